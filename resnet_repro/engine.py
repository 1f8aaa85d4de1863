"""The training loop of one process (rank): epochs of train steps, exact evaluation, checkpoints, MLflow.

The engine reads a plain, resolved config (a dict) and a `RunInfo`; it knows nothing of Hydra.
Global-batch semantics: the recipe's `gpus x batch_per_gpu` images make one optimizer step whatever
the world size; each device takes global / world images per step, in forward passes of
`trainer.micro_batch` (default: the recipe's per-GPU batch, so BatchNorm sees the batch size the
recipe trained with), accumulating gradients in between.
"""

from __future__ import annotations

import contextlib
import logging
import os
import platform
import time
from collections.abc import Iterable, Iterator, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import nn
from torch.nn.parallel import DistributedDataParallel
from torchmetrics.classification import MulticlassAccuracy
from tqdm import tqdm

from resnet_repro import checkpoint, distributed
from resnet_repro.data import DataBundle, build_data, resolve_workers
from resnet_repro.errors import UserError
from resnet_repro.losses import build_loss
from resnet_repro.models import build_model_from_cfg, count_flops, count_params
from resnet_repro.optim import build_optimizer, learning_rate, set_lr
from resnet_repro.tracking import Tracker, ui_command

log = logging.getLogger("resnet_repro")


@dataclass
class RunInfo:
    """What the job knows beyond the config: identity, provenance, where it writes."""

    row_name: str
    config_hash: str
    deviations: list[str] = field(default_factory=list)
    overrides: list[str] = field(default_factory=list)
    output_dir: str = "."
    sweep: str = ""
    config_yaml: str = ""
    section: str = ""


class Preprocessor:
    """uint8 N x 3 x H x W on the device -> normalised float (mmpretrain's data preprocessor)."""

    def __init__(self, mean: list[float], std: list[float], device: torch.device, channels_last: bool) -> None:
        self.mean = torch.tensor(mean, device=device).view(1, 3, 1, 1)
        self.std = torch.tensor(std, device=device).view(1, 3, 1, 1)
        self.memory_format = torch.channels_last if channels_last else torch.contiguous_format

    def __call__(self, images: torch.Tensor) -> torch.Tensor:
        x = (images.float() - self.mean) / self.std
        return x.contiguous(memory_format=self.memory_format)


def select_device(name: str) -> torch.device:
    if name == "cuda" or (name == "auto" and torch.cuda.is_available()):
        if not torch.cuda.is_available():
            raise UserError("trainer.device=cuda but no CUDA device is visible; allowed here: cpu, auto")
        return torch.device("cuda", distributed.local_rank() % torch.cuda.device_count())
    return torch.device("cpu")


def seed_everything(seed: int, deterministic: bool) -> None:
    import random

    import numpy as np

    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)
    if deterministic:
        os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")
        torch.use_deterministic_algorithms(True)
    torch.backends.cudnn.benchmark = not deterministic


def make_scaler(precision: Mapping[str, Any], device: torch.device) -> torch.amp.GradScaler | None:
    """Dynamic scaling (GradScaler's defaults), or a static scale re-set after every step."""
    scale = precision["loss_scale"]
    if scale is None:
        return None
    if scale == "dynamic":
        return torch.amp.GradScaler(device.type)
    return torch.amp.GradScaler(device.type, init_scale=float(scale), growth_interval=2**31 - 1)


def _versions() -> dict[str, str]:
    import timm
    import torchvision

    return {
        "torch": torch.__version__,
        "torchvision": torchvision.__version__,
        "timm": timm.__version__,
        "python": platform.python_version(),
    }


def _git_commit() -> str:
    import subprocess

    repo = Path(__file__).resolve().parents[1]
    try:
        out = subprocess.run(["git", "-C", str(repo), "rev-parse", "HEAD"], capture_output=True, text=True, timeout=5)
        dirty = subprocess.run(
            ["git", "-C", str(repo), "status", "--porcelain", "--untracked-files=no"],
            capture_output=True,
            text=True,
            timeout=5,
        ).stdout.strip()
        return out.stdout.strip() + ("-dirty" if dirty else "") if out.returncode == 0 else "unknown"
    except (OSError, subprocess.SubprocessError):
        return "unknown"


@torch.no_grad()
def topk_accuracy(
    model: nn.Module, batches: Iterable[Any], preprocess: Preprocessor, device: torch.device, num_classes: int
) -> dict[str, float]:
    """{"top1": %, "top5": %} over every (uint8 images, labels) batch; torchmetrics sums the counts over ranks."""
    ks = sorted({1, min(5, num_classes)})
    metrics = {k: MulticlassAccuracy(num_classes, top_k=k, average="micro").to(device) for k in ks}
    model.eval()
    for images, labels in batches:
        logits = model(preprocess(images.to(device, non_blocking=True)))
        for metric in metrics.values():
            metric.update(logits, labels.to(device, non_blocking=True))
    return {f"top{k}": 100.0 * float(metric.compute()) for k, metric in metrics.items()}


class Trainer:
    """Everything one rank needs to train one run; `fit()` runs it."""

    def __init__(self, cfg: Mapping[str, Any], info: RunInfo) -> None:
        self.cfg, self.info = cfg, info
        self.recipe, tr = cfg["recipe"], cfg["trainer"]
        self.world, self.rank = distributed.world_size(), distributed.rank()
        self.device = select_device(tr["device"])
        seed_everything(int(cfg["seed"]), bool(tr["deterministic"]))
        self.global_batch = int(self.recipe["gpus"]) * int(self.recipe["batch_per_gpu"])
        self.device_batch = self.global_batch // self.world
        self.micro_batch = int(tr["micro_batch"] or self.recipe["batch_per_gpu"])
        self.data: DataBundle = build_data(
            cfg,
            batch=self.device_batch,
            world=self.world,
            rank=self.rank,
            workers=resolve_workers(tr["num_workers"], self.world),
            pin=self.device.type == "cuda",
        )
        self.model, self.params, self.flops = self._build_model()
        self.optimizer = build_optimizer(self.model, self.recipe["optimizer"])
        self.criterion = build_loss(self.recipe["loss"])
        self.mixer = self._build_mixer()
        self.scaler = make_scaler(cfg["precision"], self.device)
        dtype = cfg["precision"]["autocast_dtype"]
        self.autocast_dtype = getattr(torch, dtype) if dtype else None
        channels_last = self.device.type == "cuda" if tr["channels_last"] == "auto" else bool(tr["channels_last"])
        ds = cfg["dataset"]
        self.preprocess = Preprocessor(list(ds["mean"]), list(ds["std"]), self.device, channels_last)
        if channels_last:
            self.model.to(memory_format=torch.channels_last)
        self.net = self._wrap(self.model, bool(tr["compile"]))
        norms = [m for m in self.model.modules() if isinstance(m, nn.modules.batchnorm._BatchNorm)]
        self.bn_momenta = [(m, m.momentum) for m in norms]
        self.bn_updating = True
        self.tracker = Tracker(cfg["tracking"]["uri"], cfg["tracking"]["experiment"], enabled=self.rank == 0)
        self.ckpt_dir = checkpoint.run_dir(tr["checkpoint_root"], info.row_name, info.config_hash)
        self.start_epoch, self.best_top1 = 0, float("-inf")
        self.history: dict[int, dict[str, float]] = {}  # epoch -> its metrics, kept in every checkpoint

    # ---- construction -------------------------------------------------------------------------
    def _build_model(self) -> tuple[nn.Module, int, float]:
        model = build_model_from_cfg(self.cfg)
        init = self.recipe.get("init") or {}
        if init.get("pretrained"):
            from resnet_repro.convert import load_pretrained

            load_pretrained(model, init["pretrained"], prefix=init.get("prefix"))
        params = count_params(model)
        flops = count_flops(model, int(self.cfg["dataset"]["input_size"])) / 1e9 if self.rank == 0 else 0.0
        if self.sync_bn():
            model = nn.SyncBatchNorm.convert_sync_batchnorm(model)
        return model.to(self.device), params, flops

    def _build_mixer(self) -> Any:
        if not self.recipe.get("mixing"):
            return None
        from resnet_repro.mixing import build_mixer

        # mmpretrain mixes each GPU's batch on its own: keep partners within each emulated GPU's slice
        gpus = int(self.recipe["gpus"])
        chunks = gpus // self.world if gpus % self.world == 0 else 1
        return build_mixer(self.recipe["mixing"], int(self.cfg["dataset"]["num_classes"]), chunks=chunks)

    def _wrap(self, model: nn.Module, compile_model: bool) -> nn.Module:
        """DDP across processes (kept as self.ddp for no_sync), then torch.compile around it if asked."""
        net: nn.Module = model
        self.ddp: DistributedDataParallel | None = None
        if self.world > 1:
            ids = [self.device.index] if self.device.type == "cuda" else None
            net = self.ddp = DistributedDataParallel(model, device_ids=ids)
        return torch.compile(net) if compile_model else net

    def sync_bn(self) -> bool:
        """SyncBN across processes where the recipe asks for it; torch's SyncBatchNorm runs on CUDA only."""
        return bool(self.recipe["model"].get("sync_bn")) and self.world > 1 and self.device.type == "cuda"

    def bn_batch(self) -> tuple[int, int]:
        """Images behind each BatchNorm statistic: (this run, the recipe)."""
        ours = self.micro_batch * (self.world if self.sync_bn() else 1)
        recipe = int(self.recipe["batch_per_gpu"]) * (
            int(self.recipe["gpus"]) if self.recipe["model"].get("sync_bn") else 1
        )
        return ours, recipe

    # ---- one step -----------------------------------------------------------------------------
    def autocast(self) -> contextlib.AbstractContextManager:
        if self.autocast_dtype is None:
            return contextlib.nullcontext()
        return torch.autocast(device_type=self.device.type, dtype=self.autocast_dtype)

    def train_step(self, images: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        """One optimizer step on this device's share of the global batch; returns its mean loss (detached)."""
        images = images.to(self.device, non_blocking=True)
        labels = labels.to(self.device, non_blocking=True)
        x, target = self.preprocess(images), labels
        if self.mixer is not None:
            x, target = self.mixer(x, labels)
        n = x.shape[0]
        chunks = list(zip(x.split(self.micro_batch), target.split(self.micro_batch), strict=True))
        losses = []
        for i, (xc, tc) in enumerate(chunks):
            last = i == len(chunks) - 1
            self._track_bn_stats(self.rank == 0 and i == 0)
            no_sync = self.ddp.no_sync() if self.ddp is not None and not last else contextlib.nullcontext()
            with no_sync, self.autocast():
                loss = self.criterion(self.net(xc), tc)
                if len(chunks) > 1:  # each micro-batch's share of the device batch's mean
                    loss = loss * (xc.shape[0] / n)
            (self.scaler.scale(loss) if self.scaler else loss).backward()
            losses.append(loss.detach())
        self._optimizer_step()
        return losses[0] if len(losses) == 1 else torch.stack(losses).sum()

    def _track_bn_stats(self, update: bool) -> None:
        """BN running statistics follow the recipe's rank 0: only its first per-GPU batch of a step updates them.

        On N GPUs without SyncBN each GPU keeps its own running statistics and the checkpoint holds rank
        0's; emulating those GPUs with micro-batches would otherwise average over all of them. Momentum 0
        leaves the statistics unchanged while the batch is still normalised by its own statistics.
        """
        if update == self.bn_updating:
            return
        self.bn_updating = update
        for bn, momentum in self.bn_momenta:
            bn.momentum = momentum if update else 0.0

    def _optimizer_step(self) -> None:
        if self.scaler is None:
            self.optimizer.step()
        else:
            self.scaler.step(self.optimizer)  # unscales first; skips the step on inf/NaN gradients
            scale = self.cfg["precision"]["loss_scale"]
            self.scaler.update(None if scale == "dynamic" else float(scale))
        self.optimizer.zero_grad(set_to_none=True)

    # ---- epochs -------------------------------------------------------------------------------
    def _batches(self, loader: Any, limit: int | None) -> Iterator[tuple[int, Any]]:
        for it, batch in enumerate(loader):
            if limit is not None and it >= limit:
                return
            yield it, batch

    def iters_per_epoch(self) -> int:
        limit = self.cfg["trainer"]["limit_train_batches"]
        return min(len(self.data.train), limit) if limit else len(self.data.train)

    def train_one_epoch(self, epoch: int) -> dict[str, float]:
        self.net.train()
        self.data.train.sampler.set_epoch(epoch)
        n_iter, epochs = self.iters_per_epoch(), int(self.recipe["epochs"])
        base_lr = float(self.recipe["optimizer"]["lr"])
        loss_sum = torch.zeros((), device=self.device)
        seen, lr, start = 0, base_lr, time.perf_counter()
        bar = tqdm(
            total=n_iter,
            desc=f"epoch {epoch + 1}/{epochs}",
            leave=False,
            dynamic_ncols=True,
            disable=None if self.rank == 0 else True,
        )
        for it, (images, labels) in self._batches(self.data.train, n_iter):
            lr = learning_rate(self.recipe["schedule"], base_lr, epochs, epoch, it, n_iter)
            set_lr(self.optimizer, lr)
            loss_sum += self.train_step(images, labels) * images.shape[0]
            seen += images.shape[0]
            bar.update(1)
            if self.rank == 0:
                self._progress(bar, epoch, it + 1, n_iter, loss_sum, seen, lr, start)
        bar.close()
        elapsed = time.perf_counter() - start
        totals = torch.tensor([loss_sum.item(), float(seen)], dtype=torch.float64)
        if self.world > 1:
            totals = totals.to(self.device)
            torch.distributed.all_reduce(totals)
        return {
            "train_loss": float(totals[0] / totals[1]),
            "lr": lr,
            "train_img_per_s": float(totals[1]) / elapsed,
            "train_time_s": elapsed,
        }

    def _progress(
        self, bar: tqdm, epoch: int, done: int, total: int, loss_sum: torch.Tensor, seen: int, lr: float, start: float
    ) -> None:
        """The bar's loss / lr / img/s on a terminal (every 20 steps); without one, a log line every tenth of the
        epoch (at least 20 steps apart). Reading the loss syncs the device, hence not every step."""
        if (done % 20 if not bar.disable else done % max(20, total // 10)) and done != total:
            return
        elapsed = time.perf_counter() - start
        loss, rate = loss_sum.item() / seen, seen * self.world / elapsed
        if not bar.disable:
            bar.set_postfix(loss=f"{loss:.4f}", lr=f"{lr:.3g}", img_s=f"{rate:.0f}")
        elif done != total:
            eta = (total - done) * elapsed / done
            log.info(
                "epoch %d [%d/%d]  loss %.4f  lr %.4g  %.0f img/s  eta %.0f s",
                epoch + 1,
                done,
                total,
                loss,
                lr,
                rate,
                eta,
            )

    def evaluate(self) -> dict[str, float]:
        """Top-1/top-5 (percent) over the whole split: each sample counted once, summed over ranks."""
        if self.world > 1:  # evaluate what the checkpoint holds: rank 0's BatchNorm statistics
            for buffer in self.model.buffers():
                torch.distributed.broadcast(buffer, src=0)
        batches = (b for _, b in self._batches(self.data.val, self.cfg["trainer"]["limit_val_batches"]))
        top = topk_accuracy(self.model, batches, self.preprocess, self.device, int(self.cfg["dataset"]["num_classes"]))
        return {f"val_{k}": v for k, v in top.items()}

    # ---- checkpoints --------------------------------------------------------------------------
    def resume_path(self) -> Path | None:
        """Rank 0 decides which checkpoint to continue (archiving a finished or abandoned one)."""
        mode = str(self.cfg["trainer"]["resume"])
        if mode not in ("auto", "none", "None"):
            return Path(mode)
        last = self.ckpt_dir / "last.pt"
        unfinished = last.is_file() and int(checkpoint.load(last, mmap=True)["epoch"]) < int(self.recipe["epochs"])
        if mode == "auto" and unfinished:
            return last
        moved = checkpoint.archive(self.ckpt_dir)
        if moved:
            log.info("earlier checkpoints of this config moved to %s", moved)
        return None

    def load_state(self, path: Path) -> str | None:
        state = checkpoint.load(path)
        if state.get("config_hash") != self.info.config_hash:
            log.warning("resuming %s, written by a different config (%s)", path, state.get("config_hash"))
        self.model.load_state_dict(state["model"])
        self.optimizer.load_state_dict(state["optimizer"])
        if self.scaler is not None and state.get("scaler"):
            self.scaler.load_state_dict(state["scaler"])
        self.start_epoch, self.best_top1 = int(state["epoch"]), float(state["best_top1"])
        self.history = dict(state.get("history", {}))
        rngs = state.get("rng") or []
        if len(rngs) == self.world:
            checkpoint.set_rng_state(rngs[self.rank])
        return state.get("mlflow_run_id")

    def save(self, epoch: int, val: Mapping[str, float]) -> None:
        rngs = distributed.all_gather_object(checkpoint.rng_state())
        if self.rank != 0:
            return
        improved = val["val_top1"] > self.best_top1
        self.best_top1 = max(self.best_top1, val["val_top1"])
        common = {
            "epoch": epoch,
            "model": self.model.state_dict(),
            "config": self.cfg,
            "config_hash": self.info.config_hash,
            "row_name": self.info.row_name,
            "classes": self.data.classes,
            "mlflow_run_id": self.tracker.run_id,
        }
        checkpoint.save_atomic(
            {
                **common,
                "optimizer": self.optimizer.state_dict(),
                "best_top1": self.best_top1,
                "scaler": self.scaler.state_dict() if self.scaler else None,
                "rng": rngs,
                "history": self.history,
                "world_size": self.world,
            },
            self.ckpt_dir / "last.pt",
        )
        if improved:
            checkpoint.save_atomic({**common, "val": dict(val)}, self.ckpt_dir / "best.pt")

    # ---- the run ------------------------------------------------------------------------------
    def _start_tracking(self, run_id: str | None) -> None:
        from resnet_repro.config import flatten

        ours, recipe = self.bn_batch()
        deviations = list(self.info.deviations)
        if ours != recipe:
            deviations.append(f"BatchNorm statistics over {ours} images (recipe: {recipe})")
        self.info.deviations = deviations
        if run_id is not None:
            self.tracker.start(self.info.row_name, {}, run_id=run_id)
            self.tracker.set_tags({"resumed_at_epoch": self.start_epoch})
            logged = {step for step, _ in self.tracker.history(run_id, "val_top1")}
            for epoch, metrics in sorted(self.history.items()):  # killed between checkpoint and MLflow
                if epoch not in logged:
                    self.tracker.log_metrics(metrics, step=epoch)
            return
        tags = {
            "row": self.info.row_name,
            "section": self.info.section,
            "config_hash": self.info.config_hash,
            "run_type": "train",
            "faithful": str(not deviations).lower(),
            "deviations": "; ".join(deviations),
            "sweep": self.info.sweep,
            "git_commit": _git_commit(),
            "hydra_overrides": " ".join(self.info.overrides),
            "world_size": self.world,
            "device": str(self.device),
            "output_dir": self.info.output_dir,
            "checkpoint_dir": str(self.ckpt_dir.resolve()),
            "data_verified": self.data.verified,
            **{f"version.{k}": v for k, v in _versions().items()},
        }
        self.tracker.start(f"{self.info.row_name}-{self.info.config_hash}", tags)
        accum = self.device_batch // self.micro_batch
        self.tracker.log_params(
            {
                **flatten(dict(self.cfg)),
                "batch_global": self.global_batch,
                "batch_per_device": self.device_batch,
                "batch_micro": self.micro_batch,
                "accum_steps": accum,
                "num_train": self.data.num_train,
                "num_val": self.data.num_val,
            }
        )
        self.tracker.log_metrics({"params": self.params, "flops_g": self.flops}, step=0)
        self.tracker.log_text(self.info.config_yaml, "config/config.yaml")
        self.tracker.log_text("\n".join(f"- {o}" for o in self.info.overrides) + "\n", "config/overrides.yaml")

    def fit(self) -> float:
        path = distributed.broadcast_object(self.resume_path() if self.rank == 0 else None)
        run_id = self.load_state(path) if path else None
        if self.rank == 0:
            self._start_tracking(run_id)
            log.info(
                "MLflow run %s (%s): see it with `%s`",
                self.tracker.run_id,
                self.info.row_name,
                ui_command(self.tracker.uri),
            )
            if path:
                log.info("resumed %s at epoch %d", path, self.start_epoch)
        try:
            for epoch in range(self.start_epoch, int(self.recipe["epochs"])):
                self._epoch(epoch)
        except KeyboardInterrupt:
            self.tracker.finish("KILLED")
            raise
        except BaseException:
            self.tracker.finish("FAILED")
            raise
        self.tracker.log_metrics(
            {"best_val_top1": self.best_top1, "epochs_completed": int(self.recipe["epochs"])},
            step=int(self.recipe["epochs"]),
        )
        self.tracker.finish("FINISHED")
        if self.rank == 0:
            log.info(
                "finished: best val top-1 %.2f; MLflow run %s; `%s`",
                self.best_top1,
                self.tracker.run_id,
                ui_command(self.tracker.uri),
            )
        return self.best_top1

    def _epoch(self, epoch: int) -> None:
        start = time.perf_counter()
        train = self.train_one_epoch(epoch)
        val = self.evaluate()
        metrics = {**train, **val, "epoch_time_s": time.perf_counter() - start}
        metrics.pop("train_time_s")
        self.history[epoch + 1] = metrics
        self.save(epoch + 1, val)  # the checkpoint carries the metrics: a crash before the next line loses none
        self.tracker.log_metrics(metrics, step=epoch + 1)
        if self.rank == 0:
            top5 = f"  top-5 {val['val_top5']:6.2f}" if "val_top5" in val else ""
            log.info(
                "epoch %d/%d  loss %.4f  lr %.4g  val top-1 %6.2f%s  %.1f s  %.0f img/s",
                epoch + 1,
                self.recipe["epochs"],
                train["train_loss"],
                train["lr"],
                val["val_top1"],
                top5,
                metrics["epoch_time_s"],
                train["train_img_per_s"],
            )
