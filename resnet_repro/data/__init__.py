"""Data for a run: the dataset's splits, checked before the first step, with the recipe's pipelines.

Loaders yield uint8 image batches (N x 3 x H x W) and int64 labels; float conversion, normalisation and
batch mixing happen on the device (data.preprocess, mixing). Small splits whose pipelines are a padded
crop and a flip (CIFAR, the demo) can instead live on the device and be augmented there (data.on_device);
JPEG folders whose pipelines are an OpenCV resize, crop and flip (ImageNet v1b, CUB) can be decoded and
augmented there, batch by batch (data.device_decode, trainer.decode).
"""

from __future__ import annotations

import os
import random
from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
from torch.utils.data import DataLoader, Dataset, Sampler

from resnet_repro.data import device_decode, on_device
from resnet_repro.data.datasets import ArrayDataset, DataError, Source, check_classes, check_readable, data_source
from resnet_repro.data.loaders import make_loader
from resnet_repro.data.resume import ResumableSampler
from resnet_repro.data.samplers import GlobalBatchSampler, RepeatAugSampler, ShardSampler, spread
from resnet_repro.data.transforms import Pipeline, build_pipeline

__all__ = ["DataBundle", "DataError", "GlobalBatchSampler", "ShardSampler", "build_data", "build_eval_loader", "seeded"]
ON_DEVICE_MAX_BYTES = 2 << 30  # the splits held on the device: CIFAR's, padded, take 271 MB


class TransformedDataset(Dataset):
    """Applies the pipeline; a key `(index, seed)` runs it under that sample's own RNG seed (data.samplers)."""

    def __init__(self, base: Dataset, pipeline: Pipeline) -> None:
        self.base, self.pipeline = base, pipeline

    def __len__(self) -> int:
        return len(self.base)  # type: ignore[arg-type]

    def __getitem__(self, key: int | tuple[int, int]) -> tuple[torch.Tensor, int]:
        index, seed = (key, None) if isinstance(key, int) else key
        img, label = self.base[index]
        if seed is None:
            return self.pipeline(img), label
        with seeded(seed):
            return self.pipeline(img), label


@contextmanager
def seeded(seed: int) -> Iterator[None]:
    """Seed torch, random and NumPy for one sample, then give the caller its RNG streams back."""
    saved = torch.get_rng_state(), random.getstate(), np.random.get_state()
    torch.manual_seed(seed % 2**64)  # torch takes seeds below 2**64; sample seeds can exceed it
    random.seed(seed)
    np.random.seed(seed % 2**32)
    try:
        yield
    finally:
        torch.set_rng_state(saved[0])
        random.setstate(saved[1])
        np.random.set_state(saved[2])


def build_train_sampler(
    dataset: Any, repeats: int, global_batch: int, world: int, rank: int, seed: int, gpus: int | None = None
) -> Sampler[tuple[int, int]]:
    """mmengine's DefaultSampler (padded, reshuffled by set_epoch) or, for repeated augmentation (RSB), its
    RepeatAugSampler, dealing to the recipe's `gpus`: emulated when there are fewer processes."""
    if repeats == 1:
        return GlobalBatchSampler(len(dataset), global_batch, world, rank, seed, gpus=gpus)
    per_gpu = global_batch // gpus if gpus else None
    return RepeatAugSampler(
        dataset, num_replicas=world, rank=rank, num_repeats=repeats, seed=seed, gpus=gpus, batch_per_gpu=per_gpu
    )


@dataclass
class DataBundle:
    train: Any  # a DataLoader or a data.on_device.DeviceTrainLoader: len(), iteration, .sampler.set_epoch
    val: Any
    classes: list[str]
    num_train: int
    num_val: int  # samples evaluated (all ranks together)
    source: Source
    on_device: bool
    val_limited: bool
    decode: str = "cpu"  # where JPEGs are decoded and augmented: cpu (loader workers) | device (device_decode)

    @property
    def verified(self) -> bool | None:
        """CIFAR archives: the official release's md5s matched (read when asked: rank 0, as its run opens)."""
        return self.source.verified()


def resolve_workers(setting: int | str, processes: int) -> int:
    """`trainer.num_workers`: a count, or "auto" = the CPUs shared by the local processes (at most 8)."""
    if setting == "auto":
        return min(8, max(1, (os.cpu_count() or 1) // max(1, processes)))
    return int(setting)


def build_data(
    cfg: Mapping[str, Any], *, batch: int, world: int, rank: int, workers: int, device: torch.device
) -> DataBundle:
    """The run's loaders: `batch` images per device and step; every check that the data allows, done now."""
    ds, recipe, tr = cfg["dataset"], cfg["recipe"], cfg["trainer"]
    source = data_source(ds)
    train_set, test_set = source.load("train"), source.load("test")
    classes = check_classes(train_set, test_set, ds)
    keep = spread(len(test_set), None if tr["limit_val_batches"] is None else tr["limit_val_batches"] * batch)
    seed, gpus, repeats = int(cfg["seed"]), int(recipe["gpus"]), int(recipe["sampler"]["repeats"])
    sampler = ResumableSampler(build_train_sampler(train_set, repeats, batch * world, world, rank, seed, gpus=gpus))
    shard = ShardSampler(len(test_set), world, rank, keep)  # type: ignore[arg-type]
    augment = _on_device_augment(cfg, train_set, test_set, device)
    if augment is not None:  # copied or decoded once: a corrupt image is found now
        train_split = on_device.to_device(train_set, device, augment.padding, workers)  # type: ignore[arg-type]
        test_split = on_device.to_device(test_set, device, workers=workers)  # type: ignore[arg-type]
        train: Any = on_device.DeviceTrainLoader(train_split, sampler, batch, augment)
        val: Any = on_device.DeviceEvalLoader(test_split, shard.indices, batch)
    elif device_decode.resolve(cfg, device):
        check_readable(test_set)
        train, val = _decode_loaders(cfg, train_set, test_set, sampler, shard, batch, workers, device)
    else:
        check_readable(test_set)  # a corrupt test image is found now, not after an epoch of training
        pin = device.type == "cuda"
        pipeline = build_pipeline(recipe["train_pipeline"])
        train = make_loader(TransformedDataset(train_set, pipeline), sampler, batch, workers, pin)
        val = _eval_loader(test_set, recipe, batch, workers, shard, pin)
    return DataBundle(
        train=train,
        val=val,
        classes=classes,
        num_train=len(train_set),  # type: ignore[arg-type]
        num_val=len(keep) if keep is not None else len(test_set),  # type: ignore[arg-type]
        source=source,
        on_device=augment is not None,
        val_limited=keep is not None,
        decode="device" if isinstance(train, device_decode.DecodeLoader) else "cpu",
    )


def _decode_loaders(
    cfg: Mapping[str, Any],
    train_set: Any,
    test_set: Any,
    sampler: Sampler[Any],
    shard: Sampler[int],
    batch: int,
    workers: int,
    device: torch.device,
) -> tuple[device_decode.DecodeLoader, device_decode.DecodeLoader]:
    """trainer.decode=device: workers read bytes and draw; the device decodes and resamples. Evaluation on CUDA
    decodes with OpenCV on the workers (nvJPEG may differ by a level: evaluation pixels must be exact)."""
    recipe, loader = cfg["recipe"], device_decode.DecodeLoader
    train_data = device_decode.EncodedDataset(train_set, recipe["train_pipeline"])
    test_data = device_decode.EncodedDataset(test_set, recipe["test_pipeline"], decode_here=device.type != "cpu")
    return loader(train_data, sampler, batch, workers, device), loader(test_data, shard, batch, workers, device)


def _on_device_augment(
    cfg: Mapping[str, Any], train: Dataset, test: Dataset, device: torch.device
) -> on_device.DeviceAugment | None:
    """The train pipeline as the device runs it when the splits are held there, else None (the CPU loader).
    trainer.data_on_device: true, false, or auto = the pipelines allow it, the splits fit, and either they
    are in memory already (CIFAR archives, demo) or the device is a GPU worth decoding an image folder for."""
    setting, recipe = cfg["trainer"]["data_on_device"], cfg["recipe"]
    size = int(cfg["dataset"]["input_size"])
    augment = on_device.device_augment(recipe["train_pipeline"], recipe["test_pipeline"], size)
    augment = augment if int(recipe["sampler"]["repeats"]) == 1 else None
    if setting is True and augment is None:
        raise DataError(
            "trainer.data_on_device=true, but only a padded crop and a flip run on the device; "
            "allowed for this recipe: false, auto"
        )
    if setting is False or augment is None:
        return None
    nbytes = on_device.estimate_nbytes(train, augment.padding) + on_device.estimate_nbytes(test)
    fits = nbytes <= ON_DEVICE_MAX_BYTES and (isinstance(train, ArrayDataset) or device.type == "cuda")
    return augment if setting is True or fits else None


def _eval_loader(
    base: Dataset, recipe: Mapping[str, Any], batch: int, workers: int, sampler: Sampler[int], pin: bool
) -> DataLoader:
    return make_loader(TransformedDataset(base, build_pipeline(recipe["test_pipeline"])), sampler, batch, workers, pin)


def build_eval_loader(
    cfg: Mapping[str, Any], batch: int, workers: int, *, world: int = 1, rank: int = 0, pin: bool = False
) -> DataLoader:
    """The test split with the recipe's test pipeline, every sample once over all ranks, in order."""
    test_set = data_source(cfg["dataset"]).load("test")
    check_readable(test_set)
    sampler = ShardSampler(len(test_set), world, rank)  # type: ignore[arg-type]
    return _eval_loader(test_set, cfg["recipe"], batch, workers, sampler, pin)
