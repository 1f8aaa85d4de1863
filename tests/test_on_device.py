"""The on-device split and loaders: world-size independence, the CPU pipeline's geometry and distribution."""

from __future__ import annotations

from pathlib import Path

import cv2
import numpy as np
import pytest
import torch
from omegaconf import DictConfig

from resnet_repro.data import GlobalBatchSampler, ShardSampler, seeded
from resnet_repro.data import transforms as T
from resnet_repro.data.datasets import ArrayDataset, DataError, image_folder
from resnet_repro.data.on_device import (
    DeviceAugment,
    DeviceEvalLoader,
    DeviceSplit,
    DeviceTrainLoader,
    crop_flip,
    device_pipelines_supported,
    draw_crop_flip,
    estimate_nbytes,
    seeds_to_uint64,
    splitmix64,
)

REPO = Path(__file__).resolve().parents[1]
CIFAR_PIPELINE = [{"type": "random_crop", "size": 32, "padding": 4}, {"type": "hflip", "p": 0.5}]
CIFAR = DeviceAugment.from_pipeline(CIFAR_PIPELINE)


def random_split(n: int, seed: int = 0, hw: int = 32) -> DeviceSplit:
    rng = np.random.default_rng(seed)
    images = rng.integers(1, 256, size=(n, hw, hw, 3), dtype=np.uint8)  # no zeros: padding is visible
    return DeviceSplit.from_arrays(images, rng.integers(0, 10, size=n), "cpu")


def coded_image(hw: int = 32) -> np.ndarray:
    """Red = row + 1, green = column + 1: a crop's offsets and flip can be read off its pixels."""
    rows, cols = np.meshgrid(np.arange(hw), np.arange(hw), indexing="ij")
    return np.stack([rows + 1, cols + 1, np.full_like(rows, 200)], axis=-1).astype(np.uint8)


def read_offsets(out: np.ndarray, padding: int = 4) -> tuple[int, int, bool]:
    """(dy, dx, flip) of a 32 x 32 crop (H x W x 3) of the padded coded image; its centre is never padding."""
    flip = bool(out[16, 17, 1] < out[16, 16, 1])
    dy = int(out[16, 16, 0]) - 1 - 16 + padding
    dx = int(out[16, 16, 1]) - 1 - (15 if flip else 16) + padding
    return dy, dx, flip


def epoch_batches(loader: DeviceTrainLoader, epoch: int) -> list[tuple[torch.Tensor, torch.Tensor]]:
    loader.sampler.set_epoch(epoch)
    return list(loader)


# ---- draws ---------------------------------------------------------------------------------------------------


def splitmix64_reference(state: int, count: int) -> list[int]:
    """Vigna's splitmix64.c, in Python ints."""
    mask, out = (1 << 64) - 1, []
    for _ in range(count):
        state = (state + 0x9E3779B97F4A7C15) & mask
        z = state
        z = ((z ^ (z >> 30)) * 0xBF58476D1CE4E5B9) & mask
        z = ((z ^ (z >> 27)) * 0x94D049BB133111EB) & mask
        out.append(z ^ (z >> 31))
    return out


def test_draws_are_splitmix64_of_the_seed_mod_2_64() -> None:
    seeds = [0, 1, 12345, 2**63, 2**64 - 1, (123456789 * 1_000_003 + 7) * 10_000_019 + 49_999]
    u = seeds_to_uint64(seeds)
    assert [int(v) for v in u] == [s % 2**64 for s in seeds]
    assert (seeds_to_uint64([s + 2**64 for s in seeds]) == u).all()
    assert int(seeds_to_uint64([-1])[0]) == 2**64 - 1
    gamma = 0x9E3779B97F4A7C15
    for k in range(3):
        ours = splitmix64(seeds_to_uint64([(s + (k + 1) * gamma) for s in seeds]))
        assert [int(v) for v in ours] == [splitmix64_reference(s % 2**64, 3)[k] for s in seeds]
    dy, dx, flip = draw_crop_flip(u, 8, 8, 0.5)
    for s, y, x, f in zip(seeds, dy, dx, flip, strict=True):
        u0, u1, u2 = splitmix64_reference(s % 2**64, 3)
        assert (y, x, f) == (u0 % 9, u1 % 9, (u2 >> 11) / 2**53 < 0.5)


def within(count: int, n: int, p: float, sigmas: float = 5.0) -> bool:
    return abs(count - n * p) <= sigmas * np.sqrt(n * p * (1 - p))


def chi2_ok(counts: np.ndarray, sigmas: float = 5.0) -> bool:
    """Pearson's chi-square against uniform cells, within `sigmas` of its mean (df) in its std (sqrt(2 df))."""
    expected = counts.sum() / counts.size
    stat, df = float(((counts - expected) ** 2 / expected).sum()), counts.size - 1
    return stat <= df + sigmas * np.sqrt(2 * df)


def test_draw_frequencies_match_the_cpu_pipeline() -> None:
    n = 20_000
    # seeds as GlobalBatchSampler makes them (consecutive per index, beyond 2**64 for this run seed)
    seeds = [(123456789 * 1_000_003 + 3) * 10_000_019 + i for i in range(n)]
    dy, dx, flip = draw_crop_flip(seeds_to_uint64(seeds), 8, 8, 0.5)
    for offsets in (dy, dx):
        counts = np.bincount(offsets, minlength=9)
        assert len(counts) == 9 and all(within(int(c), n, 1 / 9) for c in counts)
    assert within(int(flip.sum()), n, 0.5)
    assert chi2_ok(np.bincount((dy * 9 + dx) * 2 + flip, minlength=162))  # jointly uniform: independent
    assert chi2_ok(np.bincount(dy[:-1] * 9 + dy[1:], minlength=81))  # consecutive seeds: independent draws

    # the CPU pipeline under its own RNG (seeded per sample, as TransformedDataset does): same support, same law.
    # (torch.manual_seed refuses seeds >= 2**64, so the CPU side uses a small run seed.)
    cpu_n, pipeline, img = 1500, T.build_pipeline(CIFAR_PIPELINE), coded_image()
    draws = []
    for s in ((42 * 1_000_003 + 3) * 10_000_019 + i for i in range(cpu_n)):
        with seeded(s):
            draws.append(read_offsets(pipeline(img).numpy().transpose(1, 2, 0)))
    cpu_dy, cpu_dx, cpu_flip = (np.array(column) for column in zip(*draws, strict=True))
    for offsets in (cpu_dy, cpu_dx):
        counts = np.bincount(offsets, minlength=9)
        assert len(counts) == 9 and (counts > 0).all() and all(within(int(c), cpu_n, 1 / 9) for c in counts)
    assert within(int(cpu_flip.sum()), cpu_n, 0.5)
    assert set(np.unique(dy)) == set(np.unique(cpu_dy)) == set(range(9))
    assert set(np.unique(flip)) == set(np.unique(cpu_flip)) == {False, True}


# ---- geometry ------------------------------------------------------------------------------------------------


def test_crop_flip_equals_the_cpu_pipeline_for_given_offsets(monkeypatch: pytest.MonkeyPatch) -> None:
    split = random_split(3, seed=1)
    combos = [(dy, dx, f) for dy in range(9) for dx in range(9) for f in (False, True)]
    index = torch.arange(len(combos)) % 3
    dy, dx, flip = (torch.tensor(column) for column in zip(*combos, strict=True))
    out = crop_flip(split.images, index, dy, dx, flip, 32, 4).numpy().transpose(0, 2, 3, 1)

    for b, (y, x, f) in enumerate(combos):
        img = split.images[index[b]].numpy().transpose(1, 2, 0)
        by_hand = np.pad(img, ((4, 4), (4, 4), (0, 0)))[y : y + 32, x : x + 32]
        by_hand = by_hand[:, ::-1] if f else by_hand
        draws = iter((y, x))
        monkeypatch.setattr(T, "_randint", lambda high, draws=draws: next(draws))
        cpu = T.Pipeline([T.RandomCrop(32, padding=4), T.HFlip(p=1.0 if f else 0.0)])(img).numpy()
        assert np.array_equal(out[b], by_hand), (y, x, f)
        assert np.array_equal(out[b], cpu.transpose(1, 2, 0)), (y, x, f)


def test_hflip_only_and_empty_pipelines() -> None:
    split = random_split(20, seed=2)
    sampler = GlobalBatchSampler(20, 8, 1, 0, seed=0)
    plain = [b for b, _ in DeviceTrainLoader(split, sampler, 8, DeviceAugment.from_pipeline([]))]
    flipped = [
        b for b, _ in DeviceTrainLoader(split, sampler, 8, DeviceAugment.from_pipeline([{"type": "hflip", "p": 1}]))
    ]
    order = torch.tensor([i for i, _ in sampler])
    assert torch.equal(torch.cat(plain), split.images[order])
    assert torch.equal(torch.cat(flipped), split.images[order].flip(-1))


def test_small_images_crop_without_flip() -> None:
    """The demo's geometry: 16 x 16 digits, random_crop 16 after 2 px of zeros, no flip."""
    split = random_split(300, seed=6, hw=16)
    augment = DeviceAugment.from_pipeline([{"type": "random_crop", "size": 16, "padding": 2}])
    loader = DeviceTrainLoader(split, GlobalBatchSampler(300, 64, 1, 0, seed=1), 64, augment)
    images = torch.cat([b for b, _ in loader])
    pairs = list(loader.sampler)
    dy, dx, flip = draw_crop_flip(seeds_to_uint64(s for _, s in pairs), 4, 4, 0.0)
    assert not flip.any() and set(dy) == set(dx) == set(range(5))
    for b, (i, _) in enumerate(pairs[:40]):
        img = split.images[i].numpy().transpose(1, 2, 0)
        by_hand = np.pad(img, ((2, 2), (2, 2), (0, 0)))[dy[b] : dy[b] + 16, dx[b] : dx[b] + 16]
        assert np.array_equal(images[b].numpy().transpose(1, 2, 0), by_hand)


# ---- the train loader: world size, batch position and resumption do not change a sample's augmentation --------


def test_train_augmentation_independent_of_world_size_and_resume() -> None:
    n, global_batch, seed = 100, 16, 5  # 2 GPUs x 8; 100 / 16: a partial last step, 2 x 2
    split = random_split(n, seed=3)
    one = DeviceTrainLoader(split, GlobalBatchSampler(n, global_batch, 1, 0, seed, gpus=2), global_batch, CIFAR)
    two = [
        DeviceTrainLoader(split, GlobalBatchSampler(n, global_batch, 2, r, seed, gpus=2), global_batch // 2, CIFAR)
        for r in (0, 1)
    ]
    assert len(one) == 7 and one.num_samples == 100 and len(one.dataset) == 100
    assert [len(loader) for loader in two] == [7, 7]

    per_epoch = {}
    for epoch in (0, 1):
        single = epoch_batches(one, epoch)
        ranks = [epoch_batches(loader, epoch) for loader in two]
        assert [len(b[0]) for b in single] == [16] * 6 + [4]
        for step, (images, labels) in enumerate(single):  # a step's batch = rank 0's share, then rank 1's
            assert torch.equal(images, torch.cat([ranks[0][step][0], ranks[1][step][0]]))
            assert torch.equal(labels, torch.cat([ranks[0][step][1], ranks[1][step][1]]))
            assert images.dtype == torch.uint8 and labels.dtype == torch.int64 and images.shape[1:] == (3, 32, 32)

        # each sample's crop and flip are the draws of its own seed
        one.sampler.set_epoch(epoch)
        pairs = list(one.sampler)
        index = torch.tensor([i for i, _ in pairs])
        dy, dx, flip = (torch.from_numpy(a) for a in draw_crop_flip(seeds_to_uint64(s for _, s in pairs), 8, 8, 0.5))
        assert torch.equal(torch.cat([b[0] for b in single]), crop_flip(split.images, index, dy, dx, flip, 32, 4))
        assert torch.equal(torch.cat([b[1] for b in single]), split.labels[index])
        per_epoch[epoch] = dict(zip(index.tolist(), torch.cat([b[0] for b in single]), strict=True))

        # a resumed epoch: new loaders, set_epoch, the same images
        fresh = DeviceTrainLoader(split, GlobalBatchSampler(n, global_batch, 1, 0, seed, gpus=2), global_batch, CIFAR)
        assert all(torch.equal(a[0], b[0]) for a, b in zip(epoch_batches(fresh, epoch), single, strict=True))

    assert sorted(per_epoch[0]) == list(range(n))
    changed = sum(not torch.equal(per_epoch[0][i], per_epoch[1][i]) for i in range(n))
    assert changed > n * 0.8  # a new epoch, new draws (1/162 chance each of repeating)


def test_train_loader_refuses_a_sampler_without_seeds() -> None:
    split = random_split(10)
    with pytest.raises(TypeError, match="index, seed"):
        list(DeviceTrainLoader(split, ShardSampler(10, 1, 0), 4, CIFAR))


# ---- the eval loader -------------------------------------------------------------------------------------------


def test_eval_loader_returns_each_index_once_in_order() -> None:
    split = random_split(37, seed=4)
    loader = DeviceEvalLoader(split, range(37), 8)
    batches = list(loader)
    assert len(loader) == len(batches) == 5 and loader.num_samples == 37 and len(loader.dataset) == 37
    assert [len(b[0]) for b in batches] == [8, 8, 8, 8, 5]
    assert torch.equal(torch.cat([b[0] for b in batches]), split.images)
    assert torch.equal(torch.cat([b[1] for b in batches]), split.labels)

    shard = ShardSampler(37, 3, 1)
    loader = DeviceEvalLoader(split, shard, 5)
    assert loader.num_samples == len(shard) == 12 and len(loader) == 3 and len(loader.dataset) == 37
    idx = torch.tensor(list(shard))
    assert torch.equal(torch.cat([b[0] for b in loader]), split.images[idx])
    assert torch.equal(torch.cat([b[1] for b in loader]), split.labels[idx])
    with pytest.raises(IndexError):
        DeviceEvalLoader(split, [0, 37], 4)


# ---- putting a split on the device -----------------------------------------------------------------------------


def test_array_dataset_is_copied_as_n3hw() -> None:
    rng = np.random.default_rng(5)
    nchw = rng.integers(0, 256, size=(30, 3, 32, 32), dtype=np.uint8)
    dataset = ArrayDataset(nchw.transpose(0, 2, 3, 1), rng.integers(0, 10, 30), [str(i) for i in range(10)])
    # torchvision's CIFAR arrays are such a transposed view
    split = DeviceSplit.from_dataset(dataset, "cpu")
    assert torch.equal(split.images, torch.from_numpy(nchw)) and split.images.is_contiguous()
    assert torch.equal(split.labels, torch.from_numpy(dataset.labels))
    assert split.classes == dataset.classes
    assert estimate_nbytes(dataset) == split.nbytes == 30 * 3 * 32 * 32 + 30 * 8


def write_images(folder: Path, n: int, seed: int = 0) -> None:
    rng = np.random.default_rng(seed)
    for i in range(n):
        ext = ".png" if i % 2 else ".jpg"  # lossy or not, the device split holds what cv2 decodes
        (folder / f"class{i % 3}").mkdir(parents=True, exist_ok=True)
        cv2.imwrite(str(folder / f"class{i % 3}" / f"{i:03d}{ext}"), rng.integers(0, 256, (32, 32, 3), np.uint8))


def test_decoding_an_image_folder_equals_file_dataset(tmp_path: Path) -> None:
    write_images(tmp_path, 50)
    dataset = image_folder(tmp_path)
    split = DeviceSplit.from_dataset(dataset, "cpu", num_workers=2, decode_batch=16)
    expected = np.stack([dataset[i][0] for i in range(len(dataset))]).transpose(0, 3, 1, 2)
    assert torch.equal(split.images, torch.from_numpy(expected))
    assert torch.equal(split.labels, torch.from_numpy(dataset.labels))
    assert split.classes == ["class0", "class1", "class2"] and len(split) == 50
    assert estimate_nbytes(dataset) == split.nbytes


def test_decoding_refuses_images_of_another_size(tmp_path: Path) -> None:
    write_images(tmp_path, 10)
    odd = tmp_path / "class1" / "zzz.png"
    cv2.imwrite(str(odd), np.zeros((40, 32, 3), np.uint8))
    with pytest.raises(DataError, match=r"zzz\.png .*40x32x3"):
        DeviceSplit.from_dataset(image_folder(tmp_path), "cpu", decode_batch=4)


# ---- which recipes qualify -------------------------------------------------------------------------------------


def load_recipe(name: str) -> DictConfig:
    """conf/recipe/<name>.yaml as Hydra composes it (over its defaults)."""
    from resnet_repro.config import compose

    return compose([f"recipe={name}"]).recipe


def test_only_crop_and_flip_pipelines_are_supported() -> None:
    recipes = {path.stem: load_recipe(path.stem) for path in sorted((REPO / "conf" / "recipe").glob("*.yaml"))}
    assert {"cifar-200e", "cifar100-200e"} < set(recipes) and len(recipes) > 5
    sizes = {"demo": 16}  # the digits demo's images are 16 x 16 (conf/dataset/demo.yaml input_size); CIFAR's 32
    for name, recipe in recipes.items():
        train, test = recipe.train_pipeline, recipe.test_pipeline
        if name.startswith("cifar") or name == "demo":
            assert device_pipelines_supported(train, test, image_size=sizes.get(name, 32)), name
            assert not device_pipelines_supported(train, test, image_size=sizes.get(name, 32) * 2), name
        else:  # ImageNet, RSB, CUB: resizes, random-resized crops, RandAugment, test pipelines
            assert not device_pipelines_supported(train, test), name

    crop, flip = CIFAR_PIPELINE
    assert device_pipelines_supported([crop, flip], [])
    assert device_pipelines_supported([crop], []) and device_pipelines_supported([flip], [])
    assert device_pipelines_supported([], [])
    assert device_pipelines_supported([{"type": "random_crop", "size": 32, "padding": 0}], [], image_size=32)
    refused = [
        ([crop, flip], [{"type": "center_crop", "size": 32}], None),  # a test pipeline
        ([crop, flip], [], 28),  # crop size is not the image size
        ([flip, crop], [], None),  # flip before crop
        ([crop, crop], [], None),
        ([{"type": "random_crop", "size": 32, "padding": -1}], [], None),
        ([{"type": "random_crop", "size": 32, "padding": 4, "fill": 3}], [], None),
        ([{"type": "hflip", "p": 1.5}], [], None),
        ([{"type": "resize", "size": [36, 36]}, crop], [], None),
    ]
    for train, test, size in refused:
        assert not device_pipelines_supported(train, test, image_size=size), (train, test, size)
