"""`python -m resnet_repro.report --compare RUN [RUN ...]`: several runs in one figure (val top-1, train loss
and learning rate per epoch, or `--keys`) and a small table of what differs between them (config keys,
final metrics), like mmpretrain's `tools/analysis_tools/analyze_logs.py plot_curve --keys ... --legend ...`.

A RUN is a run id (or a unique prefix of one, 6 characters at least), a run name as MLflow shows it, or a
sweep: its folder (as the sweep's summary prints it) or its own MLflow run's id or name, which stands for the
training runs of its jobs.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import pandas as pd
from matplotlib.figure import Figure

from resnet_repro.errors import UserError
from resnet_repro.report import curves
from resnet_repro.report.records import EPOCH_KEYS, Record

DEFAULT_KEYS = ("val_top1", "train_loss", "lr")
TITLES = {
    "val_top1": "val top-1 (%)",
    "val_top5": "val top-5 (%)",
    "train_loss": "train loss",
    "lr": "learning rate",
    "epoch_time_s": "epoch time (s)",
    "train_img_per_s": "train img/s",
}
MIN_PREFIX = 6


# ---- which runs -------------------------------------------------------------------------------
def resolve(names: Sequence[str], records: Sequence[Record], sweeps: Sequence[Record]) -> list[Record]:
    """The runs the names stand for, in the order given, each once."""
    chosen: dict[str, Record] = {}
    for name in names:
        for record in _matches(name, records, sweeps):
            chosen.setdefault(record["run_id"], record)
    return list(chosen.values())


def _matches(name: str, records: Sequence[Record], sweeps: Sequence[Record]) -> list[Record]:
    exact = [r for r in records if r["run_id"] == name]
    if exact:
        return exact
    folder = _sweep_folder(name, records, sweeps)
    if folder is not None:
        jobs = [r for r in records if r["tags"].get("sweep") == folder and r["tags"].get("run_type") == "train"]
        if not jobs:
            raise UserError(f"sweep {folder} has no training runs in this store or the run records")
        return jobs
    named = [r for r in records if r.get("run_name") == name]
    if len(named) == 1:
        return named
    if len(named) > 1:
        ids = ", ".join(r["run_id"] for r in named[:4])
        raise UserError(f"{len(named)} runs are named {name!r} ({ids}, ...); give run ids")
    prefixed = [r for r in records if len(name) >= MIN_PREFIX and r["run_id"].startswith(name)]
    if len(prefixed) == 1:
        return prefixed
    raise UserError(
        f"no run {name!r} (a run id, a unique id prefix of {MIN_PREFIX}+ characters, a run name, or a sweep's "
        "folder or run); `python -m resnet_repro.report` lists the runs in runs.csv"
    )


def _sweep_folder(name: str, records: Sequence[Record], sweeps: Sequence[Record]) -> str | None:
    """The sweep folder `name` stands for: the sweep's own run (id or name), or the folder its jobs are tagged with."""
    for sweep in sweeps:
        if name in (sweep["run_id"], sweep.get("run_name")):
            return str(sweep["tags"].get("sweep", ""))
    folders = {str(r["tags"]["sweep"]) for r in records if r["tags"].get("sweep")}
    return next((folder for folder in sorted(folders) if _same_folder(name, folder)), None)


def _same_folder(a: str, b: str) -> bool:
    return bool(a) and Path(a).resolve() == Path(b).resolve()


# ---- the table of differences -----------------------------------------------------------------
def _flat(node: Mapping[str, Any], prefix: str = "") -> dict[str, str]:
    """{"recipe.optimizer.lr": "0.1", ...} as text, lists as JSON: what MLflow's params hold, so a config read
    from config.yaml and one read from the params (runs without the artifact) compare equal."""
    out: dict[str, str] = {}
    for key, value in node.items():
        if isinstance(value, Mapping):
            out |= _flat(value, f"{prefix}{key}.")
        else:
            out[f"{prefix}{key}"] = json.dumps(value) if isinstance(value, list) else str(value)
    return out


def labels(records: Sequence[Record], legend: Sequence[str] | None = None) -> list[str]:
    """`--legend`, else each run's name (with its id's start where names repeat), else its id's start."""
    if legend:
        if len(legend) != len(records):
            raise UserError(f"--legend gives {len(legend)} labels for {len(records)} runs; give one per run")
        return list(legend)
    names = [r.get("run_name") or r["run_id"][:8] for r in records]
    return [f"{n} ({r['run_id'][:8]})" if names.count(n) > 1 else n for n, r in zip(names, records, strict=True)]


def _last(record: Record, key: str) -> Any:
    values = [e[key] for e in record["epochs"] if e.get(key) is not None]
    return values[-1] if values else None


def _test_top1(record: Record, everything: Sequence[Record]) -> Any:
    """A run's test top-1: its own (an evaluation run), else that of the latest evaluation of its checkpoints
    (`resnet_repro.test` tags those `source_run_id`)."""
    if record["metrics"].get("test_top1") is not None:
        return record["metrics"]["test_top1"]
    evals = [r for r in everything if r["tags"].get("source_run_id") == record["run_id"] and r["status"] == "FINISHED"]
    latest = max(evals, key=lambda r: r.get("start_time") or 0, default=None)
    return None if latest is None else latest["metrics"].get("test_top1")


def differences(records: Sequence[Record], names: Sequence[str], everything: Sequence[Record] = ()) -> pd.DataFrame:
    """One line per config key whose value differs between the runs, then each run's final numbers
    (`everything`: the records to find the runs' evaluations in)."""
    flats = [_flat(r["config"]) for r in records]
    keys = sorted({k for f in flats for k in f})
    lines = [{"": k, **{n: f.get(k, "—") for n, f in zip(names, flats, strict=True)}} for k in keys]
    lines = [line for line in lines if len({line[n] for n in names}) > 1]
    finals = {
        "status": lambda r: r["status"],
        "epochs": lambda r: len(r["epochs"]),
        "last val top-1": lambda r: _fmt(_last(r, "val_top1")),
        "best val top-1": lambda r: _fmt(r["metrics"].get("best_val_top1")),
        "last train loss": lambda r: _fmt(_last(r, "train_loss"), 4),
        "test top-1": lambda r: _fmt(_test_top1(r, everything)),
        "run id": lambda r: r["run_id"],
    }
    lines += [{"": what, **{n: get(r) for n, r in zip(names, records, strict=True)}} for what, get in finals.items()]
    return pd.DataFrame(lines, columns=["", *names])


def _fmt(value: Any, digits: int = 2) -> str:
    return "—" if value is None else f"{float(value):.{digits}f}"


# ---- the figure -------------------------------------------------------------------------------
def figure(records: Sequence[Record], names: Sequence[str], keys: Sequence[str]) -> bytes:
    """One panel per key, one line per run (train loss: also its logged steps, faint)."""
    unknown = [k for k in keys if k not in EPOCH_KEYS]
    if unknown:
        raise UserError(f"--keys {', '.join(unknown)}: not a per-epoch metric; allowed: {', '.join(EPOCH_KEYS)}")
    fig = Figure(figsize=(4.4 * len(keys), 3.8), dpi=100)
    axes = fig.subplots(1, len(keys), squeeze=False)[0]
    colors = [f"C{i % 10}" for i in range(len(records))]
    for ax, key in zip(axes, keys, strict=True):
        for record, name, color in zip(records, names, colors, strict=True):
            if key == "train_loss":
                steps = curves.step_series(record)
                if len(steps):
                    ax.plot(steps, color=color, linewidth=0.7, alpha=0.35)
            ax.plot(curves._series(record, key), marker=".", color=color, label=name)
        ax.set(title=TITLES.get(key, key), ylabel=TITLES.get(key, key))
    curves._integer_epochs(*axes)
    curves._legend(axes[0], loc="best")
    fig.suptitle(f"{len(records)} runs compared")
    return curves._png(fig)


def figure_path(folder: Path, records: Sequence[Record]) -> Path:
    """The figure's file: named by the runs it shows, so another comparison does not overwrite it."""
    digest = hashlib.sha1(" ".join(r["run_id"] for r in records).encode()).hexdigest()[:10]
    return folder / f"compare-{digest}.png"
