"""Exact evaluation: top-1/top-5 over a split, every sample counted once (summed over ranks by torchmetrics).

Shared by the trainer (each epoch), `python -m resnet_repro.test` and the API's callers.
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any

import torch
from torch import nn
from torchmetrics.classification import MulticlassAccuracy

from resnet_repro.data.preprocess import Preprocessor
from resnet_repro.progress import Progress


@torch.no_grad()
def topk_accuracy(
    model: nn.Module,
    batches: Iterable[Any],
    preprocess: Preprocessor,
    device: torch.device,
    num_classes: int,
    progress: Progress | None = None,
) -> dict[str, float]:
    """{"top1": %, "top5": %} over every (uint8 images, labels) batch."""
    ks = sorted({1, min(5, num_classes)})
    # validate_args=False: torchmetrics' argument checks can read values on the host (torch.unique of the labels:
    # a device sync every batch; 1.9 skips it for float scores, by an operator-precedence accident). The labels
    # are the dataset's, checked against dataset.num_classes when the data is built (data.check_classes).
    metrics = {k: MulticlassAccuracy(num_classes, top_k=k, average="micro", validate_args=False).to(device) for k in ks}
    was_training = model.training
    model.eval()
    try:
        for step, (images, labels) in enumerate(batches, start=1):
            logits = model(preprocess(images.to(device, non_blocking=True)))
            for metric in metrics.values():
                metric.update(logits, labels.to(device, non_blocking=True))
            if progress is not None:
                progress.advance(step)
                if progress.due(step):
                    progress.report(step, {})
    finally:
        model.train(was_training)
        if progress is not None:
            progress.close()
    return {f"top{k}": 100.0 * float(metric.compute()) for k, metric in metrics.items()}
