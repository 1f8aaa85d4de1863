"""Which samples each rank sees, in which order, and under which augmentation seed.

Every training sampler yields `(index, seed)`: the dataset index and the seed its augmentation runs under,
a function of (run seed, epoch, the sample's dataset index or, for repeated copies, its place in the
repeated order) only. So the images a step sees, how they split into the recipe's per-GPU batches, and their
crops, flips and RandAugment ops do not depend on the world size (any dividing the recipe's GPUs), the number
of loader workers, or a restart: a run on 1 process with accumulation equals one on N, and resumes exactly.
"""

from __future__ import annotations

import math
from collections.abc import Iterator, Sized

import torch
from torch.utils.data import Sampler


def sample_seed(seed: int, epoch: int, position: int) -> int:
    """The augmentation seed of the sample at `position` of epoch `epoch`'s global order.

    Two large primes keep (seed, epoch, position) triples apart for any dataset under 10^7 positions.
    """
    return (seed * 1_000_003 + epoch) * 10_000_019 + position


class GlobalBatchSampler(Sampler[tuple[int, int]]):
    """This process's share of each global batch, cut into the recipe's per-GPU batches exactly as mmengine's
    DefaultSampler hands them to `gpus` ranks, whatever the world size; every sample with its own seed.

    mmengine's rule (shuffle=True, round_up=True), each epoch: a permutation of the dataset from seed + epoch,
    padded by repeating its start to a multiple of `gpus`; rank r takes every gpus-th index from r; each rank's
    DataLoader takes its per-GPU batch at a time, the last one short (no drop_last). So every step of the
    recipe, the short last one too, is `gpus` equal per-GPU shares: CIFAR's 50,000 images end on 8 x 10,
    ImageNet's 1,281,167 (padded to 1,281,168) on 8 x 18, CUB's 5,994 (padded to 6,000) on 8 x 6.
    Here the `gpus` ranks are virtual: process p of `world` holds ranks p*gpus/world .. (p+1)*gpus/world - 1
    and yields, step by step, their per-GPU batches one after the other, so each device batch is whole shares
    of one size (its BatchNorm groups: bn_groups.py) and the steps are the same on any world size dividing
    `gpus`. Otherwise (or without `gpus`) the processes are the ranks. The seed's position is the dataset index.
    The stream depends on (seed, epoch) only and starts at the epoch's first step: skipping k steps is
    skipping k device batches of it.
    """

    def __init__(self, size: int, global_batch: int, world: int, rank: int, seed: int, gpus: int | None = None) -> None:
        ranks = int(gpus) if gpus and int(gpus) % world == 0 else world
        if global_batch % ranks:
            raise ValueError(f"a global batch of {global_batch} does not split into {ranks} per-GPU batches")
        self.size, self.seed, self.epoch = size, seed, 0
        self.ranks, self.per_rank_batch = ranks, global_batch // ranks
        self.mine = range(rank * ranks // world, (rank + 1) * ranks // world)  # this process's virtual ranks
        self.num_samples = math.ceil(size / ranks)  # per rank and epoch (mmengine's round_up)

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def __len__(self) -> int:
        return len(self.mine) * self.num_samples

    def __iter__(self) -> Iterator[tuple[int, int]]:
        gen = torch.Generator().manual_seed(self.seed + self.epoch)
        order = torch.randperm(self.size, generator=gen).tolist()
        total = self.num_samples * self.ranks
        order = (order * (total // self.size + 1))[:total]  # pad by repeating the start
        shares = [order[v :: self.ranks] for v in self.mine]
        for start in range(0, self.num_samples, self.per_rank_batch):
            for share in shares:
                for i in share[start : start + self.per_rank_batch]:
                    yield i, sample_seed(self.seed, self.epoch, i)


class ShardSampler(Sampler[int]):
    """Rank r evaluates samples r, r+W, r+2W, ... of `indices`: every sample exactly once over all ranks.

    torch's DistributedSampler pads with repeated samples so ranks have equal counts, which would
    count some images twice in a distributed top-1.
    """

    def __init__(self, size: int, world: int, rank: int, indices: list[int] | None = None) -> None:
        self.indices = (indices if indices is not None else list(range(size)))[rank::world]

    def __iter__(self) -> Iterator[int]:
        return iter(self.indices)

    def __len__(self) -> int:
        return len(self.indices)


def spread(size: int, count: int | None) -> list[int] | None:
    """`count` indices evenly spread over range(size) (a fixed subset for limited evaluation); None = all."""
    if count is None or count >= size:
        return None
    return [i * size // count for i in range(count)]


class RepeatAugSampler(Sampler[tuple[int, int]]):
    """Repeated augmentation (RSB A1/A2) by mmpretrain's RepeatAugSampler rule, with per-copy seeds.

    The rule (also timm's): shuffle with seed + epoch, repeat each index `num_repeats` times in a row
    ([a, a, a, b, b, b, ...]), pad by wrapping around, deal rank r every world-th entry from r, and keep
    ceil(len / world) entries per rank, so an epoch still has dataset-size samples in total. timm's
    sampler yields bare indices, so the copies of an image would share an augmentation seed; here each
    copy's seed is its place in the repeated order, and the 3 copies on 3 GPUs are augmented differently.

    `gpus` and `batch_per_gpu` (optional) emulate the recipe's GPUs on fewer processes: the rule deals to
    `gpus` virtual ranks and this process (owning gpus / num_replicas of them) yields, step by step, the
    concatenation of its virtual ranks' per-GPU batches, so each BN group of `batch_per_gpu` holds what
    one recipe GPU saw. Without them, or when the processes cannot split the GPUs evenly, the processes
    are the ranks.
    """

    def __init__(
        self,
        dataset: Sized,
        num_replicas: int,
        rank: int,
        num_repeats: int = 3,
        seed: int = 0,
        gpus: int | None = None,
        batch_per_gpu: int | None = None,
    ) -> None:
        self.size, self.num_replicas, self.rank = len(dataset), num_replicas, rank
        self.num_repeats, self.seed, self.epoch = num_repeats, int(seed), 0
        virtual = bool(gpus and batch_per_gpu and gpus > num_replicas and gpus % num_replicas == 0)
        self.ranks, self.batch = (int(gpus), int(batch_per_gpu)) if virtual else (num_replicas, None)  # type: ignore[arg-type]

    def set_epoch(self, epoch: int) -> None:
        self.epoch = int(epoch)

    def __len__(self) -> int:
        return self.ranks // self.num_replicas * math.ceil(self.size / self.ranks)

    def __iter__(self) -> Iterator[tuple[int, int]]:
        order = torch.randperm(self.size, generator=torch.Generator().manual_seed(self.seed + self.epoch)).tolist()
        repeated = [(i, k) for k, i in enumerate(i for i in order for _ in range(self.num_repeats))]
        total = math.ceil(self.size * self.num_repeats / self.ranks) * self.ranks
        repeated += repeated[: total - len(repeated)]
        keep = math.ceil(self.size / self.ranks)
        per_proc = self.ranks // self.num_replicas
        mine = [
            repeated[v : total : self.ranks][:keep] for v in range(self.rank * per_proc, (self.rank + 1) * per_proc)
        ]
        batch = self.batch or keep
        for start in range(0, keep, batch):
            for share in mine:
                for i, position in share[start : start + batch]:
                    yield i, sample_seed(self.seed, self.epoch, position)
