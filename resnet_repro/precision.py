"""The `precision` group at run time: autocast and loss scaling around a step.

fp32 does neither; bf16 autocasts only; amp-fp16 autocasts with GradScaler's dynamic scale; the fp16 row
(amp-fp16-static512) keeps a static scale of 512, re-set after every step, as mmcv's Fp16OptimizerHook did.
Steps whose gradients are not finite are skipped by GradScaler in both fp16 modes.
"""

from __future__ import annotations

import contextlib
from collections.abc import Mapping
from typing import Any

import torch


class Precision:
    def __init__(self, cfg: Mapping[str, Any], device: torch.device) -> None:
        self.device, self.loss_scale = device, cfg["loss_scale"]
        self.dtype = getattr(torch, cfg["autocast_dtype"]) if cfg["autocast_dtype"] else None
        self.scaler: torch.amp.GradScaler | None = None
        if self.loss_scale == "dynamic":
            self.scaler = torch.amp.GradScaler(device.type)
        elif self.loss_scale is not None:
            self.scaler = torch.amp.GradScaler(
                device.type, init_scale=float(self.loss_scale), growth_interval=2**31 - 1
            )

    def autocast(self) -> contextlib.AbstractContextManager:
        if self.dtype is None:
            return contextlib.nullcontext()
        return torch.autocast(device_type=self.device.type, dtype=self.dtype)

    def backward(self, loss: torch.Tensor) -> None:
        (self.scaler.scale(loss) if self.scaler else loss).backward()

    def step(self, optimizer: torch.optim.Optimizer) -> None:
        """optimizer.step() (unscaling first and skipping inf/NaN gradients under fp16), then zero_grad."""
        if self.scaler is None:
            optimizer.step()
        else:
            self.scaler.step(optimizer)
            self.scaler.update(None if self.loss_scale == "dynamic" else float(self.loss_scale))
        optimizer.zero_grad(set_to_none=True)
