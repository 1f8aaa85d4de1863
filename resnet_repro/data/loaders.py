"""The one way this package builds a torch DataLoader (the CPU pipelines and the device decoder's byte loader).

Two settings matter for exact resumes and clean stops, whatever the pipeline:
- its own generator: starting an epoch does not draw from torch's global RNG (which drop-path and mixing use),
  so a run resumed at any step sees the same global draws (samples are seeded on their own anyway);
- workers that ignore Ctrl-C and the scheduler's warnings (SIGUSR1/2): the training process stops at a step
  boundary and ends them itself; by default they would die at once and fail its next step. (SIGTERM keeps its
  default: the training process ends its workers with it.)
"""

from __future__ import annotations

import signal
from collections.abc import Callable
from typing import Any

import torch
from torch.utils.data import DataLoader, Dataset, Sampler


def make_loader(
    dataset: Dataset,
    sampler: Sampler[Any],
    batch: int,
    workers: int,
    pin: bool = False,
    collate_fn: Callable[[list[Any]], Any] | None = None,
) -> DataLoader:
    return DataLoader(
        dataset,
        sampler=sampler,
        batch_size=batch,
        num_workers=workers,
        pin_memory=pin,
        persistent_workers=workers > 0,
        collate_fn=collate_fn,
        generator=torch.Generator(),
        worker_init_fn=ignore_stop_signals,
    )


def ignore_stop_signals(worker_id: int) -> None:
    for name in ("SIGINT", "SIGUSR1", "SIGUSR2"):
        signal.signal(getattr(signal, name), signal.SIG_IGN)
