"""The training loop of one process (rank): epochs of train steps, exact evaluation, checkpoints, MLflow.

The engine reads a plain, resolved config (a dict) and a `RunInfo`; it knows nothing of Hydra. How a
step of the recipe's global batch is cut over processes, forward passes and BatchNorm groups is the
batch plan's (batches.py, made once by the job: `RunInfo.plan`); the model as it trains is models.py's;
the checkpoint folder's ownership and resume policy are checkpoint.py's; the run's MLflow side is
run_books.py's; the line a stop ends with is stopping.py's.
"""

from __future__ import annotations

import contextlib
import functools
import logging
import os
import random
import time
from collections.abc import Mapping
from dataclasses import dataclass, field
from itertools import islice
from typing import Any

import numpy as np
import torch

from resnet_repro import checkpoint, distributed, stopping
from resnet_repro.batches import BatchPlan
from resnet_repro.bn_groups import set_update_stats
from resnet_repro.convert import load_state_dict_strict
from resnet_repro.data import build_data, resolve_workers
from resnet_repro.data.preprocess import Preprocessor
from resnet_repro.data.wait import WaitClock, input_bound_message
from resnet_repro.errors import UserError, marked_before_start
from resnet_repro.evaluation import topk_accuracy
from resnet_repro.faults import crash_point, step_point
from resnet_repro.identity import Deviation
from resnet_repro.losses import build_loss
from resnet_repro.mixing import build_batch_mixer
from resnet_repro.models import build_train_model
from resnet_repro.optim import build_optimizer, learning_rate, set_lr
from resnet_repro.precision import Precision, set_tf32
from resnet_repro.progress import Progress, fmt_time
from resnet_repro.run_books import RunBooks

log = logging.getLogger("resnet_repro")


@dataclass
class RunInfo:
    """What the job knows beyond the config: identity, its batch plan, provenance, where it writes."""

    row_name: str
    config_hash: str
    plan: BatchPlan  # how a step is cut over this job's processes (made once per job: job.run_job)
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
        self.net = distributed.wrap(self.model, self.world, self.device, tr["compile"])
        self.ddp, self.compiled = distributed.ddp_of(self.net), tr["compile"] is not False
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
        self.books = RunBooks(cfg, info, folder, enabled=self.rank == 0)
        self.epochs, self.epochs_done = int(self.recipe["epochs"]), 0
        self.best_top1, self.best_epoch, self.best_val = float("-inf"), 0, {}
        self.history: dict[int, dict[str, float]] = {}  # epoch -> its metrics, kept in every checkpoint
        self.steps = min(len(self.data.train), tr["limit_train_batches"] or len(self.data.train))
        self.progress = EpochProgress()  # the epoch in progress (restored mid-epoch by a resume)
        self._resume_rng: Any = None  # this rank's RNG states from the checkpoint, applied where the epoch resumes
        self.vote = stopping.StepVote(self.world, lambda: stopping.requested() is not None)
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
                loss = float(loss_sum) / seen if self.rank == 0 else 0.0  # MLflow's step metrics (rank 0)
                self.books.log_step(epoch * self.steps + step, loss, lr)
            if bar.due(step):  # rank 0: the progress line (loss, LR, img/s, wait, ETAs of the epoch and the run)
                bar.report(step, self._step_fields(bar, float(loss_sum) / seen, seen, lr, batches.fraction()))
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
            "epoch": self.epochs_done,
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
            "mlflow_run_id": self.books.run_id,
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
        self.epochs_done = int(state["epoch"])
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
        crash_point("before-first-checkpoint" if self.epochs_done == 1 and self.progress.step == 0 else "")
        checkpoint.save_atomic(state, self.folder.last)
        if mode == "last+best" and self.best_epoch == self.epochs_done and self.progress.step == 0:
            crash_point("between-last-and-best")
            checkpoint.save_atomic(checkpoint.best_from_last(state), self.folder.best)

    # ---- the run ------------------------------------------------------------------------------
    def fit(self) -> dict[str, Any]:
        """Train from where the folder says to the end; returns the run's summary (best, last, time)."""
        start = time.perf_counter()
        resume = checkpoint.Resume("fresh")
        try:
            with marked_before_start():
                resume = distributed.on_rank0(self._choose_resume)
                self._restore(resume)
                if self.rank == 0 and self.cfg["trainer"]["checkpoints"] != "none":
                    checkpoint.check_room(self.folder.path, self.model)
                distributed.on_rank0(lambda: self._open_books(resume))
        except stopping.Stopped as stop:  # a signal before the first step: keep what the folder had
            resumes = resume.path is not None and resume.action != "warm"  # a new run has nothing to keep
            at = f"epoch {self.epochs_done + 1} step {self.progress.step}/{self.steps}" if resumes else None
            stop = stopping.at_start(stop, at)
            self.books.stopped(stop)
            raise stop from None
        try:
            with stopping.current().deferring():  # from here a signal stops at a step boundary
                for epoch in range(self.epochs_done, self.epochs):
                    self._epoch(epoch)
                crash_point("before-finish")
                self.books.finish(self.best_top1, self.epochs, self.model)
        except stopping.Stopped as stop:
            self.books.stopped(stop)
            raise
        except Exception as err:
            if stopping.requested() is None or isinstance(err, UserError):
                self.books.failed()
                raise
            # an error while stopping (a lost peer, a loader ended by the signal): what the folder last got resumes
            stop = stopping.by_error(err, resumable=self.rank != 0 or self.folder.last.is_file())
            self.books.stopped(stop)
            raise stop from err
        except KeyboardInterrupt:
            self.books.killed()
            raise
        except BaseException:
            self.books.failed()
            raise
        self.books.check_end()
        last = self.history.get(self.epochs, {})
        return {
            "best_top1": self.best_top1,
            "best_epoch": self.best_epoch,
            "last": last,
            "wall_s": time.perf_counter() - start,
            "run_id": self.books.run_id,
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

    def _choose_resume(self) -> checkpoint.Resume:
        tr = self.cfg["trainer"]
        return self.folder.resume_or_archive(
            str(tr["resume"]),
            epochs=self.epochs,
            config_hash=self.info.config_hash,
            fingerprint=self.info.data_fingerprint,
            finished=self.books.finished,
            keep=int(tr["keep_archived"]),
            trusted=bool(tr["trust_checkpoint"]),
            warm_start=bool(tr["warm_start"]),
        )

    def _open_books(self, resume: checkpoint.Resume) -> None:
        """Rank 0: the run's MLflow run (new, or the one a killed start left), then where training starts."""
        self.books.start(resume, self)
        if resume.path is not None and resume.action == "warm":
            log.info("warm-started from %s", resume.path)
        elif resume.path is not None:
            where = f" step {self.progress.step}/{self.steps}" if self.progress.step else ""
            log.info("resumed %s at epoch %d%s", resume.path, self.epochs_done + 1, where)

    def _epoch(self, epoch: int) -> None:
        start, before = time.perf_counter(), self.progress.elapsed_s
        train = self.train_one_epoch(epoch)
        if train is None:  # the ranks agreed to stop: a checkpoint of this step boundary, then the line
            self.save(self.rank_states())
            raise self._stopped(f"at epoch {epoch + 1} step {self.progress.step}/{self.steps}")
        val = self.evaluate()  # a signal during the evaluation stops after it (and this epoch's checkpoint)
        metrics = {**train, **val, "epoch_time_s": time.perf_counter() - start + before}
        self.epochs_done = epoch + 1
        self.history[epoch + 1] = metrics
        if val["val_top1"] > self.best_top1:
            self.best_top1, self.best_epoch, self.best_val = val["val_top1"], epoch + 1, dict(val)
        self.save(self.rank_states())  # carries the metrics: a crash loses none
        self.books.log_epoch(epoch + 1, metrics)
        if self.rank == 0:
            log.info(epoch_line(epoch + 1, self.epochs, metrics))
        crash_point(f"after-epoch-{epoch + 1}")
        if epoch + 1 < self.epochs and self.vote.now():
            raise self._stopped(f"after epoch {epoch + 1}")

    def _stopped(self, where: str) -> stopping.Stopped:
        return stopping.at_boundary(where, kept=self.cfg["trainer"]["checkpoints"] != "none")


def epoch_line(epoch: int, epochs: int, m: Mapping[str, float]) -> str:
    top5 = f"  top-5 {m['val_top5']:6.2f}" if "val_top5" in m else ""
    return (
        f"epoch {epoch}/{epochs}  loss {m['train_loss']:.4f}  lr {m['lr']:.4g}  val top-1 {m['val_top1']:6.2f}{top5}"
        f"  {m['epoch_time_s']:.1f} s  {m['train_img_per_s']:.0f} img/s"
    )


def summary_line(row: str, result: Mapping[str, Any]) -> str:
    last = result.get("last") or {}
    top5 = f" / top-5 {last['val_top5']:.2f}" if "val_top5" in last else ""
    return (
        f"done {row}: best top-1 {result['best_top1']:.2f} (epoch {result['best_epoch']}), "
        f"last top-1 {last.get('val_top1', float('nan')):.2f}{top5}, {fmt_time(result['wall_s'])} wall"
    )
