"""Trust under faults and bad input (issue 9): a catalogue of bad inputs, hostile pickles, kills at the
awkward moments, two identical commands at once, NaN losses, failing sweep jobs, changed data."""

from __future__ import annotations

import contextlib
import io
import os
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any
from unittest import mock

import numpy as np
import pytest
import torch

from resnet_repro import checkpoint
from tests.conftest import history, mlflow_runs, run_cli, train_args
from tests.test_train import write_image_folder

# the issue's `R`: a 2-step smoke run of the demo data
R = [
    "model=resnet18",
    "dataset=demo",
    "recipe.epochs=1",
    "recipe.gpus=1",
    "recipe.batch_per_gpu=16",
    "trainer.limit_train_batches=2",
    "trainer.limit_val_batches=1",
]
EPOCH_METRICS = ("train_loss", "lr", "val_top1", "val_top5", "epoch_time_s", "train_img_per_s")


class Hostile:
    """Unpickling this creates a marker file: what a malicious checkpoint would do."""

    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self) -> tuple[Any, ...]:
        return (Path.touch, (self.marker,))


def write_hostile(path: Path, marker: Path) -> Path:
    torch.save({"model": {}, "optimizer": {}, "epoch": 1, "config_hash": "x", "payload": Hostile(marker)}, path)
    return path


def snapshot(tmp: Path) -> dict[str, Any]:
    """What must not change: every checkpoint file and every run's status, tags and metric histories."""
    files = {str(p.relative_to(tmp)): p.read_bytes() for p in sorted((tmp / "ckpt").rglob("*")) if p.is_file()}
    runs = {}
    for run in mlflow_runs(tmp):
        metrics = {k: history(tmp, run.info.run_id, k) for k in run.data.metrics}
        runs[run.info.run_id] = (run.info.status, dict(run.data.tags), metrics)
    return {"files": files, "runs": runs}


@pytest.fixture(scope="module")
def workspace(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A folder with one finished smoke run (store + checkpoints) and the data the cases need."""
    tmp = tmp_path_factory.mktemp("catalogue")
    proc = run_cli([*R, *train_args(tmp)], cwd=tmp)
    assert proc.returncode == 0, proc.stderr[-3000:]
    folder = write_image_folder(tmp / "lacks_class", {"train": 2, "test": 1}, classes=10, size=16)
    for image in (folder / "test" / "class09").iterdir():
        image.unlink()
    (folder / "test" / "class09").rmdir()
    write_image_folder(tmp / "eleven", {"train": 1, "test": 1}, classes=11, size=16)
    corrupt = write_image_folder(tmp / "corrupt", {"train": 1, "test": 1}, classes=10, size=16)
    (corrupt / "test" / "class03" / "0.jpg").write_bytes(b"not a jpeg")
    write_hostile(tmp / "hostile.pt", tmp / "MARKER")
    (tmp / "a_file").write_text("not a folder")
    return tmp


def _last(tmp: Path) -> Path:
    return next((tmp / "ckpt").rglob("last.pt"))


def _folder(name: str) -> list[str]:
    return ["model=resnet18", "dataset=cifar10", "dataset.format=imagefolder", f"dataset.root={{tmp}}/{name}"]


# (extra arguments after R and the workspace's store/checkpoint settings, words the one line must contain)
CATALOGUE: dict[str, tuple[list[str], list[str]]] = {
    "micro_batch_negative": (["trainer.micro_batch=-4"], ["trainer.micro_batch=-4", ">= 1"]),
    "micro_batch_not_a_number": (["trainer.micro_batch=abc"], ["micro_batch"]),
    "micro_batch_does_not_divide": (["trainer.micro_batch=5"], ["micro_batch=5", "does not divide"]),
    "forward_batch_does_not_divide": (["trainer.forward_batch=48"], ["forward_batch=48"]),
    "limit_val_zero": (["trainer.limit_val_batches=0"], ["trainer.limit_val_batches=0", ">= 1"]),
    "limit_train_negative": (["trainer.limit_train_batches=-1"], ["trainer.limit_train_batches=-1"]),
    "lr_negative": (["recipe.optimizer.lr=-1"], ["recipe.optimizer.lr=-1", "(0, inf)"]),
    "lr_not_a_number": (["recipe.optimizer.lr=fast"], ["recipe.optimizer.lr=fast"]),
    "momentum_above_one": (["recipe.optimizer.momentum=1.5"], ["recipe.optimizer.momentum=1.5"]),
    "epochs_zero": (["recipe.epochs=0"], ["recipe.epochs=0", "positive"]),
    "device_unknown": (["trainer.device=tpu"], ["trainer.device=tpu", "cuda:N"]),
    "device_cuda_absent": (["trainer.device=cuda"], ["trainer.device=cuda", "no CUDA device"]),
    "device_cuda_index": (["trainer.device=cuda:3"], ["trainer.device=cuda:3"]),
    "multirun_with_an_absent_device": (["--multirun", "trainer.device=cpu,cuda"], ["trainer.device=cuda"]),
    "unknown_top_level_key": (["epochs=1"], ["unknown key 'epochs'", "did you mean recipe.epochs"]),
    "unknown_nested_key": (["recipe.epoch=3"], ["recipe.epoch", "epochs"]),
    "unknown_model": (["model=resnet99"], ["model=resnet99", "resnet152"]),
    "stem_for_dataset": (["dataset=imagenet1k", "stem=cifar"], ["stem=cifar", "v1b"]),
    "unknown_precision": (["precision=fp8"], ["precision=fp8", "bf16"]),
    "checkpoints_mode": (["trainer.checkpoints=some"], ["trainer.checkpoints=some", "last+best"]),
    "compile_mode": (["trainer.compile=fast"], ["trainer.compile=fast", "reduce-overhead"]),
    "threads_zero": (["trainer.threads=0"], ["trainer.threads=0"]),
    "workers_negative": (["trainer.num_workers=-1"], ["trainer.num_workers=-1"]),
    "data_on_device_word": (["trainer.data_on_device=maybe"], ["trainer.data_on_device=maybe", "auto"]),
    "resume_missing_file": (["trainer.resume=/no/such.pt"], ["trainer.resume=/no/such.pt", "auto"]),
    "warm_start_without_a_path": (["trainer.warm_start=true"], ["trainer.warm_start"]),
    "two_mode_flags": (["--cfg=job", "--multirun"], ["cannot be combined"]),
    "tracking_server_down": (["tracking.uri=http://127.0.0.1:1"], ["tracking.uri=http://127.0.0.1:1"]),
    "tracking_bad_scheme": (["tracking.uri=notascheme:::/x"], ["tracking.uri=notascheme:::/x"]),
    "test_split_lacks_a_class": (_folder("lacks_class"), ["different classes", "class09"]),
    "more_classes_than_num_classes": (_folder("eleven"), ["11 classes", "dataset.num_classes=10"]),
    "corrupt_test_image": (_folder("corrupt"), ["cannot decode image", "class03"]),
    "missing_data": (
        ["dataset=cifar10", "dataset.root={tmp}/nowhere", "dataset.download=false"],
        ["nowhere", "dataset.download=true"],
    ),
    "resume_a_best_pt": (["trainer.resume={best}"], ["best.pt", "last.pt"]),
    "resume_another_configs_checkpoint": (["seed=44", "trainer.resume={last}"], ["another config", "warm_start"]),
    "resume_a_hostile_pickle": (["trainer.resume={tmp}/hostile.pt"], ["hostile.pt", "refused", "trust_checkpoint"]),
    "unwritable_checkpoint_root": (
        ["seed=45", "trainer.checkpoint_root={tmp}/a_file/ckpt"],
        ["cannot write checkpoints"],
    ),
}


def _case_args(tmp: Path, extra: list[str]) -> list[str]:
    last = _last(tmp)
    values = {"tmp": str(tmp), "last": str(last), "best": str(last.with_name("best.pt"))}
    base = [*R, *train_args(tmp)]
    if any(a.startswith("tracking.uri=") for a in extra):
        base = [a for a in base if not a.startswith("tracking.uri=")]
    flags = [a for a in extra if a.startswith("--")]
    return flags + base + [a.format(**values) for a in extra if not a.startswith("--")]


IN_JOB = {  # cases found once the job runs (data, store, checkpoints); the others before Hydra starts
    "tracking_server_down",
    "tracking_bad_scheme",
    "test_split_lacks_a_class",
    "more_classes_than_num_classes",
    "corrupt_test_image",
    "missing_data",
    "resume_a_best_pt",
    "resume_another_configs_checkpoint",
    "resume_a_hostile_pickle",
    "unwritable_checkpoint_root",
}


def _in_process(argv: list[str]) -> tuple[int, str, str]:
    """`python -m resnet_repro argv` for a mistake the command line check catches: in this process (no
    second start of torch), with Hydra replaced by a tripwire in case the check lets it through."""
    from resnet_repro import __main__ as entry

    out, err, saved = io.StringIO(), io.StringIO(), sys.argv
    code: Any = 0
    try:
        tripwire = mock.patch.object(entry, "_hydra_main", side_effect=AssertionError("the check let it through"))
        with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err), tripwire:
            entry.main(argv)
    except SystemExit as stop:
        code = stop.code
    finally:
        sys.argv = saved
    return int(code or 0), out.getvalue(), err.getvalue()


@pytest.fixture(scope="module")
def catalogue_results(workspace: Path) -> dict[str, tuple[int, str, float]]:
    """Every case run once: command-line mistakes in this process, the others as real commands, two at a
    time (they are independent and only read the workspace)."""
    before = snapshot(workspace)
    results: dict[str, Any] = {}
    for case in (c for c in CATALOGUE if c not in IN_JOB):
        start = time.perf_counter()
        code, out, err = _in_process(_case_args(workspace, CATALOGUE[case][0]))
        results[case] = (code, out + err, err, time.perf_counter() - start)

    def one(case: str) -> tuple[int, str, str, float]:
        start = time.perf_counter()
        proc = run_cli(_case_args(workspace, CATALOGUE[case][0]), cwd=workspace, timeout=120)
        return proc.returncode, proc.stdout + proc.stderr, proc.stderr, time.perf_counter() - start

    with ThreadPoolExecutor(max_workers=2) as pool:
        results.update(zip(sorted(IN_JOB), pool.map(one, sorted(IN_JOB)), strict=True))
    results["_unchanged"] = snapshot(workspace) == before
    return results


@pytest.mark.slow
@pytest.mark.xdist_group("catalogue")  # one worker runs the whole catalogue (a module fixture)
@pytest.mark.parametrize("case", list(CATALOGUE))
def test_bad_input_is_one_line_exit_2_and_changes_nothing(case: str, catalogue_results: dict, workspace: Path) -> None:
    code, output, stderr, seconds = catalogue_results[case]
    lines = [line for line in stderr.splitlines() if line.strip()]
    assert code == 2, (code, output[-2000:])
    assert len(lines) == 1 and lines[0].startswith("resnet_repro: error:"), output[-2000:]
    for word in CATALOGUE[case][1]:
        assert word.format(tmp=workspace) in lines[0], lines[0]
    assert "Traceback" not in output
    assert seconds < 60  # a server that does not answer is found in seconds
    assert catalogue_results["_unchanged"], "a bad input changed the checkpoints or the MLflow store"
    assert not (workspace / "MARKER").exists()
    assert not list((workspace / "ckpt").rglob("*.tmp"))
    leftovers = [p for p in (workspace / "outputs").rglob("*") if p.is_dir() and not any(p.iterdir())]
    assert not leftovers, leftovers  # failed runs leave no empty output folders


# ---- checkpoints never run code ------------------------------------------------------------------
def test_every_load_path_refuses_a_hostile_pickle(tmp_path: Path, tiny_cifar: Path) -> None:
    from resnet_repro import get_model
    from resnet_repro.errors import UserError

    marker = tmp_path / "MARKER"
    evil = write_hostile(tmp_path / "evil.pt", marker)
    row = "resnet18_8xb16_cifar10"
    for call in (lambda: get_model(row, pretrained=evil), lambda: get_model(evil), lambda: checkpoint.load(evil)):
        with pytest.raises(UserError, match="refused"):
            call()
    proc = run_cli(
        [f"row={row}", f"checkpoint={evil}", *train_args(tmp_path, tiny_cifar)], tmp_path, "resnet_repro.test"
    )
    assert proc.returncode == 2 and "refused" in proc.stderr and len(proc.stderr.strip().splitlines()) == 1
    folder = checkpoint.RunFolder(tmp_path / "ckpt" / "x")  # resume=auto finds it in the config's folder
    folder.path.mkdir(parents=True)
    write_hostile(folder.last, marker)
    with pytest.raises(UserError, match="refused"):
        folder.resume_or_archive(
            "auto", epochs=2, config_hash="x", fingerprint=None, finished=bool, keep=1, trusted=False
        )
    assert not marker.exists()


def test_trusted_opt_in_loads_a_file_with_other_types(tmp_path: Path) -> None:
    """A harmless but non-tensor object (argparse.Namespace, as old training scripts saved) is refused by
    default, naming the type, and loads with the explicit opt-in."""
    import argparse

    from resnet_repro.errors import UserError

    path = tmp_path / "old.pt"
    torch.save({"state_dict": {}, "args": argparse.Namespace(lr=0.1)}, path)
    with pytest.raises(UserError, match="argparse.Namespace"):
        checkpoint.load(path)
    assert checkpoint.load(path, trusted=True)["args"].lr == 0.1
    np_meta = tmp_path / "numpy_meta.pt"  # mmcv-era metadata holds NumPy scalars and arrays: plain data, allowed
    torch.save({"state_dict": {}, "meta": {"seed": np.int64(3), "hist": np.zeros(3)}}, np_meta)
    assert int(checkpoint.load(np_meta)["meta"]["seed"]) == 3


# ---- kills at the awkward moments ----------------------------------------------------------------
FAULT_RUN = [
    "model=resnet18",
    "dataset=demo",
    "recipe.epochs=2",
    "recipe.gpus=1",
    "recipe.batch_per_gpu=16",
    "trainer.limit_train_batches=3",
    "trainer.deterministic=true",
]


def _killed_at(point: str, tmp: Path) -> subprocess.CompletedProcess:
    env = {**os.environ, "RESNET_REPRO_CRASH_AT": point, "OMP_NUM_THREADS": "1"}
    return subprocess.run(
        [sys.executable, "-m", "resnet_repro", *FAULT_RUN, *train_args(tmp)],
        cwd=tmp,
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
    )


@pytest.mark.slow
@pytest.mark.parametrize("point", ["before-first-checkpoint", "between-last-and-best", "before-finish"])
def test_a_kill_then_the_same_command_ends_in_one_finished_run_with_every_epoch_once(
    point: str, tmp_path: Path
) -> None:
    killed = _killed_at(point, tmp_path)
    assert killed.returncode == -9, killed.stderr[-2000:]
    (run,) = mlflow_runs(tmp_path)
    assert run.info.status == "RUNNING"  # what a kill leaves behind
    again = run_cli([*FAULT_RUN, *train_args(tmp_path)], cwd=tmp_path)
    assert again.returncode == 0, again.stderr[-3000:]
    (after,) = mlflow_runs(tmp_path)  # the same MLflow run, adopted, not a second one
    assert after.info.run_id == run.info.run_id and after.info.status == "FINISHED"
    latest = max((tmp_path / "outputs").glob("*/*"))  # the output_dir tag follows the resumed run
    assert after.data.tags["output_dir"] == str(latest) != run.data.tags["output_dir"]
    for key in EPOCH_METRICS:
        assert len(history(tmp_path, run.info.run_id, key)) == 2, key  # every epoch's metrics, once
    output = again.stdout + again.stderr
    assert ("epoch 1/2" in output) == (point == "before-first-checkpoint")  # only a lost epoch is trained again
    assert ("epoch 2/2" in output) == (point != "before-finish")  # a kill after the final checkpoint: books only
    folder = next((tmp_path / "ckpt").rglob("last.pt")).parent
    last, best = checkpoint.load(folder / "last.pt"), checkpoint.load(folder / "best.pt")
    assert best["epoch"] == last["best_epoch"] and torch.equal(
        best["model"]["fc.weight"], last["model"]["fc.weight"]
    ) == (last["best_epoch"] == 2)
    assert not list(folder.glob("*.tmp")) and not list(folder.glob(".*.tmp"))


@pytest.mark.slow
def test_two_identical_commands_one_trains_the_other_stops_in_one_line(tmp_path: Path) -> None:
    args = [*FAULT_RUN, "trainer.limit_train_batches=40", *train_args(tmp_path)]
    first = subprocess.Popen(
        [sys.executable, "-m", "resnet_repro", *args],
        cwd=tmp_path,
        text=True,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        env={**os.environ, "OMP_NUM_THREADS": "1"},
    )
    deadline = time.time() + 120
    while time.time() < deadline and not list((tmp_path / "ckpt").rglob("run.json")):
        time.sleep(0.1)
    second = run_cli(args, cwd=tmp_path)
    out, err = first.communicate(timeout=300)
    assert first.returncode == 0, err[-3000:]
    assert second.returncode == 2 and second.stderr.count("\n") == 1, second.stderr
    assert f"already being trained by pid {first.pid}" in second.stderr
    (run,) = mlflow_runs(tmp_path)
    assert run.info.status == "FINISHED" and len(history(tmp_path, run.info.run_id, "val_top1")) == 2


def test_a_nan_loss_fails_the_run_in_one_line_without_a_best_checkpoint(tmp_path: Path) -> None:
    proc = run_cli([*R, "recipe.optimizer.lr=1e30", *train_args(tmp_path)], cwd=tmp_path)
    assert proc.returncode == 2 and proc.stderr.count("\n") == 1 and "became nan" in proc.stderr, proc.stderr
    (run,) = mlflow_runs(tmp_path)
    assert run.info.status == "FAILED" and "val_top1" not in run.data.metrics
    assert not list((tmp_path / "ckpt").rglob("*.pt"))


@pytest.mark.slow
def test_a_failing_sweep_job_does_not_stop_the_next_and_the_sweep_says_so(tmp_path: Path) -> None:
    proc = run_cli(["--multirun", *R, "recipe.optimizer.lr=1e30,0.05", *train_args(tmp_path)], cwd=tmp_path)
    assert proc.returncode == 1, proc.stderr[-3000:]
    summary = [line for line in proc.stdout.splitlines() if line.startswith("  #")]
    assert len(summary) == 2 and "FAILED" in summary[0] and "became nan" in summary[0], proc.stdout
    assert "FINISHED" in summary[1] and "top-1" in summary[1]
    statuses = sorted(r.info.status for r in mlflow_runs(tmp_path) if r.data.tags["run_type"] == "train")
    assert statuses == ["FAILED", "FINISHED"]
    (sweep,) = [r for r in mlflow_runs(tmp_path) if r.data.tags["run_type"] == "sweep"]
    assert sweep.info.status == "FAILED"  # the sweep's own run says a job failed


@pytest.mark.slow
def test_changed_data_trains_again_and_the_fingerprint_is_recorded(tmp_path: Path) -> None:
    data = write_image_folder(tmp_path / "jpeg", {"train": 2, "test": 1}, size=32)
    args = [
        "model=resnet18",
        "dataset=cifar10",
        "dataset.format=imagefolder",
        "recipe.epochs=1",
        "recipe.gpus=1",
        "recipe.batch_per_gpu=10",
        *train_args(tmp_path, data),
    ]
    assert run_cli(args, cwd=tmp_path).returncode == 0
    again = run_cli(args, cwd=tmp_path)
    assert again.returncode == 0 and "skipping" in again.stdout + again.stderr  # same data: done already
    (data / "train" / "class00" / "1.jpg").write_bytes((data / "train" / "class00" / "0.jpg").read_bytes() + b"\0")
    changed = run_cli(args, cwd=tmp_path)
    assert changed.returncode == 0 and "skipping" not in changed.stdout + changed.stderr
    prints = {r.data.tags["data_fingerprint"] for r in mlflow_runs(tmp_path)}
    assert len(prints) == 2 and all(len(p) == 16 for p in prints)


def test_runs_left_running_by_dead_processes_are_closed_and_stale_temporaries_removed(tmp_path: Path) -> None:
    from resnet_repro.config import compose, config_hash
    from resnet_repro.tracking import Tracker

    cfg = compose([*R, *train_args(tmp_path)])
    tracker = Tracker(f"sqlite:///{tmp_path}/mlflow.db", "resnet_repro")
    dead = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True)
    orphan = tracker.start("orphan", {"config_hash": config_hash(cfg), "run_type": "train"})
    tracker.set_tags({"pid": dead.stdout.strip()})  # its process is gone
    folder = checkpoint.run_dir(tmp_path / "ckpt", cfg.row_name, 0, config_hash(cfg))
    folder.mkdir(parents=True)
    (folder / ".last.pt.abc.tmp").write_bytes(b"\0" * 1000)
    assert run_cli([*R, *train_args(tmp_path)], cwd=tmp_path).returncode == 0
    assert Tracker(f"sqlite:///{tmp_path}/mlflow.db", "resnet_repro").status(orphan) == "KILLED"
    assert not list(folder.glob(".*.tmp"))


def test_a_cifar_archive_that_wants_code_run_is_refused(tmp_path: Path, tiny_cifar: Path) -> None:
    """The CIFAR archives are pickles too: they are read as plain data (dicts, lists, NumPy arrays) only."""
    import pickle

    from resnet_repro.data.datasets import DataError, cifar

    ds = {"name": "cifar10", "root": str(tiny_cifar), "download": False}
    assert len(cifar(ds, train=False)) == 20 and cifar(ds, train=True).images.shape == (60, 32, 32, 3)
    marker = tmp_path / "MARKER"
    with open(tiny_cifar / "cifar-10-batches-py" / "test_batch", "wb") as f:
        pickle.dump({"data": Hostile(marker), "labels": []}, f)
    with pytest.raises(DataError, match="refused"):
        cifar(ds, train=False)
    assert not marker.exists()
