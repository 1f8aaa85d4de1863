"""The recipes' losses (conf/recipe/*.yaml: loss), with mmpretrain's reductions.

Targets are class indices, or per-class weights (N x K) once Mixup / CutMix mixed the batch.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from typing import Any

import torch
import torch.nn.functional as F

Loss = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]


def smooth(target: torch.Tensor, num_classes: int, eps: float) -> torch.Tensor:
    """One-hot (or soft) targets smoothed the "original" way: target * (1 - eps) + eps / K."""
    if target.ndim == 1:
        target = F.one_hot(target, num_classes).float()
    return target * (1.0 - eps) + eps / num_classes if eps else target


def softmax_ce(eps: float) -> Loss:
    """Mean over samples of the softmax cross-entropy. torch's label_smoothing is mmpretrain's "original"
    mode for class indices and for soft (mixed) targets alike: target * (1 - eps) + eps / K."""

    def loss(logits: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        return F.cross_entropy(logits, target, label_smoothing=eps)

    return loss


def bce(eps: float) -> Loss:
    """Sigmoid BCE summed over classes and divided by the batch size (mmpretrain's use_sigmoid mode),
    not the mean over N x K that torch's default reduction would give."""

    def loss(logits: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        # targets stay float32 under autocast (mmpretrain passes label.float()): autocast runs this loss in
        # float32, but targets cast to bf16 first would be rounded (0.9001 -> 0.8984), biasing every gradient
        soft = smooth(target, logits.shape[1], eps).to(torch.promote_types(logits.dtype, torch.float32))
        return F.binary_cross_entropy_with_logits(logits, soft, reduction="sum") / logits.shape[0]

    return loss


def build_loss(cfg: Mapping[str, Any]) -> Loss:
    eps = float(cfg.get("label_smoothing", 0.0))
    builders = {"softmax_ce": softmax_ce, "bce": bce}
    if cfg["name"] not in builders:
        raise ValueError(f"recipe.loss.name={cfg['name']}; allowed: {', '.join(builders)}")
    return builders[cfg["name"]](eps)
