"""The first hour of a new user (issue 11): a demo that learns, live progress, MLflow worth opening, tidy
outputs, fair CPU use, limited evaluation that means something, small things users hit."""

from __future__ import annotations

import re
from pathlib import Path

import numpy as np
import pytest
import torch
from mlflow import MlflowClient

from resnet_repro import checkpoint, distributed
from resnet_repro.config import compose
from resnet_repro.data.samplers import ShardSampler, spread
from resnet_repro.errors import UserError
from tests.conftest import history, mlflow_runs, run_cli, train_args


def test_the_demo_picks_its_own_short_recipe() -> None:
    cfg = compose(["model=resnet18", "dataset=demo"])
    assert cfg.recipe.name == "demo" and cfg.stem.name == "cifar" and cfg.dataset.input_size == 16
    assert (cfg.recipe.epochs, cfg.recipe.gpus, cfg.recipe.batch_per_gpu) == (3, 1, 32)
    assert [step["type"] for step in cfg.recipe.train_pipeline] == ["random_crop"]  # a mirrored digit is no digit


@pytest.mark.slow
def test_the_quickstart_learns_to_95_percent_and_reports_as_it_goes(tmp_path: Path) -> None:
    """The README's quickstart, one thread (the README gives its time on 2 cores)."""
    args = ["model=resnet18", "dataset=demo", "trainer.log_every_n_steps=20", *train_args(tmp_path)]
    proc = run_cli(args, cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr[-3000:]
    out = proc.stdout + proc.stderr
    first = next(line for line in out.splitlines() if "epoch 1/3 [1/45]" in line)  # a line at the very first step
    assert all(word in first for word in ("loss", "lr", "img/s", "eta", "run eta")), first
    assert "epoch 1/3 [20/45]" in out and "epoch 3/3 [40/45]" in out  # and every trainer.log_every_n_steps
    done = r"done \S+: best top-1 [\d.]+ \(epoch \d\), last top-1 [\d.]+ / top-5 [\d.]+, [\d:]+ wall"
    assert re.search(done, out), out[-2000:]
    (run,) = mlflow_runs(tmp_path)
    assert run.info.status == "FINISHED" and run.data.metrics["val_top1"] >= 95.0  # chance is 10 %
    assert run.data.params["num_train"] == "1438" and run.data.params["num_val"] == "359"
    assert len(history(tmp_path, run.info.run_id, "step/train_loss")) == 9  # steps 1, 20, 40 of each epoch
    assert run.data.tags["mlflow.runName"] == "resnet18 demo s0"
    client = MlflowClient(tracking_uri=f"sqlite:///{tmp_path}/mlflow.db")
    assert [a.path for a in client.list_artifacts(run.info.run_id, "logs")] == ["logs/train.log"]
    folder = Path(run.data.tags["checkpoint_dir"])  # row / seed / config hash, readable
    assert folder.parent.name == "custom_resnet18-cifar-demo-demo-fp32"
    assert folder.name == f"seed0-{run.data.tags['config_hash']}"
    assert {p.name for p in folder.iterdir()} == {".lock", "run.json", "last.pt", "best.pt"}


@pytest.mark.slow
def test_smoke_runs_can_skip_checkpoints_and_evaluate_an_even_subset(tmp_path: Path) -> None:
    args = ["model=resnet18", "dataset=demo", "recipe.epochs=1", "trainer.limit_train_batches=2",
            "trainer.limit_val_batches=2", "trainer.checkpoints=none", *train_args(tmp_path)]  # fmt: skip
    proc = run_cli(args, cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr[-3000:]
    (run,) = mlflow_runs(tmp_path)
    assert run.data.tags["val_limited"] == "true" and run.data.params["num_val"] == "64"  # 2 batches of 32
    assert not list((tmp_path / "ckpt").rglob("*.pt"))
    assert run.data.tags["faithful"] == "false"


def test_limited_evaluation_is_an_evenly_spread_fixed_subset() -> None:
    """A class-sorted split (image folders are) keeps every class in a limited evaluation."""
    labels = np.repeat(np.arange(10), 100)  # 1,000 samples sorted by class
    keep = spread(len(labels), 64)
    assert len(keep) == 64 and keep == sorted(set(keep)) and spread(len(labels), 64) == keep
    assert set(labels[keep]) == set(range(10))
    assert spread(50, 64) is None  # a limit beyond the split evaluates all of it
    shards = [ShardSampler(1000, 3, r, keep).indices for r in range(3)]
    assert sorted(i for shard in shards for i in shard) == keep  # every kept sample once over the ranks


def test_threads_default_to_the_cores_each_local_process_may_use(monkeypatch: pytest.MonkeyPatch) -> None:
    saved = torch.get_num_threads()
    monkeypatch.setattr("os.sched_getaffinity", lambda pid: set(range(8)))
    try:
        monkeypatch.delenv("OMP_NUM_THREADS", raising=False)
        assert distributed.set_threads("auto", 2) == 4 and torch.get_num_threads() == 4
        assert distributed.set_threads("auto", 16) == 1
        monkeypatch.setenv("OMP_NUM_THREADS", "1")  # what torchrun sets: respected
        assert distributed.set_threads("auto", 1) == 1
        assert distributed.set_threads(3, 2) == 3 and torch.get_num_threads() == 3
    finally:
        torch.set_num_threads(saved)


def test_archived_runs_of_a_config_are_capped(tmp_path: Path) -> None:
    folder = checkpoint.RunFolder(tmp_path / "row" / "seed0-abc")
    for _ in range(4):
        folder.path.mkdir(parents=True, exist_ok=True)
        (folder.path / "last.pt").write_bytes(b"x" * 10)
        moved = folder.archive_and_start_fresh(keep=2)
        assert moved is not None and not any(folder.path.iterdir()) and (moved / "last.pt").is_file()
        kept = moved
    archives = sorted((tmp_path / "row").glob("seed0-abc.*"))
    assert len(archives) == 2 and archives[-1] == kept  # the oldest are removed, the newest kept


def test_inference_says_what_size_a_cifar_row_expects() -> None:
    from resnet_repro import get_model, inference_model

    model = get_model("resnet18_8xb16_cifar10")
    with pytest.raises(UserError, match="expects 32x32 images"):
        inference_model(model, np.zeros((64, 48, 3), np.uint8))
    assert inference_model(model, np.zeros((32, 32, 3), np.uint8))["pred_scores"].shape == (10,)
