"""BatchNorm over groups of a batch in one forward pass: the recipe's per-GPU statistics without micro-batches.

A recipe trained on 8 GPUs x 16 images without SyncBN normalises each GPU's 16 images with their own
statistics. Emulating it with 8 sequential forward passes of 16 images is faithful but runs every conv on
16 images at a time; `GroupBatchNorm2d` ("ghost BatchNorm") cuts one large pass into its per-GPU groups and
normalises each on its own instead, which is the same computation. Running statistics follow the
recipe's checkpoint, i.e. its rank 0: only the first group updates them, and only where `update_stats` is
set (the engine sets it on one pass of one process; `GatedSyncBatchNorm` gives SyncBN recipes the same
rule). torch has no ghost BN and timm's BN layers are plain BN, hence this module.

Implementation ("per-group", the CPU default): each group goes through torch's own `F.batch_norm` and the
outputs are concatenated. The first group carries the running buffers, so their update is torch's, bit for
bit (momentum, unbiased variance, momentum=None), and every group is computed exactly as its micro-batch
was. "one-kernel" (the CUDA default) folds the groups into channels for one `F.batch_norm`. On a CPU the per-group
loop runs at plain BN's speed, faster than the forms tried instead (a `var_mean` over a (G, n, C, H, W) view, CPU
`var_mean` being a slow Welford pass; the one-kernel copy); on a GPU in eager mode every group of it is its own BN
kernel (launch-bound at CIFAR sizes), hence the one-kernel form there. It traces without graph breaks, and inductor
fuses it (per layer on CPU: one forward, one backward kernel). Figures: the README's Performance section
(`python -m benchmarks.bn_groups`).
"""

from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F
from torch import nn
from torch.nn.modules.batchnorm import _BatchNorm

KERNELS = ("per-group", "one-kernel")


class GroupBatchNorm2d(nn.BatchNorm2d):
    """BatchNorm2d whose training statistics are taken over each of `groups` consecutive parts of the batch.

    The cut is `x.tensor_split(groups)`: equal parts when the batch is a multiple of `groups`, as every step of
    a run is (its device batch is whole per-GPU shares, the epoch's last, short step too: data.samplers), the
    first parts one image larger otherwise; a batch of fewer images than groups has one group per image. A
    count rather than a size keeps the graph of a compiled model the same for the last step's smaller shares.
    `kernel` is how a training forward runs (same numbers either way, up to the order of sums):
    - "per-group": one F.batch_norm per group, outputs concatenated;
    - "one-kernel": the groups folded into channels, (G*n, C, H, W) -> (n, G*C, H, W), one F.batch_norm with
      weight and bias repeated G times, then unfolded: one BN launch instead of G (GPUs are launch-bound at
      CIFAR sizes) for a copy in and out. Running statistics go through the kernel as G copies, of which the
      first group's are kept: torch's update rule, applied to the first group's statistics. Equal parts only:
      a batch that does not split evenly runs per group.
    Eval mode is plain BatchNorm2d. Parameters, buffers and state-dict keys are BatchNorm2d's.
    """

    groups: int
    kernel: str
    update_stats: bool

    def __init__(self, num_features: int, groups: int, *args, kernel: str = "per-group", **kwargs) -> None:
        super().__init__(num_features, *args, **kwargs)
        self.groups, self.kernel = _check_groups(groups), _check_kernel(kernel)
        self.update_stats = True

    def extra_repr(self) -> str:
        return f"{super().extra_repr()}, groups={self.groups}, kernel={self.kernel}"

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not self.training:
            return super().forward(x)
        self._check_input_dim(x)
        running_mean, running_var, factor = self._stats_update()
        groups = min(self.groups, x.shape[0])
        if groups == 1:
            return F.batch_norm(x, running_mean, running_var, self.weight, self.bias, True, factor, self.eps)
        if self.kernel == "one-kernel" and x.shape[0] % groups == 0:
            return self._one_kernel(x, groups, running_mean, running_var, factor)
        parts = x.tensor_split(groups)
        out = [F.batch_norm(parts[0], running_mean, running_var, self.weight, self.bias, True, factor, self.eps)]
        # the other groups: their own statistics, running ones untouched (the recipe's other GPUs)
        out += [F.batch_norm(g, None, None, self.weight, self.bias, True, 0.0, self.eps) for g in parts[1:]]
        return torch.cat(out)

    def _one_kernel(
        self,
        x: torch.Tensor,
        groups: int,
        running_mean: torch.Tensor | None,
        running_var: torch.Tensor | None,
        factor: float,
    ) -> torch.Tensor:
        n, c = x.shape[0] // groups, x.shape[1]
        fmt = torch.channels_last if _channels_last(x) else torch.contiguous_format
        folded = torch.empty((n, groups * c, *x.shape[2:]), dtype=x.dtype, device=x.device, memory_format=fmt)
        folded.unflatten(1, (groups, c)).copy_(x.unflatten(0, (groups, n)).transpose(0, 1))  # group g: channels gC..
        mean = running_mean.repeat(groups) if running_mean is not None else None
        var = running_var.repeat(groups) if running_var is not None else None
        weight = self.weight.repeat(groups) if self.weight is not None else None
        bias = self.bias.repeat(groups) if self.bias is not None else None
        y = F.batch_norm(folded, mean, var, weight, bias, True, factor, self.eps)
        if running_mean is not None and running_var is not None and mean is not None and var is not None:
            with torch.no_grad():
                running_mean.copy_(mean[:c])
                running_var.copy_(var[:c])
        out = torch.empty_like(x)  # x's memory format
        out.unflatten(0, (groups, n)).transpose(0, 1).copy_(y.unflatten(1, (groups, c)))
        return out

    def _stats_update(self) -> tuple[torch.Tensor | None, torch.Tensor | None, float]:
        """(running_mean, running_var, momentum) for the first group, as torch's BN forward computes them."""
        if not (self.update_stats and self.track_running_stats):
            return None, None, 0.0
        self.num_batches_tracked.add_(1)
        factor = 1.0 / float(self.num_batches_tracked) if self.momentum is None else self.momentum
        return self.running_mean, self.running_var, factor


class GatedSyncBatchNorm(nn.SyncBatchNorm):
    """SyncBatchNorm whose running statistics move only where `update_stats` is set: GroupBatchNorm2d's rule (one
    pass of one process per optimizer step) for the SyncBN recipes, whose every pass would otherwise update them
    when a process accumulates several per-GPU batches (fewer processes than the recipe's GPUs).

    Not updating is torch's own forward with `track_running_stats` off for the call: the batch statistics
    (synchronised across processes as usual) normalise, and no buffer is read or written. A momentum of 0 would
    be simpler but not the same: num_batches_tracked would still count, and with momentum=None (a cumulative
    average) the next update's weight would change.
    """

    update_stats: bool

    def __init__(self, *args, **kwargs) -> None:
        super().__init__(*args, **kwargs)
        self.update_stats = True

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.update_stats or not (self.training and self.track_running_stats):
            return super().forward(x)
        self.track_running_stats = False
        try:
            return super().forward(x)
        finally:
            self.track_running_stats = True


def _channels_last(x: torch.Tensor) -> bool:
    return x.dim() == 4 and not x.is_contiguous() and x.is_contiguous(memory_format=torch.channels_last)


def _check_groups(groups: int) -> int:
    if isinstance(groups, bool) or not isinstance(groups, int) or groups < 1:
        raise ValueError(f"groups={groups!r}; allowed: a positive integer (BN groups per forward pass)")
    return groups


def _check_kernel(kernel: str) -> str:
    if kernel not in KERNELS:
        raise ValueError(f"kernel={kernel!r}; allowed: {', '.join(KERNELS)}")
    return kernel


def resolve_kernel(setting: str, device: torch.device) -> str:
    """`trainer.bn_group_kernel`: auto = one-kernel on CUDA (one launch per layer instead of one per group; not
    yet measured on a GPU), per-group elsewhere (on the CPU the folding copies cost more than the loop saves)."""
    if setting == "auto":
        return "one-kernel" if device.type == "cuda" else "per-group"
    return _check_kernel(setting)


def _swap(bn: nn.BatchNorm2d, cls: type[_BatchNorm], **extra: Any) -> _BatchNorm:
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


def convert_bn_groups(model: nn.Module, *, groups: int, kernel: str = "per-group") -> nn.Module:
    """Every plain nn.BatchNorm2d of `model` -> GroupBatchNorm2d(groups, kernel), in place; returns the model.

    Subclasses of BatchNorm2d (timm's BatchNormAct2d, ...) and SyncBatchNorm are left alone; layers
    converted before get the new group count and kernel. Convert after building (and loading) the model and
    before DDP or torch.compile wrap it; the optimizer may be built before or after (the Parameters are shared).
    """
    _check_groups(groups)
    _check_kernel(kernel)

    def convert(m: nn.Module) -> nn.Module | None:
        if isinstance(m, GroupBatchNorm2d):
            m.groups, m.kernel = groups, kernel
        elif type(m) is nn.BatchNorm2d:
            return _swap(m, GroupBatchNorm2d, groups=groups, kernel=kernel)
        return None

    return _replace(model, convert)


def convert_sync_bn(model: nn.Module) -> nn.Module:
    """Every plain nn.BatchNorm2d of `model` -> GatedSyncBatchNorm (same tensors), in place; returns the model.
    What nn.SyncBatchNorm.convert_sync_batchnorm does for a ResNet, with the running-statistics rule."""
    return _replace(model, lambda m: _swap(m, GatedSyncBatchNorm) if type(m) is nn.BatchNorm2d else None)


def revert_bn_groups(model: nn.Module) -> nn.Module:
    """Every GroupBatchNorm2d of `model` back to a plain nn.BatchNorm2d (same tensors), in place."""
    return _replace(model, lambda m: _swap(m, nn.BatchNorm2d) if isinstance(m, GroupBatchNorm2d) else None)


def set_update_stats(model: nn.Module, update: bool) -> None:
    """Whether the next training forwards update the running statistics (GroupBatchNorm2d: its first group).

    Under torch.compile the flag is guarded: each value gets its own graph (two at most).
    """
    for m in model.modules():
        if isinstance(m, GroupBatchNorm2d | GatedSyncBatchNorm):
            m.update_stats = bool(update)
