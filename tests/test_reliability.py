"""Trust under faults and bad input (issue 9): a catalogue of bad inputs, hostile pickles, kills at the
awkward moments, two identical commands at once, NaN losses, failing sweep jobs, changed data."""

from __future__ import annotations

import contextlib
import hashlib
import io
import json
import os
import subprocess
import sys
import time
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any
from unittest import mock

import numpy as np
import pytest
import torch

from resnet_repro import checkpoint
from tests.conftest import history, mlflow_runs, read_only, run_cli, train_args
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
def workspace(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Path]:
    """A folder with one finished smoke run (store + checkpoints) and the data and files the cases need."""
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
    (tmp / "empty.pt").write_bytes(b"")
    (tmp / "truncated.pt").write_bytes(_last(tmp).read_bytes()[:5000])
    db = tmp / "read_only" / "mlflow.db"
    db.parent.mkdir()
    db.write_bytes((tmp / "mlflow.db").read_bytes())
    with read_only(db):
        _BEFORE[tmp] = (snapshot(tmp), _hydra_dirs(tmp))
        yield tmp


def _hydra_dirs(tmp: Path) -> list[Path]:
    return sorted((tmp / "outputs").glob("*/*"))


_BEFORE: dict[Path, tuple[dict[str, Any], list[Path]]] = {}  # workspace -> (snapshot, Hydra folders)


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
    "epochs_zero": (["recipe.epochs=0"], ["recipe.epochs=0", "an integer >= 1"]),
    "warmup_negative": (["recipe.schedule.warmup_epochs=-2"], ["recipe.schedule.warmup_epochs=-2", "an integer >= 0"]),
    "seed_not_a_number": (["seed=abc"], ["seed=abc", "an integer in [0, 4294967295]"]),
    "seed_beyond_64_bits": (["seed=18446744073709551616"], ["seed=18446744073709551616", "4294967295"]),
    "seed_a_fraction": (["seed=1.5"], ["seed=1.5", "an integer"]),
    "input_size_zero": (["dataset.input_size=0"], ["dataset.input_size=0", "an integer >= 1"]),
    "experiment_empty": (["tracking.experiment=''"], ["tracking.experiment=''", "non-empty"]),
    "unknown_key_added_with_plus": (["+recipe.optimizer.lrr=0.1"], ["'recipe.optimizer.lrr'", "recipe.optimizer.lr"]),
    "non_ascii_value_unquoted": (["dataset.root=/data/café"], ["dataset.root=/data/café", "quote it"]),
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
    "resume_an_empty_file": (["trainer.resume={tmp}/empty.pt"], ["empty.pt", "empty (0 bytes)"]),
    "resume_a_truncated_file": (["trainer.resume={tmp}/truncated.pt"], ["truncated.pt", "cannot read"]),
    "warm_start_without_a_path": (["trainer.warm_start=true"], ["trainer.warm_start"]),
    "two_mode_flags": (["--cfg=job", "--multirun"], ["cannot be combined"]),
    "tracking_server_down": (["tracking.uri=http://127.0.0.1:1"], ["tracking.uri=http://127.0.0.1:1"]),
    "tracking_bad_scheme": (["tracking.uri=notascheme:::/x"], ["tracking.uri=notascheme:::/x"]),
    "tracking_folder_missing": (
        ["tracking.uri=sqlite:////nonexistent/dir/mlflow.db"],
        ["tracking.uri=sqlite:////nonexistent/dir/mlflow.db", "does not exist"],
    ),
    "tracking_store_read_only": (
        ["tracking.uri=sqlite:///{tmp}/read_only/mlflow.db"],
        ["read_only/mlflow.db", "cannot write", "readonly"],
    ),
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
    "warm_start_from_another_architecture": (
        ["model=resnet34", "trainer.warm_start=true", "trainer.resume={last}"],
        ["last.pt does not fit ResNet-34", "missing keys"],
    ),
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


IN_JOB = {  # cases found once the job runs (data, store, checkpoints): real commands; the others before Hydra
    "tracking_server_down",
    "tracking_store_read_only",
    "test_split_lacks_a_class",
    "more_classes_than_num_classes",
    "corrupt_test_image",
    "missing_data",
    "warm_start_from_another_architecture",
    "unwritable_checkpoint_root",
}
CASE_TIMEOUT_S = 180  # each case alone: a case that hangs fails by itself, not the catalogue


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


def _run_case(case: str, tmp: Path) -> tuple[int, str, str]:
    """(exit status, all output, stderr): a command-line mistake in this process, the others as real commands."""
    args = _case_args(tmp, CATALOGUE[case][0])
    if case not in IN_JOB:
        code, out, err = _in_process(args)
        return code, out + err, err
    proc = run_cli(args, cwd=tmp, timeout=CASE_TIMEOUT_S)
    return proc.returncode, proc.stdout + proc.stderr, proc.stderr


@pytest.mark.slow
@pytest.mark.xdist_group("catalogue")  # one worker runs every case against its workspace (a module fixture)
@pytest.mark.parametrize("case", list(CATALOGUE))
def test_bad_input_is_one_line_exit_2_and_changes_nothing(case: str, workspace: Path) -> None:
    start = time.perf_counter()
    code, output, stderr = _run_case(case, workspace)
    seconds = time.perf_counter() - start
    lines = [line for line in stderr.splitlines() if line.strip()]
    assert code == 2, (code, output[-2000:])
    assert len(lines) == 1 and lines[0].startswith("resnet_repro: error:"), output[-2000:]
    for word in CATALOGUE[case][1]:
        assert word.format(tmp=workspace) in lines[0], lines[0]
    assert "Traceback" not in output
    assert seconds < 90  # a server that does not answer is found in seconds
    before, hydra_dirs = _BEFORE[workspace]
    assert snapshot(workspace) == before, "a bad input changed the checkpoints or the MLflow store"
    assert not (workspace / "MARKER").exists()
    assert not list((workspace / "ckpt").rglob("*.tmp"))
    leftovers = [p for p in (workspace / "outputs").rglob("*") if p.is_dir() and not any(p.iterdir())]
    assert not leftovers, leftovers  # failed runs leave no empty output folders
    assert _hydra_dirs(workspace) == hydra_dirs, "a failed run left a Hydra output folder"


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


def test_a_zero_byte_checkpoint_is_one_line_on_every_load_path(tmp_path: Path) -> None:
    from resnet_repro import get_model
    from resnet_repro.errors import UserError

    empty = tmp_path / "empty.pt"
    empty.write_bytes(b"")
    calls = (lambda: get_model(empty), lambda: get_model("resnet18_8xb16_cifar10", pretrained=empty))
    for call in (*calls, lambda: checkpoint.load(empty)):
        with pytest.raises(UserError, match=r"empty\.pt is empty \(0 bytes\), not a checkpoint"):
            call()


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


def _killed_at(point: str, tmp: Path, extra: Sequence[str] = ()) -> subprocess.CompletedProcess:
    env = {**os.environ, "RESNET_REPRO_CRASH_AT": point, "OMP_NUM_THREADS": "1"}
    return subprocess.run(
        [sys.executable, "-m", "resnet_repro", *FAULT_RUN, *extra, *train_args(tmp)],
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


def test_an_atomic_write_that_fails_leaves_the_old_file_and_no_temporary(tmp_path: Path) -> None:
    record = tmp_path / "run.json"
    checkpoint.save_atomic({"mlflow_run_id": "r1"}, record)
    with pytest.raises(TypeError):
        checkpoint.save_atomic({"mlflow_run_id": object()}, record)  # not JSON: fails half-way
    assert json.loads(record.read_text()) == {"mlflow_run_id": "r1"} and [*tmp_path.iterdir()] == [record]


def test_an_atomic_write_creates_its_folder(tmp_path: Path) -> None:
    checkpoint.save_atomic({"mlflow_run_id": "r1"}, tmp_path / "a" / "b" / "run.json")
    assert json.loads((tmp_path / "a" / "b" / "run.json").read_text()) == {"mlflow_run_id": "r1"}


def test_a_cifar_archive_that_wants_code_run_is_refused(tmp_path: Path, tiny_cifar: Path) -> None:
    """The CIFAR archives are pickles too: they are read as plain data (dicts, lists, NumPy arrays) only."""
    import pickle

    from resnet_repro.data.datasets import DataError, data_source

    source = data_source({"name": "cifar10", "format": "pickle", "root": str(tiny_cifar), "download": False})
    assert len(source.load("test")) == 20 and source.load("train").images.shape == (60, 32, 32, 3)
    marker = tmp_path / "MARKER"
    with open(tiny_cifar / "cifar-10-batches-py" / "test_batch", "wb") as f:
        pickle.dump({"data": Hostile(marker), "labels": []}, f)
    with pytest.raises(DataError, match="refused"):
        source.load("test")
    assert not marker.exists()


def test_the_cifar_md5s_are_read_once_per_process_and_decide_verified(
    tiny_cifar: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Reading the splits (every rank) computes no md5; the fingerprint (rank 0, before the run) and the
    data_verified tag (rank 0, as it opens) share one pass; an archive changed since is read again."""
    from resnet_repro.data import datasets

    cfg = {"name": "cifar10", "format": "pickle", "root": str(tiny_cifar)}
    source, folder = datasets.data_source(cfg), tiny_cifar / "cifar-10-batches-py"
    read, md5 = [], datasets.calculate_md5
    monkeypatch.setattr(datasets, "calculate_md5", lambda path: read.append(path) or md5(path))
    datasets._md5.cache_clear()
    assert len(source.load("train")) == 60 and len(source.load("test")) == 20 and read == []  # every rank reads
    first = datasets.fingerprint(cfg)
    assert source.verified() is False and len(read) == 7  # 5 train batches, the test batch, the meta file
    release = {name: hashlib.md5((folder / name).read_bytes()).hexdigest() for name, _ in source.files}
    monkeypatch.setattr(source, "files", list(release.items()))  # as if these were the official files
    assert source.verified() is True and datasets.fingerprint(cfg) == first and len(read) == 7
    (folder / "test_batch").write_bytes((folder / "test_batch").read_bytes() + b"\0")
    assert source.verified() is False and datasets.fingerprint(cfg) != first and len(read) == 8


# ---- stuck states (issue 20): each says what it does, and the obvious command works -----------------
def _fake_last(path: Path, epoch: int, *, best_epoch: int | None = None, run_id: str = "r1") -> Path:
    """A last.pt with what the resume policy reads (epoch, owner, data, best, run), written as training does."""
    path.parent.mkdir(parents=True, exist_ok=True)
    state = {"epoch": epoch, "optimizer": {}, "config_hash": "h", "data_fingerprint": "d", "mlflow_run_id": run_id}
    state |= {"best_epoch": epoch if best_epoch is None else best_epoch, "model": {"w": torch.full((2,), epoch)}}
    checkpoint.save_atomic(state, path)
    return path


def _choose(folder: checkpoint.RunFolder, mode: str = "auto", finished: bool = False) -> checkpoint.Resume:
    return folder.resume_or_archive(
        mode, epochs=2, config_hash="h", fingerprint="d", finished=lambda run_id: finished, keep=2, trusted=False
    )


def test_a_truncated_last_pt_names_the_way_out_and_resume_none_takes_it(tmp_path: Path) -> None:
    from resnet_repro.errors import UserError

    folder = checkpoint.RunFolder(tmp_path / "run")
    _fake_last(folder.last, 1)
    folder.last.write_bytes(folder.last.read_bytes()[:500])
    with pytest.raises(UserError, match=r"cannot read checkpoint .*last\.pt.*; trainer\.resume=none starts"):
        _choose(folder)
    assert _choose(folder, "none").action == "fresh"  # the unreadable file is moved aside, not read
    assert not folder.last.exists() and len(list(tmp_path.glob("run.*/last.pt"))) == 1


def test_a_truncated_best_pt_is_rebuilt_or_moved_aside_never_blocking(tmp_path: Path) -> None:
    folder = checkpoint.RunFolder(tmp_path / "run")
    _fake_last(folder.last, 1)  # epoch 1 was the best: last.pt holds its model
    folder.best.write_bytes(b"\x80truncated")
    assert _choose(folder).action == "continue"
    assert checkpoint.load(folder.best)["epoch"] == 1  # rebuilt from last.pt
    _fake_last(folder.last, 2)  # a finished run (skip_finished=false trains it again): archived, not read
    folder.best.write_bytes(b"")
    assert _choose(folder, finished=True).action == "fresh" and not folder.best.exists()


def test_resuming_a_finished_runs_last_pt_refuses_rather_than_copying_its_epochs(tmp_path: Path) -> None:
    from resnet_repro.errors import UserError

    last = _fake_last(tmp_path / "old" / "last.pt", 2)
    folder = checkpoint.RunFolder(tmp_path / "run")
    with pytest.raises(UserError, match="is complete .* and its MLflow run r1 finished: nothing to resume"):
        _choose(folder, str(last), finished=True)
    assert _choose(folder, str(last), finished=False).action == "finish"  # its books only, in its own run


def test_a_run_deleted_in_mlflow_is_not_adopted(tmp_path: Path) -> None:
    from resnet_repro.tracking import Tracker

    uri = train_args(tmp_path)[0].removeprefix("tracking.uri=")
    tracker = Tracker(uri, "resnet_repro")
    gone = tracker.start("gone", {"run_type": "train"})
    tracker.client.delete_run(gone)
    again = Tracker(uri, "resnet_repro")
    assert again.status(gone) is None
    assert not again.open("new", adopt=gone, tags={}, params={}, texts={}, resumed_tags={})
    assert again.run_id != gone


def test_no_room_for_two_checkpoints_stops_before_training(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    from resnet_repro.errors import UserError

    model = torch.nn.Linear(100, 10)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
    model(torch.ones(1, 100)).sum().backward()
    optimizer.step()
    checkpoint.save_atomic({"model": model.state_dict(), "optimizer": optimizer.state_dict()}, tmp_path / "last.pt")
    assert checkpoint.estimated_size(model) >= (tmp_path / "last.pt").stat().st_size * 0.9
    checkpoint.check_room(tmp_path, model)  # a real disk has room for 4 KB
    full = type("Usage", (), {"free": 5000})()
    monkeypatch.setattr(checkpoint.shutil, "disk_usage", lambda path: full)
    with pytest.raises(UserError, match=r"only 0 MB free in .*checkpoint_root"):
        checkpoint.check_room(tmp_path, model)


# ---- counted twice (issue 20) --------------------------------------------------------------------
@pytest.mark.slow
def test_one_config_started_from_two_checkpoint_roots_at_once_trains_once(tmp_path: Path) -> None:
    args = [*FAULT_RUN, *train_args(tmp_path)]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    starts = [
        subprocess.Popen(
            [sys.executable, "-m", "resnet_repro", *args, f"trainer.checkpoint_root={tmp_path}/{root}"],
            cwd=tmp_path,
            env=env,
            text=True,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
        )  # fmt: skip
        for root in ("ckpt_a", "ckpt_b")
    ]
    ends = [(p.wait(timeout=600), *p.communicate()) for p in starts]
    codes = sorted(code for code, _, _ in ends)
    assert codes == [0, 2], [err[-2000:] for _, _, err in ends]
    (refused,) = [err for code, _, err in ends if code == 2]
    assert refused.count("\n") == 1 and "already being trained by pid" in refused, refused
    (run,) = mlflow_runs(tmp_path)  # the one that gave way left no run behind
    assert run.info.status == "FINISHED" and len(history(tmp_path, run.info.run_id, "val_top1")) == 2


@pytest.mark.slow
def test_a_restart_without_checkpoints_logs_no_epoch_twice(tmp_path: Path) -> None:
    extra = ["trainer.checkpoints=none"]
    killed = _killed_at("after-epoch-1", tmp_path, extra)
    assert killed.returncode == -9, killed.stderr[-2000:]
    again = run_cli([*FAULT_RUN, *extra, *train_args(tmp_path)], cwd=tmp_path)
    assert again.returncode == 0 and "closed (KILLED)" in again.stdout, again.stderr[-3000:]
    runs = {r.info.status: r for r in mlflow_runs(tmp_path)}
    assert sorted(runs) == ["FINISHED", "KILLED"]
    assert len(history(tmp_path, runs["KILLED"].info.run_id, "val_top1")) == 1  # epoch 1, once
    for key in EPOCH_METRICS:
        assert len(history(tmp_path, runs["FINISHED"].info.run_id, key)) == 2, key  # each epoch once
