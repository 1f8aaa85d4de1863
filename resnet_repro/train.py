"""One Hydra job -> one training run: check, name, skip if already done, then train in this process,
under torchrun's ranks, or in N local workers (`trainer.nproc_per_node=N`)."""

from __future__ import annotations

import logging
import sys
from typing import Any

from omegaconf import DictConfig, OmegaConf

from resnet_repro import distributed
from resnet_repro.config import config_hash, deviations, table_row, to_plain, user_overrides, validate
from resnet_repro.engine import RunInfo, Trainer
from resnet_repro.tracking import Tracker

log = logging.getLogger("resnet_repro")


def run_info(cfg: DictConfig) -> RunInfo:
    """The job's identity and provenance, read from Hydra's runtime where there is one."""
    from hydra.core.hydra_config import HydraConfig

    overrides, output_dir, sweep = [], ".", ""
    if HydraConfig.initialized():
        hc = HydraConfig.get()
        overrides = user_overrides(list(hc.overrides.task))
        output_dir = hc.runtime.output_dir
        if str(hc.mode) == "RunMode.MULTIRUN":
            sweep = hc.sweep.dir
    row = table_row(cfg)
    return RunInfo(
        row_name=cfg.row_name,
        config_hash=config_hash(cfg),
        deviations=deviations(cfg),
        overrides=overrides,
        output_dir=output_dir,
        sweep=sweep,
        config_yaml=OmegaConf.to_yaml(cfg, resolve=True),
        section=row.section if row else "custom",
    )


def run_job(cfg: DictConfig) -> float | None:
    """Hydra's task function; returns the best val top-1 (for sweepers), None when skipped."""
    validate(cfg, world_size=distributed.env_world_size() if distributed.under_torchrun() else None)
    info = run_info(cfg)
    plain = to_plain(cfg)
    nproc = int(cfg.trainer.nproc_per_node)
    if nproc > 1 and not distributed.under_torchrun():
        if already_finished(plain, info):
            return None
        return distributed.launch_local(nproc, worker_main, plain, info)
    return train(plain, info)


def already_finished(cfg: dict[str, Any], info: RunInfo) -> bool:
    """With trainer.skip_finished, a config whose training run finished is not trained again."""
    if not cfg["trainer"]["skip_finished"] or distributed.rank() != 0:
        return False
    tracking = cfg["tracking"]
    done = Tracker(tracking["uri"], tracking["experiment"]).find_finished(info.config_hash)
    if done:
        log.info(
            "skipping %s: MLflow run %s already finished this config (trainer.skip_finished=false trains it again)",
            info.row_name,
            done,
        )
    return done is not None


def train(cfg: dict[str, Any], info: RunInfo, check_finished: bool = True) -> float | None:
    """Train on every rank of the current process group (or alone)."""
    distributed.init_from_env()
    if check_finished and distributed.broadcast_object(already_finished(cfg, info)):
        return None
    return Trainer(cfg, info).fit()


def worker_main(cfg: dict[str, Any], info: RunInfo) -> float | None:
    """Entry of each worker started by `trainer.nproc_per_node` (a fresh process: set up logging)."""
    from resnet_repro.errors import UserError, exit_with

    if not logging.getLogger().handlers:
        logging.basicConfig(level=logging.INFO, format="[%(asctime)s][%(name)s] %(message)s", stream=sys.stdout)
    try:
        return train(cfg, info, check_finished=False)  # the launching job has checked
    except UserError as err:
        exit_with(err)
    finally:
        distributed.destroy()
