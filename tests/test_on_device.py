"""The on-device split and loaders: world-size independence, the CPU pipeline's geometry and distribution."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import cv2
import numpy as np
import pytest
import torch
from omegaconf import DictConfig

from resnet_repro.data import GlobalBatchSampler, ShardSampler, on_device, seeded
from resnet_repro.data import transforms as T
from resnet_repro.data.datasets import ArrayDataset, DataError, image_folder
from resnet_repro.data.on_device import (
    DeviceAugment,
    DeviceEvalLoader,
    DeviceSplit,
    DeviceTrainLoader,
    device_augment,
    draw_crop_flip,
    estimate_nbytes,
    seeds_to_uint64,
    splitmix64,
    to_device,
)
from resnet_repro.errors import one_line

REPO = Path(__file__).resolve().parents[1]
CIFAR_PIPELINE = [{"type": "random_crop", "size": 32, "padding": 4}, {"type": "hflip", "p": 0.5}]
CIFAR = device_augment(CIFAR_PIPELINE, [], 32)


def random_data(n: int, seed: int = 0, hw: int = 32) -> ArrayDataset:
    rng = np.random.default_rng(seed)
    images = rng.integers(1, 256, size=(n, hw, hw, 3), dtype=np.uint8)  # no zeros: padding is visible
    return ArrayDataset(images, rng.integers(0, 10, size=n), [str(i) for i in range(10)])


def by_hand(
    images: np.ndarray,
    index: Sequence[int],
    dy: Sequence[int],
    dx: Sequence[int],
    flip: Sequence[bool],
    size: int = 32,
    padding: int = 4,
) -> torch.Tensor:
    """images[index] (N x H x W x 3) zero-padded, cropped at (dy, dx) and flipped, as N x 3 x size x size."""
    out = []
    for i, y, x, f in zip(index, dy, dx, flip, strict=True):
        crop = np.pad(images[i], ((padding, padding), (padding, padding), (0, 0)))[y : y + size, x : x + size]
        out.append((crop[:, ::-1] if f else crop).transpose(2, 0, 1))
    return torch.from_numpy(np.ascontiguousarray(np.stack(out)))


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
    data = random_data(3, seed=1)
    combos = [(dy, dx, f) for dy in range(9) for dx in range(9) for f in (False, True)]
    index = [b % 3 for b in range(len(combos))]
    draws = tuple(np.array(column) for column in zip(*combos, strict=True))
    monkeypatch.setattr(on_device, "draw_crop_flip", lambda *args: draws)  # the loader crops where told
    pairs = [(i, 0) for i in index]  # any (index, seed) stream is a sampler
    (out, _), *rest = DeviceTrainLoader(to_device(data, "cpu", padding=4), pairs, len(pairs), CIFAR)
    out = out.numpy().transpose(0, 2, 3, 1)
    assert not rest and out.shape == (len(combos), 32, 32, 3)

    for b, (y, x, f) in enumerate(combos):
        img = data.images[index[b]]
        hand = np.pad(img, ((4, 4), (4, 4), (0, 0)))[y : y + 32, x : x + 32]
        hand = hand[:, ::-1] if f else hand
        cpu_draws = iter((y, x))
        monkeypatch.setattr(T, "_randint", lambda high, cpu_draws=cpu_draws: next(cpu_draws))
        cpu = T.Pipeline([T.RandomCrop(32, padding=4), T.HFlip(p=1.0 if f else 0.0)])(img).numpy()
        assert np.array_equal(out[b], hand), (y, x, f)
        assert np.array_equal(out[b], cpu.transpose(1, 2, 0)), (y, x, f)


def test_hflip_only_and_empty_pipelines() -> None:
    split = to_device(random_data(20, seed=2), "cpu")
    sampler = GlobalBatchSampler(20, 8, 1, 0, seed=0)
    plain = [b for b, _ in DeviceTrainLoader(split, sampler, 8, device_augment([], []))]
    flipped = [b for b, _ in DeviceTrainLoader(split, sampler, 8, device_augment([{"type": "hflip", "p": 1}], []))]
    order = torch.tensor([i for i, _ in sampler])
    assert torch.equal(torch.cat(plain), split.images[order])
    assert torch.equal(torch.cat(flipped), split.images[order].flip(-1))


def test_small_images_crop_without_flip() -> None:
    """The demo's geometry: 16 x 16 digits, random_crop 16 after 2 px of zeros, no flip."""
    data = random_data(300, seed=6, hw=16)
    augment = device_augment([{"type": "random_crop", "size": 16, "padding": 2}], [], 16)
    loader = DeviceTrainLoader(
        to_device(data, "cpu", padding=2), GlobalBatchSampler(300, 64, 1, 0, seed=1), 64, augment
    )
    images = torch.cat([b for b, _ in loader])
    pairs = list(loader.sampler)
    dy, dx, flip = draw_crop_flip(seeds_to_uint64(s for _, s in pairs), 4, 4, 0.0)
    assert not flip.any() and set(dy) == set(dx) == set(range(5))
    index = [i for i, _ in pairs]
    assert torch.equal(images, by_hand(data.images, index, dy, dx, flip, size=16, padding=2))


# ---- the train loader: world size, batch position and resumption do not change a sample's augmentation --------


def test_train_augmentation_independent_of_world_size_and_resume() -> None:
    n, global_batch, seed = 100, 16, 5  # 2 GPUs x 8; 100 / 16: a partial last step, 2 x 2
    data = random_data(n, seed=3)
    split = to_device(data, "cpu", padding=4)
    one = DeviceTrainLoader(split, GlobalBatchSampler(n, global_batch, 1, 0, seed, gpus=2), global_batch, CIFAR)
    two = [
        DeviceTrainLoader(split, GlobalBatchSampler(n, global_batch, 2, r, seed, gpus=2), global_batch // 2, CIFAR)
        for r in (0, 1)
    ]
    assert len(one) == 7 and len(one.sampler) == 100 and len(one.dataset) == 100
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
        index = [i for i, _ in pairs]
        dy, dx, flip = draw_crop_flip(seeds_to_uint64(s for _, s in pairs), 8, 8, 0.5)
        assert torch.equal(torch.cat([b[0] for b in single]), by_hand(data.images, index, dy, dx, flip))
        assert torch.equal(torch.cat([b[1] for b in single]), torch.from_numpy(data.labels[index]))
        per_epoch[epoch] = dict(zip(index, torch.cat([b[0] for b in single]), strict=True))

        # a resumed epoch: new loaders, set_epoch, the same images
        fresh = DeviceTrainLoader(split, GlobalBatchSampler(n, global_batch, 1, 0, seed, gpus=2), global_batch, CIFAR)
        assert all(torch.equal(a[0], b[0]) for a, b in zip(epoch_batches(fresh, epoch), single, strict=True))

    assert sorted(per_epoch[0]) == list(range(n))
    changed = sum(not torch.equal(per_epoch[0][i], per_epoch[1][i]) for i in range(n))
    assert changed > n * 0.8  # a new epoch, new draws (1/162 chance each of repeating)


def test_train_loader_refuses_a_sampler_without_seeds() -> None:
    split = to_device(random_data(10), "cpu", padding=4)
    with pytest.raises(TypeError, match="index, seed"):
        list(DeviceTrainLoader(split, ShardSampler(10, 1, 0), 4, CIFAR))


# ---- the eval loader -------------------------------------------------------------------------------------------


def test_eval_loader_returns_each_index_once_in_order() -> None:
    split = to_device(random_data(37, seed=4), "cpu")
    loader = DeviceEvalLoader(split, range(37), 8)
    batches = list(loader)
    assert len(loader) == len(batches) == 5 and len(loader.dataset) == 37
    assert [len(b[0]) for b in batches] == [8, 8, 8, 8, 5]
    assert torch.equal(torch.cat([b[0] for b in batches]), split.images)
    assert torch.equal(torch.cat([b[1] for b in batches]), split.labels)

    shard = ShardSampler(37, 3, 1)
    loader = DeviceEvalLoader(split, shard, 5)
    assert len(shard) == 12 and len(loader) == 3 and len(loader.dataset) == 37
    idx = torch.tensor(list(shard))
    assert torch.equal(torch.cat([b[0] for b in loader]), split.images[idx])
    assert torch.equal(torch.cat([b[1] for b in loader]), split.labels[idx])
    with pytest.raises(IndexError):
        DeviceEvalLoader(split, [0, 37], 4)


# ---- putting a split on the device -----------------------------------------------------------------------------


def nbytes(split: DeviceSplit) -> int:
    return split.images.nbytes + split.labels.nbytes


def test_array_dataset_is_copied_as_n3hw_and_padded_with_zeros(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(on_device, "COPY_BYTES", 7 * 32 * 32 * 3)  # copies of 7 images: 5 chunks
    rng = np.random.default_rng(5)
    nchw = rng.integers(1, 256, size=(30, 3, 32, 32), dtype=np.uint8)
    # torchvision's CIFAR arrays are such a transposed view
    dataset = ArrayDataset(nchw.transpose(0, 2, 3, 1), rng.integers(0, 10, 30), [str(i) for i in range(10)])
    split = to_device(dataset, "cpu")
    assert torch.equal(split.images, torch.from_numpy(nchw)) and split.images.is_contiguous()
    assert torch.equal(split.labels, torch.from_numpy(dataset.labels))
    assert estimate_nbytes(dataset) == nbytes(split) == 30 * 3 * 32 * 32 + 30 * 8

    padded = to_device(dataset, "cpu", padding=4)  # what cv2.copyMakeBorder's constant 0 gives, image by image
    cv2_padded = [cv2.copyMakeBorder(image, 4, 4, 4, 4, cv2.BORDER_CONSTANT, value=0) for image in dataset.images]
    assert torch.equal(padded.images, torch.from_numpy(np.stack(cv2_padded).transpose(0, 3, 1, 2)))
    assert padded.images.is_contiguous() and padded.padding == 4 and len(padded) == 30
    assert estimate_nbytes(dataset, padding=4) == nbytes(padded) == 30 * 3 * 40 * 40 + 30 * 8


def write_images(folder: Path, n: int, seed: int = 0) -> None:
    rng = np.random.default_rng(seed)
    for i in range(n):
        ext = ".png" if i % 2 else ".jpg"  # lossy or not, the device split holds what cv2 decodes
        (folder / f"class{i % 3}").mkdir(parents=True, exist_ok=True)
        cv2.imwrite(str(folder / f"class{i % 3}" / f"{i:03d}{ext}"), rng.integers(0, 256, (32, 32, 3), np.uint8))


def test_decoding_an_image_folder_equals_file_dataset(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(on_device, "DECODE_BATCH", 16)  # 4 batches over 2 workers
    write_images(tmp_path, 50)
    dataset = image_folder(tmp_path)
    split = to_device(dataset, "cpu", workers=2)
    expected = np.stack([dataset[i][0] for i in range(len(dataset))]).transpose(0, 3, 1, 2)
    assert torch.equal(split.images, torch.from_numpy(expected))
    assert torch.equal(split.labels, torch.from_numpy(dataset.labels)) and len(split) == 50
    assert estimate_nbytes(dataset) == nbytes(split)


def test_decoding_refuses_images_of_another_size(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    write_images(tmp_path, 10)
    odd = tmp_path / "class1" / "zzz.png"
    cv2.imwrite(str(odd), np.zeros((40, 32, 3), np.uint8))
    monkeypatch.setattr(on_device, "DECODE_BATCH", 4)  # the odd one in another batch than the first image
    with pytest.raises(DataError, match=r"zzz\.png .*40x32x3"):
        to_device(image_folder(tmp_path), "cpu")


def test_a_corrupt_image_is_named_in_one_line(tmp_path: Path) -> None:
    write_images(tmp_path, 10)
    bad = tmp_path / "class2" / "005.png"
    bad.write_bytes(b"not an image")
    # in the main process: torch keeps an errored worker 5 s when its loader is garbage-collected (a cycle
    # through the re-raised error); from a worker, errors.one_line reads the same line out of its traceback
    with pytest.raises(DataError) as err:
        to_device(image_folder(tmp_path), "cpu", workers=0)
    assert one_line(err.value) == f"cannot decode image {bad} (corrupt or not an image); remove or replace it"


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
            assert device_augment(train, test, image_size=sizes.get(name, 32)) is not None, name
            assert device_augment(train, test, image_size=sizes.get(name, 32) * 2) is None, name
        else:  # ImageNet, RSB, CUB: resizes, random-resized crops, RandAugment, test pipelines
            assert device_augment(train, test) is None, name

    crop, flip = CIFAR_PIPELINE
    assert device_augment([crop, flip], []) == DeviceAugment(32, 4, 0.5) == CIFAR
    assert device_augment([crop], []) == DeviceAugment(32, 4, 0.0)
    assert device_augment([flip], []) == DeviceAugment(None, 0, 0.5)
    assert device_augment([{"type": "hflip"}], []) == DeviceAugment(None, 0, 0.5)  # transforms.HFlip's default p
    assert device_augment([], []) == DeviceAugment()
    assert device_augment([{"type": "random_crop", "size": 32, "padding": 0}], [], image_size=32) is not None
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
        assert device_augment(train, test, image_size=size) is None, (train, test, size)
