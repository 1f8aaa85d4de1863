"""Data for a run: the dataset's splits, the recipe's pipelines, samplers and loaders.

Loaders yield uint8 image batches (N x 3 x H x W) and int64 labels; float conversion, normalisation
and batch mixing happen on the device (engine.Preprocessor), as in mmpretrain's data preprocessor.
So a small dataset could later live on the GPU as uint8 without touching the loop.
"""

from __future__ import annotations

import math
import os
import random
from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
from torch.utils.data import DataLoader, Dataset, Sampler

from resnet_repro.data.datasets import DataError, build_dataset
from resnet_repro.data.transforms import Pipeline, build_pipeline

__all__ = [
    "DataBundle",
    "DataError",
    "GlobalBatchSampler",
    "ShardSampler",
    "TransformedDataset",
    "build_data",
    "build_dataset",
    "build_eval_loader",
]


class TransformedDataset(Dataset):
    """Applies the pipeline; a key `(index, seed)` runs it under its own RNG seed (GlobalBatchSampler)."""

    def __init__(self, base: Dataset, pipeline: Pipeline) -> None:
        self.base, self.pipeline = base, pipeline

    def __len__(self) -> int:
        return len(self.base)  # type: ignore[arg-type]

    def __getitem__(self, key: int | tuple[int, int]) -> tuple[torch.Tensor, int]:
        if isinstance(key, int):
            img, label = self.base[key]
            return self.pipeline(img), label
        index, seed = key
        img, label = self.base[index]
        with seeded(seed):
            return self.pipeline(img), label


@contextmanager
def seeded(seed: int) -> Iterator[None]:
    """Seed torch, random and NumPy for one sample, then give the caller its RNG streams back."""
    saved = torch.get_rng_state(), random.getstate(), np.random.get_state()
    torch.manual_seed(seed)
    random.seed(seed)
    np.random.seed(seed % 2**32)
    try:
        yield
    finally:
        torch.set_rng_state(saved[0])
        random.setstate(saved[1])
        np.random.set_state(saved[2])


class GlobalBatchSampler(Sampler[tuple[int, int]]):
    """This rank's share of each shuffled global batch, every sample with its own augmentation seed.

    Shuffled and padded like torch's DistributedSampler (seed + epoch), but each global batch is cut
    into contiguous per-rank slices (DistributedSampler interleaves ranks), and sample i of epoch e is
    augmented under seed f(seed, e, i). So the micro-batches, their augmentations and hence the
    gradients of a step are the same on 1 process with accumulation as on N: a run does not depend
    on its world size or on the number of loader workers, and resumes exactly.
    """

    def __init__(self, size: int, global_batch: int, world: int, rank: int, seed: int) -> None:
        self.size, self.global_batch, self.world, self.rank, self.seed = size, global_batch, world, rank, seed
        self.total = math.ceil(size / world) * world
        self.epoch = 0

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def __len__(self) -> int:
        return self.total // self.world

    def __iter__(self) -> Iterator[tuple[int, int]]:
        gen = torch.Generator().manual_seed(self.seed + self.epoch)
        order = torch.randperm(self.size, generator=gen).tolist()
        order = (order * math.ceil(self.total / self.size))[: self.total]  # pad by repeating the start
        for start in range(0, self.total, self.global_batch):
            block = order[start : start + self.global_batch]
            share = len(block) // self.world
            for i in block[self.rank * share : (self.rank + 1) * share]:
                yield i, (self.seed * 1_000_003 + self.epoch) * 10_000_019 + i


class ShardSampler(Sampler[int]):
    """Rank r evaluates samples r, r+W, r+2W, ...: every sample exactly once over all ranks.

    torch's DistributedSampler pads with repeated samples so ranks have equal counts, which would
    count some images twice in a distributed top-1.
    """

    def __init__(self, size: int, world: int, rank: int) -> None:
        self.indices = range(rank, size, world)

    def __iter__(self) -> Iterator[int]:
        return iter(self.indices)

    def __len__(self) -> int:
        return len(self.indices)


def build_train_sampler(
    dataset: Dataset, repeats: int, global_batch: int, world: int, rank: int, seed: int, gpus: int | None = None
) -> Sampler[Any]:
    """Shuffled shards of equal length (padded, like mmengine's DefaultSampler); reshuffled by set_epoch.

    Repeated augmentation deals to the recipe's `gpus` (emulated when there are fewer processes), so
    the copies of an image fall in different per-GPU (micro-)batches, as on the recipe's 8 GPUs.
    """
    if repeats == 1:
        return GlobalBatchSampler(len(dataset), global_batch, world, rank, seed)  # type: ignore[arg-type]
    from resnet_repro.data.samplers import RepeatAugSampler

    per_gpu = global_batch // gpus if gpus else None
    return RepeatAugSampler(
        dataset, num_replicas=world, rank=rank, num_repeats=repeats, seed=seed, gpus=gpus, batch_per_gpu=per_gpu
    )


@dataclass
class DataBundle:
    train: DataLoader
    val: DataLoader
    classes: list[str]
    num_train: int
    num_val: int
    verified: bool | None  # CIFAR archives: md5 of the official release matched


def resolve_workers(setting: int | str, processes: int) -> int:
    """`trainer.num_workers`: a count, or "auto" = the CPUs shared by the local processes (at most 8)."""
    if setting == "auto":
        return min(8, max(1, (os.cpu_count() or 1) // max(1, processes)))
    return int(setting)


def build_data(cfg: Mapping[str, Any], *, batch: int, world: int, rank: int, workers: int, pin: bool) -> DataBundle:
    """Loaders of the dataset config `cfg["dataset"]` with the recipe's pipelines; `batch` images per device."""
    recipe = cfg["recipe"]
    train_set = _split(cfg, "train", "train_pipeline")
    repeats, seed = int(recipe["sampler"]["repeats"]), int(cfg["seed"])
    sampler = build_train_sampler(train_set, repeats, batch * world, world, rank, seed, gpus=int(recipe["gpus"]))
    train = DataLoader(
        train_set,
        sampler=sampler,
        batch_size=batch,
        num_workers=workers,
        pin_memory=pin,
        persistent_workers=workers > 0,
    )
    val = build_eval_loader(cfg, batch, workers, world=world, rank=rank, pin=pin)
    return DataBundle(
        train=train,
        val=val,
        classes=list(getattr(train_set.base, "classes", [])),
        num_train=len(train_set),
        num_val=len(val.dataset),  # type: ignore[arg-type]
        verified=getattr(train_set.base, "verified", None),
    )


def _split(cfg: Mapping[str, Any], split: str, pipeline: str) -> TransformedDataset:
    base = build_dataset(cfg["dataset"], split)
    if len(base) == 0:  # type: ignore[arg-type]
        ds = cfg["dataset"]
        raise DataError(f"the {split} split of dataset={ds['name']} is empty (root: {ds['root']})")
    return TransformedDataset(base, build_pipeline(cfg["recipe"][pipeline]))


def build_eval_loader(
    cfg: Mapping[str, Any], batch: int, workers: int, *, world: int = 1, rank: int = 0, pin: bool = False
) -> DataLoader:
    """The test split with the recipe's test pipeline, every sample once over all ranks, in order."""
    dataset = _split(cfg, "test", "test_pipeline")
    return DataLoader(
        dataset,
        sampler=ShardSampler(len(dataset), world, rank),
        batch_size=batch,
        num_workers=workers,
        pin_memory=pin,
        persistent_workers=workers > 0,
    )
