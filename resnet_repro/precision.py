"""The `precision` group at run time: autocast and loss scaling around a step; TF32 (`trainer.tf32`).

fp32 does neither; bf16 autocasts only; amp-fp16 autocasts with GradScaler's dynamic scale; the fp16 row
(amp-fp16-static512) keeps a static scale of 512, re-set after every step, as mmcv's Fp16OptimizerHook and
mmengine's AmpOptimWrapper(loss_scale=512) do: GradScaler(init_scale=512), then step (skipped, optimizer
state untouched, when any gradient is inf/NaN) and update(512). Both fp16 modes thus skip non-finite steps.

Host syncs: GradScaler decides the skip on the host (`found_inf.item()`, once per step) unless the optimizer
takes the found-inf flag itself (`_step_supports_amp_scaling`): torch's fused SGD does, skipping in its
kernel. The engine builds SGD fused under a scaler (optim.build_optimizer), so the fp16 steps do not wait
for the device; LAMB has no fused form and keeps GradScaler's check.
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


def set_tf32(setting: bool | str, device: torch.device) -> bool:
    """`trainer.tf32`: true / false allow or forbid TF32 in fp32 convolutions (cuDNN) and matmuls (cuBLAS);
    auto keeps torch's defaults, convolutions in TF32 and matmuls in full fp32 (since torch 1.12).

    Returns whether this run's fp32 convolutions or matmuls may run in TF32 (the `tf32` tag): a CUDA device of
    compute capability 8.0 or more (Ampere and later) with either allowed. The published runs used V100s
    (7.0), which have no TF32. The legacy flags are set (torch >= 2.9 also has `fp32_precision`): they keep
    both interfaces consistent, where setting the new one makes the legacy getters raise.
    """
    if setting != "auto":
        torch.backends.cudnn.allow_tf32 = bool(setting)
        torch.backends.cuda.matmul.allow_tf32 = bool(setting)
    if device.type != "cuda" or torch.cuda.get_device_capability(device) < (8, 0):
        return False
    return bool(torch.backends.cudnn.allow_tf32 or torch.backends.cuda.matmul.allow_tf32)
