"""The trainer end to end on CPU: real data formats, MLflow records, checkpoints, resume, DDP, precision."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import cv2
import numpy as np
import pytest
import torch

from resnet_repro import checkpoint
from resnet_repro.identity import Deviation, read_deviations
from tests.conftest import history, mlflow_runs, run_cli, train_args, write_cifar10

EPOCH_METRICS = {"train_loss", "lr", "val_top1", "val_top5", "epoch_time_s", "train_img_per_s"}
R18_CIFAR = ["model=resnet18", "dataset=cifar10"]


def only_run(tmp: Path):
    runs = mlflow_runs(tmp)
    assert len(runs) == 1, [r.info.run_id for r in runs]
    return runs[0]


def assert_finished_run(tmp: Path, row: str, epochs: int):
    run = only_run(tmp)
    assert run.info.status == "FINISHED"
    assert run.data.tags["row"] == row and run.data.tags["run_type"] == "train"
    assert set(run.data.metrics) >= EPOCH_METRICS
    for key in EPOCH_METRICS:
        assert len(history(tmp, run.info.run_id, key)) == epochs, key
    assert run.data.metrics["epochs_completed"] == epochs
    return run


def test_one_epoch_on_tiny_cifar_pickles(tiny_cifar: Path, tmp_path: Path) -> None:
    proc = run_cli([*R18_CIFAR, "recipe.epochs=1", *train_args(tmp_path, tiny_cifar)], cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr[-3000:]
    run = assert_finished_run(tmp_path, "resnet18_8xb16_cifar10", 1)
    tags, params = run.data.tags, run.data.params
    assert tags["faithful"] == "false" and read_deviations(tags["deviations"]) == [
        Deviation("recipe.epochs", 200, 1, "smoke")  # the record as the run wrote it (JSON)
    ]
    assert tags["world_size"] == "1" and tags["device"] == "cpu" and tags["data_verified"] == "false"
    assert {"git_commit", "hydra_overrides", "version.torch", "config_hash", "section"} <= set(tags)
    assert "recipe.epochs=1" in tags["hydra_overrides"]
    assert params["recipe.optimizer.lr"] == "0.1" and params["batch_global"] == "128"
    # the recipe's 8 GPUs x 16 on a CPU: 8 passes of 16 (batches.py; one pass with BN groups of 16 on a GPU)
    assert params["batch_per_device"] == "128" and params["batch_bn_group"] == "16" and params["accum_steps"] == "8"
    assert params["batch_forward"] == "16" and params["bn_images"] == "16" and tags["data_on_device"] != "false"
    assert params["num_params"] == "11173962" and round(float(params["flops_g"]), 2) == 0.56
    assert history(tmp_path, run.info.run_id, "lr") == [0.1]
    ckpt = Path(tags["checkpoint_dir"])
    assert (ckpt / "last.pt").is_file() and (ckpt / "best.pt").is_file()
    assert "MLflow run" in proc.stdout + proc.stderr and "mlflow ui --backend-store-uri" in proc.stdout + proc.stderr
    from mlflow import MlflowClient

    client = MlflowClient(tracking_uri=f"sqlite:///{tmp_path}/mlflow.db")
    files = {f.path for f in client.list_artifacts(run.info.run_id, "config")}
    assert files == {"config/config.yaml", "config/overrides.yaml"}


def write_image_folder(root: Path, splits: dict[str, int], classes: int = 10, size: int = 40) -> Path:
    rng = np.random.default_rng(0)
    for split, per_class in splits.items():
        for c in range(classes):
            folder = root / split / f"class{c:02d}"
            folder.mkdir(parents=True, exist_ok=True)
            for i in range(per_class):
                img = np.clip(c * 25 + rng.normal(0, 10, (size, size, 3)), 0, 255).astype(np.uint8)
                cv2.imwrite(str(folder / f"{i}.jpg"), img)
    return root


def test_imagefolder_format_and_a_corrupt_image_named_in_one_line(tmp_path: Path) -> None:
    data = write_image_folder(tmp_path / "jpeg", {"train": 4, "test": 2})
    args = [*R18_CIFAR, "dataset.format=imagefolder", "recipe.epochs=1", *train_args(tmp_path, data)]
    proc = run_cli(args, cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert only_run(tmp_path).data.params["num_train"] == "40"
    bad = data / "test" / "class03" / "1.jpg"
    bad.write_bytes(b"not a jpeg")
    proc = run_cli([*args, "trainer.skip_finished=false"], cwd=tmp_path)
    assert proc.returncode == 2
    assert proc.stderr.strip().splitlines() == [proc.stderr.strip().splitlines()[-1]]
    assert str(bad) in proc.stderr and "Traceback" not in proc.stderr


def test_missing_data_is_a_one_line_error(tmp_path: Path) -> None:
    proc = run_cli([*R18_CIFAR, *train_args(tmp_path, tmp_path / "nowhere")], cwd=tmp_path)
    assert proc.returncode == 2
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and "nowhere" in lines[0] and "dataset.download=true" in lines[0], proc.stderr


def test_bad_resume_path_is_a_one_line_error(tmp_path: Path, tiny_cifar: Path) -> None:
    proc = run_cli([*R18_CIFAR, "trainer.resume=/no/such.pt", *train_args(tmp_path, tiny_cifar)], cwd=tmp_path)
    assert proc.returncode == 2 and len(proc.stderr.strip().splitlines()) == 1 and "trainer.resume" in proc.stderr


def test_reissuing_a_finished_config_skips_it(tiny_cifar: Path, tmp_path: Path) -> None:
    args = [*R18_CIFAR, "recipe.epochs=1", *train_args(tmp_path, tiny_cifar)]
    assert run_cli(args, cwd=tmp_path).returncode == 0
    again = run_cli(args, cwd=tmp_path)
    assert again.returncode == 0 and "skipping" in again.stdout + again.stderr
    assert len(mlflow_runs(tmp_path)) == 1


def deterministic(tmp: Path, epochs: int, steps: int) -> list[str]:
    """A small deterministic run on the demo digits (16 px: cheap on a CPU), `steps` 16-image steps an epoch."""
    return [
        "model=resnet18",
        "dataset=demo",
        f"recipe.epochs={epochs}",
        "recipe.gpus=1",
        "recipe.batch_per_gpu=16",
        f"trainer.limit_train_batches={steps}",
        "trainer.deterministic=true",
        "recipe.optimizer.lr=0.02",
        *train_args(tmp),
    ]


@pytest.mark.slow
def test_killed_and_resumed_run_ends_equal_to_an_uninterrupted_one(tmp_path: Path) -> None:
    whole, broken = tmp_path / "whole", tmp_path / "broken"
    whole.mkdir(), broken.mkdir()
    assert run_cli(deterministic(whole, 3, 10), cwd=whole).returncode == 0

    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    proc = subprocess.Popen(
        [sys.executable, "-m", "resnet_repro", *deterministic(broken, 3, 10)],
        cwd=broken,
        env=env,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
        start_new_session=True,
    )
    last = broken / "ckpt"
    deadline = time.time() + 300
    while time.time() < deadline and proc.poll() is None:
        found = list(last.rglob("last.pt"))
        if found and checkpoint.load(found[0])["epoch"] >= 1:
            os.killpg(proc.pid, signal.SIGKILL)  # a crash: no cleanup, the run stays RUNNING in MLflow
            break
        time.sleep(0.05)
    assert proc.wait() == -signal.SIGKILL, "the run ended before it could be killed"
    assert only_run(broken).info.status == "RUNNING"
    resumed = run_cli(deterministic(broken, 3, 10), cwd=broken)
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert "resumed" in resumed.stdout + resumed.stderr

    a, b = only_run(whole), only_run(broken)  # the resumed job continued the same MLflow run
    assert b.data.tags["resumed_at_epoch"] in {"1", "2"} and b.info.status == "FINISHED"
    for key in ("train_loss", "val_top1", "val_top5", "lr"):
        assert history(whole, a.info.run_id, key) == pytest.approx(history(broken, b.info.run_id, key), abs=1e-6), key
    wa = checkpoint.load(next(whole.rglob("last.pt")))["model"]
    wb = checkpoint.load(next(broken.rglob("last.pt")))["model"]
    assert all(torch.equal(wa[k], wb[k]) for k in wa)


@pytest.mark.slow
def test_two_process_ddp_matches_one_process_of_the_same_global_batch(tmp_path: Path) -> None:
    """gloo DDP: each step's global batch is cut into the same micro-batches on 1 or 2 processes, so the two
    runs do the same arithmetic up to the order of floating-point sums. Stated tolerance: train loss within
    1e-4, val top-1/top-5 within 2.5 points (a few of the 359 validation images)."""
    one, two = tmp_path / "one", tmp_path / "two"
    one.mkdir(), two.mkdir()
    common = ["recipe.gpus=2"]  # global batch 32: 2 BN groups of 16 per step either way
    assert run_cli([*deterministic(one, 2, 4), *common], cwd=one).returncode == 0
    proc = run_cli([*deterministic(two, 2, 4), *common, "trainer.nproc_per_node=2"], cwd=two)
    assert proc.returncode == 0, proc.stderr[-3000:]
    a, b = only_run(one), only_run(two)
    assert b.data.tags["world_size"] == "2" and b.data.params["batch_per_device"] == "16"
    assert history(one, a.info.run_id, "train_loss") == pytest.approx(
        history(two, b.info.run_id, "train_loss"), abs=1e-4
    )
    for key in ("val_top1", "val_top5"):
        assert history(one, a.info.run_id, key) == pytest.approx(history(two, b.info.run_id, key), abs=2.5), key
    assert len(list((two / "outputs").glob("*/*"))) == 1  # one output directory
    log = next((two / "outputs").glob("*/*/train.log")).read_text()
    assert "epoch 2/2  loss" in log and "MLflow run" in log  # the workers' lines land in Hydra's log too


@pytest.mark.slow
def test_torchrun_launch_writes_one_run_and_one_output_dir(tmp_path: Path) -> None:
    data = write_cifar10(tmp_path / "c10", n_train=32, n_test=20)
    torchrun = [
        sys.executable,
        "-m",
        "torch.distributed.run",
        "--standalone",
        "--nproc_per_node=2",
        "-m",
        "resnet_repro",
    ]
    args = [*R18_CIFAR, "recipe.epochs=1", "recipe.gpus=2", *train_args(tmp_path, data)]
    proc = run_cli(args, cwd=tmp_path, launcher=torchrun)
    assert proc.returncode == 0, proc.stderr[-3000:]
    run = only_run(tmp_path)
    assert run.info.status == "FINISHED" and run.data.tags["world_size"] == "2"
    dirs = list((tmp_path / "outputs").glob("*/*"))
    assert len(dirs) == 1 and (dirs[0] / ".hydra" / "config.yaml").is_file()


@pytest.mark.parametrize("precision", ["bf16", "amp-fp16", "amp-fp16-static512"])
def test_mixed_precision_paths_run_on_cpu(precision: str, tmp_path: Path) -> None:
    if precision != "bf16" and not torch.amp.is_autocast_available("cpu"):
        pytest.skip("this torch has no CPU autocast")
    # one step of 4 of the demo's 16-px images: CPU float16 kernels are slow
    proc = run_cli(
        [
            "model=resnet18",
            "dataset=demo",
            f"precision={precision}",
            "recipe.epochs=1",
            "recipe.gpus=1",
            "recipe.batch_per_gpu=4",
            "trainer.limit_train_batches=1",
            "trainer.limit_val_batches=1",
            *train_args(tmp_path),
        ],
        cwd=tmp_path,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    run = only_run(tmp_path)
    assert run.info.status == "FINISHED" and np.isfinite(run.data.metrics["train_loss"])
    assert run.data.params["precision.name"] == precision
