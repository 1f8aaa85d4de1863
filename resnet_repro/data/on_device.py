"""Small datasets on the device: a split held as one uint8 tensor and augmented there with batched tensor ops.

Why: a CIFAR split is 50,000 x 3 x 32 x 32 uint8 = 154 MB, a few hundred MB with its test split, so it fits on
any GPU many times over. A CIFAR ResNet step at batch 128 takes a few milliseconds on a GPU; the CPU loader
(per-sample Python: seeding, cv2 padding, crop, flip, collate, the copy to the device) is then what bounds
it. Here the split is copied (or decoded) once, and each step is a slice of per-epoch tables plus one gather.

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
(`device_pipelines_supported`): the CIFAR recipes and the demo. The others stay on the CPU loader.
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass
from typing import Any, NamedTuple

import numpy as np
import torch
from torch.utils.data import DataLoader, Dataset

from resnet_repro.data.datasets import ArrayDataset, DataError

__all__ = [
    "DRAW_SCHEME",
    "CropTables",
    "DeviceAugment",
    "DeviceEvalLoader",
    "DeviceSplit",
    "DeviceTrainLoader",
    "crop_flip",
    "crop_tables",
    "device_pipelines_supported",
    "draw_crop_flip",
    "estimate_nbytes",
    "gather",
    "seeds_to_uint64",
    "splitmix64",
]

DRAW_SCHEME = "splitmix64-v1"  # the tag value: how per-sample seeds become crop offsets and flips (draw_crop_flip)

PipelineSpec = Sequence[Mapping[str, Any]]

# ---- which recipes qualify -------------------------------------------------------------------------------------


@dataclass(frozen=True)
class DeviceAugment:
    """The train pipeline as the device applies it: crop `size` after `padding` px of zeros (None: no crop),
    then flip horizontally with probability `flip_p`."""

    size: int | None = None
    padding: int = 0
    flip_p: float = 0.0

    @classmethod
    def from_pipeline(cls, train_pipeline: PipelineSpec) -> DeviceAugment:
        """Parse [random_crop?, hflip?] (in that order, each at most once); ValueError for anything else."""
        steps = [dict(spec) for spec in train_pipeline]
        names = [spec.get("type") for spec in steps]
        if names not in ([], ["random_crop"], ["hflip"], ["random_crop", "hflip"]):
            raise ValueError(f"train pipeline {names} is not [random_crop?, hflip?]")
        size, padding, flip_p = None, 0, 0.0
        for spec in steps:
            kind = spec.pop("type")
            allowed = {"random_crop": {"size", "padding"}, "hflip": {"p"}}[kind]
            if set(spec) - allowed:
                raise ValueError(f"{kind} has arguments {sorted(set(spec) - allowed)} the device does not apply")
            if kind == "random_crop":
                size, padding = _int(spec["size"]), _int(spec.get("padding", 0))
                if size <= 0 or padding < 0:
                    raise ValueError(f"random_crop size={size} padding={padding}: need size > 0, padding >= 0")
            else:
                flip_p = float(spec.get("p", 0.5))  # transforms.HFlip's default
                if not 0.0 <= flip_p <= 1.0:
                    raise ValueError(f"hflip p={flip_p} is not a probability")
        return cls(size, padding, flip_p)


def _int(value: Any) -> int:
    if isinstance(value, bool) or int(value) != value:
        raise ValueError(f"{value!r} is not an integer")
    return int(value)


def device_pipelines_supported(
    train_pipeline: PipelineSpec, test_pipeline: PipelineSpec, image_size: int | None = None
) -> bool:
    """True when the train pipeline is random_crop and/or hflip and the test pipeline is empty.

    Pass `image_size` (dataset.input_size): random_crop's size must then equal it (CIFAR crops 32 from
    32 + 2 x 4, the digits demo 16 from 16 + 2 x 2); without it that check is skipped.
    """
    if len(test_pipeline) != 0:
        return False
    try:
        augment = DeviceAugment.from_pipeline(train_pipeline)
    except (ValueError, TypeError, KeyError):
        return False
    return augment.size is None or image_size is None or augment.size == image_size


# ---- a split on the device -----------------------------------------------------------------------------------


class DeviceSplit:
    """One split on `device`: `images` N x 3 x H x W uint8 (contiguous) and `labels` N int64.

    `len()` is the number of samples, like a Dataset's; `classes` and `verified` are the source dataset's.
    """

    def __init__(
        self,
        images: torch.Tensor,
        labels: torch.Tensor,
        classes: Sequence[str] = (),
        verified: bool | None = None,
    ) -> None:
        if images.dtype != torch.uint8 or images.dim() != 4 or images.shape[1] != 3:
            raise ValueError(f"images must be N x 3 x H x W uint8, got {tuple(images.shape)} {images.dtype}")
        if labels.shape != (images.shape[0],):
            raise ValueError(f"{images.shape[0]} images but labels of shape {tuple(labels.shape)}")
        self.images, self.labels = images.contiguous(), labels.to(torch.int64)
        self.classes, self.verified = list(classes), verified

    def __len__(self) -> int:
        return self.images.shape[0]

    @property
    def device(self) -> torch.device:
        return self.images.device

    @property
    def hw(self) -> tuple[int, int]:
        return self.images.shape[2], self.images.shape[3]

    @property
    def nbytes(self) -> int:
        """Device memory held by the split (images + labels)."""
        return self.images.nbytes + self.labels.nbytes

    @classmethod
    def from_dataset(
        cls, dataset: Dataset, device: torch.device | str, *, num_workers: int = 0, decode_batch: int = 1024
    ) -> DeviceSplit:
        """Copy an ArrayDataset's arrays, or decode any (H x W x 3 uint8, label) dataset once with a DataLoader."""
        if isinstance(dataset, ArrayDataset):
            return cls.from_arrays(dataset.images, dataset.labels, device, dataset.classes)
        return _decode(dataset, torch.device(device), num_workers, decode_batch)

    @classmethod
    def from_arrays(
        cls,
        images: np.ndarray,
        labels: Sequence[int] | np.ndarray,
        device: torch.device | str,
        classes: Sequence[str] = (),
        verified: bool | None = None,
    ) -> DeviceSplit:
        """N x H x W x 3 uint8 arrays (ArrayDataset.images) to N x 3 x H x W on `device`, in chunks."""
        if images.dtype != np.uint8 or images.ndim != 4 or images.shape[3] != 3:
            raise ValueError(f"images must be N x H x W x 3 uint8, got {images.shape} {images.dtype}")
        n, h, w, _ = images.shape
        out = torch.empty((n, 3, h, w), dtype=torch.uint8, device=device)
        chunk = max(1, (64 << 20) // max(1, h * w * 3))  # ~64 MB per host-to-device copy: bounded staging memory
        for start in range(0, n, chunk):
            part = _from_numpy(images[start : start + chunk]).to(device)
            out[start : start + part.shape[0]].copy_(part.permute(0, 3, 1, 2))
        return cls(out, torch.as_tensor(np.asarray(labels, dtype=np.int64)).to(device), classes, verified)


def _from_numpy(array: np.ndarray) -> torch.Tensor:
    # torch.from_numpy takes any non-negative strides (torchvision's CIFAR arrays are a transposed view)
    return torch.from_numpy(array if all(s >= 0 for s in array.strides) else np.ascontiguousarray(array))


def estimate_nbytes(dataset: Dataset) -> int:
    """Device bytes the split would take, before copying it: exact for an ArrayDataset, else N x (sample 0's size)."""
    n = len(dataset)  # type: ignore[arg-type]
    if isinstance(dataset, ArrayDataset):
        return int(dataset.images.nbytes) + 8 * n
    if n == 0:
        return 0
    image, _ = dataset[0]
    return n * int(np.asarray(image).nbytes) + 8 * n


# decoding: workers read and stack, the main process copies each batch into place on the device


@dataclass
class _Bad:
    index: int
    why: str


class _Decode(Dataset):
    """Yields (index, image, label), or _Bad for an undecodable or differently shaped image (reported in order)."""

    def __init__(self, base: Dataset, shape: tuple[int, ...]) -> None:
        self.base, self.shape = base, shape

    def __len__(self) -> int:
        return len(self.base)  # type: ignore[arg-type]

    def __getitem__(self, i: int) -> tuple[int, np.ndarray, int] | _Bad:
        try:
            image, label = self.base[i]
        except DataError as err:  # a clean message in the main process, not a worker traceback
            return _Bad(i, str(err))
        image = np.asarray(image)
        if image.dtype != np.uint8 or image.shape != self.shape:
            return _Bad(i, f"is {_shape(image)} but the first image is {_shape_of(self.shape)} uint8")
        return i, image, int(label)


def _shape(image: np.ndarray) -> str:
    return f"{_shape_of(image.shape)} {image.dtype}"


def _shape_of(shape: tuple[int, ...]) -> str:
    return "x".join(map(str, shape))


def _collate(items: list[Any]) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor] | _Bad:
    bad = [item for item in items if isinstance(item, _Bad)]
    if bad:
        return bad[0]
    index = torch.tensor([i for i, _, _ in items], dtype=torch.int64)
    images = torch.from_numpy(np.stack([image for _, image, _ in items]))
    labels = torch.tensor([label for _, _, label in items], dtype=torch.int64)
    return index, images, labels


def _name(dataset: Dataset, i: int) -> str:
    samples = getattr(dataset, "samples", None)  # FileDataset: (path, label) pairs
    return f"image {samples[i][0]} (sample {i})" if samples is not None else f"sample {i}"


def _decode(dataset: Dataset, device: torch.device, num_workers: int, decode_batch: int) -> DeviceSplit:
    n = len(dataset)  # type: ignore[arg-type]
    if n == 0:
        raise DataError("cannot put an empty split on the device")
    first = np.asarray(dataset[0][0])
    if first.dtype != np.uint8 or first.ndim != 3 or first.shape[2] != 3:
        raise DataError(f"{_name(dataset, 0)} is {_shape(first)}; the device split needs H x W x 3 uint8 images")
    h, w, _ = first.shape
    images = torch.empty((n, 3, h, w), dtype=torch.uint8, device=device)
    labels = torch.empty(n, dtype=torch.int64, device=device)
    loader = DataLoader(
        _Decode(dataset, first.shape),
        batch_size=decode_batch,
        num_workers=num_workers,
        collate_fn=_collate,
        pin_memory=device.type == "cuda",
    )
    for batch in loader:
        if isinstance(batch, _Bad):
            raise DataError(
                f"{_name(dataset, batch.index)} {batch.why}; putting a split on the device needs every image "
                f"of one size (decoded as the CPU loader does) — fix the image or use the CPU loader"
            )
        index, chunk, chunk_labels = batch
        start, stop = int(index[0]), int(index[-1]) + 1  # batches are consecutive: the default sequential sampler
        images[start:stop].copy_(chunk.to(device, non_blocking=True).permute(0, 3, 1, 2))
        labels[start:stop].copy_(chunk_labels.to(device, non_blocking=True))
    return DeviceSplit(images, labels, getattr(dataset, "classes", ()), getattr(dataset, "verified", None))


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


# ---- the geometry: pad + crop + flip as one gather -------------------------------------------------------------


class CropTables(NamedTuple):
    """Per-sample source rows / columns of each output pixel (clamped), and whether they fall inside the image
    (outside: the zero padding). Built once per epoch; a step slices them."""

    rows: torch.Tensor  # B x out_h int64
    cols: torch.Tensor  # B x out_w int64
    row_ok: torch.Tensor  # B x out_h bool
    col_ok: torch.Tensor  # B x out_w bool
    masked: bool  # padding > 0: some pixels may be padding

    def slice(self, start: int, stop: int) -> CropTables:
        rows, cols, row_ok, col_ok = (t[start:stop] for t in self[:4])
        return CropTables(rows, cols, row_ok, col_ok, self.masked)


def crop_tables(
    dy: torch.Tensor,
    dx: torch.Tensor,
    flip: torch.Tensor,
    out_hw: tuple[int, int],
    padding: int,
    in_hw: tuple[int, int],
) -> CropTables:
    """Output (y, x) of sample b reads image row y + dy - padding and column x' + dx - padding, where
    x' = out_w - 1 - x when flipped (the flip of the crop: crop first, as transforms.RandomCrop then HFlip)."""
    device = dy.device
    ys = torch.arange(out_hw[0], device=device)
    xs = torch.arange(out_hw[1], device=device)
    rows = dy[:, None] + ys[None, :] - padding
    cols = torch.where(flip[:, None], out_hw[1] - 1 - xs[None, :], xs[None, :]) + dx[:, None] - padding
    row_ok, col_ok = (rows >= 0) & (rows < in_hw[0]), (cols >= 0) & (cols < in_hw[1])
    return CropTables(rows.clamp(0, in_hw[0] - 1), cols.clamp(0, in_hw[1] - 1), row_ok, col_ok, padding > 0)


def gather(
    images: torch.Tensor, index: torch.Tensor, tables: CropTables, channels: torch.Tensor | None = None
) -> torch.Tensor:
    """images[index] cropped and flipped per the tables: one advanced-indexing gather (+ zeroing the padding).
    `channels` (arange(C) as 1 x C x 1 x 1 on the device) may be passed in to save building it each step."""
    if channels is None:
        channels = torch.arange(images.shape[1], device=images.device)[None, :, None, None]
    out = images[index[:, None, None, None], channels, tables.rows[:, None, :, None], tables.cols[:, None, None, :]]
    if tables.masked:  # a multiply, not boolean indexing: no host synchronisation
        out.mul_(tables.row_ok[:, None, :, None] & tables.col_ok[:, None, None, :])
    return out


def crop_flip(
    images: torch.Tensor,
    index: torch.Tensor,
    dy: torch.Tensor,
    dx: torch.Tensor,
    flip: torch.Tensor,
    size: int | tuple[int, int],
    padding: int,
) -> torch.Tensor:
    """The batch images[index] (N x 3 x H x W uint8) zero-padded by `padding`, cropped to `size` at (dy, dx),
    flipped where `flip`: the CPU pipeline's random_crop + hflip for given draws."""
    out_hw = (size, size) if isinstance(size, int) else size
    return gather(images, index, crop_tables(dy, dx, flip, out_hw, padding, (images.shape[2], images.shape[3])))


# ---- loaders -------------------------------------------------------------------------------------------------


def _steps(samples: int, batch: int) -> int:
    return math.ceil(samples / batch)


def _check_index(index: np.ndarray, size: int) -> None:
    # a bad index would be a device-side assert on a GPU: check on the host, once per epoch
    if index.size and (index.min() < 0 or index.max() >= size):
        raise IndexError(f"sample indices {index.min()}..{index.max()} outside the split's 0..{size - 1}")


class DeviceTrainLoader:
    """The train loader for a DeviceSplit: `batch` samples a step, in the order `sampler` gives this epoch.

    `sampler` yields (index, seed) pairs (GlobalBatchSampler) and has set_epoch; it is read once per epoch,
    when iteration starts. Yields (images uint8 B x 3 x h x w, labels int64 B), both on the split's device;
    the last batch is partial when the sampler's length is not a multiple of `batch` (as DataLoader's).
    `len()` = steps per epoch; `num_samples` = samples per epoch on this rank; `dataset` = the split
    (`len(loader.dataset)` = the split's size, as with a DataLoader).
    """

    def __init__(self, split: DeviceSplit, sampler: Any, batch: int, augment: DeviceAugment) -> None:
        if batch <= 0:
            raise ValueError(f"batch={batch}")
        h, w = split.hw
        self.out_hw = (augment.size, augment.size) if augment.size is not None else (h, w)
        self.range_y = h + 2 * augment.padding - self.out_hw[0]
        self.range_x = w + 2 * augment.padding - self.out_hw[1]
        if self.range_y < 0 or self.range_x < 0:
            raise ValueError(f"random_crop size {augment.size} exceeds the padded {h}x{w} images")
        self.dataset, self.sampler, self.batch, self.augment = split, sampler, batch, augment

    @property
    def num_samples(self) -> int:
        return len(self.sampler)

    def __len__(self) -> int:
        return _steps(len(self.sampler), self.batch)

    def epoch_plan(self) -> tuple[torch.Tensor, torch.Tensor, CropTables]:
        """This epoch's sample indices, labels and crop tables on the device (one host-to-device copy)."""
        pairs = list(self.sampler)
        if pairs and not (isinstance(pairs[0], tuple) and len(pairs[0]) == 2):
            raise TypeError(f"the sampler must yield (index, seed) pairs (GlobalBatchSampler), got {pairs[0]!r}")
        index = np.fromiter((i for i, _ in pairs), dtype=np.int64, count=len(pairs))
        _check_index(index, len(self.dataset))
        dy, dx, flip = draw_crop_flip(
            seeds_to_uint64(s for _, s in pairs), self.range_y, self.range_x, self.augment.flip_p
        )
        host = torch.from_numpy(np.stack([index, dy, dx, flip.astype(np.int64)]))
        index_d, dy_d, dx_d, flip_d = host.to(self.dataset.device)
        tables = crop_tables(dy_d, dx_d, flip_d.bool(), self.out_hw, self.augment.padding, self.dataset.hw)
        return index_d, self.dataset.labels[index_d], tables

    def __iter__(self) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        index, labels, tables = self.epoch_plan()
        images = self.dataset.images
        channels = torch.arange(images.shape[1], device=images.device)[None, :, None, None]
        for start in range(0, index.shape[0], self.batch):
            stop = start + self.batch  # slicing past the end is fine: the last batch is partial
            yield gather(images, index[start:stop], tables.slice(start, stop), channels), labels[start:stop]


class DeviceEvalLoader:
    """The eval loader for a DeviceSplit: the samples `indices` (e.g. a ShardSampler, or an evenly spread
    subset) in that order, `batch` a step, no augmentation (the test pipeline is empty).

    `len()` = steps; `num_samples` = len(indices); `dataset` = the split (`len(loader.dataset)` = the whole
    split's size, as with a DataLoader over a ShardSampler).
    """

    def __init__(self, split: DeviceSplit, indices: Iterable[int], batch: int) -> None:
        if batch <= 0:
            raise ValueError(f"batch={batch}")
        index = np.fromiter((int(i) for i in indices), dtype=np.int64)
        _check_index(index, len(split))
        self.dataset, self.batch = split, batch
        self.index = torch.from_numpy(index).to(split.device)

    @property
    def num_samples(self) -> int:
        return self.index.shape[0]

    def __len__(self) -> int:
        return _steps(self.num_samples, self.batch)

    def __iter__(self) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        for start in range(0, self.num_samples, self.batch):
            index = self.index[start : start + self.batch]
            yield self.dataset.images.index_select(0, index), self.dataset.labels.index_select(0, index)
