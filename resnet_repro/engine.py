"""The training loop of one process (rank): epochs of train steps, exact evaluation, checkpoints, MLflow.

The engine reads a plain, resolved config (a dict) and a `RunInfo`; it knows nothing of Hydra. How a
step of the recipe's global batch is cut over processes, forward passes and BatchNorm groups is the
batch plan's (batches.py); BatchNorm groups in one pass are bn_groups.py's; the checkpoint folder's
ownership and resume policy are checkpoint.py's; what a run records is tracking's.
"""

from __future__ import annotations

import contextlib
import functools
import logging
import math
import os
import platform
import random
import time
from collections.abc import Mapping
from dataclasses import dataclass, field
from itertools import islice
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn
from torch.nn.parallel import DistributedDataParallel

from resnet_repro import batches, checkpoint, distributed, stopping
from resnet_repro.bn_groups import (
    GroupBatchNorm2d,
    convert_bn_groups,
    convert_sync_bn,
    resolve_kernel,
    set_update_stats,
)
from resnet_repro.convert import load_state_dict_strict
from resnet_repro.data import build_data, on_device, resolve_workers
from resnet_repro.data.preprocess import Preprocessor
from resnet_repro.data.wait import WaitClock, input_bound_message
from resnet_repro.errors import UserError, one_line
from resnet_repro.evaluation import topk_accuracy
from resnet_repro.faults import crash_point, step_point
from resnet_repro.identity import Deviation, deviations_tag, flag
from resnet_repro.losses import build_loss
from resnet_repro.mixing import build_mixer
from resnet_repro.models import build_model_from_cfg, count_flops, count_params
from resnet_repro.optim import build_optimizer, learning_rate, set_lr
from resnet_repro.precision import Precision, set_tf32
from resnet_repro.progress import Progress, fmt_time
from resnet_repro.tracking import Tracker, ui_command
from resnet_repro.tracking.run import flat_params, pid_alive, provenance_tags

log = logging.getLogger("resnet_repro")


@dataclass
class RunInfo:
    """What the job knows beyond the config: identity, its batch plan, provenance, where it writes."""

    row_name: str
    config_hash: str
    plan: batches.BatchPlan  # how a step is cut over this job's processes (made once by the job: provenance.run_info)
    run_name: str = ""
    deviations: list[Deviation] = field(default_factory=list)
    overrides: list[str] = field(default_factory=list)
    output_dir: str = "."
    log_file: str = ""
    sweep: str = ""
    config_yaml: str = ""
    section: str = ""
    data_fingerprint: str | None = None


@dataclass
class EpochProgress:
    """Where the epoch in progress stands on this rank: steps done, the loss summed over its images, the images,
    and the training seconds so far. A mid-epoch checkpoint holds it (each rank's sums), so a resumed epoch
    reports the same train_loss as an uninterrupted one."""

    step: int = 0
    loss_sum: float = 0.0
    seen: int = 0
    elapsed_s: float = 0.0

    @classmethod
    def of(cls, state: Mapping[str, Any], rank: int, world: int) -> EpochProgress:
        """This rank's part of a checkpoint's epoch; under another world size rank 0 carries the sums."""
        saved = state.get("epoch_progress") or {}
        sums, seen = saved.get("loss_sum", []), saved.get("seen", [])
        if len(sums) == world:
            mine = (float(sums[rank]), int(seen[rank]))
        else:
            mine = (float(sum(sums)), int(sum(seen))) if rank == 0 else (0.0, 0)
        return cls(int(state.get("step", 0)), *mine, float(saved.get("elapsed_s", 0.0)))


class NonFiniteLoss(UserError):
    """The training loss became NaN or infinite: the run stops (FAILED), writing no checkpoint of it."""


def seed_everything(seed: int, deterministic: bool) -> None:
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)
    if deterministic:
        os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")
        torch.use_deterministic_algorithms(True)
    torch.backends.cudnn.benchmark = not deterministic


def build_train_model(
    cfg: Mapping[str, Any], plan: batches.BatchPlan, device: torch.device, channels_last: bool, rank: int
) -> tuple[nn.Module, int, float]:
    """The run's model on its device (recipe init, SyncBN or BN groups), its Params and FLOPs (G, rank 0).

    BN groups: each forward pass holds `plan.bn_groups_per_pass` groups (the recipe's per-GPU shares, of equal
    size in every step, the short last one too), in the `trainer.bn_group_kernel` form."""
    model = build_model_from_cfg(cfg)
    init = cfg["recipe"].get("init") or {}
    if init.get("pretrained"):
        from resnet_repro.convert import load_pretrained

        trusted = bool(cfg["trainer"]["trust_checkpoint"])
        load_pretrained(model, init["pretrained"], prefix=init.get("prefix"), trusted=trusted)
    params = count_params(model)  # ptflops knows plain BN layers: count before converting them
    flops = count_flops(model, int(cfg["dataset"]["input_size"])) / 1e9 if rank == 0 else 0.0
    if plan.sync_bn:  # running statistics from one pass per step, as the BN groups' (bn_groups.GatedSyncBatchNorm)
        model = convert_sync_bn(model)
    else:  # each group of the recipe's per-GPU batch normalised on its own, in one pass
        kernel = resolve_kernel(str(cfg["trainer"]["bn_group_kernel"]), device)
        convert_bn_groups(model, groups=plan.bn_groups_per_pass, kernel=kernel)
    model.to(device)
    return (model.to(memory_format=torch.channels_last) if channels_last else model), params, flops


def wrap(model: nn.Module, world: int, device: torch.device, compile_mode: Any) -> nn.Module:
    """DDP across processes, then torch.compile around it when asked (mode: CUDA graphs etc.)."""
    net: nn.Module = model
    if world > 1:
        net = DistributedDataParallel(model, device_ids=[device.index] if device.type == "cuda" else None)
    if compile_mode is False:
        return net
    return torch.compile(net, mode=None if compile_mode is True else str(compile_mode))


def ddp_of(net: nn.Module) -> DistributedDataParallel | None:
    """The DDP module inside what `wrap` returned (torch.compile hides it), for `no_sync`; None without DDP."""
    inner = getattr(net, "_orig_mod", net)
    return inner if isinstance(inner, DistributedDataParallel) else None


def build_batch_mixer(cfg: Mapping[str, Any], plan: batches.BatchPlan) -> Any:
    """Mixup/CutMix of the RSB recipes; mmpretrain mixes each GPU's batch on its own, so partners stay
    within each BN group (the recipe's per-GPU batch)."""
    if not cfg["recipe"].get("mixing"):
        return None
    groups = plan.device_batch // plan.bn_group
    return build_mixer(cfg["recipe"]["mixing"], int(cfg["dataset"]["num_classes"]), chunks=groups)


class Trainer:
    """Everything one rank needs to train one run; `fit()` runs it in the config's checkpoint folder."""

    def __init__(self, cfg: Mapping[str, Any], info: RunInfo, folder: checkpoint.RunFolder) -> None:
        self.cfg, self.info, self.folder = cfg, info, folder
        self.recipe, tr = cfg["recipe"], cfg["trainer"]
        self.world, self.rank = distributed.world_size(), distributed.rank()
        self.device = distributed.select_device(tr["device"])
        seed_everything(int(cfg["seed"]), bool(tr["deterministic"]))
        self.tf32 = set_tf32(tr["tf32"], self.device)
        self.plan = info.plan
        workers = resolve_workers(tr["num_workers"], distributed.local_world_size())
        self.workers = workers  # named in the input-bound advice (data.wait)
        self.data = build_data(
            cfg, batch=self.plan.device_batch, world=self.world, rank=self.rank, workers=workers, device=self.device
        )
        channels_last = self.device.type == "cuda" if tr["channels_last"] == "auto" else bool(tr["channels_last"])
        self.model, self.params, self.flops = build_train_model(cfg, self.plan, self.device, channels_last, self.rank)
        self.net = wrap(self.model, self.world, self.device, tr["compile"])
        self.ddp, self.compiled = ddp_of(self.net), tr["compile"] is not False
        if tr["compile"] == "reduce-overhead" and self.world > 1 and self.rank == 0:
            log.warning(
                "trainer.compile=reduce-overhead under DDP: inductor runs graphs that update BatchNorm buffers "
                "without CUDA graphs (pytorch/pytorch#139207); here only rank 0's first pass per step updates them"
            )
        self.precision = Precision(cfg["precision"], self.device)
        # under a loss scaler, SGD fused: the skip of a non-finite step is decided on the device (precision.py)
        fused = self.precision.scaler is not None
        self.optimizer = build_optimizer(self.model, self.recipe["optimizer"], fused=fused)
        self.criterion = build_loss(self.recipe["loss"])
        self.mixer = build_batch_mixer(cfg, self.plan)
        self.preprocess = Preprocessor(cfg["dataset"]["mean"], cfg["dataset"]["std"], self.device, channels_last)
        self.tracker = Tracker(cfg["tracking"]["uri"], cfg["tracking"]["experiment"], enabled=self.rank == 0)
        self.epochs, self.start_epoch = int(self.recipe["epochs"]), 0
        self.best_top1, self.best_epoch, self.best_val = float("-inf"), 0, {}
        self.history: dict[int, dict[str, float]] = {}  # epoch -> its metrics, kept in every checkpoint
        self.steps = min(len(self.data.train), tr["limit_train_batches"] or len(self.data.train))
        self.progress = EpochProgress()  # the epoch in progress (restored mid-epoch by a resume)
        self._resume_rng: Any = None  # this rank's RNG states from the checkpoint, applied where the epoch resumes
        self.vote = stopping.StepVote(self.world, lambda: stopping.requested() is not None)
        self._last_logged_step = 0  # MLflow step metrics the run already has: a resumed run never logs one twice
        self._eval_seconds = 0.0  # the last evaluation's time, for the run's ETA
        self._bn_update: bool | None = None  # what the BN groups were last told (set_update_stats)
        self._said_input_bound = False  # the advice of data.wait.input_bound_message is given once

    # ---- one step -----------------------------------------------------------------------------
    def train_step(self, images: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        """One optimizer step on this device's share of the global batch; its mean loss, left on the device.

        The batch is whole per-GPU shares of one size (data.samplers), so `accum_steps` equal passes cut it at
        group boundaries, the epoch's short last step too."""
        x = self.preprocess(images.to(self.device, non_blocking=True))
        target = labels.to(self.device, non_blocking=True)
        if self.mixer is not None:
            x, target = self.mixer(x, target)
        n, k = x.shape[0], self.plan.accum_steps
        passes = list(zip(x.tensor_split(k), target.tensor_split(k), strict=True))
        loss_sum = torch.zeros((), device=self.device)
        for i, (xp, tp) in enumerate(passes):
            update = self.rank == 0 and i == 0  # BN running statistics: the recipe's rank 0, its first group
            if update != self._bn_update:  # walking the modules only when it changes
                set_update_stats(self.model, update)
                self._bn_update = update
            if self.compiled:  # one graph for every batch size: the short last step does not recompile
                torch._dynamo.maybe_mark_dynamic(xp, 0)
            # accumulation passes keep their gradients local (DDP's no_sync, also under torch.compile)
            no_sync = self.ddp.no_sync() if self.ddp is not None and i < len(passes) - 1 else contextlib.nullcontext()
            with no_sync, self.precision.autocast():
                loss = self.criterion(self.net(xp), tp) * (xp.shape[0] / n)  # the device batch's mean
            self.precision.backward(loss)
            loss_sum += loss.detach()
        self.precision.step(self.optimizer)
        return loss_sum

    # ---- epochs -------------------------------------------------------------------------------
    def train_one_epoch(self, epoch: int) -> dict[str, float] | None:
        """The epoch's steps from where `self.progress` stands; its metrics, or None when the ranks agreed to
        stop before its end (`self.progress` then holds the stop point)."""
        self.net.train()
        done = self.progress
        self.data.train.sampler.set_epoch(epoch)
        self.data.train.sampler.start_at(done.step * self.plan.device_batch)  # mid-epoch: skip the steps done
        if done.step == 0:  # resumed at an epoch's end: the RNG states as the epoch started
            self._restore_rng()
        batches = iter(self.data.train)
        self._restore_rng()  # mid-epoch: the states of that step boundary, after whatever starting the epoch drew
        base_lr = float(self.recipe["optimizer"]["lr"])
        loss_sum = torch.tensor(done.loss_sum, device=self.device, dtype=torch.float64)
        seen, lr = done.seen, base_lr
        every = int(self.cfg["trainer"]["log_every_n_steps"])
        later = (self.epochs - epoch - 1, self._eval_seconds)  # for the run's ETA
        bar = Progress(
            f"epoch {epoch + 1}/{self.epochs}", self.steps, every, enabled=self.rank == 0, later=later, done=done.step
        )
        batches = WaitClock(islice(batches, self.steps - done.step))  # data_wait_frac: time in the loader's next()
        for it, (images, labels) in enumerate(batches, start=done.step):
            lr = learning_rate(self.recipe["schedule"], base_lr, self.epochs, epoch, it, self.steps)
            set_lr(self.optimizer, lr)
            loss = self.train_step(images, labels)
            loss_sum += loss * images.shape[0]
            seen, step = seen + images.shape[0], it + 1
            bar.advance(step, live=functools.partial(self._live_fields, bar, loss_sum, seen, lr, batches))
            if step % every == 0 or step == self.steps:  # the same steps on every rank: the check all-reduces
                self._check_finite(loss_sum, epoch, step)
                self._log_step(epoch, step, float(loss_sum) / seen if self.rank == 0 else 0.0, lr)
            if bar.due(step):  # rank 0
                self._report_step(bar, epoch, step, float(loss_sum) / seen, seen, lr, batches.fraction())
            step_point(epoch + 1, step)
            if step < self.steps and self.vote.poll():  # every rank stops after this same step
                self.progress = EpochProgress(step, float(loss_sum), seen, done.elapsed_s + bar.elapsed())
                bar.close()
                return None
        self.vote.settle()
        bar.close()
        wait = batches.fraction()
        advice = input_bound_message(wait, epoch + 1, self.cfg, self.workers, self.data.decode)
        if advice and self.rank == 0 and not self._said_input_bound:
            log.warning(advice)
            self._said_input_bound = True
        totals = torch.stack([loss_sum.double(), torch.tensor(float(seen), device=self.device, dtype=torch.float64)])
        if self.world > 1:
            torch.distributed.all_reduce(totals)
        elapsed = done.elapsed_s + bar.elapsed()
        self.progress = EpochProgress()
        return {
            "train_loss": float(totals[0] / totals[1]),
            "lr": lr,
            "train_img_per_s": float(totals[1]) / elapsed,
            "data_wait_frac": wait,
        }

    def _restore_rng(self) -> None:
        if self._resume_rng is not None:
            checkpoint.set_rng_state(self._resume_rng, self.device)
            self._resume_rng = None

    def _log_step(self, epoch: int, step: int, loss: float, lr: float) -> None:
        """MLflow's step metrics at fixed steps (every log_every_n_steps, and the epoch's end), each step once."""
        global_step = epoch * self.steps + step
        if self.rank == 0 and global_step > self._last_logged_step:
            self.tracker.log_metrics({"step/train_loss": loss, "step/lr": lr}, step=global_step)
            self._last_logged_step = global_step

    def _check_finite(self, loss_sum: torch.Tensor, epoch: int, step: int) -> None:
        """A NaN or infinite loss stops the run on every rank (reading it syncs: only at reporting points)."""
        finite = torch.isfinite(loss_sum).to(torch.int32)
        if self.world > 1:
            torch.distributed.all_reduce(finite, op=torch.distributed.ReduceOp.MIN)
        if not bool(finite):
            raise NonFiniteLoss(
                f"the training loss became {float(loss_sum):g} in epoch {epoch + 1} by step {step}; "
                f"the run is stopped (lower recipe.optimizer.lr, or use precision=amp-fp16 for dynamic loss scaling)"
            )

    def _step_fields(self, bar: Progress, loss: float, seen: int, lr: float, wait: float) -> dict[str, str]:
        """What the progress shows of the epoch so far (its ETAs are the bar's)."""
        rate = (seen - self.progress.seen) * self.world / bar.elapsed()  # this start's images, this start's time
        return {"loss": f"{loss:.4f}", "lr": f"{lr:.4g}", "img/s": f"{rate:.0f}", "wait": f"{wait:.0%}"}

    def _live_fields(
        self, bar: Progress, loss_sum: torch.Tensor, seen: int, lr: float, batches: WaitClock
    ) -> dict[str, str]:
        """The terminal bar's fields at a redraw (rank 0; reading the loss syncs the device, about once a second)."""
        return self._step_fields(bar, float(loss_sum) / seen, seen, lr, batches.fraction())

    def _report_step(
        self, bar: Progress, epoch: int, step: int, loss: float, seen: int, lr: float, wait: float
    ) -> None:
        """The progress line: loss, LR, img/s, wait, ETAs of the epoch and the run (MLflow's: _log_step)."""
        bar.report(step, self._step_fields(bar, loss, seen, lr, wait))

    def evaluate(self) -> dict[str, float]:
        """Top-1/top-5 (percent) over the split (or its evenly spread subset): each sample counted once."""
        start = time.perf_counter()
        crash_point("evaluate")
        if self.world > 1:  # evaluate what the checkpoint holds: rank 0's BatchNorm statistics
            for buffer in self.model.buffers():
                torch.distributed.broadcast(buffer, src=0)
        every = int(self.cfg["trainer"]["log_every_n_steps"])
        bar = Progress("eval", len(self.data.val), every, enabled=self.rank == 0, unit="batch", first=False)
        num_classes = int(self.cfg["dataset"]["num_classes"])
        top = topk_accuracy(self.model, self.data.val, self.preprocess, self.device, num_classes, bar)
        self._eval_seconds = time.perf_counter() - start
        return {f"val_{k}": v for k, v in top.items()}

    # ---- what a checkpoint holds ----------------------------------------------------------------
    def state_dict(self) -> dict[str, Any]:
        """last.pt: everything a resume needs, in types torch.load(weights_only=True) reads."""
        return {
            "epoch": self.start_epoch,  # epochs completed
            "step": self.progress.step,  # steps of the next epoch done (a mid-epoch checkpoint)
            "model": self.model.state_dict(),
            "optimizer": self.optimizer.state_dict(),
            "scaler": self.precision.scaler.state_dict() if self.precision.scaler else None,
            "best_top1": self.best_top1,
            "best_epoch": self.best_epoch,
            "best_val": dict(self.best_val),
            "history": self.history,
            "config": dict(self.cfg),
            "config_hash": self.info.config_hash,
            "data_fingerprint": self.info.data_fingerprint,
            "row_name": self.info.row_name,
            "classes": self.data.classes,
            "mlflow_run_id": self.tracker.run_id,
            "world_size": self.world,
            "write_best": self.cfg["trainer"]["checkpoints"] == "last+best",
        }

    def load_state_dict(self, state: Mapping[str, Any], weights_only: bool = False, source: str = "") -> None:
        # strict, one line naming the keys that do not fit (a warm start from another architecture)
        load_state_dict_strict(self.model, state["model"], f"checkpoint {source or 'state'}")
        if weights_only:  # a warm start: a new run from another run's weights
            return
        self.optimizer.load_state_dict(state["optimizer"])
        if self.precision.scaler is not None and state.get("scaler"):
            self.precision.scaler.load_state_dict(state["scaler"])
        self.start_epoch = int(state["epoch"])
        self.progress = EpochProgress(step=int(state.get("step", 0)))
        self.best_top1, self.best_epoch = float(state["best_top1"]), int(state.get("best_epoch", 0))
        self.best_val, self.history = dict(state.get("best_val", {})), dict(state.get("history", {}))

    def rank_states(self) -> list[dict[str, Any]]:
        """Every rank's RNG states and epoch sums at this step boundary (a collective: all ranks call it)."""
        mine = {"rng": checkpoint.rng_state(self.device), "loss_sum": self.progress.loss_sum}
        mine["seen"] = self.progress.seen
        return distributed.all_gather_object(mine)

    def save(self, ranks: list[dict[str, Any]]) -> None:
        """last.pt (at an epoch's end, or mid-epoch where a stop left it), then best.pt when this epoch
        improved (a kill between the two is repaired at start)."""
        mode = self.cfg["trainer"]["checkpoints"]
        if self.rank != 0 or mode == "none":
            return
        progress = {"elapsed_s": self.progress.elapsed_s, **{k: [r[k] for r in ranks] for k in ("loss_sum", "seen")}}
        state = {**self.state_dict(), "rng": [r["rng"] for r in ranks], "epoch_progress": progress}
        crash_point("before-first-checkpoint" if self.start_epoch == 1 and self.progress.step == 0 else "")
        checkpoint.save_atomic(state, self.folder.last)
        if mode == "last+best" and self.best_epoch == self.start_epoch and self.progress.step == 0:
            crash_point("between-last-and-best")
            checkpoint.save_atomic(checkpoint.best_from_last(state), self.folder.best)

    # ---- the run ------------------------------------------------------------------------------
    def fit(self) -> dict[str, Any]:
        """Train from where the folder says to the end; returns the run's summary (best, last, time)."""
        start = time.perf_counter()
        resume = checkpoint.Resume("fresh")
        try:
            resume = distributed.on_rank0(self._choose_resume)
            self._restore(resume)
            if self.rank == 0 and self.cfg["trainer"]["checkpoints"] != "none":
                checkpoint.check_room(self.folder.path, self.model)
            distributed.on_rank0(lambda: self._start_tracking(resume))
        except UserError as err:
            err.before_start = True
            raise
        except stopping.Stopped as stop:  # a signal before the first step: keep what the folder had
            raise self._stopped_at_start(stop, resume) from None
        try:
            with stopping.current().deferring():  # from here a signal stops at a step boundary
                for epoch in range(self.start_epoch, self.epochs):
                    self._epoch(epoch)
                crash_point("before-finish")
                self._finish_books()
        except stopping.Stopped as stop:
            self._record_stop(stop)
            raise
        except Exception as err:
            if stopping.requested() is None or isinstance(err, UserError):
                self.tracker.finish("FAILED")
                self._log_files()
                raise
            stop = self._stopped_by_error(err)  # an error while stopping (a lost peer, a loader ended by the signal)
            self._record_stop(stop)
            raise stop from err
        except KeyboardInterrupt:
            self.tracker.finish("KILLED")
            raise
        except BaseException:
            self.tracker.finish("FAILED")
            self._log_files()
            raise
        self._check_books()
        last = self.history.get(self.epochs, {})
        return {
            "best_top1": self.best_top1,
            "best_epoch": self.best_epoch,
            "last": last,
            "wall_s": time.perf_counter() - start,
            "run_id": self.tracker.run_id,
        }

    def _restore(self, resume: checkpoint.Resume) -> None:
        if resume.path is None:
            return
        state = checkpoint.load(resume.path, trusted=bool(self.cfg["trainer"]["trust_checkpoint"]))
        self.load_state_dict(state, weights_only=resume.action == "warm", source=str(resume.path))
        if resume.action == "warm":
            return
        self.progress = EpochProgress.of(state, self.rank, self.world)
        rngs = state.get("rng") or []
        if len(rngs) == self.world:  # applied where the epoch resumes (train_one_epoch)
            self._resume_rng = rngs[self.rank]

    def _stopped(self, epoch: int, step: int | None) -> stopping.Stopped:
        """The stop after a checkpoint of this point: mid-epoch (`epoch` 0-based in progress, `step` done) or
        at the end of `epoch` (epochs completed, `step` None)."""
        sig = stopping.requested() or "SIGTERM"
        where = f"at epoch {epoch + 1} step {step}/{self.steps}" if step is not None else f"after epoch {epoch}"
        if self.cfg["trainer"]["checkpoints"] == "none":
            line = f"stopped {where} ({sig}); trainer.checkpoints=none kept nothing: the same command starts over"
            return stopping.Stopped(line, stopping.exit_code(sig), sig)
        return stopping.Stopped(f"stopped {where} ({sig}); the same command resumes here", stopping.EXIT_STOPPED, sig)

    def _stopped_at_start(self, stop: stopping.Stopped, resume: checkpoint.Resume) -> stopping.Stopped:
        """A signal before the first step: a run that resumes a checkpoint still resumes it; a new one has
        nothing to keep (its MLflow run, if started, is KILLED)."""
        if resume.path is not None and resume.action != "warm":
            where = f"epoch {self.start_epoch + 1} step {self.progress.step}/{self.steps}"
            stop = stopping.Stopped(
                f"stopped before the first step ({stop.signal_name}); the same command resumes at {where}",
                stopping.EXIT_STOPPED,
                stop.signal_name,
            )
        self._record_stop(stop)
        return stop

    def _stopped_by_error(self, err: Exception) -> stopping.Stopped:
        """Asked to stop, the run failed before it reached a step boundary: what the folder last got resumes."""
        sig = stopping.requested() or "SIGTERM"
        why = f"stopped ({sig}) by an error while stopping ({type(err).__name__}: {str(err).strip()[:160]})"
        if self.rank == 0 and not self.folder.last.is_file():
            return stopping.Stopped(f"{why}; nothing to resume", stopping.exit_code(sig), sig)
        return stopping.Stopped(f"{why}; the same command resumes from the last checkpoint", stopping.EXIT_STOPPED, sig)

    def _record_stop(self, stop: stopping.Stopped) -> None:
        """A resumable stop leaves the MLflow run RUNNING, tagged with where and why; otherwise it is KILLED."""
        self.tracker.set_tags({"stopped": stop.line})
        if not stop.resumable:
            self.tracker.finish("KILLED")

    def _choose_resume(self) -> checkpoint.Resume:
        tr = self.cfg["trainer"]
        return self.folder.resume_or_archive(
            str(tr["resume"]),
            epochs=self.epochs,
            config_hash=self.info.config_hash,
            fingerprint=self.info.data_fingerprint,
            finished=lambda run_id: self.tracker.status(run_id) == "FINISHED",
            keep=int(tr["keep_archived"]),
            trusted=bool(tr["trust_checkpoint"]),
            warm_start=bool(tr["warm_start"]),
        )

    def _adoptable(self, resume: checkpoint.Resume) -> str | None:
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
                self.folder.record,
                f", with the {len(self.history)} epochs its checkpoint holds" if self.history else "",
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

    def _start_tracking(self, resume: checkpoint.Resume) -> None:
        """A new MLflow run, or the one this config's folder names (adopted after a kill); run.json records it
        once the store has said all it must (so a store lost from then on costs no read)."""
        try:
            closed = self._open_run(resume)
        except UserError:
            raise
        except Exception as err:  # MLflow raises many types; the store answered the probe seconds ago
            raise UserError(
                f"the MLflow store {self.tracker.uri} stopped answering as the run started ({one_line(err)}); "
                "nothing was trained: run the same command again when it answers"
            ) from None
        self.folder.write_run_id(self.tracker.run_id or "", self.tracker.uri)
        note = f"; closed {len(closed)} run(s) left RUNNING by dead processes" if closed else ""
        log.info(
            "MLflow run %s (%s): see it with `%s`%s",
            self.tracker.run_id,
            self.info.run_name,
            ui_command(self.tracker.uri),
            note,
        )
        if resume.path is not None and resume.action == "warm":
            log.info("warm-started from %s", resume.path)
        elif resume.path is not None:
            where = f" step {self.progress.step}/{self.steps}" if self.progress.step else ""
            log.info("resumed %s at epoch %d%s", resume.path, self.start_epoch + 1, where)

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

    def _open_run(self, resume: checkpoint.Resume) -> list[str]:
        """Open (or adopt) the run; the store is the authority on who trains this config on this data, so a rival
        that took it up first wins. Returns the runs of dead processes it closed."""
        params = {**flat_params(self.cfg), **self.plan.params(), "num_train": self.data.num_train}
        params |= {"num_val": self.data.num_val, "steps_per_epoch": self.steps}
        adopted = self.tracker.open(
            self.info.run_name,
            adopt=self._adoptable(resume),
            tags=run_tags(self),
            params={**params, "num_params": self.params, "flops_g": round(self.flops, 4)},  # params: fixed facts
            texts={"config/config.yaml": self.info.config_yaml, "config/overrides.yaml": _as_list(self.info.overrides)},
            resumed_tags={
                "resumed_at_epoch": self.start_epoch,
                "resumed_at_step": self.progress.step,
                "output_dir": self.info.output_dir,
            },
            system_metrics=bool(self.cfg["tracking"].get("system_metrics")),
        )
        rival = rival_run(self.tracker, self.info.config_hash, self.info.data_fingerprint, self.tracker.claimed_at)
        if rival is not None:  # two starts at once from two checkpoint roots: the later one gives way
            self.tracker.withdraw(adopted)
            raise UserError(already_training(self.info.row_name, rival))
        if adopted:
            self._last_logged_step = self.tracker.last_step(self.tracker.run_id, "step/train_loss")
            self._say_where_the_run_lives()
        mine = str(self.folder.path.resolve())  # we hold its lock: any other run left RUNNING there is dead
        closed = self.tracker.close_dead_runs(self.info.config_hash, keep=self.tracker.run_id, checkpoint_dir=mine)
        self.tracker.keep_pending(self.folder.path)  # from now on a write the store does not take is kept
        if self.history:  # epochs a kill kept from MLflow but not from the checkpoint (reads the run's history)
            self.tracker.backfill(self.history)
        return closed

    def _epoch(self, epoch: int) -> None:
        start, before = time.perf_counter(), self.progress.elapsed_s
        train = self.train_one_epoch(epoch)
        if train is None:  # the ranks agreed to stop: a checkpoint of this step boundary, then the line
            self.save(self.rank_states())
            raise self._stopped(epoch, self.progress.step)
        val = self.evaluate()  # a signal during the evaluation stops after it (and this epoch's checkpoint)
        metrics = {**train, **val, "epoch_time_s": time.perf_counter() - start + before}
        self.start_epoch = epoch + 1
        self.history[epoch + 1] = metrics
        if val["val_top1"] > self.best_top1:
            self.best_top1, self.best_epoch, self.best_val = val["val_top1"], epoch + 1, dict(val)
        self.save(self.rank_states())  # carries the metrics: a crash loses none
        self.tracker.log_metrics(metrics, step=epoch + 1)
        if self.rank == 0:
            log.info(epoch_line(epoch + 1, self.epochs, metrics))
        crash_point(f"after-epoch-{epoch + 1}")
        if epoch + 1 < self.epochs and self.vote.now():
            raise self._stopped(epoch + 1, None)

    def _finish_books(self) -> None:
        """The end of the run: final metrics, FINISHED, artifacts (also all a re-run after a late kill does)."""
        self.tracker.log_metrics({"best_val_top1": self.best_top1, "epochs_completed": self.epochs}, step=self.epochs)
        if self.rank == 0 and self.cfg["tracking"]["log_checkpoint"]:
            self.tracker.log_file(self.folder.best, "checkpoints")
        if self.rank == 0 and self.cfg["tracking"].get("log_model"):
            self.tracker.log_model(plain_model(self.cfg, self.model), int(self.cfg["dataset"]["input_size"]))
        self._log_files()
        self.tracker.finish("FINISHED")

    def _check_books(self) -> None:
        """The end of the run reached the store, or the command fails in one line (the only tracking failure
        that does): the checkpoints are saved, and the next start of the same command writes what is kept."""
        if self.rank != 0 or self.tracker.flush():
            return
        saved = (
            "" if self.cfg["trainer"]["checkpoints"] == "none" else f"; the checkpoints are saved in {self.folder.path}"
        )
        raise UserError(
            f"the MLflow store {self.tracker.uri} did not take the end of the run ({self.tracker.pending} writes kept "
            f"in {self.tracker.pending_file}){saved}: run the same command again when the store answers, to write them"
        )

    def _log_files(self) -> None:
        if self.rank == 0 and self.info.log_file:
            self.tracker.log_file(Path(self.info.log_file), "logs")


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


def plain_model(cfg: Mapping[str, Any], trained: nn.Module) -> nn.Module:
    """The trained weights in the row's plain model (ordinary BatchNorm, on the CPU): what serving needs."""
    model = build_model_from_cfg(cfg)
    model.load_state_dict({k: v.detach().cpu() for k, v in trained.state_dict().items()})
    return model.eval()


def run_tags(trainer: Trainer) -> dict[str, Any]:
    """What a training run records about itself (tracking.run: the names the report reads)."""
    info, data = trainer.info, trainer.data
    return provenance_tags(
        row=info.row_name,
        section=info.section,
        config_hash=info.config_hash,
        run_type="train",
        faithful=flag(not info.deviations),
        deviations=deviations_tag(info.deviations),
        sweep=info.sweep,
        hydra_overrides=" ".join(info.overrides),
        world_size=trainer.world,
        device=str(trainer.device),
        device_name=distributed.device_name(trainer.device),
        output_dir=info.output_dir,
        checkpoint_dir=str(trainer.folder.path.resolve()),
        data_verified=flag(data.verified),
        data_fingerprint=info.data_fingerprint,
        data_on_device=on_device.DRAW_SCHEME if data.on_device else "false",
        decode=data.decode,
        val_limited=flag(data.val_limited),
        tf32=flag(trainer.tf32),
        bn_group_kernel=next((m.kernel for m in trainer.model.modules() if isinstance(m, GroupBatchNorm2d)), "none"),
    )


def epoch_line(epoch: int, epochs: int, m: Mapping[str, float]) -> str:
    top5 = f"  top-5 {m['val_top5']:6.2f}" if "val_top5" in m else ""
    return (
        f"epoch {epoch}/{epochs}  loss {m['train_loss']:.4f}  lr {m['lr']:.4g}  val top-1 {m['val_top1']:6.2f}{top5}"
        f"  {m['epoch_time_s']:.1f} s  {m['train_img_per_s']:.0f} img/s"
    )


def _as_list(overrides: list[str]) -> str:
    return "\n".join(f"- {o}" for o in overrides) + "\n"


def summary_line(row: str, result: Mapping[str, Any]) -> str:
    last = result.get("last") or {}
    top5 = f" / top-5 {last['val_top5']:.2f}" if "val_top5" in last else ""
    return (
        f"done {row}: best top-1 {result['best_top1']:.2f} (epoch {result['best_epoch']}), "
        f"last top-1 {last.get('val_top1', float('nan')):.2f}{top5}, {fmt_time(result['wall_s'])} wall"
    )
