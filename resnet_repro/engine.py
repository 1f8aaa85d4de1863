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

from resnet_repro import batches, checkpoint, distributed
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
from resnet_repro.faults import crash_point
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
    """What the job knows beyond the config: identity, provenance, where it writes."""

    row_name: str
    config_hash: str
    run_name: str = ""
    deviations: list[str] = field(default_factory=list)
    overrides: list[str] = field(default_factory=list)
    output_dir: str = "."
    log_file: str = ""
    sweep: str = ""
    config_yaml: str = ""
    section: str = ""
    data_fingerprint: str | None = None


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
        self.plan = batches.plan(cfg, self.world, self.device.type == "cuda")
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
    def train_one_epoch(self, epoch: int) -> dict[str, float]:
        self.net.train()
        self.data.train.sampler.set_epoch(epoch)
        base_lr = float(self.recipe["optimizer"]["lr"])
        loss_sum, seen, lr = torch.zeros((), device=self.device, dtype=torch.float64), 0, base_lr
        every = int(self.cfg["trainer"]["log_every_n_steps"])
        later = (self.epochs - epoch - 1, self._eval_seconds)  # for the run's ETA
        bar = Progress(f"epoch {epoch + 1}/{self.epochs}", self.steps, every, enabled=self.rank == 0, later=later)
        batches = WaitClock(islice(self.data.train, self.steps))  # data_wait_frac: time in the loader's next()
        for it, (images, labels) in enumerate(batches):
            lr = learning_rate(self.recipe["schedule"], base_lr, self.epochs, epoch, it, self.steps)
            set_lr(self.optimizer, lr)
            loss = self.train_step(images, labels)
            loss_sum += loss * images.shape[0]
            seen, step = seen + images.shape[0], it + 1
            bar.advance(step, live=functools.partial(self._live_fields, bar, loss_sum, seen, lr, batches))
            if step % every == 0 or step == self.steps:  # the same steps on every rank: the check all-reduces
                self._check_finite(loss_sum, epoch, step)
            if bar.due(step):  # rank 0
                self._report_step(bar, epoch, step, float(loss_sum) / seen, seen, lr, batches.fraction())
        bar.close()
        wait = batches.fraction()
        advice = input_bound_message(wait, epoch + 1, self.cfg, self.workers, self.data.decode)
        if advice and self.rank == 0 and not self._said_input_bound:
            log.warning(advice)
            self._said_input_bound = True
        totals = torch.stack([loss_sum.double(), torch.tensor(float(seen), device=self.device, dtype=torch.float64)])
        if self.world > 1:
            torch.distributed.all_reduce(totals)
        elapsed = bar.elapsed()
        return {
            "train_loss": float(totals[0] / totals[1]),
            "lr": lr,
            "train_img_per_s": float(totals[1]) / elapsed,
            "data_wait_frac": wait,
        }

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
        rate = seen * self.world / bar.elapsed()
        return {"loss": f"{loss:.4f}", "lr": f"{lr:.4g}", "img/s": f"{rate:.0f}", "wait": f"{wait:.0%}"}

    def _live_fields(
        self, bar: Progress, loss_sum: torch.Tensor, seen: int, lr: float, batches: WaitClock
    ) -> dict[str, str]:
        """The terminal bar's fields at a redraw (rank 0; reading the loss syncs the device, about once a second)."""
        return self._step_fields(bar, float(loss_sum) / seen, seen, lr, batches.fraction())

    def _report_step(
        self, bar: Progress, epoch: int, step: int, loss: float, seen: int, lr: float, wait: float
    ) -> None:
        """The progress line (loss, LR, img/s, ETAs of the epoch and the run) and MLflow's step metrics."""
        bar.report(step, self._step_fields(bar, loss, seen, lr, wait))
        self.tracker.log_metrics({"step/train_loss": loss, "step/lr": lr}, step=epoch * self.steps + step)

    def evaluate(self) -> dict[str, float]:
        """Top-1/top-5 (percent) over the split (or its evenly spread subset): each sample counted once."""
        start = time.perf_counter()
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
            "epoch": self.start_epoch,
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
        self.best_top1, self.best_epoch = float(state["best_top1"]), int(state.get("best_epoch", 0))
        self.best_val, self.history = dict(state.get("best_val", {})), dict(state.get("history", {}))

    def save(self, rngs: list[Any]) -> None:
        """last.pt, then best.pt when this epoch improved (a kill between the two is repaired at start)."""
        mode = self.cfg["trainer"]["checkpoints"]
        if self.rank != 0 or mode == "none":
            return
        state = {**self.state_dict(), "rng": rngs}
        crash_point("before-first-checkpoint" if self.start_epoch == 1 else "")
        checkpoint.save_atomic(state, self.folder.last)
        if mode == "last+best" and self.best_epoch == self.start_epoch:
            crash_point("between-last-and-best")
            checkpoint.save_atomic(checkpoint.best_from_last(state), self.folder.best)

    # ---- the run ------------------------------------------------------------------------------
    def fit(self) -> dict[str, Any]:
        """Train from where the folder says to the end; returns the run's summary (best, last, time)."""
        start = time.perf_counter()
        try:
            resume = distributed.on_rank0(self._choose_resume)
            self._restore(resume)
            if self.rank == 0 and self.cfg["trainer"]["checkpoints"] != "none":
                checkpoint.check_room(self.folder.path, self.model)
            distributed.on_rank0(lambda: self._start_tracking(resume))
        except UserError as err:
            err.before_start = True
            raise
        try:
            for epoch in range(self.start_epoch, self.epochs):
                self._epoch(epoch)
            crash_point("before-finish")
            self._finish_books()
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
        rngs = state.get("rng") or []
        if len(rngs) == self.world and resume.action != "warm":
            checkpoint.set_rng_state(rngs[self.rank], self.device)

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
        if resume.path is not None:
            how = "warm-started from" if resume.action == "warm" else "resumed"
            log.info("%s %s at epoch %d", how, resume.path, self.start_epoch)

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
            resumed_tags={"resumed_at_epoch": self.start_epoch, "output_dir": self.info.output_dir},
            system_metrics=bool(self.cfg["tracking"].get("system_metrics")),
        )
        rival = rival_run(self.tracker, self.info.config_hash, self.info.data_fingerprint, self.tracker.claimed_at)
        if rival is not None:  # two starts at once from two checkpoint roots: the later one gives way
            self.tracker.withdraw(adopted)
            raise UserError(already_training(self.info.row_name, rival))
        closed = self.tracker.close_dead_runs(self.info.config_hash, keep=self.tracker.run_id)
        self.tracker.keep_pending(self.folder.path)  # from now on a write the store does not take is kept
        if self.history:  # epochs a kill kept from MLflow but not from the checkpoint (reads the run's history)
            self.tracker.backfill(self.history)
        return closed

    def _epoch(self, epoch: int) -> None:
        start = time.perf_counter()
        train = self.train_one_epoch(epoch)
        val = self.evaluate()
        metrics = {**train, **val, "epoch_time_s": time.perf_counter() - start}
        self.start_epoch = epoch + 1
        self.history[epoch + 1] = metrics
        if val["val_top1"] > self.best_top1:
            self.best_top1, self.best_epoch, self.best_val = val["val_top1"], epoch + 1, dict(val)
        rngs = distributed.all_gather_object(checkpoint.rng_state(self.device))
        self.save(rngs)  # carries the metrics: a crash loses none
        self.tracker.log_metrics(metrics, step=epoch + 1)
        if self.rank == 0:
            log.info(epoch_line(epoch + 1, self.epochs, metrics))
        crash_point(f"after-epoch-{epoch + 1}")

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
        faithful=str(not info.deviations).lower(),
        deviations="; ".join(info.deviations),
        sweep=info.sweep,
        hydra_overrides=" ".join(info.overrides),
        world_size=trainer.world,
        device=str(trainer.device),
        device_name=distributed.device_name(trainer.device),
        output_dir=info.output_dir,
        checkpoint_dir=str(trainer.folder.path.resolve()),
        data_verified=data.verified,
        data_fingerprint=info.data_fingerprint,
        data_on_device=on_device.DRAW_SCHEME if data.on_device else "false",
        decode=data.decode,
        val_limited=str(data.val_limited).lower(),
        tf32=str(trainer.tf32).lower(),
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
