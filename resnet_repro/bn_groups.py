"""BatchNorm over groups of a batch in one forward pass: the recipe's per-GPU statistics without micro-batches.

A recipe trained on 8 GPUs x 16 images without SyncBN normalises each GPU's 16 images with their own
statistics. Emulating it with 8 sequential forward passes of 16 images is faithful but runs every conv on
16 images at a time; `GroupBatchNorm2d` ("ghost BatchNorm") normalises every `group_size` consecutive images
of one large pass on their own instead, which is the same computation. Running statistics follow the
recipe's checkpoint, i.e. its rank 0: only the first group updates them, and only where `update_stats` is
set (the engine sets it on one pass of one process). torch has no ghost BN and timm's BN layers are plain
BN, hence this module.

Implementation: each group goes through torch's own `F.batch_norm` and the outputs are concatenated. The
first group carries the running buffers, so their update is torch's, bit for bit (momentum, unbiased
variance, momentum=None), and every group is computed exactly as its micro-batch was. Measured on the 2-core
development CPU (ResNet-18 CIFAR stem, batch 128, groups of 16, full train step, one thread, process time,
median of 5 alternating rounds, two sessions; plain BN = 1.0): this per-group loop 1.03 / 0.99; a `var_mean`
over the (G, n, C, H, W) view with broadcast affine 0.64 / 0.70 (CPU `var_mean` is a slow Welford pass), the
same with a hand-written backward 0.80 / 0.94, one `F.batch_norm` over a (n, G*C, H, W) copy 0.86 / 0.99.
It traces without graph breaks, and inductor fuses it (per layer on CPU: one forward, one backward kernel).
On a GPU in eager mode every group is its own BN kernel (launch-bound at CIFAR sizes): there, compile.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn


class GroupBatchNorm2d(nn.BatchNorm2d):
    """BatchNorm2d whose training statistics are taken over each `group_size` consecutive images.

    The cut is `x.split(group_size)` (a smaller last group if the batch is not a multiple). Eval mode is
    plain BatchNorm2d. Parameters, buffers and state-dict keys are BatchNorm2d's.
    """

    group_size: int
    update_stats: bool

    def __init__(self, num_features: int, group_size: int, *args, **kwargs) -> None:
        super().__init__(num_features, *args, **kwargs)
        self.group_size = _check_group_size(group_size)
        self.update_stats = True

    def extra_repr(self) -> str:
        return f"{super().extra_repr()}, group_size={self.group_size}"

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not self.training:
            return super().forward(x)
        self._check_input_dim(x)
        running_mean, running_var, factor = self._stats_update()
        groups = x.split(self.group_size)
        out = [F.batch_norm(groups[0], running_mean, running_var, self.weight, self.bias, True, factor, self.eps)]
        # the other groups: their own statistics, running ones untouched (the recipe's other GPUs)
        out += [F.batch_norm(g, None, None, self.weight, self.bias, True, 0.0, self.eps) for g in groups[1:]]
        return out[0] if len(out) == 1 else torch.cat(out)

    def _stats_update(self) -> tuple[torch.Tensor | None, torch.Tensor | None, float]:
        """(running_mean, running_var, momentum) for the first group, as torch's BN forward computes them."""
        if not (self.update_stats and self.track_running_stats):
            return None, None, 0.0
        self.num_batches_tracked.add_(1)
        factor = 1.0 / float(self.num_batches_tracked) if self.momentum is None else self.momentum
        return self.running_mean, self.running_var, factor


def _check_group_size(group_size: int) -> int:
    if isinstance(group_size, bool) or not isinstance(group_size, int) or group_size < 1:
        raise ValueError(f"group_size={group_size!r}; allowed: a positive integer (images per BN group)")
    return group_size


def _swap(bn: nn.BatchNorm2d, cls: type[nn.BatchNorm2d], **extra: int) -> nn.BatchNorm2d:
    """A `cls` sharing `bn`'s Parameter and buffer objects (like SyncBatchNorm.convert_sync_batchnorm)."""
    hyper = {"eps": bn.eps, "momentum": bn.momentum, "affine": bn.affine, "track_running_stats": bn.track_running_stats}
    new = cls(bn.num_features, **extra, **hyper, device="meta")  # no storage: bn's tensors replace them below
    for name, param in bn.named_parameters(recurse=False):
        setattr(new, name, param)
    for name, buffer in bn.named_buffers(recurse=False):
        setattr(new, name, buffer)
    if hasattr(bn, "qconfig"):
        new.qconfig = bn.qconfig
    return new.train(bn.training)


def _replace(model: nn.Module, convert) -> nn.Module:
    """`model` with every module m for which convert(m) is not None replaced, in place."""
    root = convert(model)
    if root is not None:
        return root
    for parent in model.modules():
        for name, child in list(parent.named_children()):
            new = convert(child)
            if new is not None:
                setattr(parent, name, new)
    return model


def convert_bn_groups(model: nn.Module, group_size: int) -> nn.Module:
    """Every plain nn.BatchNorm2d of `model` -> GroupBatchNorm2d(group_size), in place; returns the model.

    Subclasses of BatchNorm2d (timm's BatchNormAct2d, ...) and SyncBatchNorm are left alone; layers
    converted before get the new group size. Convert after building (and loading) the model and before
    DDP or torch.compile wrap it; the optimizer may be built before or after (the Parameters are shared).
    """
    _check_group_size(group_size)

    def convert(m: nn.Module) -> nn.Module | None:
        if isinstance(m, GroupBatchNorm2d):
            m.group_size = group_size
        elif type(m) is nn.BatchNorm2d:
            return _swap(m, GroupBatchNorm2d, group_size=group_size)
        return None

    return _replace(model, convert)


def revert_bn_groups(model: nn.Module) -> nn.Module:
    """Every GroupBatchNorm2d of `model` back to a plain nn.BatchNorm2d (same tensors), in place."""
    return _replace(model, lambda m: _swap(m, nn.BatchNorm2d) if isinstance(m, GroupBatchNorm2d) else None)


def set_update_stats(model: nn.Module, update: bool) -> None:
    """Whether the first group of the next training forwards updates the running statistics.

    Under torch.compile the flag is guarded: each value gets its own graph (two at most).
    """
    for m in model.modules():
        if isinstance(m, GroupBatchNorm2d):
            m.update_stats = bool(update)
