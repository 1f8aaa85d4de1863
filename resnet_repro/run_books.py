"""The MLflow side of one training run (its books): open the run or adopt the one a killed start left, log what
the steps and epochs give, end it, and make sure the end reached the store; the tags every run records about
itself; who else trains this config. Rank 0 writes; on the other ranks every call does nothing."""

from __future__ import annotations

import logging
import math
import platform
from collections.abc import Mapping
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch
from torch import nn

from resnet_repro import checkpoint, distributed, stopping
from resnet_repro.bn_groups import GroupBatchNorm2d
from resnet_repro.data import on_device
from resnet_repro.errors import UserError, one_line
from resnet_repro.identity import deviations_tag, flag
from resnet_repro.models import plain_model
from resnet_repro.tracking import Tracker, ui_command
from resnet_repro.tracking.run import flat_params, pid_alive, provenance_tags

if TYPE_CHECKING:
    from resnet_repro.engine import RunInfo, Trainer

log = logging.getLogger("resnet_repro")


class RunBooks:
    """One training run's MLflow run, for the Trainer: rank 0 writes it (`enabled`)."""

    def __init__(self, cfg: Mapping[str, Any], info: RunInfo, folder: checkpoint.RunFolder, enabled: bool) -> None:
        self.cfg, self.info, self.folder, self.enabled = cfg, info, folder, enabled
        self.tracker = Tracker(cfg["tracking"]["uri"], cfg["tracking"]["experiment"], enabled=enabled)
        self.last_logged_step = 0  # MLflow step metrics the run already has: a resumed run never logs one twice

    @property
    def run_id(self) -> str | None:
        return self.tracker.run_id

    def finished(self, run_id: str) -> bool:
        return self.tracker.status(run_id) == "FINISHED"

    # ---- the start --------------------------------------------------------------------------------
    def start(self, resume: checkpoint.Resume, trainer: Trainer) -> None:
        """A new MLflow run of the trainer's run, or the one this config's folder names (adopted after a kill:
        tagged with where it resumed); run.json links it once the store has said all it must (a store lost from
        then on costs no read). The store is the authority on who trains this config on this data: a rival that
        took it up first wins."""
        info, tracker, history, data = self.info, self.tracker, trainer.history, trainer.data
        if tracker.off:  # tracking.uri=none: no run (job.prepare said so), run.json left as it was
            return
        params = {
            **flat_params(self.cfg),
            **trainer.plan.params(),
            "num_train": data.num_train,
            "num_val": data.num_val,
        }
        params |= {"steps_per_epoch": trainer.steps, "num_params": trainer.params, "flops_g": round(trainer.flops, 4)}
        resumed = {"resumed_at_epoch": trainer.epochs_done, "resumed_at_step": trainer.progress.step}
        overrides = "".join(f"- {o}\n" for o in info.overrides)  # as YAML
        try:
            adopted = tracker.open(
                info.run_name,
                adopt=self._adoptable(resume, history),
                tags=train_tags(trainer),
                params=params,  # fixed facts of the run; what changes per epoch is a metric
                texts={"config/config.yaml": info.config_yaml, "config/overrides.yaml": overrides},
                resumed_tags={**resumed, "output_dir": info.output_dir},
                system_metrics=bool(self.cfg["tracking"].get("system_metrics")),
            )
            rival = rival_run(tracker, info.config_hash, info.data_fingerprint, tracker.claimed_at)
            if rival is not None:  # two starts at once from two checkpoint roots: the later one gives way
                tracker.withdraw(adopted)
                raise UserError(already_training(info.row_name, rival))
            if adopted:
                self.last_logged_step = tracker.last_step(tracker.run_id, "step/train_loss")
                self._say_where_the_run_lives()
            mine = str(self.folder.path.resolve())  # we hold its lock: any other run left RUNNING there is dead
            closed = tracker.close_dead_runs(info.config_hash, keep=tracker.run_id, checkpoint_dir=mine)
            tracker.keep_pending(self.folder.path)  # from now on a write the store does not take is kept
            if history:  # epochs a kill kept from MLflow but not from the checkpoint (reads the run's history)
                tracker.backfill(history)
        except UserError:
            raise
        except Exception as err:  # MLflow raises many types; the store answered the probe seconds ago
            raise UserError(
                f"the MLflow store {tracker.uri} stopped answering as the run started ({one_line(err)}); "
                "nothing was trained: run the same command again when it answers"
            ) from None
        self.folder.write_run_id(tracker.run_id or "", tracker.uri)
        note = f"; closed {len(closed)} run(s) left RUNNING by dead processes" if closed else ""
        log.info("MLflow run %s (%s): see it with `%s`%s", tracker.run_id, info.run_name, ui_command(tracker.uri), note)

    def _adoptable(self, resume: checkpoint.Resume, history: Mapping[int, Any]) -> str | None:
        """The MLflow run this start continues: the folder's, unless the store lost it, or it logged epochs that
        no checkpoint kept (trainer.checkpoints=none: they are trained again, in a new run, never logged twice)."""
        run_id = resume.run_id
        if run_id is None:
            return None
        status = self.tracker.status(run_id)
        if status is None:
            log.warning(
                "MLflow run %s (named by %s) is not in the store (deleted?): this run goes on in a new MLflow run%s",
                run_id,
                self.folder.run_link,
                f", with the {len(history)} epochs its checkpoint holds" if history else "",
            )
            return None
        if resume.path is None and status != "FINISHED" and self.tracker.history(run_id, "val_top1"):
            self.tracker.close_run(run_id, "KILLED")
            log.warning(
                "MLflow run %s logged epochs that no checkpoint kept (trainer.checkpoints=%s): it is closed (KILLED) "
                "and training starts over in a new MLflow run, so that no epoch is logged twice",
                run_id,
                self.cfg["trainer"]["checkpoints"],
            )
            return None
        return run_id

    def _say_where_the_run_lives(self) -> None:
        """A resumed run stays in the experiment it started in, whatever tracking.experiment says now."""
        started_in = self.tracker.experiment_of(self.tracker.run_id)
        if started_in is not None and started_in != self.tracker.experiment:
            log.warning(
                "MLflow run %s continues in experiment '%s', where it started; tracking.experiment=%s names new "
                "runs only (trainer.resume=none starts a new run there)",
                self.tracker.run_id,
                started_in,
                self.tracker.experiment,
            )

    # ---- during the run ---------------------------------------------------------------------------
    def log_step(self, global_step: int, loss: float, lr: float) -> None:
        """The step metrics at a fixed step (each step once, also across a resume)."""
        if self.enabled and global_step > self.last_logged_step:
            self.tracker.log_metrics({"step/train_loss": loss, "step/lr": lr}, step=global_step)
            self.last_logged_step = global_step

    def log_epoch(self, epoch: int, metrics: Mapping[str, float]) -> None:
        self.tracker.log_metrics(metrics, step=epoch)

    # ---- the end ----------------------------------------------------------------------------------
    def finish(self, best_top1: float, epochs: int, model: nn.Module) -> None:
        """The end of the run: final metrics, FINISHED, artifacts (also all a re-run after a late kill does)."""
        self.tracker.log_metrics({"best_val_top1": best_top1, "epochs_completed": epochs}, step=epochs)
        tracking = self.cfg["tracking"]
        if self.enabled and tracking["log_checkpoint"]:
            self.tracker.log_file(self.folder.best, "checkpoints")
        if self.enabled and tracking.get("log_model"):
            self.tracker.log_model(plain_model(self.cfg, model), int(self.cfg["dataset"]["input_size"]))
        self._log_files()
        self.tracker.finish("FINISHED")

    def check_end(self) -> None:
        """The end of the run reached the store, or the command fails in one line (the only tracking failure
        that does): the checkpoints are saved, and the next start of the same command writes what is kept."""
        if not self.enabled or self.tracker.flush():
            return
        saved = (
            "" if self.cfg["trainer"]["checkpoints"] == "none" else f"; the checkpoints are saved in {self.folder.path}"
        )
        raise UserError(
            f"the MLflow store {self.tracker.uri} did not take the end of the run ({self.tracker.pending} writes kept "
            f"in {self.tracker.pending_file}){saved}: run the same command again when the store answers, to write them"
        )

    def failed(self) -> None:
        self.tracker.finish("FAILED")
        self._log_files()

    def killed(self) -> None:
        self.tracker.finish("KILLED")

    def stopped(self, stop: stopping.Stopped) -> None:
        """A resumable stop leaves the MLflow run RUNNING, tagged with where and why; otherwise it is KILLED."""
        self.tracker.set_tags({"stopped": stop.line})
        if not stop.resumable:
            self.tracker.finish("KILLED")

    def _log_files(self) -> None:
        if self.enabled and self.info.log_file:
            self.tracker.log_file(Path(self.info.log_file), "logs")


# ---- what a run records about itself ---------------------------------------------------------------
def run_tags(info: RunInfo, run_type: str, device: torch.device, data_verified: Any, **more: Any) -> dict[str, Any]:
    """The tags of a training or evaluation run (tracking.run: the names the report reads): its row, identity,
    deviations (identity.Deviation records, as JSON), hardware and data, with the provenance every run has."""
    return provenance_tags(
        row=info.row_name,
        section=info.section,
        config_hash=info.config_hash,
        run_type=run_type,
        faithful=flag(not info.deviations),
        deviations=deviations_tag(info.deviations),
        device=str(device),
        device_name=distributed.device_name(device),
        data_verified=flag(data_verified),
        **more,
    )


def train_tags(trainer: Trainer) -> dict[str, Any]:
    """A training run's tags: run_tags, and how it trains (processes, data path, kernels)."""
    info, data = trainer.info, trainer.data
    kernel = next((m.kernel for m in trainer.model.modules() if isinstance(m, GroupBatchNorm2d)), "none")
    return run_tags(
        info,
        "train",
        trainer.device,
        data.verified,
        sweep=info.sweep,
        hydra_overrides=" ".join(info.overrides),
        world_size=trainer.world,
        output_dir=info.output_dir,
        checkpoint_dir=str(trainer.folder.path.resolve()),
        data_fingerprint=info.data_fingerprint,
        data_on_device=on_device.DRAW_SCHEME if data.on_device else "false",
        decode=data.decode,
        val_limited=flag(data.val_limited),
        tf32=flag(trainer.tf32),
        bn_group_kernel=kernel,
    )


# ---- who else trains this config ----------------------------------------------------------------------
def rival_run(tracker: Tracker, config_hash: str, fingerprint: str | None, claimed: float = math.inf) -> dict | None:
    """A RUNNING run of this config and seed on this data that took it up before `claimed` (our claim; inf
    before we have one) and whose process lives: it holds its checkpoint folder's lock (where that folder can
    be seen from here), or its pid runs on this host; on another host, unseen, it is taken to live."""
    for run in sorted(tracker.running(config_hash, fingerprint), key=lambda r: (r["claimed"], r["run_id"])):
        if (run["claimed"], run["run_id"]) >= (claimed, tracker.run_id or ""):
            break
        tags = run["tags"]
        held = checkpoint.RunFolder.lock_held(Path(tags["checkpoint_dir"])) if tags.get("checkpoint_dir") else None
        alive = held if held is not None else tags.get("host") != platform.node() or pid_alive(tags.get("pid", ""))
        if alive:
            return run
    return None


def already_training(row: str, rival: Mapping[str, Any]) -> str:
    tags = rival["tags"]
    return (
        f"{row} (this config, seed and data) is already being trained by pid {tags.get('pid', '?')} on "
        f"{tags.get('host', '?')} (MLflow run {rival['run_id']}, checkpoints in {tags.get('checkpoint_dir', '?')}); "
        "wait for it or stop it"
    )
