"""Which runs count, which are only indicative, and the verdict per row: the report's rules, apart from how
they are drawn.

A training run counts for its table row when all of these hold:
- it is a training run of a table row: tag run_type=train and tag row names one of the 22 rows
  (custom compositions never count);
- it finished: status FINISHED (not RUNNING, FAILED or KILLED);
- it is faithful: tag faithful="true", i.e. it ran the row's exact recipe with no deviation
  (smoke runs with fewer epochs or limited batches, changed hyper-parameters, or BatchNorm over
  fewer images than the recipe are all deviations), and it validated on the whole split (val_limited);
- it ran full length: metric epochs_completed equals param recipe.epochs;
- CIFAR rows: it read the official archives, md5-verified (tag data_verified="true"), not a copy.
The deviations are read as the records the run wrote (identity.read_deviations: the tag's JSON, or the words of
runs recorded before), each with its reason: a shortened run (smoke), other data, or another recipe.
Its Top-1/Top-5 is the last epoch's val_top1/val_top5 (the final model, as the published checkpoints
are; no best-epoch selection on the evaluation split).

A training run is indicative when the data is all that keeps it from counting (an image-folder/JPEG copy
of CIFAR, data not md5-verified): the tables show it apart, never as a reproduction.

Verdict per row and metric, over the counting runs (seeds): `reproduced` when |mean Δ| <= max(0.3,
2 × sample std over seeds), the std only with two seeds or more (0.3 points is ImageNet's seed-to-seed
noise, pytorch/vision#4115); otherwise `not reproduced (Δ -0.84)`; `—` without a counting run.

A training run of the same config, seed and data as a counting run that started earlier (tags config_hash and
data_fingerprint) does not count: one experiment is counted once.

Cost: device-hours of a row's counting runs, the sum of epoch_time_s × world_size / 3600.
"""

from __future__ import annotations

import statistics
from collections.abc import Mapping, Sequence
from datetime import datetime, timezone
from typing import Any

import pandas as pd

from resnet_repro.identity import DATA, SMOKE, Deviation, read_deviations, read_flag
from resnet_repro.report.records import Record, row_of
from resnet_repro.rows import Row, rows_by_name

OFFICIAL_DATA_ONLY = ("cifar10", "cifar100")  # datasets whose files the loader can verify (md5)
DATA_COPY = "data: an image-folder copy (dataset.format=imagefolder), not the official archives"
DATA_UNVERIFIED = "data: not the md5-verified official CIFAR archives (e.g. an image-folder copy)"
SEED_NOISE = 0.3  # top-1 points between seeds of one ImageNet recipe (pytorch/vision#4115)
EPSILON = 1e-9  # |Δ| equal to the bound in two decimals is within it, whatever the float rounding
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
    "indicative",
    "device",
    "world_size",
    "device_hours",
]
EXTRA_COLUMNS = ["params_n", "flops_g", "checkpoint", "source_run_id", "has_curves", "_order", "_start_ms", "_identity"]


def _num(value: Any) -> float | None:
    try:
        return float(value)
    except (TypeError, ValueError):
        return None


# ---- the counting rule ------------------------------------------------------------------------
def _faithfulness(tags: Mapping[str, str]) -> list[str]:
    """Why a run is not the row's exact recipe, its data left aside (see _data); [] when it is."""
    everything = read_deviations(tags.get("deviations"))
    deviations = [d for d in everything if d.reason != DATA]
    only_data = "faithful" in tags and everything and not deviations
    reasons = [] if read_flag(tags.get("faithful")) or only_data else _deviation_reasons(tags, deviations)
    limited = any(d.key == "trainer.limit_val_batches" for d in deviations)
    if read_flag(tags.get("val_limited")) and not limited:  # top-1 of a validation subset is no result
        reasons.append("smoke: validated on a subset (val_limited=true)")
    return reasons


def _deviation_reasons(tags: Mapping[str, str], deviations: list[Deviation]) -> list[str]:
    smoke = [str(d) for d in deviations if d.reason == SMOKE]
    other = [str(d) for d in deviations if d.reason != SMOKE]
    reasons = [f"smoke: {', '.join(smoke)}"] if smoke else []
    reasons += [f"deviates: {', '.join(other)}"] if other else []
    return reasons or [f"not faithful (faithful={tags.get('faithful', 'missing')})"]


def _data(row: Row, tags: Mapping[str, str]) -> list[str]:
    """Why the data is not the row's published data; [] when it is."""
    reasons = [DATA_COPY] if any(d.reason == DATA for d in read_deviations(tags.get("deviations"))) else []
    if row.dataset in OFFICIAL_DATA_ONLY and not read_flag(tags.get("data_verified")) and not reasons:
        reasons.append(DATA_UNVERIFIED)
    return reasons


def _full_length(run: Mapping[str, Any]) -> list[str]:
    done, planned = _num(run["metrics"].get("epochs_completed")), _num(run["params"].get("recipe.epochs"))
    if done is None or planned is None:
        return ["not full length: epochs_completed or recipe.epochs missing"]
    return [] if done == planned else [f"not full length: {done:g} of {planned:g} epochs"]


def _reasons(run: Mapping[str, Any]) -> tuple[list[str], list[str]]:
    """(reasons other than the data, reasons of the data) why a run does not count; both [] when it counts."""
    tags, run_type, row = run["tags"], run["tags"].get("run_type", ""), run["tags"].get("row", "")
    if run_type not in ("train", "eval"):
        return [f"not a training or evaluation run (run_type={run_type or 'missing'})"], []
    if row.startswith("custom:"):
        return ["custom composition"], []
    if row not in rows_by_name():
        return [f"not a table row ({row or 'no row tag'})"], []
    reasons = [] if run["status"] == "FINISHED" else [f"not finished ({run['status']})"]
    metric = "val_top1" if run_type == "train" else "test_top1"
    if run["metrics"].get(metric) is None:  # absent, or null (NaN/inf in the store): no number to count
        reasons.append(f"no {metric}")
    reasons += _faithfulness(tags)  # an eval on a cut test split or another transform is no re-test either
    if run_type == "train" and run["status"] == "FINISHED":
        reasons += _full_length(run)
    return reasons, _data(rows_by_name()[row], tags)


def exclusion(run: Mapping[str, Any]) -> str:
    """The reason a run does not count ("" when it counts), the checks joined by "; "."""
    other, data = _reasons(run)
    return "; ".join(other + data)


def indicative(run: Mapping[str, Any]) -> bool:
    """A finished, full-length, faithful training run of a table row that only its data keeps from counting."""
    other, data = _reasons(run)
    return run["tags"].get("run_type") == "train" and not other and bool(data)


def indicative_label(reason: str) -> str:
    """The short reason an indicative run shows beside its number."""
    return "image-folder (JPEG) copy, not the md5-verified archives" if DATA_COPY in reason else "data not md5-verified"


# ---- cost -------------------------------------------------------------------------------------
def device_name(tags: Mapping[str, str]) -> str:
    """The accelerator or CPU model (tag device_name); runs before that tag name only the torch device."""
    return tags.get("device_name") or tags.get("device") or "unknown device"


def device_hours(record: Mapping[str, Any]) -> float | None:
    """Σ epoch_time_s × world_size / 3600; None when no epoch logged its time."""
    times = [e["epoch_time_s"] for e in record.get("epochs", []) if e.get("epoch_time_s") is not None]
    return sum(times) * int(_num(record["tags"].get("world_size")) or 1) / 3600 if times else None


# ---- verdict ----------------------------------------------------------------------------------
def verdict(values: Sequence[float], published: float | None) -> tuple[str, float | None]:
    """("reproduced" | "not reproduced", mean Δ), or ("", None) without values or a published number."""
    if not values or published is None:
        return "", None
    delta = statistics.fmean(values) - published
    bound = max(SEED_NOISE, 2 * statistics.stdev(values)) if len(values) >= 2 else SEED_NOISE
    return ("reproduced" if abs(delta) <= bound + EPSILON else "not reproduced"), delta


# ---- the frame of all runs --------------------------------------------------------------------
def _start(ms: Any) -> str:
    if ms is None:
        return ""
    return datetime.fromtimestamp(int(ms) / 1000, tz=timezone.utc).strftime("%Y-%m-%d %H:%M:%S UTC")


def _line(record: Record, order: dict[str, int]) -> dict[str, Any]:
    tags, params, metrics = record["tags"], record["params"], record["metrics"]
    eval_run = tags.get("run_type") == "eval"
    return {
        "run_id": record["run_id"],
        "run_type": tags.get("run_type", ""),
        "row": row_of(record),
        "status": record["status"],
        "counts": not exclusion(record),
        "reason": exclusion(record),
        "top1": metrics.get("test_top1" if eval_run else "val_top1"),
        "top5": metrics.get("test_top5" if eval_run else "val_top5"),
        "epochs": "" if metrics.get("epochs_completed") is None else int(metrics["epochs_completed"]),
        "recipe_epochs": params.get("recipe.epochs", ""),
        "seed": params.get("seed", ""),
        "config_hash": tags.get("config_hash", ""),
        "start_time": _start(record.get("start_time")),
        "indicative": indicative(record),
        "device": device_name(tags),
        "world_size": int(_num(tags.get("world_size")) or 1),
        "device_hours": device_hours(record),
        "params_n": _complexity(record, "num_params", "params"),
        "flops_g": _complexity(record, "flops_g", "flops_g"),
        "checkpoint": tags.get("checkpoint") or params.get("checkpoint", ""),
        "source_run_id": tags.get("source_run_id", ""),
        "has_curves": bool(record.get("epochs")),
        "_order": order.get(row_of(record), len(order)),
        "_start_ms": int(record.get("start_time") or 0),
        "_identity": f"{tags.get('config_hash', '')}/{tags.get('data_fingerprint', '')}"
        if tags.get("config_hash")
        else "",
    }


def _complexity(record: Record, param: str, old_metric: str) -> float | None:
    """Params / FLOPs: params of the run (metrics of runs recorded before they were params)."""
    value = _num(record["params"].get(param))
    return value if value is not None else record["metrics"].get(old_metric)


def runs_frame(records: Sequence[Record]) -> pd.DataFrame:
    """One line per run (CSV_COLUMNS plus what the tables need), in table-row order, then start time."""
    order = {name: i for i, name in enumerate(rows_by_name())}
    frame = pd.DataFrame.from_records([_line(r, order) for r in records], columns=[*CSV_COLUMNS, *EXTRA_COLUMNS])
    frame = frame.sort_values(["_order", "_start_ms", "run_id"], kind="stable").reset_index(drop=True)
    return _count_once(frame)


def _count_once(frame: pd.DataFrame) -> pd.DataFrame:
    """Two training runs of one identity (config hash: config and seed; data fingerprint) are one experiment
    done twice (two checkpoint roots, or a retrain): the first to start counts, the others are named beside it."""
    counting = frame[(frame["run_type"] == "train") & frame["counts"].astype(bool) & (frame["_identity"] != "")]
    for _, same in counting.groupby("_identity", sort=False):
        first = same["run_id"].iloc[0]
        for index in same.index[1:]:
            frame.loc[index, ["counts", "reason"]] = [
                False,
                f"counted once: run {first} has the same config, seed and data",
            ]
    return frame


def of_row(frame: pd.DataFrame, run_type: str, row: str, flag: str = "counts") -> pd.DataFrame:
    """A row's runs of one type that count (flag="counts") or are indicative (flag="indicative")."""
    return frame[(frame["run_type"] == run_type) & (frame["row"] == row) & frame[flag].astype(bool)]


def not_finished(frame: pd.DataFrame) -> pd.DataFrame:
    return frame[frame["status"] != "FINISHED"]
