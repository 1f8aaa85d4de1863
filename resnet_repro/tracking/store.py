"""Reading the MLflow store (the report's side): runs as plain data, metric histories, run pages."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from resnet_repro.tracking.run import Tracker
from resnet_repro.tracking.uri import resolve_uri, retrying, sqlite_path


def store_missing(uri: str | None) -> bool:
    """True when a local store (SQLite file, file:// or plain folder) does not exist yet.

    Readers check this first: opening an MLflow client on a missing local store would create it.
    """
    uri = resolve_uri(uri)
    db = sqlite_path(uri)
    if db is not None:
        return not db.is_file()
    if uri.startswith("file:"):
        return not Path(uri[len("file:") :].removeprefix("//")).exists()
    if "://" not in uri:
        return not Path(uri).exists()
    return False


def read_runs(uri: str | None, experiment: str) -> list[dict[str, Any]]:
    """Every active run of the experiment as plain data; [] when the store or the experiment is missing.

    Each run: run_id, experiment_id, status, start_time (ms since the epoch), tags, params, metrics
    (the latest value of each metric, i.e. the one at the highest step).
    """
    if store_missing(uri):
        return []
    tracker = Tracker(uri, experiment)
    if retrying(tracker.client.get_experiment_by_name)(experiment) is None:
        return []
    return [
        {
            "run_id": run.info.run_id,
            "experiment_id": run.info.experiment_id,
            "status": run.info.status,
            "start_time": run.info.start_time,
            "tags": dict(run.data.tags),
            "params": dict(run.data.params),
            "metrics": dict(run.data.metrics),
        }
        for run in tracker.search()
    ]


def metric_history(uri: str | None, run_id: str, key: str) -> list[tuple[int, float]]:
    """(step, value) of one metric of one run, in step order."""
    return sorted(Tracker(uri, "").history(run_id, key))


def run_page(uri: str | None, experiment_id: str, run_id: str) -> str | None:
    """The run's page in an MLflow server's UI; None for a local store (no page to link to)."""
    uri = resolve_uri(uri)
    if not uri.startswith(("http://", "https://")):
        return None
    return f"{uri.rstrip('/')}/#/experiments/{experiment_id}/runs/{run_id}"
