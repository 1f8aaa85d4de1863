"""Batch mixing of the RSB recipes (conf/recipe/rsb-*.yaml: mixing), as mmpretrain's data preprocessor
does it: on the normalised device batch, one op per batch - Mixup or CutMix, chosen 50/50, never none.

timm's `Mixup` is not used: it pairs each image with the flipped batch (image i with N-1-i) where
mmpretrain pairs with a random permutation (so an image can be its own partner), it refuses odd
batches (the last, partial batch of an epoch can be odd), its CutMix box is one pixel taller/wider
for odd cut sizes (cy + (cut+1)//2 vs mmpretrain's cy + cut//2), and it folds label smoothing into the
target (here the loss smooths, as mmpretrain's LabelSmoothLoss does).
Randomness follows mmpretrain: op choice, lambda and box from NumPy, the permutation from torch. The
permutation is drawn on the batch's device (a CPU draw would be copied to the GPU inside every step, a
host-device round trip): on a CPU the same draws as mmpretrain's `torch.randperm(n)`, on a GPU from that
device's generator (seeded by the run's seed and saved in checkpoints), an equally uniform permutation.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import numpy as np
import torch
import torch.nn.functional as F

if TYPE_CHECKING:
    from resnet_repro.batches import BatchPlan

Mixer = Callable[[torch.Tensor, torch.Tensor], tuple[torch.Tensor, torch.Tensor]]
Box = tuple[int, int, int, int]  # y1, y2, x1, x2 (half-open)


@dataclass
class Mix:
    """One batch's draw: the op, each image's own-label weight (CutMix: the kept-area fraction), its partner."""

    op: str
    lam: float
    perm: torch.Tensor
    box: Box | None = None


def cutmix_box(height: int, width: int, lam: float) -> Box:
    """mmpretrain's CutMix box: side sqrt(1 - lam) of the image, centre uniform over the image,
    clipped to the borders (no min/max limits)."""
    ratio = np.sqrt(1.0 - lam)
    cut_h, cut_w = int(height * ratio), int(width * ratio)
    cy, cx = int(np.random.randint(0, height)), int(np.random.randint(0, width))
    y1, y2 = int(np.clip(cy - cut_h // 2, 0, height)), int(np.clip(cy + cut_h // 2, 0, height))
    x1, x2 = int(np.clip(cx - cut_w // 2, 0, width)), int(np.clip(cx + cut_w // 2, 0, width))
    return y1, y2, x1, x2


class BatchMixer:
    """Each call applies exactly one of the configured ops (alpha > 0), chosen uniformly.

    `chunks` > 1 treats the batch as that many per-GPU batches (the recipe's GPUs emulated on one
    device): partners are then drawn within each chunk, as mmpretrain mixes each GPU's batch alone.
    mmengine seeds every rank alike by default, so its GPUs draw the same op, lambda, box and permutation;
    here too one op, lambda and box serve the whole batch and one permutation serves every chunk.
    """

    def __init__(self, mixup_alpha: float, cutmix_alpha: float, num_classes: int, chunks: int = 1) -> None:
        self.alphas = {name: a for name, a in (("mixup", mixup_alpha), ("cutmix", cutmix_alpha)) if a > 0}
        if not self.alphas:
            raise ValueError("recipe.mixing needs mixup_alpha > 0 or cutmix_alpha > 0")
        self.num_classes, self.chunks = num_classes, max(1, int(chunks))

    def _partners(self, n: int, device: torch.device | None) -> torch.Tensor:
        if self.chunks == 1 or n % self.chunks:  # a batch that does not split evenly mixes as one
            return torch.randperm(n, device=device)
        size = n // self.chunks
        offsets = size * torch.arange(self.chunks, device=device)[:, None]
        return (torch.randperm(size, device=device) + offsets).flatten()

    def draw(self, n: int, height: int, width: int, device: torch.device | None = None) -> Mix:
        """The random choices for a batch of n images, in mmpretrain's order: op and lambda (NumPy), the
        partners (torch, on `device`), then the CutMix box (NumPy), whose clipped area corrects lambda."""
        names = list(self.alphas)
        op = names[int(np.random.choice(len(names)))]
        lam = float(np.random.beta(self.alphas[op], self.alphas[op]))
        perm = self._partners(n, device)
        if op == "mixup":
            return Mix(op, lam, perm)
        y1, y2, x1, x2 = box = cutmix_box(height, width, lam)
        return Mix(op, 1.0 - (y2 - y1) * (x2 - x1) / float(height * width), perm, box)  # correct_lam

    def apply(self, x: torch.Tensor, labels: torch.Tensor, mix: Mix) -> tuple[torch.Tensor, torch.Tensor]:
        perm, lam = mix.perm.to(x.device), mix.lam  # already there when drawn for x's device: no copy
        target = F.one_hot(labels, self.num_classes).to(x.dtype)
        if mix.box is None:
            x = lam * x + (1.0 - lam) * x[perm]
        else:
            y1, y2, x1, x2 = mix.box
            x = x.clone()  # do not write into the caller's tensor
            x[:, :, y1:y2, x1:x2] = x[perm, :, y1:y2, x1:x2]
        return x, lam * target + (1.0 - lam) * target[perm]

    def __call__(self, x: torch.Tensor, labels: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        return self.apply(x, labels, self.draw(x.shape[0], x.shape[-2], x.shape[-1], x.device))


def build_mixer(mixing_cfg: Mapping[str, Any], num_classes: int, chunks: int = 1) -> Mixer:
    alphas = (float(mixing_cfg.get("mixup_alpha", 0.0)), float(mixing_cfg.get("cutmix_alpha", 0.0)))
    return BatchMixer(*alphas, num_classes, chunks=chunks)


def build_batch_mixer(cfg: Mapping[str, Any], plan: BatchPlan) -> Mixer | None:
    """The run's Mixup/CutMix (None without recipe.mixing); mmpretrain mixes each GPU's batch on its own, so
    partners stay within each BN group (the recipe's per-GPU batch)."""
    if not cfg["recipe"].get("mixing"):
        return None
    groups = plan.device_batch // plan.bn_group
    return build_mixer(cfg["recipe"]["mixing"], int(cfg["dataset"]["num_classes"]), chunks=groups)
