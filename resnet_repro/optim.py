"""Optimizers and learning-rate schedules of the recipes (conf/recipe/*.yaml: optimizer, schedule).

The schedules are written as one closed-form function of (epoch, iteration) because mmpretrain mixes
granularities that torch's and timm's schedulers do not: a linear warmup updated every iteration,
then a decay updated once per epoch. Two conventions exist (`cosine_span`):

- after_warmup (mmengine, today's configs): LinearLR over the warmup iterations reaching the base lr
  at the last warmup iteration, factor s + (1 - s) * t / (W - 1); then the epoch decay, a cosine
  over epochs [warmup, E) with T_max = E - warmup, or steps at the milestones.
- whole_run (mmcv 1.x, the release configs): the cosine spans epochs [0, E) and the warmup factor
  1 - (1 - t / W) * (1 - s) multiplies it during the first W iterations.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from typing import Any

import torch
from timm.optim import Lamb, param_groups_weight_decay
from torch import nn


def param_groups(model: nn.Module, weight_decay: float, decay_norm_and_bias: bool) -> list[dict[str, Any]]:
    """All parameters decayed, or none of the 1-D ones (BN weights/biases, fc bias) - mmpretrain's
    norm_decay_mult=0 / bias_decay_mult=0, which for a ResNet are exactly timm's "ndim <= 1" rule."""
    if decay_norm_and_bias:
        return [{"params": [p for p in model.parameters() if p.requires_grad], "weight_decay": weight_decay}]
    return param_groups_weight_decay(model, weight_decay=weight_decay)


def build_optimizer(model: nn.Module, cfg: Mapping[str, Any], fused: bool = False) -> torch.optim.Optimizer:
    """The recipe's optimizer; `fused=True` (under a GradScaler) builds SGD fused: see `fused_sgd`."""
    groups = param_groups(model, float(cfg["weight_decay"]), bool(cfg["decay_norm_and_bias"]))
    name = cfg["name"]
    if name == "sgd":
        sgd = torch.optim.SGD(
            groups,
            lr=float(cfg["lr"]),
            momentum=float(cfg["momentum"]),
            nesterov=bool(cfg["nesterov"]),
            weight_decay=float(cfg["weight_decay"]),
            fused=fused or None,
        )
        return fused_sgd(sgd) if fused else sgd
    if name == "lamb":
        # timm's Lamb is the port mmpretrain uses: trust ratio only where weight decay is non-zero
        # (always_adapt=False), global grad-norm clip built in (max_grad_norm), no trust clipping.
        return Lamb(
            groups,
            lr=float(cfg["lr"]),
            betas=tuple(cfg["betas"]),
            eps=float(cfg["eps"]),
            weight_decay=float(cfg["weight_decay"]),
            grad_averaging=True,
            max_grad_norm=float(cfg["max_grad_norm"]),
            trust_clip=False,
            always_adapt=False,
        )
    raise ValueError(f"recipe.optimizer.name={name}; allowed: sgd, lamb")


def fused_sgd(sgd: torch.optim.SGD) -> torch.optim.SGD:
    """Fused SGD, which GradScaler hands the found-inf flag: a non-finite step is skipped inside the kernel, no
    host sync (precision.py). The same update as torch's other SGD forms, but a *first* step it skipped would
    leave the momentum buffers it allocated uninitialised: they start at zero instead, so the first real step
    gives buf = 0 * momentum + grad = grad, torch's clone (dampening is 0), skipped steps or not. A checkpoint
    loaded later keeps the optimizer fused (its saved param groups say otherwise when written unfused)."""

    def ready(opt: torch.optim.Optimizer) -> None:
        for group in opt.param_groups:
            group["fused"], group["foreach"] = True, None
            if group["momentum"] and not group["dampening"]:
                for p in group["params"]:
                    if opt.state[p].get("momentum_buffer") is None:
                        opt.state[p]["momentum_buffer"] = torch.zeros_like(p)

    ready(sgd)
    sgd.register_load_state_dict_post_hook(ready)
    return sgd


def _cosine(base: float, floor: float, progress: float) -> float:
    return floor + (base - floor) * (1.0 + math.cos(math.pi * progress)) / 2.0


def learning_rate(
    sched: Mapping[str, Any], base_lr: float, epochs: int, epoch: int, it: int, iters_per_epoch: int
) -> float:
    """The lr of iteration `it` (0-based, within the epoch) of epoch `epoch` (0-based)."""
    warm_epochs = int(sched["warmup_epochs"])
    start = float(sched["warmup_start_factor"])
    whole_run = sched["cosine_span"] == "whole_run"
    if sched["decay"] == "step":
        lr = base_lr * float(sched["gamma"]) ** sum(epoch >= m for m in sched["milestones"])
    elif whole_run:
        lr = _cosine(base_lr, float(sched["min_lr"]), epoch / epochs)
    elif epoch < warm_epochs:
        lr = base_lr
    else:
        lr = _cosine(base_lr, float(sched["min_lr"]), (epoch - warm_epochs) / max(1, epochs - warm_epochs))
    warm_iters = warm_epochs * iters_per_epoch
    t = epoch * iters_per_epoch + it
    if t < warm_iters:
        if whole_run:
            lr *= 1.0 - (1.0 - t / warm_iters) * (1.0 - start)
        else:
            lr *= start + (1.0 - start) * t / max(1, warm_iters - 1)
    return lr


def set_lr(optimizer: torch.optim.Optimizer, lr: float) -> None:
    for group in optimizer.param_groups:
        group["lr"] = lr
