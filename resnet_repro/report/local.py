"""Runs that change no table (the demo, smoke runs, custom compositions no run record holds): the report
shows them without touching the repository's files.

By default the files under --out and the README are computed from the runs that change a table (counting
and indicative runs, counting re-tests) and the runs the run records already hold, so a clone's tracked
files change only when a table does. Every other run goes to the local folder (--local-out, default
outputs/report/, which git ignores): runs.csv (every run and why it does or does not count), runs.md (the
runs that change no table) and their curves under curves/runs/. `--all-runs` writes them under --out.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from pathlib import Path

import pandas as pd

from resnet_repro.report import curves, markdown, render, select
from resnet_repro.report.markdown import DASH, fmt
from resnet_repro.report.records import Record
from resnet_repro.rows import find_row

LOCAL_OUT = "outputs/report"


def split(records: Sequence[Record], record_files: Mapping[str, Path]) -> tuple[list[Record], list[Record]]:
    """(runs for the repository's files, runs that change no table and no record holds)."""
    frame = select.runs_frame(records)
    table = set(frame["run_id"][frame["counts"].astype(bool) | frame["indicative"].astype(bool)])
    shared = [r for r in records if r["run_id"] in table or r["run_id"] in record_files]
    kept = {r["run_id"] for r in shared}
    return shared, [r for r in records if r["run_id"] not in kept]


def runs_markdown(frame: pd.DataFrame, links: render.Links) -> str:
    head = "# Runs that change no table (not in results/ or the README; --all-runs writes them there)"
    lines = [
        {
            "Run": f"`{run['run_id']}`",
            "Row": f"`{run['row'] or DASH}`",
            "Type": run["run_type"] or DASH,
            "Status": run["status"],
            "Epochs": f"{run['epochs']} of {run['recipe_epochs']}" if run["epochs"] != "" else DASH,
            "Top-1 (%)": fmt(run["top1"]),
            "Why it does not count": run["reason"],
            "Curves": f"[curves]({links.run_curves(run['run_id'])})" if run["has_curves"] else DASH,
        }
        for _, run in frame.iterrows()
    ]
    return f"{head}\n\n{markdown.table(pd.DataFrame(lines))}\n" if lines else f"{head}\n\nNone.\n"


def files(everything: Sequence[Record], local: Sequence[Record], folder: Path) -> dict[Path, bytes]:
    """The local folder's files: every run's runs.csv, the local runs' list and curves."""
    frame = select.runs_frame(local)
    out = {folder / "runs.csv": render.runs_csv(select.runs_frame(everything))}
    out[folder / "runs.md"] = runs_markdown(frame, render.Links(folder, folder, {})).encode()
    by_id = {r["run_id"]: r for r in local}
    for run_id, row in frame[frame["has_curves"].astype(bool)][["run_id", "row"]].itertuples(index=False):
        out[folder / "curves" / "runs" / f"{run_id}.png"] = curves.run_png(by_id[run_id], find_row(row))
    return out
