"""Reading the MLflow store (the report's side), without ever writing to it.

The report only reads, but MLflow does not: an MlflowClient opened on a missing or empty SQLite file, or on
another program's SQLite database, writes MLflow's schema into it, and a wrong http(s) URI retries for
minutes. `check_store` rejects those first, as a one-line UserError; `read_runs` then pages through an
experiment's runs and returns plain data, so no MLflow type leaves this package.
"""

from __future__ import annotations

import contextlib
import logging
import sqlite3
import tempfile
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any
from urllib.parse import urlparse

from resnet_repro.errors import UserError
from resnet_repro.tracking.uri import PROBE_ENV, SCHEMES, mlflow_environ, resolve_uri, retrying, sqlite_path

MLFLOW_TABLES = {"experiments", "runs", "metrics", "params", "tags"}
PAGE = 1000  # runs per search request: the store's own page size, followed by page tokens to the end
LOCK_WAIT_S = 60.0  # how long a read waits for a writer's lock (sqlite's default is 5 s)
QUIET_ENV = {"MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR": "false"}  # one bar per run's config file is noise


def store_missing(uri: str | None) -> bool:
    """True when a local store (SQLite file, file:// or plain folder) does not exist yet.

    Readers check this first: opening an MLflow client on a missing local store would create it.
    """
    uri = resolve_uri(uri)
    db = sqlite_path(uri)
    if db is not None:
        return not db.is_file()
    folder = _folder(uri)
    return folder is not None and not folder.exists()


def _folder(uri: str) -> Path | None:
    """The folder of a file store (`file:///x` or a plain path); None for other stores."""
    if uri.startswith("file:"):
        return Path(uri[len("file:") :].removeprefix("//"))
    return Path(uri) if not urlparse(uri).scheme else None


def check_store(uri: str) -> None:
    """Raise a one-line UserError unless `uri` names an existing MLflow store that answers."""
    scheme = urlparse(uri).scheme.split("+")[0].lower()
    if scheme not in SCHEMES:
        raise UserError(
            f"unsupported tracking URI {uri!r}: give sqlite:///path/to/mlflow.db, a folder (file:///path), "
            "or http(s)://host:port"
        )
    if scheme == "sqlite":
        _check_sqlite(uri)
    elif (folder := _folder(uri)) is not None:
        _check_folder(folder)
    with mlflow_environ(PROBE_ENV):  # a server that does not answer is an error now, not after minutes of retries
        _probe(uri)


def _check_sqlite(uri: str) -> None:
    db = sqlite_path(uri)
    if db is None:
        raise UserError(f"unsupported SQLite URI {uri!r}: write sqlite:///<path to mlflow.db>")
    if not db.is_file():
        raise UserError(f"no MLflow store at {db} (no such file)")
    if db.stat().st_size == 0:
        raise UserError(f"{db} is empty (0 bytes), not an MLflow store")
    try:  # read-only: an MLflow client would create its tables in a database that lacks them
        with contextlib.closing(sqlite3.connect(f"{db.as_uri()}?mode=ro", uri=True, timeout=LOCK_WAIT_S)) as con:
            tables = {name for (name,) in con.execute("SELECT name FROM sqlite_master WHERE type = 'table'")}
    except sqlite3.OperationalError as err:
        if "locked" not in str(err):
            raise UserError(f"{db} cannot be read as an SQLite database ({err})") from None
        raise UserError(
            f"{db} stayed locked by another process for {LOCK_WAIT_S:g} s (a long write: a training run or "
            "another report); run the report again when it is done"
        ) from None
    except sqlite3.DatabaseError as err:
        raise UserError(f"{db} is not an SQLite database ({err})") from None
    if not tables >= MLFLOW_TABLES:
        raise UserError(f"{db} is not an MLflow store: an SQLite database without MLflow's tables (runs, metrics, ...)")


def _check_folder(folder: Path) -> None:
    if not folder.is_dir():
        raise UserError(f"no MLflow store at {folder} ({'not a folder' if folder.exists() else 'no such folder'})")
    if not (folder / ".trash").is_dir() and not any(folder.glob("*/meta.yaml")):
        raise UserError(f"{folder} is not an MLflow file store (no experiments' meta.yaml in it)")


def _probe(uri: str) -> None:
    try:
        _client(uri).search_experiments(max_results=1)
    except Exception as err:  # MLflow raises many types here (connection, schema version, permissions)
        first = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
        raise UserError(f"cannot read the MLflow store {uri}: {first}") from None


def _client(uri: str) -> Any:
    from mlflow import MlflowClient

    logging.getLogger("mlflow").setLevel(logging.WARNING)  # not its database-migration chatter
    logging.getLogger("alembic").setLevel(logging.WARNING)
    return MlflowClient(tracking_uri=uri)


def read_runs(
    uri: str | None, experiment: str, histories: Sequence[str] = (), artifact: str | None = None
) -> list[dict[str, Any]]:
    """Every active run of the experiment as plain data; [] when the store or the experiment is missing.

    Each run: run_id, run_name, experiment (name), experiment_id, status, start_time and end_time (ms since
    the epoch), tags, params, metrics (the latest value of each metric, i.e. the one at the highest step),
    history ({key: [(step, value), ...]} in step order, for the keys in `histories` the run has), and
    artifact_text (the text of the artifact at the path `artifact`, None when the run has none).
    """
    uri = resolve_uri(uri)
    if store_missing(uri):
        return []
    client = _client(uri)
    exp = retrying(client.get_experiment_by_name)(experiment)
    if exp is None:
        return []
    return [_plain(client, run, experiment, histories, artifact) for run in _search(client, exp.experiment_id)]


def _search(client: Any, experiment_id: str) -> Iterator[Any]:
    """All runs, page after page (one search returns at most PAGE)."""
    token = None
    while True:
        page = retrying(client.search_runs)([experiment_id], max_results=PAGE, page_token=token)
        yield from page
        token = page.token
        if not token:
            return


def _plain(client: Any, run: Any, experiment: str, histories: Sequence[str], artifact: str | None) -> dict[str, Any]:
    run_id = run.info.run_id
    return {
        "run_id": run_id,
        "run_name": run.info.run_name or "",
        "experiment": experiment,
        "experiment_id": run.info.experiment_id,
        "status": run.info.status,
        "start_time": run.info.start_time,
        "end_time": run.info.end_time,
        "tags": dict(run.data.tags),
        "params": dict(run.data.params),
        "metrics": dict(run.data.metrics),
        "history": {key: _history(client, run_id, key) for key in histories if key in run.data.metrics},
        "artifact_text": _artifact_text(client, run_id, artifact) if artifact else None,
    }


def _history(client: Any, run_id: str, key: str) -> list[tuple[int, float]]:
    """(step, value) in step order, values of one step in the order they were logged (their timestamps): the
    last value logged for a step is the last of its points (as after a resume that re-logs an epoch)."""
    points = sorted(retrying(client.get_metric_history)(run_id, key), key=lambda m: (m.step, m.timestamp))
    return [(m.step, m.value) for m in points]


def _artifact_text(client: Any, run_id: str, path: str) -> str | None:
    with tempfile.TemporaryDirectory() as tmp, mlflow_environ(QUIET_ENV):
        try:
            local = client.download_artifacts(run_id, path, tmp)
        except Exception:  # absent (evaluation runs, older trainers) or its artifact store is gone: no text
            return None
        return Path(local).read_text(encoding="utf-8")
