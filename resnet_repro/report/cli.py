"""`python -m resnet_repro.report`: read the runs (MLflow store and run records), export records, write the
tables, figures and README section.

The report only reads the store: a store given with --tracking-uri that is missing, empty, not MLflow's or
unreachable is a one-line error (exit 2), never a new store. Without --tracking-uri it reads ./mlflow.db
when there is one, else the run records alone (a fresh clone). With no run from either source it changes
no existing file (exit 1 if one would change) unless --allow-empty: a wrong directory or URI must not wipe
the results.

Written files go under the current directory's results/ (--out); the README is updated only in the
repository (./README.md with the results markers) or where --readme says. Runs that change no table go to
outputs/report/ instead (report.local; --all-runs: under --out too), so a clone's tracked files change only
when a table does. The first lines printed say where each figure went. `--compare RUN [RUN ...]` draws
several runs in one figure and prints what differs between them (report.compare), writing nothing else.
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path

import pandas as pd

from resnet_repro import tracking
from resnet_repro.errors import UserError, exit_with
from resnet_repro.report import compare, curves, local, outputs, published, records, render, select
from resnet_repro.report.records import Record
from resnet_repro.rows import SECTIONS, all_rows, find_row
from resnet_repro.tracking import store

DEFAULT_EXPERIMENT = "resnet_repro"  # conf/tracking/default.yaml: experiment


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        prog="python -m resnet_repro.report",
        description="Rebuild the result tables (results/, the README's results section) from the MLflow store "
        "and the run records in results/logs.",
    )
    parser.add_argument(
        "--tracking-uri", help="MLflow store to read (default: ./mlflow.db when it exists, else the records only)"
    )
    parser.add_argument("--experiment", default=DEFAULT_EXPERIMENT, help="MLflow experiment name")
    parser.add_argument("--out", default="results", help="folder for the tables, runs.csv and curves/ (of the cwd)")
    parser.add_argument(
        "--runs",
        help="run records read beside the store and written by --export (default: <out>/logs; none: no records)",
    )
    parser.add_argument(
        "--export",
        nargs="?",
        const="rows",
        choices=records.EXPORT_SCOPES,
        help="write the store's finished runs as records: rows (the default) = every training run of the 22 table "
        "rows, counting or not (smoke runs too), and their evaluation runs; all = custom compositions too",
    )
    parser.add_argument(
        "--readme", help="README whose results section is rewritten (default: ./README.md if it has one)"
    )
    parser.add_argument("--no-readme", action="store_true", help="write results/ only")
    parser.add_argument(
        "--allow-empty",
        action="store_true",
        help="with no run at all, still rewrite existing tables (published numbers only); without it, exit 1 "
        "instead of changing a file",
    )
    parser.add_argument(
        "--all-runs",
        action="store_true",
        help="also write the runs that change no table (smoke, demo, custom) under --out; default: --local-out",
    )
    parser.add_argument(
        "--local-out",
        default=local.LOCAL_OUT,
        help="folder (of the cwd) for the runs that change no table: runs.csv, runs.md, curves/runs/ "
        "(default: outputs/report, ignored by git)",
    )
    parser.add_argument(
        "--compare",
        nargs="+",
        metavar="RUN",
        help="draw these runs in one figure (in --local-out) and print what differs between them; a RUN is a run "
        "id (or a unique prefix), a run name, or a sweep (its folder, or its own run's id or name)",
    )
    parser.add_argument(
        "--keys",
        nargs="+",
        default=list(compare.DEFAULT_KEYS),
        help=f"with --compare: the per-epoch metrics to draw, one panel each (default: "
        f"{' '.join(compare.DEFAULT_KEYS)}; any of {', '.join(records.EPOCH_KEYS)})",
    )
    parser.add_argument("--legend", nargs="+", help="with --compare: one label per run (default: their run names)")
    parser.add_argument(
        "--fetch-logs",
        action="store_true",
        help="download mmpretrain's published training logs of the rows with curves into torch.hub's cache "
        "(default: read the cache only)",
    )
    return parser.parse_args(argv)


# ---- reading ----------------------------------------------------------------------------------
def read_store(uri: str | None, experiment: str) -> list[Record]:
    """The store's runs as records; [] when no store was given and ./mlflow.db does not exist."""
    if uri is None:
        uri = tracking.default_uri()
        if store.store_missing(uri):
            return []
    uri = tracking.resolve_uri(uri)
    store.check_store(uri)
    histories = (*records.EPOCH_KEYS, *(f"step/{k}" for k in records.STEP_KEYS))
    runs = store.read_runs(uri, experiment, histories=histories, artifact=records.CONFIG_ARTIFACT)
    return [records.from_store(run) for run in runs]


def records_dir(args: argparse.Namespace) -> Path | None:
    if args.runs is None:
        return Path(args.out) / "logs"
    return None if args.runs.lower() in ("none", "") else Path(args.runs)


@dataclass(frozen=True)
class Runs:
    """The runs to report, each once, and where they came from."""

    records: list[Record]
    files: dict[str, Path]  # run id -> its record file, for the runs that have one
    from_store: int
    from_files: int
    exported: int
    sweeps: list[Record]  # sweeps' own runs (run_type=sweep): they hold no result, only their jobs


def collect(args: argparse.Namespace) -> Runs:
    """Read the store and the records folder; with --export, write the store's runs as records first."""
    runs_dir = records_dir(args)
    if args.export and runs_dir is None:
        raise UserError("--export writes run records: give a folder with --runs (or leave --runs out)")
    read = read_store(args.tracking_uri, args.experiment)
    sweeps = [r for r in read if r["tags"].get("run_type") == "sweep"]
    from_store = [r for r in read if r["tags"].get("run_type") != "sweep"]
    from_files = records.load_dir(runs_dir, args.experiment) if runs_dir is not None and runs_dir.is_dir() else []
    exported = records.export(from_store, runs_dir, args.export) if args.export and runs_dir is not None else []
    merged = records.merge(from_store, from_files)
    paths = {} if runs_dir is None else {r["run_id"]: runs_dir / records.relative_path(r) for r in merged}
    on_disk = {run_id: path for run_id, path in paths.items() if path.is_file()}
    return Runs(merged, on_disk, len(from_store), len(from_files), len(exported), sweeps)


# ---- building ---------------------------------------------------------------------------------
def curve_files(frame: pd.DataFrame, by_id: Mapping[str, Record], out: Path, fetch: bool) -> dict[Path, bytes]:
    """Each row's curves (rows with counting runs) and each run's curves (every run with epochs)."""
    files = {}
    for row in all_rows():
        runs = [by_id[run_id] for run_id in select.of_row(frame, "train", row.name)["run_id"]]
        if runs:
            log, note = published.find(row, int(float(runs[0]["params"]["recipe.epochs"])), fetch)
            if fetch and note:
                print("resnet_repro.report:", " ".join(note.splitlines()), file=sys.stderr)
            files[out / "curves" / f"{row.name}.png"] = curves.row_png(row, runs, log, note)
    for run_id, row_name in frame[frame["has_curves"].astype(bool)][["run_id", "row"]].itertuples(index=False):
        row = find_row(row_name)
        files[out / "curves" / "runs" / f"{run_id}.png"] = curves.run_png(by_id[run_id], row)
    return files


def build(
    frame: pd.DataFrame,
    by_id: Mapping[str, Record],
    record_files: Mapping[str, Path],
    args: argparse.Namespace,
    readme: Path | None,
) -> dict[Path, bytes]:
    """Every output file and its bytes."""
    out = Path(args.out)
    files: dict[Path, bytes] = {out / "runs.csv": render.runs_csv(frame)}
    files |= curve_files(frame, by_id, out, args.fetch_logs)
    local = render.Links(out, out, record_files)
    for section in SECTIONS:
        text = render.section_markdown(section, frame, local, "#", with_others=True)
        files[out / f"{render.section_slug(section)}.md"] = text.encode()
    files[out / render.OTHER_RUNS] = render.other_runs_markdown(frame, local).encode()
    if readme is not None:
        content = render.readme_section(frame, render.Links(readme.parent, out, record_files), args.experiment)
        text = outputs.replace_section(readme.read_text(encoding="utf-8"), content, str(readme))
        files[readme] = text.encode()
    return files


# ---- printing ---------------------------------------------------------------------------------
def summary(frame: pd.DataFrame, runs: Runs, readme: Path | None) -> str:
    train = frame[frame["run_type"] == "train"]
    counted, indicative = int(train["counts"].sum()), int(train["indicative"].sum())
    everything = len(runs.records)
    lines = [
        f"{everything} runs ({runs.from_store} from the MLflow store, {runs.from_files} from run records, each once): "
        f"{counted} training runs count, {indicative} indicative, {everything - counted - indicative} others"
    ]
    for _, run in select.not_finished(frame).iterrows():  # RUNNING after its process died stays RUNNING: name it
        lines.append(f"not finished ({run['status']}): {run['run_id']} `{run['row']}` started {run['start_time']}")
    lines.append(f"README: {readme}" if readme else "README: not updated (no README.md with the results markers here)")
    return "\n".join(lines)


def refuse_empty(files: Mapping[Path, bytes], allow: bool, others: int = 0) -> bool:
    """With no run for the tables: True (and why, on stderr) when writing would change an existing file."""
    changed = [str(path) for path, data in files.items() if path.exists() and outputs.changes(path, data)]
    if allow or not changed:
        return False
    none = f"none of the {others} runs changes a table" if others else "no runs in the store or the run records"
    print(
        f"resnet_repro.report: {none}: wrote nothing there, {len(changed)} existing files would change "
        "(--allow-empty rewrites them with the published numbers only)",
        file=sys.stderr,
    )
    return True


def compare_runs(args: argparse.Namespace, runs: Runs) -> int:
    """--compare: one figure of the runs' curves (in --local-out) and the table of their differences."""
    chosen = compare.resolve(args.compare, runs.records, runs.sweeps)
    names = compare.labels(chosen, args.legend)
    png = compare.figure(chosen, names, args.keys)
    path = compare.figure_path(Path(args.local_out), chosen)
    print(f"figure: {path} ({len(chosen)} run{'s' if len(chosen) != 1 else ''}: {' '.join(args.keys)})")
    print(compare.differences(chosen, names, runs.records).to_markdown(index=False))
    outputs.write_if_changed(path, png)
    return 0


def run(args: argparse.Namespace) -> int:
    readme = None if args.compare else outputs.readme_path(args.readme, args.no_readme)  # fails before reading
    runs = collect(args)
    if args.compare:
        return compare_runs(args, runs)
    by_id = {r["run_id"]: r for r in runs.records}
    shared, mine = (runs.records, []) if args.all_runs else local.split(runs.records, runs.files)
    frame = select.runs_frame(shared)
    files = build(frame, by_id, runs.files, args, readme)
    local_files = local.files(runs.records, mine, Path(args.local_out)) if mine else {}
    for path in sorted(p for p in [*files, *local_files] if p.suffix == ".png"):  # where each figure goes, first
        print(f"figure: {path}")
    for section in SECTIONS:
        print(files[Path(args.out) / f"{render.section_slug(section)}.md"].decode())
    print(files[Path(args.out) / render.OTHER_RUNS].decode())
    print(summary(frame, runs, readme))
    if mine:
        print(local_files[Path(args.local_out) / "runs.md"].decode())
        print(
            f"{len(mine)} runs change no table: listed in {Path(args.local_out) / 'runs.md'}, their curves under "
            f"{Path(args.local_out) / 'curves' / 'runs'}, every run in {Path(args.local_out) / 'runs.csv'} "
            f"(--all-runs writes them under {args.out})"
        )
    if args.export:
        print(f"{runs.exported} run records exported (--export {args.export})")
    for path, data in local_files.items():
        outputs.write_if_changed(path, data)
    if not shared and refuse_empty(files, args.allow_empty, len(mine)):
        return 1
    changed = [str(path) for path, data in files.items() if outputs.write_if_changed(path, data)]
    print(f"{len(changed)} of {len(files)} files changed" + (f": {', '.join(changed)}" if changed else ""))
    return 0


def main(argv: Sequence[str] | None = None) -> int:
    args = parse_args(argv)
    try:
        return run(args)
    except UserError as err:
        exit_with(err)
