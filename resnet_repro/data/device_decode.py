"""JPEG folders (ImageNet, CUB) decoded and augmented on the device, with the CPU pipeline's draws and pixels.

Why: the recipes decode every JPEG with OpenCV and resize it with OpenCV on loader workers, ~100-200 images/s
per core, while one H100 trains ResNet-50 at 2,000-4,000 images/s. Here loader workers only read the file's
bytes, parse its header and draw the sample's crop and flip; each step decodes its batch on the device in one
call (`torchvision.io.decode_jpeg` on a list: nvJPEG on CUDA, libjpeg-turbo on CPU tensors) and resamples
all crops to the batch in one gather, whatever their sizes.

What stays as on the CPU pipeline (data.TransformedDataset + data.transforms):
- the draws: the worker runs the same transform objects' draw methods (`RandomResizedCrop.params`,
  `RandomCrop.offsets`, `HFlip.draw`) from torch's generator seeded with the same per-sample seed (as
  data.seeded does), on the decoded image's size, so every sample gets the CPU pipeline's crop box and flip;
- the pixels: the resize is OpenCV's INTER_LINEAR on uint8, fixed point included (`cv2_linear_tables`,
  `resample`: 11-bit coefficients, the 16-bit vertical pass of its SIMD code), equal to cv2.resize pixel for
  pixel (tests/test_device_decode.py); libjpeg-turbo's decode on CPU equals cv2.imdecode. nvJPEG's IDCT may
  differ by a level or two (benchmarks/input_pipeline.py --device cuda measures it), which is why evaluation
  on CUDA decodes on the loader workers with OpenCV and only resamples on the device: its pixels are exact.

Files the device decoder would read differently stay with OpenCV on the worker and join the batch decoded:
anything but a 3-component JPEG (greyscale, CMYK, PNG named .JPEG) and JPEGs with an EXIF rotation (OpenCV
applies it). A file that cannot be decoded stops the run naming it, as on the CPU (data.datasets.read_image);
nvJPEG / libjpeg errors on data OpenCV would decode past (a garbled scan) stop it too.

Pipelines that qualify (`unsupported`): a resize step first (random_resized_crop, resize_short or resize, with
backend cv2 and bilinear interpolation), then center_crop or random_crop without padding, then hflip, each at
most once, giving one output size: the ImageNet v1b rows and CUB. Pillow (v1c/v1d rows) and RandAugment
(RSB rows) stay on the CPU pipeline.
"""

from __future__ import annotations

import contextlib
import io
from collections.abc import Iterator, Mapping, Sequence
from typing import Any, NamedTuple

import numpy as np
import torch
from torch.utils.data import Dataset

from resnet_repro.data.datasets import DataError, FileDataset, decode_bytes
from resnet_repro.data.loaders import make_loader
from resnet_repro.data.transforms import (
    CenterCrop,
    HFlip,
    RandomCrop,
    RandomResizedCrop,
    Resize,
    ResizeShort,
    build_pipeline,
)

__all__ = [
    "DecodeLoader",
    "EncodedBatch",
    "EncodedDataset",
    "check_setting",
    "cv2_linear_tables",
    "decode_images",
    "plan_geometry",
    "reason",
    "resample",
    "resolve",
    "unsupported",
]

PipelineSpec = Sequence[Mapping[str, Any]]
RESIZES, CROPS = ("random_resized_crop", "resize_short", "resize"), ("center_crop", "random_crop")
ENCODED, DECODED, BAD = 0, 1, 2  # what a worker hands over for a sample
COEF_BITS = 11  # OpenCV's INTER_RESIZE_COEF_BITS: linear weights in 1/2048


# ---- which pipelines qualify -----------------------------------------------------------------------------------


def unsupported(pipeline: PipelineSpec) -> str | None:
    """Why the device cannot run this pipeline with the CPU's pixels; None when it can."""
    names = [dict(spec).get("type") for spec in pipeline]
    order = (
        [n for n in names if n in RESIZES][:1] + [n for n in names if n in CROPS][:1] + ["hflip"] * ("hflip" in names)
    )
    if names != order or not names or names[0] not in RESIZES:
        return f"its steps are {names}, not [resize step, crop?, hflip?]"
    for spec in map(dict, pipeline):
        backend, interpolation = spec.get("backend", "cv2"), spec.get("interpolation", "bilinear")
        if spec["type"] in RESIZES and (backend, interpolation) != ("cv2", "bilinear"):
            return f"{spec['type']} uses {backend} {interpolation}"
        if spec["type"] == "random_crop" and spec.get("padding", 0):
            return "random_crop pads"
    if names[0] == "resize_short" and not any(n in CROPS for n in names):
        return "resize_short without a crop gives images of different sizes"
    return None


def reason(cfg: Mapping[str, Any]) -> str | None:
    """Why trainer.decode=device cannot run this config (dataset format and both pipelines); None when it can."""
    ds, recipe = cfg["dataset"], cfg["recipe"]
    if ds["format"] not in ("imagefolder", "cub"):
        return f"dataset.format={ds['format']} holds no image files"
    for split in ("train_pipeline", "test_pipeline"):
        why = unsupported(recipe[split])
        if why:
            return f"recipe.{split}: {why}"
    if int(recipe["sampler"]["repeats"]) != 1:
        return "repeated augmentation runs on the CPU pipeline"
    return None


def check_setting(cfg: Mapping[str, Any]) -> None:
    """trainer.decode=device on a recipe or dataset it cannot run: ValueError naming why (one line)."""
    why = reason(cfg) if cfg["trainer"].get("decode", "cpu") == "device" else None
    if why:
        raise ValueError(
            f"trainer.decode=device, but {why} (the device runs cv2-bilinear resize/crop/flip pipelines of image "
            f"folders: the ImageNet v1b and CUB recipes); allowed here: cpu, auto"
        )


def resolve(cfg: Mapping[str, Any], device: torch.device) -> bool:
    """trainer.decode: device, cpu, or auto = device on CUDA where the recipe and dataset qualify."""
    setting = cfg["trainer"].get("decode", "cpu")
    if setting == "device":
        try:
            check_setting(cfg)
        except ValueError as err:
            raise DataError(str(err)) from None
        return True
    return setting == "auto" and device.type == "cuda" and reason(cfg) is None


# ---- per-sample geometry, drawn on the worker ----------------------------------------------------------------

# one sample's geometry: the resize reads box (top, left, h, w) of the source and makes (rh, rw); the output
# is its window at (oy, ox), flipped horizontally when flip = 1
GEOMETRY = ("top", "left", "h", "w", "rh", "rw", "oy", "ox", "flip")


def plan_geometry(steps: Sequence[Any], height: int, width: int) -> tuple[list[int], tuple[int, int]]:
    """The geometry of the pipeline's steps on an image of height x width, drawing from torch's RNG exactly as
    the steps' own __call__ does (call it under the sample's seed); also the output's (h, w)."""
    top, left, box_h, box_w, flip = 0, 0, height, width, 0
    resized = size = (height, width)  # what the resize step makes; the image's size after each step
    oy = ox = 0
    for step in steps:
        if isinstance(step, RandomResizedCrop):
            top, left, box_h, box_w = step.params(height, width)
            resized = size = (step.size, step.size)
        elif isinstance(step, ResizeShort):
            resized = size = step.target(height, width)
        elif isinstance(step, Resize):
            resized = size = step.size
        elif isinstance(step, CenterCrop | RandomCrop):  # RandomCrop without padding (unsupported() checks)
            dy, dx = step.offsets(*size)
            oy, ox, size = oy + dy, ox + dx, (min(step.size, size[0] - dy), min(step.size, size[1] - dx))
        elif isinstance(step, HFlip):
            flip = int(step.draw())
        else:
            raise TypeError(f"{type(step).__name__} does not run on the device")
    return [top, left, box_h, box_w, resized[0], resized[1], oy, ox, flip], size


def output_size(steps: Sequence[Any]) -> tuple[int, int]:
    """The one (h, w) a qualifying pipeline makes: its crop's, else its resize's."""
    crops = [step for step in steps if isinstance(step, CenterCrop | RandomCrop)]
    if crops:
        return crops[-1].size, crops[-1].size
    for step in steps:
        if isinstance(step, RandomResizedCrop):
            return step.size, step.size
        if isinstance(step, Resize):
            return step.size
    raise ValueError("the pipeline has no output size of its own")


# ---- loader workers: bytes, header, draws --------------------------------------------------------------------


def jpeg_size(data: np.ndarray) -> tuple[int, int] | None:
    """(h, w) of a 3-component JPEG without an EXIF rotation, which the device decodes as OpenCV does; None for
    anything else (OpenCV decodes it on the worker)."""
    from PIL import Image

    try:
        with Image.open(io.BytesIO(data.tobytes())) as img:
            if img.format != "JPEG" or img.mode != "RGB" or img.getexif().get(0x0112, 1) != 1:
                return None
            return img.height, img.width
    except Exception:  # noqa: BLE001 - any header PIL cannot read: OpenCV's decode decides, as on the CPU
        return None


@contextlib.contextmanager
def torch_seeded(seed: int) -> Iterator[None]:
    """data.seeded for draws from torch's CPU generator only (every geometric step draws there): the same
    draws without reseeding Python's and NumPy's RNGs and the CUDA generators (~10 us instead of ~300)."""
    generator = torch.default_generator
    saved = generator.get_state()
    generator.manual_seed(seed % 2**64)  # as torch.manual_seed(seed % 2**64) in data.seeded
    try:
        yield
    finally:
        generator.set_state(saved)


class Item(NamedTuple):
    index: int
    kind: int  # ENCODED (payload: the file's bytes), DECODED (H x W x 3 RGB), BAD (payload empty)
    payload: torch.Tensor
    geometry: list[int]
    label: int
    error: str


class EncodedDataset(Dataset):
    """Image files -> the file's bytes (or OpenCV's pixels, see jpeg_size) and the sample's drawn geometry.

    A key `(index, seed)` draws under that sample's seed (data.samplers), as data.TransformedDataset does.
    `decode_here`: every image is decoded by OpenCV on the worker (evaluation on CUDA: exact pixels).
    """

    def __init__(self, base: FileDataset, pipeline: PipelineSpec, decode_here: bool = False) -> None:
        why = unsupported(pipeline)
        if why:
            raise ValueError(f"this pipeline does not run on the device: {why}")
        self.samples, self.decode_here = base.samples, decode_here
        self.steps = build_pipeline(pipeline).steps
        self.out_hw = output_size(self.steps)

    def __len__(self) -> int:
        return len(self.samples)

    def path(self, index: int) -> str:
        return self.samples[index][0]

    def __getitem__(self, key: int | tuple[int, int]) -> Item:
        index, seed = (key, None) if isinstance(key, int) else key
        path, label = self.samples[index]
        data = np.fromfile(path, dtype=np.uint8)
        size = None if self.decode_here else jpeg_size(data)
        kind, payload = ENCODED, torch.from_numpy(data)
        if size is None:
            try:
                image = decode_bytes(data, path)
            except DataError as err:  # raised in the main process: one line, not a worker traceback
                return Item(index, BAD, torch.empty(0, dtype=torch.uint8), [0] * len(GEOMETRY), label, str(err))
            kind, payload, size = DECODED, torch.from_numpy(image), image.shape[:2]
        with torch_seeded(seed) if seed is not None else contextlib.nullcontext():
            geometry, out = plan_geometry(self.steps, *size)
        if out != self.out_hw:
            want = "x".join(map(str, self.out_hw))
            why = f"image {path} is {size[0]}x{size[1]}: the pipeline makes {out[0]}x{out[1]} of it, not {want}"
            return Item(index, BAD, torch.empty(0, dtype=torch.uint8), geometry, label, why)
        return Item(index, kind, payload, geometry, label, "")


class EncodedBatch(NamedTuple):
    indices: torch.Tensor
    kinds: list[int]
    payloads: list[torch.Tensor]
    geometry: torch.Tensor  # N x len(GEOMETRY) int64
    labels: torch.Tensor
    errors: list[str]


def collate(items: Sequence[Item]) -> EncodedBatch:
    return EncodedBatch(
        indices=torch.tensor([item.index for item in items], dtype=torch.int64),
        kinds=[item.kind for item in items],
        payloads=[item.payload for item in items],
        geometry=torch.tensor([item.geometry for item in items], dtype=torch.int64),
        labels=torch.tensor([item.label for item in items], dtype=torch.int64),
        errors=[item.error for item in items],
    )


# ---- the device: decode, then resample -----------------------------------------------------------------------


def decode_images(batch: EncodedBatch, device: torch.device, path: Any) -> list[torch.Tensor]:
    """The batch's images as 3 x H x W uint8 RGB on `device`: its JPEGs decoded in one call. `path(index)` names
    a file that fails, in one line (DataError)."""
    bad = [i for i, kind in enumerate(batch.kinds) if kind == BAD]
    if bad:
        raise DataError(batch.errors[bad[0]])
    out: list[torch.Tensor | None] = [None] * len(batch.kinds)
    coded = [i for i, kind in enumerate(batch.kinds) if kind == ENCODED]
    if coded:
        try:
            images = _decode_jpegs([batch.payloads[i] for i in coded], device)
        except RuntimeError:
            for i in coded:  # which one: decode them one by one
                try:
                    _decode_jpegs([batch.payloads[i]], device)
                except RuntimeError as err:
                    why = str(err).strip().splitlines()[0].rsplit(", ", 1)[-1]
                    path_i = path(int(batch.indices[i]))
                    raise DataError(f"cannot decode image {path_i} ({why}); remove or replace it") from None
            raise
        for i, image in zip(coded, images, strict=True):
            out[i] = image
    for i, kind in enumerate(batch.kinds):
        if kind == DECODED:
            out[i] = batch.payloads[i].to(device, non_blocking=True).permute(2, 0, 1)
    return out  # type: ignore[return-value]


_DECODE_STREAMS: dict[torch.device, Any] = {}


def _decode_jpegs(data: list[torch.Tensor], device: torch.device) -> list[torch.Tensor]:
    """decode_jpeg on a list; on CUDA from a stream of its own. torchvision's CUDA decoder allocates its outputs
    from the current stream's memory but writes them on a private stream not ordered after it, so with the
    step's kernels still queued it can overwrite memory they are about to read (pytorch/vision#9606, seen on
    H100). From a stream that has nothing queued and holds no freed blocks of the step, it cannot."""
    from torchvision.io import ImageReadMode, decode_jpeg

    if device.type != "cuda":
        return decode_jpeg(data, mode=ImageReadMode.RGB, device=device)
    if device not in _DECODE_STREAMS:
        _DECODE_STREAMS[device] = torch.cuda.Stream(device)
    side = _DECODE_STREAMS[device]
    with torch.cuda.stream(side):
        images = decode_jpeg(data, mode=ImageReadMode.RGB, device=device)
    step = torch.cuda.current_stream(device)
    step.wait_stream(side)
    for image in images:  # freed later on the step's stream: not reused by a decode before the step is done
        image.record_stream(step)
    return images


def cv2_linear_tables(
    src: torch.Tensor, dst: torch.Tensor, start: torch.Tensor, count: int, border_weights: bool
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """Rows n of (i0, i1, w0, w1): for outputs start[n] .. start[n] + count - 1 of a resize from src[n] to dst[n]
    pixels, the two source pixels and their weights in 1/2048, computed as cv2.resize INTER_LINEAR does.

    OpenCV: x = (float)((d + 0.5) * (1 / (dst / src)) - 0.5) in double then float, i = floor(x), weights
    round((1 - (x - i)) * 2048) and round((x - i) * 2048) in float (half to even). The horizontal pass
    (`border_weights`) clamps i to [0, src - 1] with weight 2048 beyond the borders; the vertical pass keeps
    the weights and clamps the two row indices.
    """
    d = start[:, None] + torch.arange(count, device=start.device)
    scale = 1.0 / (dst.double() / src.double())
    x = ((d.double() + 0.5) * scale[:, None] - 0.5).float()
    i = torch.floor(x)
    frac = x - i
    i = i.long()
    last = (src - 1)[:, None]
    if border_weights:
        frac = torch.where((i < 0) | (i >= last), torch.zeros_like(frac), frac)
    i0, i1 = torch.minimum(i.clamp(min=0), last), torch.minimum((i + 1).clamp(min=0), last)
    scale_w = float(1 << COEF_BITS)
    w0, w1 = torch.round((1.0 - frac) * scale_w).int(), torch.round(frac * scale_w).int()
    return i0, i1, w0, w1


def resample(
    images: Sequence[torch.Tensor], geometry: torch.Tensor, out_hw: tuple[int, int], chunk: int = 64
) -> torch.Tensor:
    """N x 3 x out_h x out_w uint8: each image's box resized as cv2.resize INTER_LINEAR (uint8) does, windowed
    and flipped by its geometry row (GEOMETRY), all images in a few gathers (no loop per image).

    OpenCV's fixed point: the horizontal pass sums pixel x 11-bit weight in int32, the vertical pass (its SIMD
    code) takes the high 16 bits of (h >> 4) x 11-bit weight per row, adds, and rounds with (v + 2) >> 2.
    """
    device, n = geometry.device, len(images)
    out_h, out_w = out_hw
    hw = to_device_async(torch.tensor([tuple(image.shape[-2:]) for image in images], dtype=torch.int64), device)
    height, width = hw[:, 0], hw[:, 1]
    planes = height * width
    base = torch.cumsum(3 * planes, 0) - 3 * planes
    flat = torch.cat([image.reshape(-1) for image in images])
    top, left, box_h, box_w, rh, rw, oy, ox, flip = geometry.long().unbind(1)
    y0, y1, b0, b1 = cv2_linear_tables(box_h, rh, oy, out_h, border_weights=False)
    x0, x1, a0, a1 = cv2_linear_tables(box_w, rw, ox, out_w, border_weights=True)
    y0, y1, x0, x1 = y0 + top[:, None], y1 + top[:, None], x0 + left[:, None], x1 + left[:, None]
    flipped = flip.bool()[:, None]
    x0, x1, a0, a1 = (torch.where(flipped, t.flip(1), t) for t in (x0, x1, a0, a1))
    out = torch.empty((n, 3, out_h, out_w), dtype=torch.uint8, device=device)
    channel = torch.arange(3, device=device)
    for s in range(0, n, chunk):
        k = slice(s, s + chunk)
        plane = (base[k, None] + channel * planes[k, None])[:, :, None, None]  # n x 3 x 1 x 1
        r0 = plane + (y0[k] * width[k, None])[:, None, :, None]  # n x 3 x out_h x 1
        r1 = plane + (y1[k] * width[k, None])[:, None, :, None]
        c0, c1 = x0[k][:, None, None, :], x1[k][:, None, None, :]  # n x 1 x 1 x out_w
        w0, w1 = a0[k][:, None, None, :], a1[k][:, None, None, :]
        h0 = _take(flat, r0 + c0) * w0 + _take(flat, r0 + c1) * w1
        h1 = _take(flat, r1 + c0) * w0 + _take(flat, r1 + c1) * w1
        v = (((h0 >> 4) * b0[k][:, None, :, None]) >> 16) + (((h1 >> 4) * b1[k][:, None, :, None]) >> 16)
        out[k] = ((v + 2) >> 2).clamp(0, 255).to(torch.uint8)
    return out


def to_device_async(tensor: torch.Tensor, device: torch.device) -> torch.Tensor:
    """A host tensor on `device` without waiting for the device: a blocking copy to a GPU synchronises its stream,
    so each loader `next()` would wait out the previous step (the GPU idle while the host prepares the batch, and
    data_wait_frac counting the step's compute). From pinned memory the copy queues behind the step instead (the
    caching host allocator keeps the pinned block until the copy is done)."""
    if device.type != "cuda":
        return tensor.to(device)
    return (tensor if tensor.is_pinned() else tensor.pin_memory()).to(device, non_blocking=True)


def _take(flat: torch.Tensor, index: torch.Tensor) -> torch.Tensor:
    """flat[index] as int32 (index_select: several times faster on CPU than advanced indexing)."""
    return flat.index_select(0, index.reshape(-1)).view(index.shape).int()


class DecodeLoader:
    """Batches of (uint8 N x 3 x H x W on the device, labels): a DataLoader of EncodedDataset items, each batch
    decoded and resampled on `device` when iterated (so its time is the step's wait for data)."""

    def __init__(self, dataset: EncodedDataset, sampler: Any, batch: int, workers: int, device: torch.device) -> None:
        self.dataset, self.sampler, self.device = dataset, sampler, device
        # pinned batches on CUDA: their copies (geometry, labels, worker-decoded images) do not wait (to_device_async)
        self.loader = make_loader(dataset, sampler, batch, workers, pin=device.type == "cuda", collate_fn=collate)

    def __len__(self) -> int:
        return len(self.loader)

    def images(self, batch: EncodedBatch) -> torch.Tensor:
        decoded = decode_images(batch, self.device, self.dataset.path)
        return resample(decoded, to_device_async(batch.geometry, self.device), self.dataset.out_hw)

    def __iter__(self) -> Any:
        for batch in self.loader:
            yield self.images(batch), batch.labels
