"""One Hydra job -> one training run: plan, name, skip if already done on the same data, then train in this
process, under torchrun's ranks, or in N local workers (`trainer.nproc_per_node=N`); the engine trains."""

from __future__ import annotations

import contextlib
import json
import logging
import os
import re
import shutil
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from omegaconf import DictConfig

from resnet_repro import batches, checkpoint, distributed, stopping
from resnet_repro.config import to_plain, user_overrides
from resnet_repro.data.datasets import ensure_present, fingerprint
from resnet_repro.engine import RunInfo, Trainer, summary_line
from resnet_repro.errors import RunFailed, UserError, exit_with, marked_before_start, one_line
from resnet_repro.faults import crash_point
from resnet_repro.provenance import run_info
from resnet_repro.run_books import already_training, rival_run
from resnet_repro.sweep import write_summary
from resnet_repro.tracking import Tracker, resolve_uri, tracking_off, ui_command

log = logging.getLogger("resnet_repro")


def run_job(cfg: DictConfig) -> dict[str, Any] | None:
    """Hydra's task function (checked by cli.prepare_argv before Hydra ran it): the run's summary (None when
    skipped). The batch plan and the provenance are made here, once, and passed on."""
    if cfg.tracking.uri is None:  # the store by its absolute path: in the checkpoints, params and config.yaml
        cfg.tracking.uri = resolve_uri(None)
    plan = batches.plan(cfg, distributed.job_world_size(cfg.trainer.nproc_per_node))
    info = run_info(cfg, plan)
    plain = to_plain(cfg)
    if plan.world > 1 and not distributed.under_torchrun():
        return launch_workers(plain, info, plan.world)
    return train(plain, info)


TRACKING_OFF = (
    "tracking.uri=none: nothing is tracked (no MLflow run), and what reads the store is skipped: "
    "trainer.skip_finished, the check for another start of this config, continuing a killed run's MLflow run; "
    "the checkpoint folder's lock is the only guard against a second start"
)


@dataclass(frozen=True)
class Prepared:
    """What rank 0 found before anything is built: the data's fingerprint, and the summary of the finished run
    of this config on this data when the job is skipped (trainer.skip_finished)."""

    fingerprint: str | None
    skipped: dict[str, Any] | None = None


def prepare(cfg: dict[str, Any], info: RunInfo, folder: Path) -> Prepared:
    """Rank 0, before anything is built: the store answers and takes what an earlier run of this folder kept
    for it, the data is there, nobody else trains this config on it."""
    tracking = cfg["tracking"]
    tracker = Tracker(tracking["uri"], tracking["experiment"])
    tracker.probe()
    if tracker.off:
        log.info(TRACKING_OFF)
    if left := tracker.deliver_pending(folder):
        log.warning("the MLflow store still misses %d writes of an earlier run; they stay kept in %s", left, folder)
    ensure_present(cfg["dataset"])
    data = fingerprint(cfg["dataset"])
    rival = rival_run(tracker, info.config_hash, data)
    if rival is not None:  # the store, not the checkpoint folder, knows every start of this config
        raise UserError(already_training(info.row_name, rival))
    done = tracker.find_finished(info.config_hash, data) if cfg["trainer"]["skip_finished"] else None
    if done:
        log.info(
            "skipping %s: MLflow run %s already finished this config on this data "
            "(trainer.skip_finished=false trains it again)",
            info.row_name,
            done,
        )
        return Prepared(data, skipped_result(tracker, done))
    return Prepared(data)


def skipped_result(tracker: Tracker, run_id: str) -> dict[str, Any]:
    """The summary of a finished run a re-issued job skips: its result, for the sweep's summary."""
    metrics = tracker.final_metrics(run_id)
    last = {k: v for k, v in metrics.items() if k in ("val_top1", "val_top5")}
    return {"skipped": True, "run_id": run_id, "last": last, "best_top1": metrics.get("best_val_top1")}


def train(cfg: dict[str, Any], info: RunInfo) -> dict[str, Any] | None:
    """Train on every rank of the current process group (or alone). A signal stops it (stopping.Stopped): at
    once before the first step, at a step boundary after a checkpoint once the steps run."""
    with stopping.handling():
        return _train(cfg, info)


def _train(cfg: dict[str, Any], info: RunInfo) -> dict[str, Any] | None:
    distributed.init_from_env()
    tr = cfg["trainer"]
    local = distributed.local_world_size() if distributed.under_torchrun() else int(tr["nproc_per_node"])
    distributed.set_threads(tr["threads"], local)
    folder = _folder(cfg, info)
    try:
        with marked_before_start():
            prepared = distributed.on_rank0(lambda: prepare(cfg, info, folder.path))
            if prepared.skipped is not None:
                return prepared.skipped
            info.data_fingerprint = prepared.fingerprint
            distributed.on_rank0(folder.acquire)  # one process per config: a second one stops here in one line
            crash_point("before-start")
            trainer = Trainer(cfg, info, folder)
        result = trainer.fit()
    finally:
        folder.release()
    if distributed.rank() == 0:
        ends = "" if info.sweep else "\n" + next_steps(folder, cfg)  # a sweep ends with its summary instead
        log.info("%s%s", summary_line(info.row_name, result), ends)
    return result


def next_steps(folder: checkpoint.RunFolder, cfg: dict[str, Any]) -> str:
    """The end of a run's output: its best checkpoint and the commands that come next (test it, the report,
    the MLflow UI), each ready to paste."""
    kept = {"last+best": folder.best, "last": folder.last}.get(str(cfg["trainer"]["checkpoints"]))
    path = _shown(kept) if kept is not None and kept.is_file() else None
    steps = [("test it", f"python -m resnet_repro.test checkpoint={path}")] if path else []
    uri = cfg["tracking"]["uri"]
    if not tracking_off(uri):  # the report and the UI read the MLflow store
        steps += [("curves", "python -m resnet_repro.report"), ("MLflow UI", ui_command(resolve_uri(uri)))]
    head = f"best checkpoint: {path}" if path else "no checkpoint kept (trainer.checkpoints=none)"
    lines = [f"{'next:' if i == 0 else '':<6}{what:<11}{command}" for i, (what, command) in enumerate(steps)]
    return "\n".join([head, *lines])


def _shown(path: Path) -> str:
    """A path relative to the current directory when it lies under it (shorter to read and paste)."""
    try:
        return str(path.resolve().relative_to(Path.cwd().resolve()))
    except ValueError:
        return str(path.resolve())


def remove_output_dir(output_dir: str) -> None:
    """The Hydra folder of a job that failed before it started holds only Hydra's own files: remove it
    and the date folders above it that it leaves empty."""
    folder = Path(output_dir)
    if not folder.is_dir() or any(p.name != ".hydra" and p.suffix != ".log" for p in folder.iterdir()):
        return
    shutil.rmtree(folder, ignore_errors=True)
    for parent in folder.parents:
        if parent == Path.cwd() or not parent.is_dir() or any(parent.iterdir()):
            break
        parent.rmdir()


def worker_main(cfg: dict[str, Any], info: RunInfo, outcome: str = "") -> dict[str, Any] | None:
    """Entry of each worker started by `trainer.nproc_per_node` (a fresh process: set up logging). Errors go to
    torch elastic's error file, for the launching process to say in one line; rank 0 writes a stop to `outcome`."""
    if not logging.getLogger().handlers:
        handlers: list[logging.Handler] = [logging.StreamHandler(sys.stdout)]
        if info.log_file and distributed.env_rank() == 0:  # the worker's lines land in Hydra's log too
            handlers.append(logging.FileHandler(info.log_file))
        logging.basicConfig(level=logging.INFO, format="[%(asctime)s][%(name)s] %(message)s", handlers=handlers)
    stopping.announcing = False  # the launching process says how the workers stopped, once
    try:
        return train(cfg, info)
    except stopping.Stopped as stop:
        if outcome and distributed.env_rank() == 0:
            Path(outcome).write_text(json.dumps({"line": stop.line, "code": stop.code, "signal": stop.signal_name}))
        raise
    except UserError as err:
        from torch.distributed.elastic.multiprocessing.errors import ErrorHandler

        ErrorHandler().record_exception(err)
        sys.exit(2)
    finally:
        distributed.destroy()


def launch_workers(cfg: dict[str, Any], info: RunInfo, nproc: int) -> dict[str, Any] | None:
    """`trainer.nproc_per_node=N`: N local workers. A failed group starts again up to trainer.max_restarts
    times (resuming from the last checkpoint, in the same MLflow run), then ends in one line naming the failed
    rank and its error (RunFailed; the MLflow run FAILED). A signal stops every worker (stopping.Stopped)."""
    restarts, handlers = int(cfg["trainer"]["max_restarts"]), stopping.saved_handlers()
    with tempfile.TemporaryDirectory(prefix="resnet_repro-") as tmp:
        outcome = Path(tmp) / "stopped.json"
        for attempt in range(restarts + 1):
            os.environ["RESNET_REPRO_RESTART"] = str(attempt)  # the workers' restart count (faults.py)
            outcome.unlink(missing_ok=True)
            try:
                return distributed.launch_local(nproc, worker_main, cfg, info, str(outcome))
            except distributed.LauncherSignalled as sig:
                raise _workers_stopped(cfg, info, outcome, sig.signal_name, handlers) from None
            except distributed.WorkersFailed as failed:
                if all(f.exitcode in stopping.stop_codes() for f in failed.failures):
                    raise _workers_stopped(cfg, info, outcome, None, handlers) from None
                root = failed.root
                if root.exitcode == 2:  # bad input, found by the workers: their one line
                    raise UserError(re.sub(r"^\w+: ", "", root.message)) from None
                line = f"worker rank {root.rank} failed: {root.message}"
                if attempt < restarts:
                    log.warning(
                        "%s; starting the %d workers again (restart %d of %d): they resume from the last checkpoint",
                        line,
                        nproc,
                        attempt + 1,
                        restarts,
                    )
                    continue
                raise _run_failed(cfg, info, line, root) from None
            finally:
                stopping.restore_handlers(handlers)  # the elastic agent had replaced them
                os.environ.pop("RESNET_REPRO_RESTART", None)
    return None


def _workers_stopped(
    cfg: dict[str, Any], info: RunInfo, outcome: Path, signal_name: str | None, handlers: dict[int, Any]
) -> stopping.Stopped:
    """The workers stopped on a signal: rank 0's line, or, when none of them got to say it, what the folder
    still holds; said once, here. A resumable stop is handed to the previous handler (submitit's requeue)."""
    if outcome.is_file():
        said = json.loads(outcome.read_text())
        stop = stopping.Stopped(said["line"], int(said["code"]), said["signal"])
    else:
        name = signal_name or "SIGTERM"
        stop = stopping.before_start(name)
        if _folder(cfg, info).last.is_file():
            line = f"stopped ({name}) before the workers wrote a checkpoint; the same command resumes from the last one"
            stop = stopping.Stopped(line, stopping.EXIT_STOPPED, name)
    stopping.announce(stop)
    if stop.resumable:
        stopping.hand_over(stop.signal_name, handlers)
    return stop


def _folder(cfg: dict[str, Any], info: RunInfo) -> checkpoint.RunFolder:
    root = cfg["trainer"]["checkpoint_root"]
    return checkpoint.RunFolder(checkpoint.run_dir(root, info.row_name, int(cfg["seed"]), info.config_hash))


def _run_failed(cfg: dict[str, Any], info: RunInfo, line: str, root: distributed.WorkerFailure) -> RunFailed:
    """The end of a worker group that failed for good: its traceback in the job's log, its MLflow run FAILED
    and tagged with the failed rank (rank 0 may have died before saying anything), one line."""
    where = ""
    if root.traceback and info.log_file and Path(info.log_file).parent.is_dir():
        with open(info.log_file, "a") as f:
            f.write(f"{line}\n{root.traceback}\n")
        where = f" (its traceback is in {info.log_file})"
    run_id = _folder(cfg, info).read_run_id()
    if run_id is not None:
        tracker = Tracker(cfg["tracking"]["uri"], cfg["tracking"]["experiment"])
        with contextlib.suppress(Exception):  # the books are best effort here: the line matters
            if tracker.status(run_id) in ("RUNNING", "FAILED"):  # rank 0 may have failed it, on a lost peer
                tracker.run_id = run_id
                tracker.set_tags({"failed": line})
                tracker.finish("FAILED")
    return RunFailed(f"{line}{where}; the same command resumes from the last checkpoint")


def run_and_summarise(cfg: DictConfig, multirun: bool) -> dict[str, Any] | None:
    """run_job, then the job's line of the sweep summary. In a sweep a failing job is reported and the sweep
    goes on; alone, bad input ends the process with one line (exit 2)."""
    from hydra.core.hydra_config import HydraConfig

    start, result, error = time.perf_counter(), None, None
    try:
        result = run_job(cfg)
    except (UserError, RunFailed) as err:
        error = one_line(err)
        if not multirun:
            if isinstance(err, UserError) and err.before_start and HydraConfig.initialized():
                remove_output_dir(HydraConfig.get().runtime.output_dir)
            exit_with(err)
        log.error("resnet_repro: error: %s", error)
    except Exception as err:
        if not multirun:
            raise
        error = f"{type(err).__name__}: {one_line(err)}"
        log.exception("job failed")
    if HydraConfig.initialized():
        last = (result or {}).get("last") or {}
        write_summary(
            HydraConfig.get().runtime.output_dir,
            row=str(cfg.row_name),
            overrides=user_overrides(list(HydraConfig.get().overrides.task)),
            status="FAILED" if error else ("SKIPPED" if result is None or result.get("skipped") else "FINISHED"),
            top1=last.get("val_top1"),
            wall_s=time.perf_counter() - start,
            error=error,
            run_id=(result or {}).get("run_id"),
        )
    return result
