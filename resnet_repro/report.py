"""`python -m resnet_repro.report`: the README's result tables, rebuilt from the MLflow store.

Which runs count. A training run counts for its table row when all of these hold:
- it is a training run of a table row: tag run_type=train and tag row names one of the 22 rows
  (custom compositions never count);
- it finished: MLflow status FINISHED (not RUNNING, FAILED or KILLED);
- it is faithful: tag faithful="true", i.e. it ran the row's exact recipe with no deviation
  (smoke runs with fewer epochs or limited batches, changed hyper-parameters, or BatchNorm over
  fewer images than the recipe are all deviations);
- it ran full length: metric epochs_completed equals param recipe.epochs;
- CIFAR rows: it read the official archives, md5-verified (tag data_verified="True"), not a copy.
Its reproduced Top-1/Top-5 is the last epoch's val_top1/val_top5 (the final model, as the published
checkpoints are; no best-epoch selection on the evaluation split). Several counting runs of one row
(seeds) are shown as mean ± sample standard deviation with n and each run's number; a row without a
counting run shows the published numbers and "—". Evaluation runs (run_type=eval, written by
`python -m resnet_repro.test`) of a table row are listed per section as checkpoint re-tests when they
finished and are faithful (the row's full test split and test transform).
Every other run is listed in results/runs.csv with the reason it does not count.

Outputs: results/<section>.md, results/runs.csv, results/curves/<row>.png (val_top1 and train_loss
per epoch of every counting run), and the README between `<!-- results:begin -->` and
`<!-- results:end -->`. Nothing in them depends on when the report ran, and unchanged files are not
rewritten, so a second call on the same store changes no byte.
"""

from __future__ import annotations

import argparse
import io
import os
import sys
from collections.abc import Sequence
from dataclasses import dataclass
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

import pandas as pd

from resnet_repro import tracking
from resnet_repro.errors import UserError, exit_with
from resnet_repro.rows import SECTIONS, Row, all_rows

DEFAULT_EXPERIMENT = "resnet_repro"  # conf/tracking/default.yaml: experiment
BEGIN, END = "<!-- results:begin -->", "<!-- results:end -->"
REPO_ROOT = Path(__file__).resolve().parents[1]
DASH = "—"
OFFICIAL_DATA_ONLY = ("cifar10", "cifar100")  # datasets whose files the loader can verify (md5)
SMOKE_KEYS = ("recipe.epochs=", "trainer.limit_train_batches=", "trainer.limit_val_batches=")
CSV_COLUMNS = [
    "run_id",
    "run_type",
    "row",
    "status",
    "counts",
    "reason",
    "top1",
    "top5",
    "epochs",
    "recipe_epochs",
    "seed",
    "config_hash",
    "start_time",
]
EXTRA_COLUMNS = ["experiment_id", "params_n", "flops_g", "checkpoint", "source_run_id", "_order", "_start_ms"]
MARKS = "¹²³⁴⁵⁶⁷⁸⁹"


# ---- which runs count ---------------------------------------------------------------------------
def _rows_by_name() -> dict[str, Row]:
    return {row.name: row for row in all_rows()}


def _num(value: Any) -> float | None:
    try:
        return float(value)
    except (TypeError, ValueError):
        return None


def _faithfulness(tags: dict[str, str]) -> list[str]:
    """Why a run is not the row's exact recipe; [] when it is."""
    if tags.get("faithful") == "true":
        return []
    deviations = [d.strip() for d in tags.get("deviations", "").split(";") if d.strip()]
    smoke = [d for d in deviations if d.startswith(SMOKE_KEYS)]
    other = [d for d in deviations if d not in smoke]
    reasons = [f"smoke: {', '.join(smoke)}"] if smoke else []
    reasons += [f"deviates: {', '.join(other)}"] if other else []
    return reasons or [f"not faithful (faithful={tags.get('faithful', 'missing')})"]


def _full_length(run: dict[str, Any]) -> list[str]:
    done, planned = _num(run["metrics"].get("epochs_completed")), _num(run["params"].get("recipe.epochs"))
    if done is None or planned is None:
        return ["not full length: epochs_completed or recipe.epochs missing"]
    return [] if done == planned else [f"not full length: {done:g} of {planned:g} epochs"]


def exclusion(run: dict[str, Any]) -> str:
    """The reason a run does not count ("" when it counts), the checks joined by "; "."""
    tags, run_type, row = run["tags"], run["tags"].get("run_type", ""), run["tags"].get("row", "")
    if run_type not in ("train", "eval"):
        return f"not a training or evaluation run (run_type={run_type or 'missing'})"
    if row.startswith("custom:"):
        return "custom composition"
    if row not in _rows_by_name():
        return f"not a table row ({row or 'no row tag'})"
    reasons = [] if run["status"] == "FINISHED" else [f"not finished ({run['status']})"]
    metric = "val_top1" if run_type == "train" else "test_top1"
    if metric not in run["metrics"]:
        reasons.append(f"no {metric}")
    reasons += _faithfulness(tags)  # an eval on a cut test split or another transform is no re-test either
    if _rows_by_name()[row].dataset in OFFICIAL_DATA_ONLY and tags.get("data_verified") != "True":
        reasons.append("data: not the md5-verified official CIFAR archives (e.g. an image-folder copy)")
    if run_type == "train" and run["status"] == "FINISHED":
        reasons += _full_length(run)
    return "; ".join(reasons)


def _start(ms: Any) -> str:
    if ms is None:
        return ""
    return datetime.fromtimestamp(int(ms) / 1000, tz=timezone.utc).strftime("%Y-%m-%d %H:%M:%S UTC")


def runs_frame(runs: Sequence[dict[str, Any]]) -> pd.DataFrame:
    """One line per run (CSV_COLUMNS plus what the tables need), in table-row order, then start time."""
    order = {name: i for i, name in enumerate(_rows_by_name())}
    records = []
    for run in runs:
        tags, params, metrics = run["tags"], run["params"], run["metrics"]
        eval_run = tags.get("run_type") == "eval"
        reason = exclusion(run)
        records.append(
            {
                "run_id": run["run_id"],
                "run_type": tags.get("run_type", ""),
                "row": tags.get("row", ""),
                "status": run["status"],
                "counts": not reason,
                "reason": reason,
                "top1": metrics.get("test_top1" if eval_run else "val_top1"),
                "top5": metrics.get("test_top5" if eval_run else "val_top5"),
                "epochs": "" if "epochs_completed" not in metrics else int(metrics["epochs_completed"]),
                "recipe_epochs": params.get("recipe.epochs", ""),
                "seed": params.get("seed", ""),
                "config_hash": tags.get("config_hash", ""),
                "start_time": _start(run.get("start_time")),
                "experiment_id": run.get("experiment_id", ""),
                "params_n": metrics.get("params"),
                "flops_g": metrics.get("flops_g"),
                "checkpoint": tags.get("checkpoint") or params.get("checkpoint", ""),
                "source_run_id": tags.get("source_run_id", ""),
                "_order": order.get(tags.get("row", ""), len(order)),
                "_start_ms": int(run.get("start_time") or 0),
            }
        )
    frame = pd.DataFrame.from_records(records, columns=[*CSV_COLUMNS, *EXTRA_COLUMNS])
    return frame.sort_values(["_order", "_start_ms", "run_id"], kind="stable").reset_index(drop=True)


def counting(frame: pd.DataFrame, run_type: str, row: str) -> pd.DataFrame:
    return frame[(frame["run_type"] == run_type) & (frame["row"] == row) & frame["counts"].astype(bool)]


# ---- numbers and cells --------------------------------------------------------------------------
def fmt(value: float | None) -> str:
    return DASH if value is None or pd.isna(value) else f"{value:.2f}"


def fmt_diff(value: float | None) -> str:
    if value is None or pd.isna(value):
        return DASH
    rounded = round(float(value), 2)
    return f"{rounded:+.2f}" if rounded != 0 else "+0.00"  # never "-0.00"


@dataclass(frozen=True)
class Links:
    """How one markdown file links out: relative paths from its folder, run pages of a server store."""

    where: Path
    curves: Path
    uri: str

    def rel(self, target: Path) -> str:
        return Path(os.path.relpath(target.resolve(), self.where.resolve())).as_posix()

    def config(self, row: Row) -> str:
        conf = REPO_ROOT / "conf" if (REPO_ROOT / "conf").is_dir() else Path("conf")  # editable install or cwd
        return self.rel(conf / "row" / f"{row.name}.yaml")

    def curve(self, row: Row) -> str:
        return self.rel(self.curves / f"{row.name}.png")


def anchor(run_id: str) -> str:
    return f"#run-{run_id}"


def reproduced(runs: pd.DataFrame, column: str) -> tuple[str, float | None]:
    """The cell (mean ± std (n: each run linked)) and the mean, over the runs that have the metric."""
    have = runs[runs[column].notna()]
    if have.empty:
        return DASH, None
    values = have[column].astype(float)
    mean = float(values.mean())
    if len(have) == 1:
        return f"[{mean:.2f}]({anchor(have['run_id'].iloc[0])})", mean
    each = ", ".join(f"[{v:.2f}]({anchor(r)})" for v, r in zip(values, have["run_id"], strict=True))
    return f"{mean:.2f} ± {float(values.std(ddof=1)):.2f} (n={len(have)}: {each})", mean


def _note(notes: list[str], text: str) -> str:
    """Register a note under the table; returns its superscript mark."""
    if text not in notes:
        notes.append(text)
    return MARKS[notes.index(text) % len(MARKS)]


def _complexity(row: Row, runs: pd.DataFrame, notes: list[str]) -> tuple[str, str]:
    """Params (M) and Flops (G): measured by the runs when there are some, else the table's."""
    params = runs["params_n"].dropna().astype(float)
    flops = runs["flops_g"].dropna().astype(float)
    p_cell = fmt(params.iloc[0] / 1e6) if len(params) else fmt(row.params_m_table)
    f_cell = fmt(flops.iloc[0]) if len(flops) else fmt(row.flops_g_table)
    exact = row.params_exact / 1e6
    if not len(params) and abs(row.params_m_table - exact) > 0.01:  # a typo in the table (resnet34: 2.18)
        text = f"The published table prints {row.params_m_table:.2f} for `{row.name}`; the model has "
        p_cell += _note(notes, text + f"{row.params_exact:,} parameters ({exact:.2f} M).")
    return p_cell, f_cell


def _pretrain(row: Row, notes: list[str]) -> str:
    shown = row.pretrain.split(" (")[0]
    return shown if shown == row.pretrain else shown + _note(notes, f"`{row.name}` Pretrain: {row.pretrain}.")


def _download(row: Row) -> str:
    log = row.checkpoint_url.rsplit(".", 1)[0] + ".json"  # the training log sits beside the checkpoint
    return f"[model]({row.checkpoint_url}) \\| [log]({log})"


def has_top5(section: str) -> bool:
    """The seed's table has a Top-5 column for this section."""
    return any(r.top5_table is not None for r in all_rows() if r.section == section)


def table_line(row: Row, frame: pd.DataFrame, links: Links, notes: list[str]) -> dict[str, str]:
    runs = counting(frame, "train", row.name)
    params, flops = _complexity(row, runs, notes)
    top1, mean1 = reproduced(runs, "top1")
    line = {
        "Model": f"`{row.name}`",
        "Pretrain": _pretrain(row, notes),
        "Params (M)": params,
        "Flops (G)": flops,
        "Top-1 (%)": top1,
        "Published Top-1 (%)": fmt(row.top1_table),
        "Δ Top-1": fmt_diff(None if mean1 is None else mean1 - row.top1_table),
    }
    if has_top5(row.section):
        top5, mean5 = reproduced(runs, "top5")
        published5 = row.top5_table
        line["Top-5 (%)"] = top5
        line["Published Top-5 (%)"] = fmt(published5)
        line["Δ Top-5"] = fmt_diff(None if mean5 is None or published5 is None else mean5 - published5)
    line["Curves"] = f"[curves]({links.curve(row)})" if len(runs) else DASH
    line["Config"] = f"[config]({links.config(row)})"
    line["Download"] = _download(row)
    return line


def column_order(section: str) -> list[str]:
    cols = ["Model", "Pretrain", "Params (M)", "Flops (G)", "Top-1 (%)"]
    cols += ["Top-5 (%)"] if has_top5(section) else []
    cols += ["Published Top-1 (%)"] + (["Published Top-5 (%)"] if has_top5(section) else [])
    cols += ["Δ Top-1"] + (["Δ Top-5"] if has_top5(section) else [])
    return [*cols, "Curves", "Config", "Download"]


def markdown_table(frame: pd.DataFrame) -> str:
    """A GitHub markdown table: the first column left-aligned, the rest centred (as in the seed)."""
    head = "| " + " | ".join(frame.columns) + " |"
    rule = "| :--- | " + " | ".join(":---:" for _ in frame.columns[1:]) + " |"
    body = ["| " + " | ".join(values) + " |" for values in frame.astype(str).itertuples(index=False, name=None)]
    return "\n".join([head, rule, *body])


# ---- sections ---------------------------------------------------------------------------------
def _checkpoint(row: Row, run: pd.Series) -> str:
    """`published`, or the file name and the training run that wrote it (no machine-specific folder)."""
    ckpt = str(run["checkpoint"] or "")
    if ckpt == row.checkpoint_url:
        return "`published`"
    name = f"`{Path(ckpt).name}`" if ckpt else DASH
    return f"{name} of run `{run['source_run_id']}`" if run["source_run_id"] else name


def retest_table(section: str, frame: pd.DataFrame) -> str:
    """Finished evaluation runs of this section's rows: a checkpoint's Top-1 beside the published one."""
    lines = []
    for row in (r for r in all_rows() if r.section == section):
        for _, run in counting(frame, "eval", row.name).iterrows():
            line = {
                "Model": f"`{row.name}`",
                "Checkpoint": _checkpoint(row, run),
                "Checkpoint re-test Top-1 (%)": f"[{run['top1']:.2f}]({anchor(run['run_id'])})",
                "Published Top-1 (%)": fmt(row.top1_table),
                "Δ Top-1": fmt_diff(float(run["top1"]) - row.top1_table),
            }
            if has_top5(section):
                line["Checkpoint re-test Top-5 (%)"] = fmt(run["top5"])
                line["Published Top-5 (%)"] = fmt(row.top5_table)
            lines.append(line)
    return markdown_table(pd.DataFrame(lines)) if lines else ""


def other_runs_table(section: str, frame: pd.DataFrame) -> str:
    """Training runs of this section's rows that do not count (smoke, unfinished, deviating), with why."""
    lines = []
    for row in (r for r in all_rows() if r.section == section):
        runs = frame[(frame["run_type"] == "train") & (frame["row"] == row.name) & ~frame["counts"].astype(bool)]
        for _, run in runs[runs["top1"].notna()].iterrows():
            line = {
                "Model": f"`{row.name}`",
                "Top-1 (%)": fmt(run["top1"]),
                "Published Top-1 (%)": fmt(row.top1_table),
                "Δ Top-1": fmt_diff(float(run["top1"]) - row.top1_table),
            }
            if has_top5(section):
                line["Top-5 (%)"] = fmt(run["top5"])
            lines.append({**line, "Why it does not count": run["reason"], "Run": f"`{run['run_id']}`"})
    return markdown_table(pd.DataFrame(lines)) if lines else ""


def _run_item(run: pd.Series, links: Links) -> str:
    page = tracking.run_page(links.uri, str(run["experiment_id"]), run["run_id"])
    ident = f"[`{run['run_id']}`]({page})" if page else f"`{run['run_id']}`"
    parts = [f'<a id="run-{run["run_id"]}"></a>{ident}', run["run_type"], f"`{run['row']}`"]
    if run["run_type"] == "train":
        parts += [f"seed {run['seed']}", f"{run['recipe_epochs']} epochs"]
    else:
        parts += [f"checkpoint `{run['checkpoint'] or DASH}`"]
    parts += [f"top-1 {fmt(run['top1'])}", f"top-5 {fmt(run['top5'])}"]
    parts += [f"config `{run['config_hash']}`"] if run["config_hash"] else []
    return "- " + " · ".join(parts + [f"started {run['start_time']}"])


def section_markdown(section: str, frame: pd.DataFrame, links: Links, level: str, with_others: bool = False) -> str:
    """A section's table; `with_others` (results/<section>.md, not the README) adds the runs that do not count."""
    notes: list[str] = []
    rows = [r for r in all_rows() if r.section == section]
    table = pd.DataFrame([table_line(r, frame, links, notes) for r in rows], columns=column_order(section))
    parts = [f"{level} Image Classification on {section}", markdown_table(table)]
    if notes:
        parts.append("\n".join(f"{MARKS[i % len(MARKS)]} {text}  " for i, text in enumerate(notes)).rstrip())
    retest = retest_table(section, frame)
    if retest:
        parts += [f"Checkpoint re-tests on {section} (`python -m resnet_repro.test`):", retest]
    names = {r.name for r in rows}
    shown = frame[frame["row"].isin(names) & frame["counts"].astype(bool)]
    if len(shown):
        parts += ["Runs behind these numbers:", "\n".join(_run_item(run, links) for _, run in shown.iterrows())]
    others = other_runs_table(section, frame) if with_others else ""
    if others:
        parts += [f"Runs on {section} that do not count:", others]
    return "\n\n".join(parts) + "\n"


def section_slug(section: str) -> str:
    return section.lower()


# ---- curves -----------------------------------------------------------------------------------
def _last_per_step(points: list[tuple[int, float]]) -> tuple[list[int], list[float]]:
    """One value per epoch (a resumed run may log an epoch twice: the later value stands)."""
    by_step = dict(points)
    steps = sorted(s for s in by_step if s >= 1)
    return steps, [by_step[s] for s in steps]


def curves_png(row: Row, runs: pd.DataFrame, uri: str) -> bytes:
    """val_top1 and train_loss per epoch, one line per counting run; PNG bytes without a timestamp."""
    from matplotlib.figure import Figure  # Agg canvas, no pyplot global state
    from matplotlib.ticker import MaxNLocator

    fig = Figure(figsize=(9, 3.5), dpi=100)
    top1_ax, loss_ax = fig.subplots(1, 2)
    for _, run in runs.iterrows():
        label = f"seed {run['seed']} ({run['run_id'][:8]})"
        top1_ax.plot(*_last_per_step(tracking.metric_history(uri, run["run_id"], "val_top1")), marker=".", label=label)
        loss_ax.plot(*_last_per_step(tracking.metric_history(uri, run["run_id"], "train_loss")), marker=".")
    top1_ax.axhline(row.top1_table, color="grey", linestyle="--", label=f"published {row.top1_table:.2f}")
    top1_ax.set(xlabel="epoch", ylabel="val top-1 (%)", title="val_top1")
    loss_ax.set(xlabel="epoch", ylabel="train loss", title="train_loss")
    for ax in (top1_ax, loss_ax):
        ax.xaxis.set_major_locator(MaxNLocator(integer=True))  # epochs
    top1_ax.legend(fontsize="small")
    fig.suptitle(row.name)
    fig.tight_layout()
    buf = io.BytesIO()
    fig.savefig(buf, format="png", metadata={"Software": None})
    return buf.getvalue()


# ---- files ------------------------------------------------------------------------------------
def write_if_changed(path: Path, data: bytes) -> bool:
    """Write only when the bytes differ, so an unchanged store leaves every file (and its mtime) alone."""
    if path.is_file() and path.read_bytes() == data:
        return False
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(data)
    return True


def replace_section(text: str, content: str, name: str) -> str:
    """The README with everything between the markers replaced by `content`."""
    start, end = text.find(BEGIN), text.find(END)
    if start < 0 or end < start:
        raise UserError(f"{name} has no results section: add the lines {BEGIN} and {END} (in this order)")
    return text[: start + len(BEGIN)] + "\n" + content + text[end:]


def check_readme(path: Path) -> str:
    if not path.is_file():
        raise UserError(f"{path}: no such file (use --no-readme to write results/ only)")
    text = path.read_text(encoding="utf-8")
    replace_section(text, "", str(path))  # fails early, before anything is written
    return text


def runs_csv(frame: pd.DataFrame) -> bytes:
    out = frame[CSV_COLUMNS].copy()
    out["counts"] = out["counts"].map(lambda c: "yes" if c else "no")
    return out.to_csv(index=False, lineterminator="\n", float_format="%.4f").encode()


def preamble(frame: pd.DataFrame, links: Links, experiment: str) -> str:
    train = frame[frame["run_type"] == "train"]
    counted = int(train["counts"].astype(bool).sum())
    store = "" if links.uri.startswith("sqlite:") else f" in `{links.uri}`"
    return (
        f"Generated by `python -m resnet_repro.report` from MLflow experiment `{experiment}`{store}: "
        f"{counted} of {len(train)} training runs count (finished, faithful to the row's recipe, full length); "
        f"every run and why it does or does not count: [runs.csv]({links.rel(links.curves.parent / 'runs.csv')}). "
        "Top-1/Top-5: this project's runs (last epoch; mean ± std over seeds, each run linked); "
        "Δ = reproduced − published; — = no counting run yet.\n"
    )


def build(frame: pd.DataFrame, uri: str, experiment: str, out: Path, readme: Path | None) -> dict[Path, bytes]:
    """Every output file and its bytes."""
    curves = out / "curves"
    files: dict[Path, bytes] = {out / "runs.csv": runs_csv(frame)}
    for row in all_rows():
        runs = counting(frame, "train", row.name)
        if len(runs):
            files[curves / f"{row.name}.png"] = curves_png(row, runs, uri)
    local = Links(out, curves, uri)
    for section in SECTIONS:
        text = section_markdown(section, frame, local, "#", with_others=True)
        files[out / f"{section_slug(section)}.md"] = text.encode()
    if readme is not None:
        links = Links(readme.parent, curves, uri)
        body = [preamble(frame, links, experiment)]
        body += [section_markdown(s, frame, links, "###") for s in SECTIONS]
        content = "\n".join(body)
        files[readme] = replace_section(readme.read_text(encoding="utf-8"), content, str(readme)).encode()
    return files


def load_frame(uri: str, experiment: str) -> pd.DataFrame:
    if tracking.store_missing(uri):
        print(f"no MLflow store at {uri}: showing the published numbers", file=sys.stderr)
        return runs_frame([])
    return runs_frame(tracking.read_runs(uri, experiment))


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        prog="python -m resnet_repro.report",
        description="Rebuild the result tables (results/, README section) from the MLflow store.",
    )
    parser.add_argument("--tracking-uri", default=None, help="MLflow store (default: sqlite:///<cwd>/mlflow.db)")
    parser.add_argument("--experiment", default=DEFAULT_EXPERIMENT, help="MLflow experiment name")
    parser.add_argument("--out", default="results", help="folder for <section>.md, runs.csv and curves/")
    parser.add_argument("--readme", default="README.md", help="README whose results section is rewritten")
    parser.add_argument("--no-readme", action="store_true", help="write results/ only")
    return parser.parse_args(argv)


def main(argv: Sequence[str] | None = None) -> int:
    args = parse_args(argv)
    uri = tracking.resolve_uri(args.tracking_uri)
    readme = None if args.no_readme else Path(args.readme)
    try:
        if readme is not None:
            check_readme(readme)
    except UserError as err:
        exit_with(err)
    frame = load_frame(uri, args.experiment)
    files = build(frame, uri, args.experiment, Path(args.out), readme)
    for section in SECTIONS:
        print(files[Path(args.out) / f"{section_slug(section)}.md"].decode())
    changed = [str(path) for path, data in files.items() if write_if_changed(path, data)]
    print(f"{len(changed)} of {len(files)} files changed" + (f": {', '.join(changed)}" if changed else ""))
    return 0


if __name__ == "__main__":
    sys.exit(main())
