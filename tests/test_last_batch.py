"""The recipe's global batches, the short last one included, cut into per-GPU shares as mmengine's DefaultSampler
hands them to the recipe's GPUs, on any world size (issue 15, part 2)."""

from __future__ import annotations

import math

import pytest
import torch

from resnet_repro.data import GlobalBatchSampler
from resnet_repro.data.on_device import DeviceAugment, DeviceSplit, DeviceTrainLoader


def default_sampler(size: int, gpus: int, seed: int, epoch: int) -> list[list[int]]:
    """mmengine's DefaultSampler(shuffle=True, round_up=True) as each of `gpus` ranks iterates it (from its code:
    randperm under seed + epoch, padded by repeating to a multiple of the world size, rank::world)."""
    g = torch.Generator()
    g.manual_seed(seed + epoch)
    indices = torch.randperm(size, generator=g).tolist()
    num_samples = math.ceil(size / gpus)
    total = num_samples * gpus
    indices = (indices * int(total / len(indices) + 1))[:total]
    return [indices[r:total:gpus] for r in range(gpus)]


def recipe_steps(size: int, gpus: int, per_gpu: int, seed: int, epoch: int) -> list[list[list[int]]]:
    """Step by step, every GPU's batch: each rank's DataLoader(batch_size=per_gpu), no drop_last."""
    ranks = default_sampler(size, gpus, seed, epoch)
    return [[r[s : s + per_gpu] for r in ranks] for s in range(0, len(ranks[0]), per_gpu)]


def device_batches(size: int, gpus: int, per_gpu: int, world: int, rank: int, seed: int, epoch: int) -> list[list[int]]:
    """What a DataLoader over GlobalBatchSampler hands process `rank` each step (batch = the device's share)."""
    sampler = GlobalBatchSampler(size, gpus * per_gpu, world, rank, seed, gpus=gpus)
    sampler.set_epoch(epoch)
    indices = [i for i, _ in sampler]
    assert len(indices) == len(sampler)
    batch = gpus * per_gpu // world
    return [indices[s : s + batch] for s in range(0, len(indices), batch)]


@pytest.mark.parametrize("world", [1, 2, 4, 8])
def test_every_step_is_the_recipe_gpus_shares_on_any_world_size(world: int) -> None:
    size, gpus, per_gpu, seed, epoch = 37, 8, 3, 4, 2  # 37 -> 40 (padded), 5 per GPU: steps of 3, then 2
    steps = recipe_steps(size, gpus, per_gpu, seed, epoch)
    assert [len(step[0]) for step in steps] == [3, 2]
    k = gpus // world  # virtual GPUs per process
    for rank in range(world):
        got = device_batches(size, gpus, per_gpu, world, rank, seed, epoch)
        assert len(got) == len(steps)
        for step, batch in zip(steps, got, strict=True):
            shares = step[rank * k : (rank + 1) * k]
            assert batch == [i for share in shares for i in share]
            # the BN groups (bn_groups: tensor_split into the k groups of a pass) are exactly those shares
            assert [t.tolist() for t in torch.tensor(batch).tensor_split(k)] == shares


@pytest.mark.parametrize(
    ("size", "per_gpu", "padded", "last"),
    [(50_000, 16, 50_000, 10), (5_994, 8, 6_000, 6)],
    ids=["cifar-8x16", "cub-8x8"],
)
def test_the_recipes_last_step(size: int, per_gpu: int, padded: int, last: int) -> None:
    got = device_batches(size, 8, per_gpu, 1, 0, seed=0, epoch=0)
    steps = recipe_steps(size, 8, per_gpu, 0, 0)
    assert [i for b in got for i in b] == [i for step in steps for share in step for i in share]
    assert sum(map(len, got)) == padded and len(got[-1]) == 8 * last
    assert [len(share) for share in steps[-1]] == [last] * 8


def test_imagenet_ends_on_8_shares_of_18() -> None:
    """1,281,167 images, 8 x 32: mmengine pads the epoch to 1,281,168 and each GPU's last batch is 18."""
    size = 1_281_167
    sampler = GlobalBatchSampler(size, 256, 8, 7, seed=0, gpus=8)  # the last GPU, as one of 8 processes
    assert sampler.num_samples == 160_146 and len(sampler) == 160_146
    last = [i for i, _ in sampler][-(160_146 % 32) :]
    assert len(last) == 18 and last == default_sampler(size, 8, 0, 0)[7][-18:]


def test_the_device_loader_follows_the_same_cut() -> None:
    """DeviceTrainLoader's steps are the DataLoader's: each device batch the concatenated per-GPU shares."""
    size, gpus, per_gpu, seed = 37, 4, 3, 1  # 37 -> 40: 10 per GPU, steps of 3, 3, 3, 1
    images = torch.zeros(size, 3, 4, 4, dtype=torch.uint8)
    split = DeviceSplit(images, torch.arange(size))  # labels = indices: what each step holds
    for world in (1, 2):
        for rank in range(world):
            sampler = GlobalBatchSampler(size, gpus * per_gpu, world, rank, seed, gpus=gpus)
            loader = DeviceTrainLoader(split, sampler, gpus * per_gpu // world, DeviceAugment())
            sampler.set_epoch(3)
            got = [labels.tolist() for _, labels in loader]
            assert got == device_batches(size, gpus, per_gpu, world, rank, seed, 3)
            assert [len(b) for b in got] == [3 * gpus // world] * 3 + [gpus // world]
