"""Runs that survive a cluster: a signal stops at a step boundary with a checkpoint of it, the same command resumes
there bitwise (1 process, the CPU loader and the device-resident one; 2 gloo processes), a dead worker is named in
one line or restarted, two "nodes" train as one, submitit requeues a job stopped by its time-limit warning.

The faults come from resnet_repro/faults.py (RESNET_REPRO_CRASH_AT): signals sent at a given step, not sleeps."""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from resnet_repro import checkpoint, faults, stopping
from tests.conftest import history, mlflow_runs, train_args

# 2 epochs of 4 steps; drop-path draws from torch's RNG every step, so a resume must restore it exactly
DEMO = [
    "model=resnet18",
    "dataset=demo",
    "recipe.epochs=2",
    "recipe.model.drop_path_rate=0.1",
    "trainer.limit_train_batches=4",
    "trainer.limit_val_batches=1",
    "trainer.log_every_n_steps=2",
    "trainer.deterministic=true",
]
ONE = ["recipe.gpus=1", "recipe.batch_per_gpu=8"]
TWO = ["recipe.gpus=2", "recipe.batch_per_gpu=4", "trainer.nproc_per_node=2"]  # 8 images a step either way
EPOCH_KEYS = ("train_loss", "lr", "val_top1", "val_top5")


# ---- one process, in this process (cheap): stop, resume, compare ------------------------------------------------
@pytest.fixture
def run_here(monkeypatch: pytest.MonkeyPatch):
    """train() in this process with RESNET_REPRO_CRASH_AT=crash: its result, or the Stopped it ended with."""
    from resnet_repro.config import compose, config_hash, to_plain, validate
    from resnet_repro.engine import RunInfo
    from resnet_repro.job import train

    saved = torch.get_num_threads(), torch.are_deterministic_algorithms_enabled(), torch.get_rng_state()

    def run(tmp: Path, extra: list[str], crash: str = "") -> dict | stopping.Stopped | None:
        monkeypatch.setenv("RESNET_REPRO_CRASH_AT", crash)
        faults._fired.clear()
        cfg = compose([*DEMO, *ONE, *extra, *train_args(tmp)])
        info = RunInfo(row_name=cfg.row_name, config_hash=config_hash(cfg), plan=validate(cfg), run_name="test")
        try:
            return train(to_plain(cfg), info)
        except stopping.Stopped as stop:
            return stop

    yield run
    torch.set_num_threads(saved[0])
    torch.use_deterministic_algorithms(saved[1])
    torch.set_rng_state(saved[2])


def last_state(tmp: Path) -> dict:
    (path,) = (tmp / "ckpt").rglob("last.pt")
    return checkpoint.load(path)


def assert_same_weights(a: Path, b: Path) -> None:
    wa, wb = last_state(a)["model"], last_state(b)["model"]
    assert wa.keys() == wb.keys() and all(torch.equal(wa[k], wb[k]) for k in wa), "weights differ"


def assert_one_finished_run(whole: Path, broken: Path, steps: list[int]) -> None:
    """broken's run equals whole's: one FINISHED run, every epoch metric and step metric once, the same values."""
    (a,) = mlflow_runs(whole)
    (b,) = [r for r in mlflow_runs(broken) if r.data.tags.get("run_type") == "train" and "stopped" in r.data.tags]
    assert b.info.status == "FINISHED"
    for key in EPOCH_KEYS:
        assert history(whole, a.info.run_id, key) == history(broken, b.info.run_id, key), key
    from mlflow import MlflowClient

    client = MlflowClient(tracking_uri=f"sqlite:///{broken}/mlflow.db")
    logged = [m.step for m in client.get_metric_history(b.info.run_id, "step/train_loss")]
    assert sorted(logged) == steps, logged  # at fixed steps, each once, whatever the stops and crashes


def test_a_stopped_run_resumes_mid_epoch_exactly_on_the_device_resident_path(run_here, tmp_path: Path) -> None:
    """Stopped mid-epoch (a second signal while the checkpoint is written), then during an evaluation, resumed
    each time by the same call: the weights and metrics of an uninterrupted run, in one MLflow run."""
    whole, broken = tmp_path / "whole", tmp_path / "broken"
    assert run_here(whole, [])["best_epoch"] >= 1

    stop = run_here(broken, [], crash="1.3 TERM; checkpoint-write INT")
    assert isinstance(stop, stopping.Stopped) and stop.code == stopping.EXIT_STOPPED == 75
    assert stop.line == "stopped at epoch 1 step 3/4 (SIGTERM); the same command resumes here"
    state = last_state(broken)
    assert (state["epoch"], state["step"]) == (0, 3) and not list((broken / "ckpt").rglob("best.pt"))
    (run,) = mlflow_runs(broken)
    assert run.info.status == "RUNNING" and run.data.tags["stopped"] == stop.line

    stop = run_here(broken, [], crash="evaluate INT")  # the evaluation finishes, with its epoch's checkpoint
    assert stop.line == "stopped after epoch 1 (SIGINT); the same command resumes here" and stop.code == 75
    assert (last_state(broken)["epoch"], last_state(broken)["step"]) == (1, 0)

    # a run left RUNNING in this folder by a process elsewhere: holding the folder's lock proves it dead
    from resnet_repro.tracking import Tracker

    tracker = Tracker(f"sqlite:///{broken}/mlflow.db", "resnet_repro")
    folder = str(next((broken / "ckpt").rglob("last.pt")).parent.resolve())
    orphan = tracker.start("orphan", {"config_hash": run.data.tags["config_hash"], "checkpoint_dir": folder})
    tracker.set_tags({"host": "another-node", "pid": str(os.getpid())})

    assert run_here(broken, [])["best_epoch"] >= 1
    assert_same_weights(whole, broken)
    assert_one_finished_run(whole, broken, steps=[2, 4, 6, 8])
    assert Tracker(f"sqlite:///{broken}/mlflow.db", "resnet_repro").status(orphan) == "KILLED"


def test_a_stopped_run_resumes_mid_epoch_exactly_on_the_cpu_loader(
    run_here, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    whole, broken = tmp_path / "whole", tmp_path / "broken"
    cpu = ["trainer.data_on_device=false", "recipe.epochs=1"]  # the DataLoader path, one epoch
    run_here(whole, cpu)
    stop = run_here(broken, cpu, crash="1.2 USR1")
    assert stop.line == "stopped at epoch 1 step 2/4 (SIGUSR1); the same command resumes here"
    with caplog.at_level("INFO", logger="resnet_repro"):  # resumed under another experiment name: said so
        run_here(broken, [*cpu, "tracking.experiment=elsewhere"])
    assert "continues in experiment 'resnet_repro', where it started" in caplog.text
    assert "resumed" in caplog.text and "at epoch 1 step 2/4" in caplog.text
    assert_same_weights(whole, broken)
    assert_one_finished_run(whole, broken, steps=[2, 4])


def test_a_signal_before_the_first_step_stops_at_once_with_nothing_to_resume(run_here, tmp_path: Path) -> None:
    stop = run_here(tmp_path, [], crash="before-start TERM")
    assert stop.line == "stopped before the first step (SIGTERM); nothing to resume"
    assert stop.code == 128 + signal.SIGTERM and not stop.resumable
    assert not list((tmp_path / "ckpt").rglob("*.pt")) and not mlflow_runs(tmp_path)


def test_a_signal_after_the_steps_were_left_does_not_claim_the_run_never_started() -> None:
    """torchrun's agent ends the surviving ranks with SIGTERM once one died: they are past their first step."""
    request = stopping.StopRequest()
    with request.deferring():
        request.handle(signal.SIGUSR1, None)  # recorded only, for the next step boundary
    with pytest.raises(stopping.Stopped) as stop:
        request.handle(signal.SIGTERM, None)  # e.g. while a lost peer's error is being recorded
    assert stop.value.line == (
        "stopped (SIGTERM) while the run was ending; the same command resumes from its last checkpoint, if any"
    )
    assert stop.value.code == 128 + signal.SIGTERM and not stop.value.resumable


def test_a_stop_without_checkpoints_says_nothing_was_kept(run_here, tmp_path: Path) -> None:
    stop = run_here(tmp_path, ["trainer.checkpoints=none"], crash="1.1 INT")
    assert stop.code == 128 + signal.SIGINT and "trainer.checkpoints=none kept nothing" in stop.line
    (run,) = mlflow_runs(tmp_path)
    assert run.info.status == "KILLED" and run.data.tags["stopped"] == stop.line


def test_an_error_while_stopping_still_ends_in_one_line(run_here, tmp_path: Path) -> None:
    stop = run_here(tmp_path, [], crash="1.1 TERM; 1.1 raise")  # asked to stop, it failed before the boundary
    assert stop.line == (
        "stopped (SIGTERM) by an error while stopping (RuntimeError: injected fault at 1.1); nothing to resume"
    )
    assert stop.code == 128 + signal.SIGTERM


# ---- several processes (slow: each launch imports torch in every process) ------------------------------------------
def cli(tmp: Path, args: list[str], crash: str = "", launcher: list[str] | None = None) -> subprocess.CompletedProcess:
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1", "RESNET_REPRO_CRASH_AT": crash}
    cmd = [*(launcher or [sys.executable]), "-m", "resnet_repro", *args]
    return subprocess.run(cmd, cwd=tmp, env=env, capture_output=True, text=True, timeout=600)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def two_nodes(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """An uninterrupted 2-rank run, as two torchrun "nodes" of one worker each (c10d rendezvous on 127.0.0.1)."""
    tmp = tmp_path_factory.mktemp("two_nodes")
    port = free_port()
    torchrun = [
        sys.executable,
        "-m",
        "torch.distributed.run",
        "--nnodes=2",
        "--nproc-per-node=1",
        "--rdzv-backend=c10d",
        f"--rdzv-endpoint=127.0.0.1:{port}",
        "--rdzv-id=two-nodes",
    ]
    args = [*DEMO, "recipe.gpus=2", "recipe.batch_per_gpu=4", *train_args(tmp)]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    nodes = [
        subprocess.Popen(
            [*torchrun, "-m", "resnet_repro", *args],
            cwd=tmp,
            env=env,
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            text=True,
        )
        for _ in range(2)
    ]
    outputs = [node.communicate(timeout=600)[0] for node in nodes]
    assert all(node.returncode == 0 for node in nodes), "\n".join(o[-3000:] for o in outputs)
    return tmp


@pytest.mark.slow
def test_two_nodes_train_as_one_run_in_one_folder_written_by_global_rank_0(two_nodes: Path) -> None:
    (run,) = mlflow_runs(two_nodes)
    assert run.info.status == "FINISHED" and run.data.tags["world_size"] == "2"
    assert run.data.params["batch_per_device"] == "4"
    (folder,) = (two_nodes / "ckpt").glob("*/*")  # one config folder, its lock held by global rank 0
    assert {p.name for p in folder.iterdir()} == {".lock", "last.pt", "best.pt", "run.json"}
    assert len(list((two_nodes / "outputs").glob("*/*"))) == 1


@pytest.mark.slow
def test_a_dead_worker_restarts_the_group_and_a_preempted_group_resumes_exactly(two_nodes: Path, tmp_path: Path):
    """2 local workers (gloo), trainer.max_restarts=1: a worker killed in epoch 1 (after step 2 was logged) -> the
    group starts again -> SIGTERM to rank 0 mid-epoch 2 -> one line, exit 75; the same command finishes: one MLflow
    run, each step and epoch logged once, the weights of the uninterrupted 2-node run."""
    args = [*DEMO, *TWO, "trainer.max_restarts=1", *train_args(tmp_path)]
    stopped = cli(tmp_path, args, crash="1.2 KILL rank=1 restart=0; 2.2 TERM rank=0 restart=1")
    assert stopped.returncode == 75, stopped.stderr[-3000:]
    assert "worker rank 1 failed: killed by SIGKILL; starting the 2 workers again (restart 1 of 1)" in stopped.stdout
    # rank 0 asked after step 2; the ranks agree one boundary later, at step 3
    assert stopped.stderr.strip().splitlines() == [
        "resnet_repro: stopped at epoch 2 step 3/4 (SIGTERM); the same command resumes here"
    ]
    assert cli(tmp_path, args).returncode == 0
    (run,) = mlflow_runs(tmp_path)
    assert run.info.status == "FINISHED" and run.data.tags["resumed_at_step"] == "3"
    for key in EPOCH_KEYS:
        assert len(history(tmp_path, run.info.run_id, key)) == 2, key
    assert _steps(tmp_path, run.info.run_id) == [2, 4, 6, 8]
    assert_same_weights(two_nodes, tmp_path)


def test_a_worker_group_out_of_restarts_ends_in_one_line_naming_the_dead_rank(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    """The launching side of trainer.nproc_per_node: the rank that died (not the one that lost its peer) is named,
    each restart is one line, the last failure one error line, the MLflow run FAILED with that line."""
    from resnet_repro import distributed, job
    from resnet_repro.config import compose, config_hash, to_plain, validate
    from resnet_repro.engine import RunInfo
    from resnet_repro.errors import RunFailed
    from resnet_repro.tracking import Tracker

    cfg = compose([*DEMO, *TWO, "trainer.max_restarts=1", *train_args(tmp_path)])
    info = RunInfo(row_name=cfg.row_name, config_hash=config_hash(cfg), plan=validate(cfg))
    plain = to_plain(cfg)
    tracker = Tracker(plain["tracking"]["uri"], "resnet_repro")
    run_id = tracker.start("killed", {"run_type": "train"})
    folder = job._folder(plain, info)
    folder.path.mkdir(parents=True)
    folder.write_run_id(run_id, tracker.uri)
    launches = []

    def dies(nproc: int, entry, *args):
        launches.append(os.environ["RESNET_REPRO_RESTART"])
        lost = distributed.WorkerFailure(0, 1, "RuntimeError: [gloo] Connection closed by peer [127.0.0.1]:1")
        raise distributed.WorkersFailed([lost, distributed.WorkerFailure(1, -9, "killed by SIGKILL", "")])

    monkeypatch.setattr(distributed, "launch_local", dies)
    with caplog.at_level("WARNING", logger="resnet_repro"), pytest.raises(RunFailed) as failed:
        job.launch_workers(plain, info, 2)
    assert launches == ["0", "1"] and caplog.text.count("starting the 2 workers again (restart 1 of 1)") == 1
    assert str(failed.value) == (
        "worker rank 1 failed: killed by SIGKILL; the same command resumes from the last checkpoint"
    )
    assert tracker.status(run_id) == "FAILED"
    assert Tracker(plain["tracking"]["uri"], "resnet_repro").client.get_run(run_id).data.tags["failed"] == (
        "worker rank 1 failed: killed by SIGKILL"
    )


def _steps(tmp: Path, run_id: str) -> list[int]:
    from mlflow import MlflowClient

    client = MlflowClient(tracking_uri=f"sqlite:///{tmp}/mlflow.db")
    return sorted(m.step for m in client.get_metric_history(run_id, "step/train_loss"))


# ---- SLURM: the preset, and submitit's requeue with its local executor ----------------------------------------
def test_the_slurm_preset_asks_for_the_warning_signal_and_requeues() -> None:
    from hydra import compose, initialize_config_dir

    from resnet_repro.config import CONF_DIR, register_resolvers

    register_resolvers()
    with initialize_config_dir(config_dir=str(CONF_DIR), version_base="1.3"):
        cfg = compose("config", overrides=["hydra/launcher=slurm"], return_hydra_config=True)
    launcher = cfg.hydra.launcher
    assert launcher._target_.endswith("SlurmLauncher")
    assert launcher.signal_delay_s >= 120 and launcher.max_num_timeout >= 20


@pytest.mark.slow
def test_a_submitit_job_stopped_by_its_time_limit_warning_requeues_and_finishes_once(tmp_path: Path) -> None:
    """submitit's local executor: the warning signal (USR2, sent here at a step, as SLURM would before the time
    limit) -> a checkpoint -> submitit requeues the job -> it resumes and finishes, one MLflow run."""
    args = ["--multirun", "hydra/launcher=submitit_local", f"hydra.sweep.dir={tmp_path}/sweep", *DEMO, *ONE]
    proc = cli(tmp_path, [*args, *train_args(tmp_path)], crash="1.3 USR2")
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-3000:]
    sweep, (run,) = _split_by(mlflow_runs(tmp_path), lambda r: r.data.tags.get("run_type") == "sweep")
    assert len(sweep) == 1 and run.data.tags["mlflow.parentRunId"] == sweep[0].info.run_id  # the sweep's own run
    assert run.info.status == "FINISHED"
    assert run.data.tags["stopped"] == "stopped at epoch 1 step 3/4 (SIGUSR2); the same command resumes here"
    assert run.data.tags["resumed_at_step"] == "3"
    for key in EPOCH_KEYS:
        assert len(history(tmp_path, run.info.run_id, key)) == 2, key
    logs = "".join(p.read_text() for p in (tmp_path / "sweep" / ".submitit").rglob("*_log.*"))
    assert "Requeued job" in logs


def _split_by(runs: list, test) -> tuple[list, list]:
    """(the runs for which test holds, the others)."""
    return [r for r in runs if test(r)], [r for r in runs if not test(r)]
