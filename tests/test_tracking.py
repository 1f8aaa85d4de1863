"""The MLflow layer: parallel jobs on one SQLite store lose no run; the default store is absolute."""

from __future__ import annotations

import multiprocessing as mp
import sys
from pathlib import Path

from resnet_repro.tracking import Tracker, default_uri, resolve_uri
from tests.conftest import run_cli


def _job(uri: str, i: int) -> str:
    tracker = Tracker(uri, "parallel")
    run_id = tracker.start(f"job-{i}", {"row": f"job-{i}", "run_type": "train", "config_hash": f"h{i}"})
    tracker.log_params({f"p{k}": k for k in range(150)})  # more than one MLflow batch
    for epoch in range(1, 6):
        tracker.log_metrics({"val_top1": float(epoch + i), "train_loss": 1.0 / epoch}, step=epoch)
    tracker.finish("FINISHED")
    return run_id


def test_parallel_jobs_on_one_sqlite_store_lose_nothing(tmp_path: Path) -> None:
    uri = f"sqlite:///{tmp_path}/mlflow.db"
    with mp.get_context("spawn").Pool(6) as pool:
        ids = pool.starmap(_job, [(uri, i) for i in range(6)])
    tracker = Tracker(uri, "parallel")
    runs = {r.info.run_id: r for r in tracker.search()}
    assert set(ids) == set(runs) and len(runs) == 6
    for run in runs.values():
        assert run.info.status == "FINISHED" and len(run.data.params) == 150
        assert [v for _, v in tracker.history(run.info.run_id, "train_loss")] == [1.0, 0.5, 1 / 3, 0.25, 0.2]
    h3 = next(r for r in runs.values() if r.data.tags["config_hash"] == "h3")
    assert tracker.find_finished("h3") == h3.info.run_id


def test_default_store_is_an_absolute_sqlite_file(tmp_path: Path, monkeypatch) -> None:
    monkeypatch.chdir(tmp_path)
    assert default_uri() == f"sqlite:///{tmp_path.resolve()}/mlflow.db"
    assert resolve_uri(None) == default_uri()
    assert resolve_uri("sqlite:///rel/m.db") == f"sqlite:///{tmp_path.resolve()}/rel/m.db"
    assert resolve_uri("http://host:5000") == "http://host:5000"


def test_a_run_with_tracking_off_never_imports_mlflow(tmp_path: Path) -> None:
    """tracking.uri=none: the run ends 0, says once that the store's checks are skipped, and neither imports
    MLflow (-X importtime lists every module the process imported) nor writes a store."""
    args = ["model=resnet18", "dataset=demo", "trainer.device=cpu", "tracking.uri=none", "+smoke=on"]
    args += [f"trainer.checkpoint_root={tmp_path}/ckpt", "trainer.num_workers=0"]
    done = run_cli(args, cwd=tmp_path, launcher=[sys.executable, "-X", "importtime", "-m", "resnet_repro"])
    assert done.returncode == 0, done.stderr[-3000:]
    imported = {line.rsplit("|", 1)[1].strip() for line in done.stderr.splitlines() if line.startswith("import time:")}
    assert "torch" in imported and not {name for name in imported if name.split(".")[0] == "mlflow"}
    assert (done.stdout + done.stderr).count("tracking.uri=none: nothing is tracked") == 1
    assert not (tmp_path / "mlflow.db").exists() and not (tmp_path / "mlruns").exists()
