"""Starting an epoch part-way: a mid-epoch checkpoint resumes at the step it stopped after.

The train samplers are deterministic given (seed, epoch) and each step takes the next `batch` items of this
rank's (index, seed) stream, whatever the loader (a DataLoader or data.on_device.DeviceTrainLoader). So step k
of an epoch starts at item k x batch of that stream: skipping items in the sampler — not loading and dropping
batches — resumes exactly and at once, and knows nothing of how the sampler orders its epoch.
"""

from __future__ import annotations

from collections.abc import Iterator
from itertools import islice
from typing import Any

from torch.utils.data import Sampler


class ResumableSampler(Sampler[Any]):
    """The wrapped sampler's stream; after `start_at(n)`, its next epoch starts at item n (once)."""

    def __init__(self, sampler: Any) -> None:
        self.sampler, self.start = sampler, 0

    def set_epoch(self, epoch: int) -> None:
        self.sampler.set_epoch(epoch)

    def start_at(self, item: int) -> None:
        self.start = int(item)

    def __len__(self) -> int:
        return len(self.sampler)

    def __iter__(self) -> Iterator[Any]:
        start, self.start = self.start, 0
        return islice(iter(self.sampler), start, None)

    def __getattr__(self, name: str) -> Any:  # the wrapped sampler's own attributes (epoch, seed, ...)
        if name == "sampler":
            raise AttributeError(name)
        return getattr(self.sampler, name)
