"""Shared fixtures: tiny datasets written in real formats, the CLI as a subprocess, MLflow readers."""

from __future__ import annotations

import contextlib
import functools
import os
import pickle
import shutil
import subprocess
import sys
import tempfile
from collections.abc import Iterator
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np
import pytest

if TYPE_CHECKING:
    import torch

REPO = Path(__file__).resolve().parents[1]


def write_cifar10(root: Path, n_train: int = 60, n_test: int = 20, seed: int = 0) -> Path:
    """A tiny CIFAR-10 in the official python-pickle layout (cifar-10-batches-py/), class-dependent images."""
    rng = np.random.default_rng(seed)
    folder = root / "cifar-10-batches-py"
    folder.mkdir(parents=True, exist_ok=True)

    def batch(n: int, name: str) -> dict:
        labels = [i % 10 for i in range(n)]
        base = np.array(labels, dtype=np.float32)[:, None] * 25.0  # brightness encodes the class
        data = np.clip(base + rng.normal(0, 8, size=(n, 3072)), 0, 255).astype(np.uint8)
        return {"batch_label": name, "labels": labels, "data": data, "filenames": [f"{i}.png" for i in range(n)]}

    per = [n_train // 5 + (1 if i < n_train % 5 else 0) for i in range(5)]
    for i, n in enumerate(per, start=1):
        with open(folder / f"data_batch_{i}", "wb") as f:
            pickle.dump(batch(n, f"training batch {i} of 5"), f)
    with open(folder / "test_batch", "wb") as f:
        pickle.dump(batch(n_test, "testing batch 1 of 1"), f)
    names = ["airplane", "automobile", "bird", "cat", "deer", "dog", "frog", "horse", "ship", "truck"]
    with open(folder / "batches.meta", "wb") as f:
        pickle.dump({"label_names": names, "num_cases_per_batch": 10000, "num_vis": 3072}, f)
    return root


def randomise(model: torch.nn.Module, seed: int = 0) -> torch.nn.Module:
    """`model` in eval mode with every tensor random (BN statistics included; integer ones 7), so that a tensor
    mapped or loaded wrongly shows in the output."""
    import torch

    torch.manual_seed(seed)
    with torch.no_grad():
        for name, t in model.state_dict().items():
            if t.is_floating_point():
                t.copy_(torch.rand_like(t) + 0.5 if name.endswith("running_var") else torch.randn_like(t) * 0.2)
            else:
                t.fill_(7)
    return model.eval()


@pytest.fixture
def one_thread() -> Iterator[None]:
    """Tiny tensors: one intra-op thread is as fast alone and far faster on a shared machine."""
    import torch

    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture
def tiny_cifar(tmp_path: Path) -> Path:
    return write_cifar10(tmp_path / "cifar10")


@functools.cache
def _empty_store() -> Path:
    """An MLflow SQLite store with its schema created: copying it saves each CLI test MLflow's ~4 s of
    database migrations (the product creates new stores the same way, through MLflow)."""
    from resnet_repro.tracking import Tracker

    folder = Path(tempfile.mkdtemp(prefix="empty-store-"))
    Tracker(f"sqlite:///{folder}/mlflow.db", "resnet_repro").client  # noqa: B018 - opening creates the schema
    return folder / "mlflow.db"


def run_cli(
    args: list[str], cwd: Path, module: str = "resnet_repro", timeout: float = 600, launcher: list[str] | None = None
) -> subprocess.CompletedProcess:
    """`python -m <module> <args>` in `cwd`, output captured; the environment pins CPU threads."""
    # one thread per run: pytest-xdist runs two tests at a time on the 2-core machine
    env = {**os.environ, "PYTHONUNBUFFERED": "1", "HYDRA_FULL_ERROR": "0", "OMP_NUM_THREADS": "1"}
    cmd = (launcher or [sys.executable, "-m", module]) + args
    return subprocess.run(cmd, cwd=cwd, env=env, capture_output=True, text=True, timeout=timeout)


def train_args(tmp: Path, data: Path | None = None) -> list[str]:
    """Overrides that keep a CLI run inside `tmp` and on the CPU (its store starts from a copy of an empty one)."""
    if not (tmp / "mlflow.db").exists():
        tmp.mkdir(parents=True, exist_ok=True)
        shutil.copyfile(_empty_store(), tmp / "mlflow.db")
    args = [
        f"tracking.uri=sqlite:///{tmp}/mlflow.db",
        f"trainer.checkpoint_root={tmp}/ckpt",
        "trainer.device=cpu",
        "trainer.num_workers=0",
    ]
    if data is not None:
        args += [f"dataset.root={data}", "dataset.download=false"]
    return args


def mlflow_runs(tmp: Path, experiment: str = "resnet_repro") -> list:
    from mlflow import MlflowClient

    client = MlflowClient(tracking_uri=f"sqlite:///{tmp}/mlflow.db")
    exp = client.get_experiment_by_name(experiment)
    return [] if exp is None else list(client.search_runs([exp.experiment_id]))


def history(tmp: Path, run_id: str, key: str) -> list[float]:
    from mlflow import MlflowClient

    client = MlflowClient(tracking_uri=f"sqlite:///{tmp}/mlflow.db")
    return [m.value for m in sorted(client.get_metric_history(run_id, key), key=lambda m: m.step)]


@contextlib.contextmanager
def read_only(path: Path) -> Iterator[Path]:
    """A file or folder no process of this user can write, also as root (immutable), for the block."""
    if os.geteuid() != 0:
        mode = path.stat().st_mode
        path.chmod(0o555 if path.is_dir() else 0o444)
        try:
            yield path
        finally:
            path.chmod(mode)
        return
    subprocess.run(["chattr", "+i", str(path)], check=True)
    try:
        yield path
    finally:
        subprocess.run(["chattr", "-i", str(path)], check=True)
