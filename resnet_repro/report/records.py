"""Run records: the one in-memory form of a run that every table, figure and CSV is computed from, and its
file, `results/logs/<row folder>/<run_id>.json`.

Why files: the MLflow store is a local database nobody commits. A record is a small text file that travels
with the repository, so a fresh clone rebuilds the same README section and results/ byte for byte. Why one
form: a run read from MLflow is converted into exactly the dict its file holds (numbers rounded the same
way), so whichever source a run comes from, everything downstream sees the same data.

A record (schema 1): run_id, run_name, experiment, status, start_time / end_time (ms since the epoch, UTC),
tags (MLflow's own `mlflow.*` tags left out: user names and source paths say nothing about the result),
params (strings, as MLflow stores them), metrics (the last value of each metric: epochs_completed,
best_val_top1, test_top1, ...; per-step `step/*` and MLflow's `system/*` metrics left out), epochs (one dict
per epoch: epoch and the EPOCH_KEYS it logged; the last value logged for an epoch stands, as after a resume),
steps (one dict per logged optimizer step: step and the STEP_KEYS it logged, for the step-level loss curve;
absent from records written before it), config (the resolved composed config from the run's
config/config.yaml artifact, or else the params nested at their dots) and config_source (which of the two).
"""

from __future__ import annotations

import json
import math
import re
from collections.abc import Iterable, Mapping, Sequence
from pathlib import Path
from typing import Any

import yaml

from resnet_repro.errors import UserError
from resnet_repro.report.outputs import write_if_changed
from resnet_repro.rows import all_rows

SCHEMA = 1
EPOCH_KEYS = ("train_loss", "lr", "val_top1", "val_top5", "epoch_time_s", "train_img_per_s")
STEP_KEYS = ("train_loss", "lr")  # logged as step/<key> at the log interval, step = optimizer step
CONFIG_ARTIFACT = "config/config.yaml"
SIGNIFICANT = 10  # digits kept of every metric: exact for parameter counts, stable text for float32 noise
Record = dict[str, Any]


# ---- from MLflow ------------------------------------------------------------------------------
def number(value: float) -> float | None:
    """A metric as records keep it: 10 significant digits; None for NaN/inf (JSON has neither)."""
    value = float(value)
    return float(f"{value:.{SIGNIFICANT}g}") if math.isfinite(value) else None


def _epochs(history: Mapping[str, Sequence[tuple[int, float]]], index: str = "epoch") -> list[dict[str, Any]]:
    by_epoch: dict[int, dict[str, Any]] = {}
    for key, points in history.items():
        for step, value in points:  # in step order: a re-logged epoch's later value overwrites
            if step >= 1:
                by_epoch.setdefault(int(step), {index: int(step)})[key] = number(value)
    return [by_epoch[epoch] for epoch in sorted(by_epoch)]


def _steps(history: Mapping[str, Sequence[tuple[int, float]]]) -> list[dict[str, Any]]:
    return _epochs({k.removeprefix("step/"): v for k, v in history.items() if k.startswith("step/")}, "step")


def _nest(flat: Mapping[str, str]) -> dict[str, Any]:
    """{"recipe.epochs": "200"} -> {"recipe": {"epochs": "200"}}; a key that clashes stays flat."""
    nested: dict[str, Any] = {}
    for key, value in sorted(flat.items()):
        *parents, leaf = key.split(".")
        node = nested
        for part in parents:
            node = node.setdefault(part, {})
            if not isinstance(node, dict):
                nested[key] = value
                break
        else:
            if isinstance(node.get(leaf), dict):
                nested[key] = value
            else:
                node[leaf] = value
    return nested


def _config(run: Mapping[str, Any]) -> tuple[dict[str, Any], str]:
    text = run.get("artifact_text")
    if text:
        # through JSON, so the dict equals the one read back from the record file (tuples, dates -> text)
        return json.loads(json.dumps(yaml.safe_load(text), default=str)), CONFIG_ARTIFACT
    return _nest(run["params"]), "params"


def from_store(run: Mapping[str, Any]) -> Record:
    """The record of a run as `tracking.store.read_runs` returns it."""
    config, source = _config(run)
    return {
        "schema": SCHEMA,
        "run_id": run["run_id"],
        "run_name": run.get("run_name") or "",
        "experiment": run["experiment"],
        "status": run["status"],
        "start_time": run.get("start_time"),
        "end_time": run.get("end_time"),
        "tags": {k: v for k, v in sorted(run["tags"].items()) if not k.startswith("mlflow.")},
        "params": dict(sorted(run["params"].items())),
        "metrics": {k: number(v) for k, v in sorted(run["metrics"].items()) if not k.startswith(("step/", "system/"))},
        "epochs": _epochs({k: v for k, v in run.get("history", {}).items() if k in EPOCH_KEYS}),
        "steps": _steps(run.get("history", {})),
        "config": config,
        "config_source": source,
    }


# ---- files ------------------------------------------------------------------------------------
def row_of(record: Mapping[str, Any]) -> str:
    return str(record["tags"].get("row", ""))


def row_folder(row: str) -> str:
    """A folder name for a row: table rows as they are, `custom:a-b` -> `custom_a-b`, no row -> `_no_row`."""
    return re.sub(r"[^A-Za-z0-9._-]+", "_", row) or "_no_row"


def relative_path(record: Mapping[str, Any]) -> Path:
    """Where a record lies under the records folder."""
    return Path(row_folder(row_of(record))) / f"{record['run_id']}.json"


def dumps(record: Mapping[str, Any]) -> str:
    """Sorted keys, two-space indent, one line per epoch and per step (a new epoch is a few-line diff), final
    newline."""
    listed = [key for key in ("epochs", "steps") if key in record]
    body = json.dumps({**record, **{key: [] for key in listed}}, indent=2, sort_keys=True, ensure_ascii=False)
    for key in listed:
        items = ",\n".join("    " + json.dumps(e, sort_keys=True, ensure_ascii=False) for e in record[key])
        lines = f'\n  "{key}": [\n' + items + "\n  ]" if items else f'\n  "{key}": []'
        body = body.replace(f'\n  "{key}": []', lines, 1)  # the top level's key: indent 2 exactly
    return body + "\n"


def write(record: Mapping[str, Any], root: Path) -> Path:
    path = root / relative_path(record)
    write_if_changed(path, dumps(record).encode(), what=f"run records to {root}", flag="--runs")
    return path


def _invalid(record: Any) -> str:
    """What makes `record` no record ("" when it is one)."""
    if not isinstance(record, dict):
        return "not a JSON object"
    if record.get("schema") != SCHEMA:
        return f"schema {record.get('schema')!r}, expected {SCHEMA}"
    types = {"run_id": str, "experiment": str, "status": str, "tags": dict, "params": dict, "metrics": dict}
    types |= {"epochs": list, "config": dict}
    wrong = [key for key, kind in types.items() if not isinstance(record.get(key), kind)]
    if wrong:
        return f"missing or mistyped {', '.join(wrong)}"
    if not all(isinstance(e, dict) and isinstance(e.get("epoch"), int) for e in record["epochs"]):
        return "an entry of epochs without an integer epoch"
    times = [key for key in ("start_time", "end_time") if not _ms(record.get(key))]
    if times:
        return f"{times[0]} is {record.get(times[0])!r}, not milliseconds since the epoch (an integer) or null"
    steps = record.get("steps", [])
    if not (isinstance(steps, list) and all(isinstance(e, dict) and isinstance(e.get("step"), int) for e in steps)):
        return "steps that are not a list of entries with an integer step"
    numbers = [*record["metrics"].values(), *(v for e in [*record["epochs"], *steps] for v in e.values())]
    if not all(v is None or (isinstance(v, (int, float)) and not isinstance(v, bool)) for v in numbers):
        return "a metric that is not a number"
    return ""


def _ms(value: Any) -> bool:
    return value is None or (isinstance(value, int) and not isinstance(value, bool))


def load(path: Path) -> Record:
    """A record file, checked: a malformed one, or one in another row's folder, is a one-line UserError."""
    try:
        record = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as err:
        raise UserError(f"{path}: not a run record ({err})") from None
    problem = _invalid(record)
    if problem:
        raise UserError(f"{path}: not a run record ({problem})")
    if record["run_id"] != path.stem:
        raise UserError(f"{path}: holds run {record['run_id']}, but the file is named for run {path.stem}")
    if row_folder(row_of(record)) != path.parent.name:
        raise UserError(f"{path}: a run of row {row_of(record)!r} belongs in {row_folder(row_of(record))}/")
    return record


def load_dir(root: Path, experiment: str) -> list[Record]:
    """The records under `root` (`<row folder>/<run_id>.json`) of one experiment."""
    found = (load(path) for path in sorted(root.glob("*/*.json")))
    return [record for record in found if record["experiment"] == experiment]


# ---- which runs go to files -------------------------------------------------------------------
EXPORT_SCOPES = ("rows", "all")


def exportable(record: Mapping[str, Any], scope: str) -> bool:
    """Finished runs; of the table's rows only (training runs of any length, evaluations) unless scope=all."""
    if record["status"] != "FINISHED":
        return False
    return scope == "all" or row_of(record) in {row.name for row in all_rows()}


def export(records: Iterable[Record], root: Path, scope: str) -> list[Path]:
    return [write(record, root) for record in records if exportable(record, scope)]


def merge(first: Iterable[Record], second: Iterable[Record]) -> list[Record]:
    """One record per run id; `first` (the live store) wins over `second` (the files)."""
    merged: dict[str, Record] = {}
    for record in [*second, *first]:
        merged[record["run_id"]] = record
    return list(merged.values())
