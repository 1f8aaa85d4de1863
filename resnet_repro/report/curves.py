"""The report's figures, drawn from run records with matplotlib's Figure API (no pyplot global state).

- a row's curves (results/curves/<row>.png): val top-1 and train loss per epoch of each counting run
  (seed) and their mean, beside mmpretrain's published training log when it is in the cache;
- a run's curves (results/curves/runs/<run_id>.png), for every training run, counting or not: val
  top-1/top-5, train loss per epoch and at each logged step, and the learning rate, the published numbers
  as horizontal lines.
PNGs are written without a timestamp or software version, so the same records give the same bytes.
"""

from __future__ import annotations

import io
import math
from collections.abc import Sequence
from typing import Any

import pandas as pd
from matplotlib.figure import Figure
from matplotlib.ticker import MaxNLocator

from resnet_repro.report.published import PublishedLog
from resnet_repro.report.records import Record
from resnet_repro.rows import Row

PUBLISHED = {"color": "grey", "linestyle": "--", "linewidth": 1}
LOG = {"color": "crimson", "linestyle": ":", "linewidth": 2}


def _png(fig: Figure) -> bytes:
    # fixed margins: tight_layout would draw every figure twice, and the report draws one per run
    fig.subplots_adjust(left=0.07, right=0.98, bottom=0.14, top=0.86, wspace=0.28)
    buf = io.BytesIO()
    fig.savefig(buf, format="png", metadata={"Software": None})
    return buf.getvalue()


def epochs_frame(record: Record) -> pd.DataFrame:
    """The record's per-epoch metrics, indexed by epoch."""
    return pd.DataFrame.from_records(record["epochs"]).set_index("epoch") if record["epochs"] else pd.DataFrame()


def _series(record: Record, key: str) -> pd.Series:
    frame = epochs_frame(record)
    return frame[key].dropna() if key in frame else pd.Series(dtype=float)


def steps_per_epoch(record: Record) -> float | None:
    """Optimizer steps of one epoch (param steps_per_epoch; older runs: the train split over the global batch)."""
    params = record["params"]
    try:
        if params.get("steps_per_epoch"):
            return float(params["steps_per_epoch"])
        steps = math.ceil(float(params["num_train"]) / float(params["batch_global"]))
        limit = params.get("trainer.limit_train_batches")
        return float(min(steps, int(float(limit))) if limit not in (None, "", "None") else steps)
    except (KeyError, TypeError, ValueError, ZeroDivisionError):
        return None


def step_series(record: Record, key: str = "train_loss") -> pd.Series:
    """A step metric (logged every trainer.log_every_n_steps) on the epoch axis: step 45 of 45 is epoch 1.0."""
    per_epoch = steps_per_epoch(record)
    points = [(s["step"], s[key]) for s in record.get("steps") or [] if s.get(key) is not None]
    if not per_epoch or not points:
        return pd.Series(dtype=float)
    return pd.Series([v for _, v in points], index=[step / per_epoch for step, _ in points])


def _integer_epochs(*axes: Any) -> None:
    for ax in axes:
        ax.xaxis.set_major_locator(MaxNLocator(integer=True))
        ax.set_xlabel("epoch")
        ax.grid(True, alpha=0.3)


def _legend(ax: Any, **kwargs: Any) -> None:
    """A legend that reads: small but not tiny, framed, off the curves where matplotlib finds room."""
    if ax.get_legend_handles_labels()[0]:
        ax.legend(fontsize="small", framealpha=0.9, **kwargs)


def row_png(row: Row, records: Sequence[Record], log: PublishedLog | None, note: str) -> bytes:
    """A row's counting runs (each seed, and their mean when there are several) against mmpretrain's log."""
    fig = Figure(figsize=(10, 4), dpi=100)
    top1_ax, loss_ax = fig.subplots(1, 2)
    top1 = {}
    for record in records:
        label = f"seed {record['params'].get('seed', '?')} ({record['run_id'][:8]})"
        top1[record["run_id"]] = _series(record, "val_top1")
        top1_ax.plot(top1[record["run_id"]], marker=".", linewidth=1, alpha=0.7, label=label)
        loss_ax.plot(_series(record, "train_loss"), marker=".", linewidth=1, alpha=0.7)
    if len(records) > 1:
        top1_ax.plot(pd.concat(top1, axis=1).mean(axis=1), color="black", linewidth=2, label="mean over seeds")
    if log is not None:
        top1_ax.plot(log.val["top1"], **LOG, label="mmpretrain's log")
        loss_ax.plot(log.train_loss, **LOG, label="mmpretrain's log")
        _legend(loss_ax)
    else:
        loss_ax.text(0.98, 0.96, note, transform=loss_ax.transAxes, ha="right", va="top", fontsize="x-small")
    top1_ax.axhline(row.top1_table, **PUBLISHED, label=f"published {row.top1_table:.2f}")
    top1_ax.set(ylabel="val top-1 (%)", title="val top-1")
    loss_ax.set(ylabel="train loss", title="train loss")
    _integer_epochs(top1_ax, loss_ax)
    _legend(top1_ax, loc="lower right")
    fig.suptitle(row.name)
    return _png(fig)


def run_png(record: Record, row: Row | None) -> bytes:
    return _png(run_figure(record, row))


def run_figure(record: Record, row: Row | None) -> Figure:
    """One run's val top-1/top-5, train loss (per epoch and at each logged step) and learning rate per epoch."""
    fig = Figure(figsize=(13, 3.6), dpi=100)
    acc_ax, loss_ax, lr_ax = fig.subplots(1, 3)
    for key, label in (("val_top1", "val top-1"), ("val_top5", "val top-5")):
        series = _series(record, key)
        if len(series):
            acc_ax.plot(series, marker=".", label=label)
    if row is not None:
        acc_ax.axhline(row.top1_table, **PUBLISHED, label=f"published top-1 {row.top1_table:.2f}")
        if row.top5_table is not None:
            acc_ax.axhline(row.top5_table, color="silver", linestyle="--", linewidth=1, label="published top-5")
    steps = step_series(record)
    if len(steps):
        loss_ax.plot(steps, linewidth=0.8, alpha=0.6, color="tab:blue", label="logged steps (running mean)")
    loss_ax.plot(_series(record, "train_loss"), marker="o", color="tab:orange", label="epoch mean")
    lr_ax.plot(_series(record, "lr"), marker=".")
    acc_ax.set(ylabel="accuracy (%)", title="validation")
    loss_ax.set(ylabel="train loss", title="train loss")
    lr_ax.set(ylabel="learning rate", title="learning rate")
    _integer_epochs(acc_ax, loss_ax, lr_ax)
    _legend(acc_ax, loc="lower right")
    _legend(loss_ax, loc="upper right")
    row_name = record["tags"].get("row", "") or "no row"
    fig.suptitle(f"{row_name} · run {record['run_id']} · {record['status']}")
    return fig
