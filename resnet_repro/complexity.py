"""Params and FLOPs of every table row, counted the way the table counted them.

Convention (shared/spec/complexity.md): "Flops" are multiply-accumulates as mmcv 1.x's hook counter
saw them — conv/linear MACs, BN 2 per element, every ReLU call 1 per element, pooling 1 per input
element, additions free — over the backbone and pooling only (classifier removed), on a 1x3xHxW input
(224 ImageNet, 32 CIFAR, 448 CUB). ptflops 0.7.5's pytorch backend with functional counting off
reproduces it. "Params" count the whole classifier, head included.

    python -m resnet_repro.complexity      # a progress line per row (stderr), then the 22 rows; writes
                                           # results/complexity.{md,csv}

The files go under the current directory's results/ (--out), never into the installed package's tree.
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path
from typing import TextIO

import pandas as pd
from torch import nn

from resnet_repro.config import compose_row
from resnet_repro.models import build_model_from_cfg, count_flops, count_params
from resnet_repro.report import markdown
from resnet_repro.rows import Row, all_rows

RESULTS_DIR = Path("results")  # of the current directory
MARKDOWN_COLUMNS = {  # column of complexity_table -> its header, its alignment
    "row": ("Row", "left"),
    "input_px": ("Input", "right"),
    "params_m": ("Params (M)", "right"),
    "params_m_table": ("Table params (M)", "right"),
    "flops_g": ("Flops (G)", "right"),
    "flops_g_table": ("Table flops (G)", "right"),
    "status": ("Status", "left"),
}


def row_model(row: Row) -> nn.Module:
    return build_model_from_cfg(compose_row(row.name))


def _status(row: Row, params: int, flops_g: float) -> str:
    if params != row.params_exact:
        return f"MISMATCH: params {params:,} != exact {row.params_exact:,}"
    if round(flops_g, 2) != row.flops_g_table:
        return f"MISMATCH: flops {flops_g:.4f} G vs table {row.flops_g_table}"
    if round(params / 1e6, 2) != row.params_m_table:
        return f"table error: lists {row.params_m_table} M, the model has {params:,} ({params / 1e6:.2f} M)"
    return "ok"


def complexity_table(rows: tuple[Row, ...] | None = None, progress: TextIO | None = None) -> pd.DataFrame:
    """One line per row; with `progress`, a line there as each row is counted (the 22 take minutes)."""
    records, rows = [], rows or all_rows()
    for i, row in enumerate(rows, start=1):
        start = time.perf_counter()
        model = row_model(row)
        params = count_params(model)
        flops_g = count_flops(model, row.flops_input_px) / 1e9
        records.append(
            {
                "row": row.name,
                "section": row.section,
                "input_px": row.flops_input_px,
                "params": params,
                "params_m": round(params / 1e6, 2),
                "params_m_table": row.params_m_table,
                "flops_g": round(flops_g, 4),
                "flops_g_table": row.flops_g_table,
                "status": _status(row, params, flops_g),
            }
        )
        if progress is not None:
            print(
                f"[{i}/{len(rows)}] {row.name}: {params / 1e6:.2f} M params, {flops_g:.2f} G FLOPs at "
                f"{row.flops_input_px} px, {records[-1]['status']} ({time.perf_counter() - start:.1f} s)",
                file=progress,
                flush=True,
            )
    return pd.DataFrame.from_records(records)


def to_markdown(df: pd.DataFrame) -> str:
    shown = df[list(MARKDOWN_COLUMNS)].assign(
        row="`" + df["row"] + "`",
        params_m=df["params_m"].map("{:.2f}".format),
        params_m_table=df["params_m_table"].map("{:.2f}".format),
        flops_g=df["flops_g"].map("{:.4f}".format),
        flops_g_table=df["flops_g_table"].map("{:.2f}".format),
    )
    shown.columns = [header for header, _ in MARKDOWN_COLUMNS.values()]
    return markdown.table(shown, [align for _, align in MARKDOWN_COLUMNS.values()]) + "\n"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m resnet_repro.complexity", description=__doc__.split("\n")[0])
    parser.add_argument("--out", type=Path, default=RESULTS_DIR, help="folder for complexity.md / .csv (of the cwd)")
    args = parser.parse_args(argv)
    print(f"counting {len(all_rows())} rows (a line as each is done)", file=sys.stderr, flush=True)
    df = complexity_table(progress=sys.stderr)
    print(to_markdown(df), end="")
    agree = int((df.status == "ok").sum())
    table_errors = int(df.status.str.startswith("table error").sum())
    mismatches = int(df.status.str.startswith("MISMATCH").sum())
    print(f"\n{len(df)} rows: {agree} agree, {table_errors} error(s) of the table, {mismatches} mismatch(es)")
    args.out.mkdir(parents=True, exist_ok=True)
    header = "# Params and FLOPs of every row (`python -m resnet_repro.complexity`)\n\n"
    (args.out / "complexity.md").write_text(header + to_markdown(df))
    df.to_csv(args.out / "complexity.csv", index=False, float_format="%.4f")
    return 1 if mismatches else 0


if __name__ == "__main__":
    sys.exit(main())
