"""What the store could not take, kept until it answers again: a tracking outage never stops a training run.

During a run (rank 0) the Tracker's client is wrapped in a `GuardedClient`: every write (metrics, tags,
params, artifacts, the end status) goes through `Outbox.send`. A write the store does not take (a server that
went away, a database that cannot be written: disk full, read-only, removed) is kept, in order, as one JSON
line in the run's checkpoint folder (`mlflow-pending.jsonl`, the metrics with their own timestamps and steps),
a warning says so once per outage, and training goes on. While the store is away later writes are only kept
(a new try after RETRY_S, doubling up to RETRY_MAX_S), so a step costs nothing; the first write that goes
through sends the kept ones first. `flush` tries once more at the end of the run; what is still kept then
stays in the file, the command fails in one line (the model is saved), and the next start of the same config
sends it first (`deliver`), so the run's history in MLflow ends complete.

Each try is bounded: MLflow's HTTP retries and timeout are cut to WRITE_ENV, SQLite's locks to WRITE_WAIT_S.
A write the store refuses for good (a run deleted meanwhile, a parameter that may not change) is dropped with
a warning rather than kept for ever.
"""

from __future__ import annotations

import contextlib
import inspect
import json
import logging
import os
import tempfile
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

from resnet_repro.tracking.uri import mlflow_environ, mlflow_quiet, retrying

log = logging.getLogger("resnet_repro")
PENDING_FILE = "mlflow-pending.jsonl"
RETRY_S = 60.0  # after a failed write, the next try; doubled after each further failure
RETRY_MAX_S = 600.0
WRITE_WAIT_S = 30.0  # how long a write waits for SQLite's lock (parallel jobs of a sweep)
# one retry, 15 s per request: MLflow's defaults (7 retries, 120 s) block a step for minutes on a dead server
WRITE_ENV = {
    "MLFLOW_HTTP_REQUEST_MAX_RETRIES": "1",
    "MLFLOW_HTTP_REQUEST_BACKOFF_FACTOR": "1",
    "MLFLOW_HTTP_REQUEST_TIMEOUT": "15",
}
# MLflow error codes of a write the store answered and refused: no later try will go through
REFUSED = {"INVALID_PARAMETER_VALUE", "RESOURCE_DOES_NOT_EXIST", "INVALID_STATE", "BAD_REQUEST"}
BATCH = 1000  # metrics per log_batch when sending kept ones (MLflow's limit per request)
Entry = dict[str, Any]


def _now_ms() -> int:
    return int(time.time() * 1000)


def _apply_or_drop(client: Any, entry: Entry, what: str = "") -> None:
    """Write `entry`; a write the store refuses (not one it cannot take now) is dropped with a warning."""
    try:
        retrying(apply, max_wait=WRITE_WAIT_S)(client, entry)
    except Exception as err:
        if not refused(err):
            raise
        log.warning("the MLflow store refused a %swrite (%s): dropped", what, _first_line(err))


def _first_line(err: BaseException) -> str:
    text = str(err).strip()
    return (text.splitlines()[0] if text else type(err).__name__)[:200]


def refused(err: BaseException) -> bool:
    return getattr(err, "error_code", None) in REFUSED


# ---- writes as plain data ---------------------------------------------------------------------
def encode(name: str, client: Any, args: tuple[Any, ...], kwargs: dict[str, Any]) -> Entry:
    """A client write as a JSON-able entry (what `apply` sends later)."""
    a = inspect.signature(getattr(client, name)).bind(*args, **kwargs).arguments
    run_id = a["run_id"]
    if name == "log_batch":
        return {
            "call": "log_batch",
            "run_id": run_id,
            "metrics": [[m.key, m.value, m.timestamp, m.step] for m in a.get("metrics") or []],
            "params": [[p.key, p.value] for p in a.get("params") or []],
            "tags": [[t.key, t.value] for t in a.get("tags") or []],
        }
    if name == "log_metric":
        metric = [a["key"], float(a["value"]), a.get("timestamp") or _now_ms(), a.get("step") or 0]
        return {"call": "log_batch", "run_id": run_id, "metrics": [metric], "params": [], "tags": []}
    if name in ("set_tag", "log_param"):
        pair = [a["key"], str(a["value"])]
        tags, params = ([pair], []) if name == "set_tag" else ([], [pair])
        return {"call": "log_batch", "run_id": run_id, "metrics": [], "params": params, "tags": tags}
    if name == "set_terminated":
        status = a.get("status") or "FINISHED"
        return {"call": name, "run_id": run_id, "status": status, "end_time": a.get("end_time") or _now_ms()}
    if name == "log_text":
        return {"call": name, "run_id": run_id, "text": a["text"], "artifact_file": a["artifact_file"]}
    if name == "log_artifact":
        return {"call": name, "run_id": run_id, "local_path": str(a["local_path"]), "artifact_path": a["artifact_path"]}
    raise ValueError(f"no outbox form for MlflowClient.{name}")


def apply(client: Any, entry: Entry) -> None:
    from mlflow.entities import Metric, Param, RunTag

    call, run_id = entry["call"], entry["run_id"]
    if call == "log_batch":
        client.log_batch(
            run_id,
            metrics=[Metric(k, v, ts, step) for k, v, ts, step in entry["metrics"]],
            params=[Param(k, v) for k, v in entry["params"]],
            tags=[RunTag(k, v) for k, v in entry["tags"]],
        )
    elif call == "set_terminated":
        client.set_terminated(run_id, status=entry["status"], end_time=entry["end_time"])
    elif call == "log_text":
        client.log_text(run_id, entry["text"], entry["artifact_file"])
    elif call == "log_artifact" and Path(entry["local_path"]).is_file():  # a log file removed meanwhile: nothing
        client.log_artifact(run_id, entry["local_path"], entry["artifact_path"])


def _coalesced(entries: list[Entry]) -> Iterator[tuple[int, Entry]]:
    """(how many entries, one entry to send): runs of metrics-only batches of one run merged up to BATCH."""
    i = 0
    while i < len(entries):
        entry, n = entries[i], 1
        if entry["call"] == "log_batch" and not entry["params"] and not entry["tags"]:
            metrics = list(entry["metrics"])
            while i + n < len(entries):
                nxt = entries[i + n]
                mergeable = nxt["call"] == "log_batch" and nxt["run_id"] == entry["run_id"]
                if not (mergeable and not nxt["params"] and not nxt["tags"]) or len(metrics) >= BATCH:
                    break
                metrics += nxt["metrics"]
                n += 1
            entry = {**entry, "metrics": metrics}
        yield n, entry
        i += n


# ---- the outbox -------------------------------------------------------------------------------
class Outbox:
    """The writes of one run folder that the store did not take yet, in a file and in memory."""

    def __init__(self, path: Path, uri: str) -> None:
        self.path, self.uri = Path(path), uri
        self.entries: list[Entry] = read(self.path)
        self.away = False
        self.failures = 0
        self.next_try = 0.0

    def __len__(self) -> int:
        return len(self.entries)

    def send(self, client: Any, entry: Entry) -> None:
        """Send `entry` after what is kept; keep it when the store does not take it (never raises for that)."""
        if self.away and time.monotonic() < self.next_try:
            self._keep(entry)
            return
        try:
            with _bounded():
                self._send_kept(client)
                _apply_or_drop(client, entry)
        except Exception as err:
            self._keep(entry)
            self._went_away(err)
            return
        self._back()

    def flush(self, client: Any) -> bool:
        """Try to send everything kept now (the end of a run); True when nothing is left."""
        if not self.entries:
            return True
        try:
            with _bounded():
                self._send_kept(client)
        except Exception as err:
            self._went_away(err)
            return False
        self._back()
        return True

    def _send_kept(self, client: Any) -> None:
        sent = 0
        try:
            for n, entry in _coalesced(self.entries):
                _apply_or_drop(client, entry, "kept ")
                sent += n
        finally:
            if sent:
                self.entries = self.entries[sent:]
                self._rewrite()
                if not self.entries:
                    log.info("MLflow store %s answers again: %d kept writes written", self.uri, sent)

    def _keep(self, entry: Entry) -> None:
        self.entries.append(entry)
        self.path.parent.mkdir(parents=True, exist_ok=True)
        with open(self.path, "a", encoding="utf-8") as f:
            f.write(json.dumps(entry) + "\n")

    def _rewrite(self) -> None:
        if not self.entries:
            self.path.unlink(missing_ok=True)
            return
        fd, tmp = tempfile.mkstemp(prefix=f".{self.path.name}.", suffix=".tmp", dir=self.path.parent)
        with os.fdopen(fd, "w", encoding="utf-8") as f:
            f.writelines(json.dumps(e) + "\n" for e in self.entries)
        os.replace(tmp, self.path)

    def _went_away(self, err: BaseException) -> None:
        if not self.away:
            log.warning(
                "the MLflow store %s did not take a write (%s); training goes on: what it misses is kept in %s "
                "and written when it answers again (at the latest by the next start of this command)",
                self.uri,
                _first_line(err),
                self.path,
            )
        self.away = True
        self.next_try = time.monotonic() + min(RETRY_S * 2**self.failures, RETRY_MAX_S)
        self.failures += 1

    def _back(self) -> None:
        self.away, self.failures = False, 0


@contextlib.contextmanager
def _bounded() -> Iterator[None]:
    with mlflow_environ(WRITE_ENV), mlflow_quiet():
        yield


def read(path: Path) -> list[Entry]:
    """The kept writes of a file (a line torn by a kill is left out)."""
    if not path.is_file():
        return []
    entries = []
    for line in path.read_text(encoding="utf-8").splitlines():
        with contextlib.suppress(ValueError):
            entries.append(json.loads(line))
    return entries


def deliver(client: Any, path: Path, uri: str) -> int:
    """Send the writes kept in `path` (a run folder's, from a run the store missed the end of), under a lock
    against a second start doing the same; the number left (0: all written)."""
    from filelock import FileLock

    if not path.is_file():
        return 0
    with FileLock(str(path) + ".lock"):
        outbox = Outbox(path, uri)
        outbox.flush(client)
    Path(str(path) + ".lock").unlink(missing_ok=True)
    return len(outbox)


class GuardedClient:
    """An MlflowClient whose writes go through an Outbox; reads pass through unchanged."""

    WRITES = ("log_batch", "log_metric", "log_param", "set_tag", "set_terminated", "log_text", "log_artifact")

    def __init__(self, client: Any, outbox: Outbox) -> None:
        self.inner, self.outbox = client, outbox

    def __getattr__(self, name: str) -> Any:
        attr = getattr(self.inner, name)
        if name not in self.WRITES:
            return attr
        return self._guarded(name)

    def _guarded(self, name: str) -> Callable[..., None]:
        def write(*args: Any, **kwargs: Any) -> None:
            self.outbox.send(self.inner, encode(name, self.inner, args, kwargs))

        return write
