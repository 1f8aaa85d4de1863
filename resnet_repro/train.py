"""One Hydra job -> one training run: check, name, skip if already done on the same data, then train in
this process, under torchrun's ranks, or in N local workers (`trainer.nproc_per_node=N`)."""

from __future__ import annotations

import contextlib
import logging
import shutil
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from omegaconf import DictConfig, OmegaConf

from resnet_repro import checkpoint, distributed
from resnet_repro.config import config_hash, deviations, table_row, to_plain, user_overrides, validate
from resnet_repro.data.datasets import ensure_present, fingerprint
from resnet_repro.engine import RunInfo, Trainer, already_training, rival_run, summary_line
from resnet_repro.errors import UserError, exit_with, one_line
from resnet_repro.sweep import write_summary
from resnet_repro.tracking import Tracker, resolve_uri, ui_command

log = logging.getLogger("resnet_repro")


def world_of(cfg: DictConfig) -> int:
    return distributed.env_world_size() if distributed.under_torchrun() else int(cfg.trainer.nproc_per_node)


def run_info(cfg: DictConfig, world: int) -> RunInfo:
    """The job's identity and provenance, read from Hydra's runtime where there is one."""
    from hydra.core.hydra_config import HydraConfig

    overrides, output_dir, sweep, log_file = [], ".", "", ""
    if HydraConfig.initialized():
        hc = HydraConfig.get()
        overrides = user_overrides(list(hc.overrides.task))
        output_dir = hc.runtime.output_dir
        log_file = str(Path(output_dir) / f"{hc.job.name}.log")
        if str(hc.mode) == "RunMode.MULTIRUN":
            sweep = hc.sweep.dir
    row = table_row(cfg)
    devs = deviations(cfg, world)
    return RunInfo(
        row_name=cfg.row_name,
        config_hash=config_hash(cfg),
        run_name=run_name(cfg.row_name, int(cfg.seed), overrides),
        deviations=devs,
        overrides=overrides,
        output_dir=output_dir,
        log_file=log_file,
        sweep=sweep,
        config_yaml=OmegaConf.to_yaml(cfg, resolve=True),
        section=row.section if row else "custom",
    )


# overrides that never change what a run trains: where things are, how it executes, which row it is
NAMELESS = ("trainer.", "tracking.", "dataset.root", "dataset.download", "seed=", "hydra", "+sweep")
GROUP_CHOICES = ("model=", "stem=", "dataset=", "recipe=", "precision=", "row=")
NAME_WIDTH = 40  # about what MLflow's run-name column shows


def run_name(row: str, seed: int, overrides: list[str], width: int = NAME_WIDTH) -> str:
    """A name a person can tell apart in the MLflow UI's column: the row (a custom composition: its model,
    dataset and the groups chosen besides), the seed, then the overrides that change the run by their last
    key (`recipe.optimizer.lr=0.2` -> `lr=0.2`, `+smoke=on` -> `smoke`); cut with … past `width`."""
    given = {o.split("=", 1)[0]: o.split("=", 1)[1] for o in overrides if o.startswith(GROUP_CHOICES)}
    head = row
    if row.startswith("custom:"):  # custom:<model>-<stem>-<dataset>-<recipe>-<precision>; only recipe and
        model, _, dataset = (row.removeprefix("custom:").split("-") + ["", ""])[:3]  # precision hold hyphens
        chosen = [given[g] for g in ("stem", "recipe", "precision") if g in given and given[g] != dataset]
        head = " ".join([model, dataset, *chosen])
    changes = [o for o in overrides if not o.lstrip("+~").startswith(NAMELESS + GROUP_CHOICES)]
    changes += [o for o in overrides if o.startswith(("trainer.micro_batch", "trainer.limit_"))]
    name = " ".join([head, f"s{seed}", *map(_short, changes)])
    return name if len(name) <= width else name[: width - 1] + "…"


def _short(override: str) -> str:
    key, _, value = override.lstrip("+~").partition("=")
    if override.startswith("+") and "." not in key:  # an added group: +smoke=on -> smoke
        return key if value in ("on", "true") else f"{key}={value}"
    return f"{key.rpartition('.')[2]}={value}"


def run_job(cfg: DictConfig) -> dict[str, Any] | None:
    """Hydra's task function: the run's summary (None when skipped)."""
    world = world_of(cfg)
    validate(cfg, world_size=world)
    if cfg.tracking.uri is None:  # the store by its absolute path: in the checkpoints, params and config.yaml
        cfg.tracking.uri = resolve_uri(None)
    info = run_info(cfg, world)
    plain = to_plain(cfg)
    nproc = int(cfg.trainer.nproc_per_node)
    if nproc > 1 and not distributed.under_torchrun():
        return distributed.launch_local(nproc, worker_main, plain, info)
    return train(plain, info)


def prepare(cfg: dict[str, Any], info: RunInfo, folder: Path) -> str | dict[str, Any]:
    """Rank 0, before anything is built: the store answers and takes what an earlier run of this folder kept
    for it, the data is there, nobody else trains this config on it; its fingerprint, or when this config
    already finished on this data (trainer.skip_finished) that run's summary (`skipped`)."""
    tracking = cfg["tracking"]
    tracker = Tracker(tracking["uri"], tracking["experiment"])
    tracker.probe()
    if left := tracker.deliver_pending(folder):
        log.warning("the MLflow store still misses %d writes of an earlier run; they stay kept in %s", left, folder)
    ensure_present(cfg["dataset"])
    info.data_fingerprint = fingerprint(cfg["dataset"])
    rival = rival_run(tracker, info.config_hash, info.data_fingerprint)
    if rival is not None:  # the store, not the checkpoint folder, knows every start of this config
        raise UserError(already_training(info.row_name, rival))
    done = tracker.find_finished(info.config_hash, info.data_fingerprint) if cfg["trainer"]["skip_finished"] else None
    if done:
        log.info(
            "skipping %s: MLflow run %s already finished this config on this data "
            "(trainer.skip_finished=false trains it again)",
            info.row_name,
            done,
        )
        return skipped_result(tracker, done)
    return info.data_fingerprint


def skipped_result(tracker: Tracker, run_id: str) -> dict[str, Any]:
    """The summary of a finished run a re-issued job skips: its result, for the sweep's summary."""
    metrics = tracker.final_metrics(run_id)
    last = {k: v for k, v in metrics.items() if k in ("val_top1", "val_top5")}
    return {"skipped": True, "run_id": run_id, "last": last, "best_top1": metrics.get("best_val_top1")}


def train(cfg: dict[str, Any], info: RunInfo) -> dict[str, Any] | None:
    """Train on every rank of the current process group (or alone)."""
    distributed.init_from_env()
    tr = cfg["trainer"]
    local = distributed.local_world_size() if distributed.under_torchrun() else int(tr["nproc_per_node"])
    distributed.set_threads(tr["threads"], local)
    folder = checkpoint.RunFolder(
        checkpoint.run_dir(tr["checkpoint_root"], info.row_name, int(cfg["seed"]), info.config_hash)
    )
    try:
        with before_start():
            prepared = distributed.on_rank0(lambda: prepare(cfg, info, folder.path))
            if isinstance(prepared, dict):
                return prepared
            info.data_fingerprint = prepared
            distributed.on_rank0(folder.acquire)  # one process per config: a second one stops here in one line
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
    steps += [
        ("curves", "python -m resnet_repro.report"),
        ("MLflow UI", ui_command(resolve_uri(cfg["tracking"]["uri"]))),
    ]
    head = f"best checkpoint: {path}" if path else "no checkpoint kept (trainer.checkpoints=none)"
    lines = [f"{'next:' if i == 0 else '':<6}{what:<11}{command}" for i, (what, command) in enumerate(steps)]
    return "\n".join([head, *lines])


def _shown(path: Path) -> str:
    """A path relative to the current directory when it lies under it (shorter to read and paste)."""
    try:
        return str(path.resolve().relative_to(Path.cwd().resolve()))
    except ValueError:
        return str(path.resolve())


@contextlib.contextmanager
def before_start() -> Iterator[None]:
    """Errors in the block happened before the run started: nothing of it is left to keep."""
    try:
        yield
    except UserError as err:
        err.before_start = True
        raise


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


def worker_main(cfg: dict[str, Any], info: RunInfo) -> dict[str, Any] | None:
    """Entry of each worker started by `trainer.nproc_per_node` (a fresh process: set up logging)."""
    if not logging.getLogger().handlers:
        handlers: list[logging.Handler] = [logging.StreamHandler(sys.stdout)]
        if info.log_file and distributed.local_rank() == 0:  # the worker's lines land in Hydra's log too
            handlers.append(logging.FileHandler(info.log_file))
        logging.basicConfig(level=logging.INFO, format="[%(asctime)s][%(name)s] %(message)s", handlers=handlers)
    try:
        return train(cfg, info)
    except UserError as err:
        exit_with(err)
    finally:
        distributed.destroy()


def run_and_summarise(cfg: DictConfig, multirun: bool) -> dict[str, Any] | None:
    """run_job, then the job's line of the sweep summary. In a sweep a failing job is reported and the sweep
    goes on; alone, bad input ends the process with one line (exit 2)."""
    from hydra.core.hydra_config import HydraConfig

    start, result, error = time.perf_counter(), None, None
    try:
        result = run_job(cfg)
    except UserError as err:
        error = one_line(err)
        if not multirun:
            if err.before_start and HydraConfig.initialized():
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
