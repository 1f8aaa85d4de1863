"""The report's figures, drawn from run records with matplotlib's Figure API (no pyplot global state).

- a row's curves (results/curves/<row>.png): val top-1 and train loss per epoch of each counting run
  (seed) and their mean, beside mmpretrain's published training log when it is in the cache;
- a run's curves (results/curves/runs/<run_id>.png), for every training run, counting or not: val
  top-1/top-5, train loss and learning rate per epoch, the published numbers as horizontal lines.
PNGs are written without a timestamp or software version, so the same records give the same bytes.
"""

from __future__ import annotations

import io
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


def _integer_epochs(*axes: Any) -> None:
    for ax in axes:
        ax.xaxis.set_major_locator(MaxNLocator(integer=True))
        ax.set_xlabel("epoch")


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
        loss_ax.legend(fontsize="x-small")
    else:
        loss_ax.text(0.98, 0.96, note, transform=loss_ax.transAxes, ha="right", va="top", fontsize="x-small")
    top1_ax.axhline(row.top1_table, **PUBLISHED, label=f"published {row.top1_table:.2f}")
    top1_ax.set(ylabel="val top-1 (%)", title="val top-1")
    loss_ax.set(ylabel="train loss", title="train loss")
    _integer_epochs(top1_ax, loss_ax)
    top1_ax.legend(fontsize="x-small", loc="lower right")
    fig.suptitle(row.name)
    return _png(fig)


def run_png(record: Record, row: Row | None) -> bytes:
    """One run's val top-1/top-5, train loss and learning rate per epoch."""
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
    loss_ax.plot(_series(record, "train_loss"), marker=".")
    lr_ax.plot(_series(record, "lr"), marker=".")
    acc_ax.set(ylabel="accuracy (%)", title="validation")
    loss_ax.set(ylabel="train loss", title="train loss")
    lr_ax.set(ylabel="learning rate", title="learning rate")
    _integer_epochs(acc_ax, loss_ax, lr_ax)
    acc_ax.legend(fontsize="x-small", loc="lower right")
    row_name = record["tags"].get("row", "") or "no row"
    fig.suptitle(f"{row_name} · run {record['run_id']} · {record['status']}")
    return _png(fig)
