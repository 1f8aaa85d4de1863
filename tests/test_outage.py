"""A tracking outage never stops training (issue 20): what the store does not take is kept in the run folder,
written when it answers again (at the latest by the next start), and only the end of the run may fail the
command, in one line, with the checkpoints saved. One test in this process against a store that stops
answering, one with a real `mlflow server` killed mid-run."""

from __future__ import annotations

import contextlib
import logging
import os
import signal
import socket
import subprocess
import sys
import threading
import time
import urllib.request
from collections.abc import Iterator
from pathlib import Path

import pytest

from resnet_repro.tracking import Tracker
from resnet_repro.tracking.outbox import PENDING_FILE, read
from tests.conftest import history, mlflow_runs, run_cli, train_args


def _warnings(caplog: pytest.LogCaptureFixture) -> list[str]:
    return [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]


def test_a_store_that_stops_answering_loses_no_write_and_the_next_start_writes_the_rest(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    from mlflow import MlflowClient

    uri = train_args(tmp_path)[0].removeprefix("tracking.uri=")
    folder = tmp_path / "ckpt"
    tracker = Tracker(uri, "resnet_repro")
    run_id = tracker.start("r", {"run_type": "train"})
    tracker.keep_pending(folder)
    tracker.log_metrics({"val_top1": 1.0}, step=1)
    store, away = tracker.client.inner, MlflowClient("http://127.0.0.1:1")  # a port where nothing listens
    tracker.client.inner = away  # the store goes away
    start = time.perf_counter()
    with caplog.at_level(logging.INFO, logger="resnet_repro"):
        for step in (2, 3):
            tracker.log_metrics({"val_top1": float(step)}, step=step)
        tracker.set_tags({"note": "kept"})
    assert time.perf_counter() - start < 30  # one bounded try; then kept without trying, until RETRY_S
    assert tracker.pending == 3 and len(read(folder / PENDING_FILE)) == 3
    assert len(_warnings(caplog)) == 1 and str(folder / PENDING_FILE) in _warnings(caplog)[0]
    tracker.client.inner = store  # it answers again: the end of the run sends everything, in order
    tracker.finish()
    assert tracker.flush() and tracker.pending == 0 and not (folder / PENDING_FILE).exists()
    assert history(tmp_path, run_id, "val_top1") == [1.0, 2.0, 3.0]
    run = MlflowClient(uri).get_run(run_id)
    assert run.info.status == "FINISHED" and run.data.tags["note"] == "kept"

    second = Tracker(uri, "resnet_repro")  # the store is away at the end: kept for the next start
    other = second.start("r2", {"run_type": "train"})
    second.keep_pending(folder)
    second.client.inner = away
    second.log_metrics({"val_top1": 5.0}, step=1)
    ended = int(time.time() * 1000)
    second.finish()
    assert not second.flush() and second.pending == 2
    assert Tracker(uri, "resnet_repro").deliver_pending(folder) == 0  # the next start, the store back
    info = MlflowClient(uri).get_run(other).info
    assert info.status == "FINISHED" and ended <= info.end_time < ended + 5000  # when it ended, not when written
    assert history(tmp_path, other, "val_top1") == [5.0] and not (folder / PENDING_FILE).exists()


def test_a_write_the_store_refuses_is_dropped_with_a_warning_not_kept_for_ever(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    uri = train_args(tmp_path)[0].removeprefix("tracking.uri=")
    tracker = Tracker(uri, "resnet_repro")
    tracker.start("r", {"run_type": "train"})
    tracker.keep_pending(tmp_path / "ckpt")
    tracker.log_params({"lr": 0.1})
    with caplog.at_level(logging.WARNING, logger="resnet_repro"):
        tracker.log_params({"lr": 0.2})  # MLflow never changes a parameter
    assert tracker.pending == 0 and "refused a write" in _warnings(caplog)[0]


def test_system_metrics_stuck_in_retries_do_not_hold_the_run_s_end() -> None:
    """MLflow's sampling thread retries a store that went away for minutes; stopping it waits seconds."""
    from resnet_repro.tracking.standard import stop_system_metrics

    class Stuck:  # what MLflow's SystemMetricsMonitor holds: a daemon thread and its shutdown event
        def __init__(self) -> None:
            self._shutdown_event, self.flushed = threading.Event(), False
            self._process = threading.Thread(target=time.sleep, args=(60,), daemon=True)
            self._process.start()

        def finish(self) -> None:
            self.flushed = True

    monitor, start = Stuck(), time.monotonic()
    stop_system_metrics(monitor, wait_s=0.5)
    assert time.monotonic() - start < 5 and monitor._shutdown_event.is_set() and not monitor.flushed


# ---- a real tracking server, killed mid-run ------------------------------------------------------
def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


@contextlib.contextmanager
def mlflow_server(db: Path, port: int) -> Iterator[subprocess.Popen]:
    """`mlflow server` on `db` (one worker), in its own process group; yields once it answers."""
    cmd = [sys.executable, "-m", "mlflow", "server", "--backend-store-uri", f"sqlite:///{db}", "--port", str(port)]
    cmd += ["--host", "127.0.0.1", "--workers", "1", "--artifacts-destination", str(db.parent / "artifacts")]
    server = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True)
    try:
        deadline = time.time() + 180
        while time.time() < deadline:
            with contextlib.suppress(OSError):
                urllib.request.urlopen(f"http://127.0.0.1:{port}/health", timeout=2)
                break
            assert server.poll() is None, "mlflow server exited"
            time.sleep(0.3)
        yield server
    finally:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(server.pid, signal.SIGKILL)  # the server and its worker: the group this test started
        server.wait()


@pytest.mark.slow
def test_a_tracking_server_killed_mid_run_stops_no_training_and_loses_no_metric(tmp_path: Path) -> None:
    port = _free_port()
    store = [a for a in train_args(tmp_path) if not a.startswith("tracking.uri=")]
    args = [
        "model=resnet18",
        "dataset=demo",
        "recipe.epochs=2",
        "recipe.gpus=1",
        "recipe.batch_per_gpu=16",
        "trainer.limit_train_batches=4",
        "trainer.limit_val_batches=1",
        "trainer.log_every_n_steps=1",
        f"tracking.uri=http://127.0.0.1:{port}",
        *store,
    ]
    env = {**os.environ, "PYTHONUNBUFFERED": "1", "OMP_NUM_THREADS": "1"}
    with mlflow_server(tmp_path / "mlflow.db", port) as server:
        trainer = subprocess.Popen(
            [sys.executable, "-m", "resnet_repro", *args], cwd=tmp_path, env=env, text=True,
            stdout=subprocess.PIPE, stderr=subprocess.PIPE,
        )  # fmt: skip
        deadline = time.time() + 300
        while time.time() < deadline and not list((tmp_path / "ckpt").rglob("run.json")):
            assert trainer.poll() is None, trainer.communicate()
            time.sleep(0.1)
        os.killpg(server.pid, signal.SIGKILL)  # the store goes away in the first epoch
        out, err = trainer.communicate(timeout=600)
    assert trainer.returncode == 2, err[-3000:]
    assert err.count("\n") == 1 and "did not take the end of the run" in err and "checkpoints are saved" in err, err
    assert out.count("did not take a write") == 1 and "Traceback" not in out + err  # warned once, trained on
    folder = next((tmp_path / "ckpt").rglob("last.pt")).parent
    assert (folder / "best.pt").is_file() and (folder / PENDING_FILE).is_file()
    with mlflow_server(tmp_path / "mlflow.db", port):  # back: the same command writes the rest and is done
        again = run_cli(args, cwd=tmp_path, timeout=600)
    assert again.returncode == 0 and "skipping" in again.stdout + again.stderr, again.stderr[-3000:]
    (run,) = mlflow_runs(tmp_path)
    assert run.info.status == "FINISHED" and not (folder / PENDING_FILE).exists()
    assert history(tmp_path, run.info.run_id, "val_top1") == [pytest.approx(v) for v in _checkpoint_top1(folder)]
    assert len(history(tmp_path, run.info.run_id, "step/train_loss")) == 8  # every step of both epochs, once
    assert history(tmp_path, run.info.run_id, "epochs_completed") == [2.0]


def _checkpoint_top1(folder: Path) -> list[float]:
    from resnet_repro import checkpoint

    hist = checkpoint.load(folder / "last.pt")["history"]
    return [hist[epoch]["val_top1"] for epoch in sorted(hist)]
