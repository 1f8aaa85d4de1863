"""Small datasets on the device: a split held as one uint8 tensor and augmented there with batched tensor ops.

Why: a CIFAR split is 50,000 x 3 x 32 x 32 uint8 = 154 MB (240 MB padded), a few hundred MB with its test
split, so it fits on any GPU many times over. A CIFAR ResNet step at batch 128 takes a few milliseconds on a
GPU; the CPU loader (per-sample Python: seeding, cv2 padding, crop, flip, collate, the copy to the device) is
then what bounds it. Here the split is copied (or decoded) and zero-padded once, and each step is a slice of
per-epoch tables plus one gather.

What stays as on the CPU loader (data.TransformedDataset + data.transforms):
- which samples, in which order, in which rank's batch: the same sampler (GlobalBatchSampler) is read;
- the geometry: zero padding (cv2.copyMakeBorder's constant 0), a crop at (dy, dx) with dy, dx uniform in
  0..2*padding, then a horizontal flip of the crop with probability p;
- the distribution of (dy, dx, flip): uniform, uniform, Bernoulli(p), independent.

What differs is the draws. The CPU pipeline draws from torch's RNG seeded with the sample's seed; here the
sample's draws are the first three outputs of SplitMix64 started from that seed (mod 2**64), computed for a
whole epoch at once in NumPy (see `draw_crop_flip`). A device-fed run is thus an equally distributed but
different realisation of the recipe: record DRAW_SCHEME as a tag, not as a deviation. Since the draws depend
only on each sample's own seed, they are the same whatever the world size, batch position or worker count,
and a resumed epoch (set_epoch) reproduces them exactly.

Only pipelines made of random_crop (the image's size) and/or hflip, with an empty test pipeline, qualify
(`device_augment`): the CIFAR recipes and the demo. The others stay on the CPU loader.
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
from torch.utils.data import DataLoader, Dataset

from resnet_repro.data.datasets import ArrayDataset, DataError, FileDataset

DRAW_SCHEME = "splitmix64-v1"  # the tag value: how per-sample seeds become crop offsets and flips (draw_crop_flip)

PipelineSpec = Sequence[Mapping[str, Any]]
COPY_BYTES, DECODE_BATCH = 64 << 20, 256  # a host-to-device copy of an ArrayDataset; images per decoding task

# ---- which recipes qualify -------------------------------------------------------------------------------------


@dataclass(frozen=True)
class DeviceAugment:
    """The train pipeline as the device applies it: crop `size` after `padding` px of zeros (None: no crop),
    then flip horizontally with probability `flip_p`."""

    size: int | None = None
    padding: int = 0
    flip_p: float = 0.0


def device_augment(
    train_pipeline: PipelineSpec, test_pipeline: PipelineSpec, image_size: int | None = None
) -> DeviceAugment | None:
    """The train pipeline as the device runs it, or None when it cannot: only [random_crop?, hflip?] (in that
    order, with no other arguments) and an empty test pipeline qualify.

    Pass `image_size` (dataset.input_size): random_crop's size must then equal it (CIFAR crops 32 from
    32 + 2 x 4, the digits demo 16 from 16 + 2 x 2); without it that check is skipped.
    """
    names = [spec.get("type") for spec in train_pipeline]
    if len(test_pipeline) or names not in ([], ["random_crop"], ["hflip"], ["random_crop", "hflip"]):
        return None
    args = {spec["type"]: {k: v for k, v in spec.items() if k != "type"} for spec in train_pipeline}
    crop, flip = args.get("random_crop", {}), args.get("hflip", {})
    if set(crop) - {"size", "padding"} or set(flip) - {"p"}:
        return None
    try:
        size = _int(crop["size"]) if "random_crop" in args else None
        padding = _int(crop.get("padding", 0))
        flip_p = float(flip.get("p", 0.5)) if "hflip" in args else 0.0  # transforms.HFlip's default
    except (ValueError, TypeError, KeyError):
        return None
    size_ok = size is None or (size > 0 and image_size in (None, size))
    return DeviceAugment(size, padding, flip_p) if size_ok and padding >= 0 and 0.0 <= flip_p <= 1.0 else None


def _int(value: Any) -> int:
    if isinstance(value, bool) or int(value) != value:
        raise ValueError(f"{value!r} is not an integer")
    return int(value)


# ---- a split on the device -----------------------------------------------------------------------------------


@dataclass
class DeviceSplit:
    """One split on the device: `images` N x 3 x (H + 2 padding) x (W + 2 padding) uint8, zero-padded once by
    the train pipeline's `padding` (so a crop is a window of it, no mask), and `labels` N int64."""

    images: torch.Tensor
    labels: torch.Tensor
    padding: int = 0

    def __len__(self) -> int:
        return len(self.labels)


def to_device(
    dataset: ArrayDataset | FileDataset, device: torch.device | str, padding: int = 0, workers: int = 0
) -> DeviceSplit:
    """The split on `device`, zero-padded by `padding`, copied chunk by chunk (bounded host memory)."""
    out = None
    for start, part in _host_chunks(dataset, workers):
        if out is None:
            n, (h, w, c) = len(dataset), part.shape[1:]
            out = torch.zeros((n, c, h + 2 * padding, w + 2 * padding), dtype=torch.uint8, device=device)
        inside = out[start : start + len(part), :, padding : padding + h, padding : padding + w]
        inside.copy_(torch.from_numpy(part).to(device).permute(0, 3, 1, 2))
    if out is None:
        raise DataError("cannot put an empty split on the device")
    return DeviceSplit(out, torch.from_numpy(dataset.labels).to(device), padding)


def _host_chunks(dataset: ArrayDataset | FileDataset, workers: int) -> Iterator[tuple[int, np.ndarray]]:
    """(first index, N' x H x W x 3 uint8 images): an ArrayDataset's arrays ~64 MB at a time, or an image folder's
    files decoded by `workers` loader processes as the CPU loader decodes them (datasets.read_image: a file that
    cannot be decoded stops it, named in its DataError, which errors.one_line finds in a worker's traceback)."""
    if isinstance(dataset, ArrayDataset):
        step = max(1, COPY_BYTES // max(1, math.prod(dataset.images.shape[1:])))
        for start in range(0, len(dataset), step):
            yield start, np.ascontiguousarray(dataset.images[start : start + step])
        return
    step, first = DECODE_BATCH, None
    loader = DataLoader(dataset, batch_size=step, num_workers=workers, collate_fn=list)
    for start, items in zip(range(0, len(dataset), step), loader, strict=True):
        first = first or items[0][0].shape
        for i, (image, _) in enumerate(items, start):
            if image.shape != first:
                raise DataError(
                    f"image {dataset.samples[i][0]} is {'x'.join(map(str, image.shape))}, the first one "
                    f"{'x'.join(map(str, first))}; a split on the device needs every image of one size: resize "
                    f"them or set trainer.data_on_device=false"
                )
        yield start, np.stack([image for image, _ in items])


def estimate_nbytes(dataset: Dataset, padding: int = 0) -> int:
    """Device bytes the split would take (`padding` included), before copying or decoding it: N x its first
    image's size, and the labels."""
    n = len(dataset)  # type: ignore[arg-type]
    if n == 0:
        return 0
    h, w, c = np.shape(dataset[0][0])
    return n * (c * (h + 2 * padding) * (w + 2 * padding) + 8)


# ---- per-sample draws: counter-based, from each sample's own seed ----------------------------------------------

_GOLDEN = 0x9E3779B97F4A7C15  # SplitMix64's increment (Steele, Lea & Flood 2014)
_MIX1, _MIX2 = np.uint64(0xBF58476D1CE4E5B9), np.uint64(0x94D049BB133111EB)
_MASK64 = (1 << 64) - 1


def seeds_to_uint64(seeds: Iterable[int]) -> np.ndarray:
    """Python ints of any size (GlobalBatchSampler's exceed 2**64) reduced mod 2**64."""
    return np.fromiter((int(s) & _MASK64 for s in seeds), dtype=np.uint64)


def splitmix64(z: np.ndarray) -> np.ndarray:
    """SplitMix64's output function on a uint64 array (wrapping arithmetic, as in the reference C)."""
    z = np.asarray(z, dtype=np.uint64)
    with np.errstate(over="ignore"):
        z = (z ^ (z >> np.uint64(30))) * _MIX1
        z = (z ^ (z >> np.uint64(27))) * _MIX2
        return z ^ (z >> np.uint64(31))


def _draw(seeds: np.ndarray, k: int) -> np.ndarray:
    """Output k (0-based) of a SplitMix64 generator started at each seed: mix(seed + (k + 1) * golden)."""
    with np.errstate(over="ignore"):
        return splitmix64(seeds + np.uint64(((k + 1) * _GOLDEN) & _MASK64))


def draw_crop_flip(
    seeds: np.ndarray, range_y: int, range_x: int, flip_p: float
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Each sample's crop offsets and flip from its uint64 seed s alone:

    dy = u0 mod (range_y + 1), dx = u1 mod (range_x + 1), flip = (u2 >> 11) / 2**53 < flip_p,
    with u_k = splitmix64(s + (k + 1) * 0x9E3779B97F4A7C15 mod 2**64), the first outputs of SplitMix64(s).
    The modulo's bias is below (range + 1) / 2**64. Returns int64, int64 and bool arrays.
    """
    seeds = np.asarray(seeds, dtype=np.uint64)
    dy = (_draw(seeds, 0) % np.uint64(range_y + 1)).astype(np.int64)
    dx = (_draw(seeds, 1) % np.uint64(range_x + 1)).astype(np.int64)
    flip = (_draw(seeds, 2) >> np.uint64(11)).astype(np.float64) * 2.0**-53 < flip_p
    return dy, dx, flip


# ---- loaders -------------------------------------------------------------------------------------------------


def _check_index(index: np.ndarray, size: int) -> None:
    # a bad index would be a device-side assert on a GPU: check on the host, once per epoch
    if index.size and (index.min() < 0 or index.max() >= size):
        raise IndexError(f"sample indices {index.min()}..{index.max()} outside the split's 0..{size - 1}")


class DeviceTrainLoader:
    """The train loader for a DeviceSplit padded as `augment` pads: `batch` samples a step, in the order
    `sampler` gives this epoch, each cropped and flipped by its own seed's draws (draw_crop_flip).

    `sampler` yields (index, seed) pairs (GlobalBatchSampler) and has set_epoch; it is read once per epoch,
    when iteration starts. Yields (images uint8 B x 3 x h x w, labels int64 B), both on the split's device;
    the last batch is partial when the sampler's length is not a multiple of `batch` (as DataLoader's).
    `len()` = steps per epoch; `dataset` = the split (`len(loader.dataset)` = its size, as a DataLoader's).
    """

    def __init__(self, split: DeviceSplit, sampler: Any, batch: int, augment: DeviceAugment) -> None:
        if split.padding != augment.padding:
            raise ValueError(f"the split is padded by {split.padding} px, the pipeline pads by {augment.padding}")
        padded_hw = split.images.shape[2:]
        size = augment.size
        self.out_hw = (size, size) if size is not None else tuple(s - 2 * split.padding for s in padded_hw)
        self.ranges = [s - out for s, out in zip(padded_hw, self.out_hw, strict=True)]  # crop offsets 0..range
        if min(self.ranges) < 0:
            raise ValueError(f"random_crop size {size} exceeds the padded {tuple(padded_hw)} images")
        self.dataset, self.sampler, self.batch, self.flip_p = split, sampler, batch, augment.flip_p

    def __len__(self) -> int:
        return math.ceil(len(self.sampler) / self.batch)

    def __iter__(self) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        pairs = list(self.sampler)
        if pairs and not (isinstance(pairs[0], tuple) and len(pairs[0]) == 2):
            raise TypeError(f"the sampler must yield (index, seed) pairs (GlobalBatchSampler), got {pairs[0]!r}")
        index = np.fromiter((i for i, _ in pairs), dtype=np.int64, count=len(pairs))
        _check_index(index, len(self.dataset))
        dy, dx, flip = draw_crop_flip(seeds_to_uint64(s for _, s in pairs), *self.ranges, self.flip_p)
        images, device = self.dataset.images, self.dataset.images.device
        index_d, dy_d, dx_d, flip_d = torch.from_numpy(np.stack([index, dy, dx, flip])).to(device)  # one copy
        # output pixel (y, x) of a sample is padded pixel (dy + y, dx + x), x mirrored within the crop if flipped
        ys, xs = torch.arange(self.out_hw[0], device=device), torch.arange(self.out_hw[1], device=device)
        rows = (dy_d[:, None] + ys)[:, None, :, None]
        cols = (dx_d[:, None] + torch.where(flip_d[:, None].bool(), self.out_hw[1] - 1 - xs, xs))[:, None, None, :]
        channels, labels = (
            torch.arange(images.shape[1], device=device)[None, :, None, None],
            self.dataset.labels[index_d],
        )
        for start in range(0, len(pairs), self.batch):
            step = slice(start, start + self.batch)  # past the end is fine: the last batch is partial
            yield images[index_d[step, None, None, None], channels, rows[step], cols[step]], labels[step]


class DeviceEvalLoader:
    """The eval loader for a DeviceSplit: the samples `indices` (e.g. a ShardSampler, or an evenly spread
    subset) in that order, `batch` a step, no augmentation (the test pipeline is empty).

    `len()` = steps; `dataset` = the split (`len(loader.dataset)` = the whole split's size, as with a
    DataLoader over a ShardSampler).
    """

    def __init__(self, split: DeviceSplit, indices: Iterable[int], batch: int) -> None:
        index = np.fromiter((int(i) for i in indices), dtype=np.int64)
        _check_index(index, len(split))
        on_device = torch.from_numpy(index).to(split.images.device)
        self.dataset, self.steps = split, [on_device[i : i + batch] for i in range(0, len(index), batch)]

    def __len__(self) -> int:
        return len(self.steps)

    def __iter__(self) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        for index in self.steps:
            yield self.dataset.images.index_select(0, index), self.dataset.labels.index_select(0, index)
