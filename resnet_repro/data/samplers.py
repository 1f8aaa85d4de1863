"""Repeated augmentation (RSB A1/A2): mmpretrain's RepeatAugSampler, built on timm's.

Both shuffle the dataset, repeat each index `num_repeats` times in a row ([a, a, a, b, b, b, ...]),
pad by wrapping around, and give rank r every world-th entry from r, so the copies of an image land
on consecutive ranks; each rank then keeps only its first ceil(len / world) entries, so an epoch
still has dataset-size samples in total (about len / num_repeats distinct images, each repeated).
"""

from __future__ import annotations

import math
from collections.abc import Iterator

import torch
from timm.data.distributed_sampler import RepeatAugSampler as _TimmRepeatAugSampler
from torch.utils.data import Dataset


class RepeatAugSampler(_TimmRepeatAugSampler):
    """timm's sampler with the two settings where it differs from mmpretrain's:

    - selected_round=0: timm's default first rounds the dataset size down to a multiple of 256
      before dividing by the world size; mmpretrain keeps ceil(len / world) per rank.
    - the shuffle seed: timm seeds its generator with the epoch alone, mmpretrain with
      seed + epoch (the same on every rank); timm's __iter__ reads `self.epoch`, so `set_epoch`
      stores seed + epoch there.

    `gpus` and `batch_per_gpu` (optional) emulate the recipe's GPUs on fewer processes: the sampler
    deals to `gpus` virtual ranks by mmpretrain's rule and this process (owning gpus / num_replicas
    of them) yields, step by step, the concatenation of its virtual ranks' per-GPU batches. Then each
    micro-batch of `batch_per_gpu` holds what one recipe GPU saw: the copies of an image stay on
    different (virtual) GPUs instead of landing in the same BatchNorm batch on a single process.
    Without them, or when the processes cannot split the GPUs evenly, the processes are the ranks.
    """

    def __init__(
        self,
        dataset: Dataset,
        num_replicas: int,
        rank: int,
        num_repeats: int = 3,
        seed: int = 0,
        gpus: int | None = None,
        batch_per_gpu: int | None = None,
    ) -> None:
        super().__init__(
            dataset, num_replicas=num_replicas, rank=rank, shuffle=True, num_repeats=num_repeats, selected_round=0
        )
        self.seed = int(seed)
        self.set_epoch(0)
        self.virtual: tuple[int, int] | None = None
        if gpus and batch_per_gpu and gpus > num_replicas and gpus % num_replicas == 0:
            self.virtual = (int(gpus), int(batch_per_gpu))

    def set_epoch(self, epoch: int) -> None:
        self.epoch = self.seed + int(epoch)

    def __len__(self) -> int:
        if self.virtual is None:
            return super().__len__()
        gpus = self.virtual[0]
        return gpus // self.num_replicas * math.ceil(len(self.dataset) / gpus)

    def __iter__(self) -> Iterator[int]:
        if self.virtual is None:
            return super().__iter__()
        return iter(self._virtual_indices(*self.virtual))

    def _virtual_indices(self, gpus: int, batch: int) -> list[int]:
        n = len(self.dataset)
        order = torch.randperm(n, generator=torch.Generator().manual_seed(self.epoch)).tolist()
        repeated = [i for i in order for _ in range(self.num_repeats)]
        total = math.ceil(n * self.num_repeats / gpus) * gpus
        repeated += repeated[: total - len(repeated)]
        keep = math.ceil(n / gpus)
        per_proc = gpus // self.num_replicas
        ranks = [repeated[v:total:gpus][:keep] for v in range(self.rank * per_proc, (self.rank + 1) * per_proc)]
        return [i for start in range(0, keep, batch) for share in ranks for i in share[start : start + batch]]
