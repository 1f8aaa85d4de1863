"""The recipes' image pipelines, on uint8 HxWx3 RGB arrays, with the resize backend each recipe names.

mmpretrain decodes with OpenCV and resizes with OpenCV or Pillow as the recipe says; the two give
slightly different pixels, and torchvision's tensor resize (antialiased or not) matches neither,
so the geometric steps are written here over cv2 / PIL. Random parameters come from torchvision's
samplers (`RandomResizedCrop.get_params`, the same distribution as mmpretrain's) and torch's RNG,
which the DataLoader seeds per worker. Normalisation happens later, on the device (engine).

A pipeline is a list of `{type: name, **kwargs}` entries (conf/recipe/*.yaml: train_pipeline).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

import cv2
import numpy as np
import torch
from PIL import Image
from torchvision.transforms import RandomResizedCrop as _TVRandomResizedCrop

from resnet_repro.data.randaugment import RandAugment

Array = np.ndarray
CV2_INTERP = {
    "nearest": cv2.INTER_NEAREST,
    "bilinear": cv2.INTER_LINEAR,
    "bicubic": cv2.INTER_CUBIC,
    "area": cv2.INTER_AREA,
    "lanczos": cv2.INTER_LANCZOS4,
}
PIL_INTERP = {
    "nearest": Image.NEAREST,
    "bilinear": Image.BILINEAR,
    "bicubic": Image.BICUBIC,
    "box": Image.BOX,
    "lanczos": Image.LANCZOS,
}


def resize(img: Array, size_hw: tuple[int, int], interpolation: str, backend: str) -> Array:
    h, w = size_hw
    if backend == "cv2":
        return cv2.resize(img, (w, h), interpolation=CV2_INTERP[interpolation])
    if backend == "pillow":
        return np.asarray(Image.fromarray(img).resize((w, h), PIL_INTERP[interpolation]))
    raise ValueError(f"backend={backend!r}; allowed: cv2, pillow")


def _randint(high: int) -> int:
    """Uniform integer in [0, high] from torch's RNG."""
    return int(torch.randint(0, high + 1, (1,)).item())


class RandomResizedCrop:
    """Crop a random area (scale) and aspect (log-uniform ratio), then resize to `size`."""

    def __init__(
        self,
        size: int,
        scale: Sequence[float] = (0.08, 1.0),
        ratio: Sequence[float] = (3 / 4, 4 / 3),
        interpolation: str = "bilinear",
        backend: str = "cv2",
    ) -> None:
        self.size, self.scale, self.ratio = int(size), tuple(scale), tuple(ratio)
        self.interpolation, self.backend = interpolation, backend

    def params(self, height: int, width: int) -> tuple[int, int, int, int]:
        """(top, left, h, w) of the crop, drawn from torch's RNG (shared with data.device_decode's draws)."""
        # get_params reads only the image size: a zero-element tensor of that size stands in for it
        shape = torch.empty((0, height, width))
        return tuple(_TVRandomResizedCrop.get_params(shape, list(self.scale), list(self.ratio)))  # type: ignore[return-value]

    def __call__(self, img: Array) -> Array:
        top, left, h, w = self.params(img.shape[0], img.shape[1])
        crop = img[top : top + h, left : left + w]
        return resize(crop, (self.size, self.size), self.interpolation, self.backend)


class ResizeShort:
    """Resize the short edge to `size`; the long edge becomes int(size * long / short)."""

    def __init__(self, size: int, interpolation: str = "bilinear", backend: str = "cv2") -> None:
        self.size, self.interpolation, self.backend = int(size), interpolation, backend

    def target(self, h: int, w: int) -> tuple[int, int]:
        return (self.size, int(self.size * w / h)) if h <= w else (int(self.size * h / w), self.size)

    def __call__(self, img: Array) -> Array:
        return resize(img, self.target(*img.shape[:2]), self.interpolation, self.backend)


class Resize:
    """Resize to exactly `size` = [h, w] (or an int for a square), ignoring the aspect ratio."""

    def __init__(self, size: int | Sequence[int], interpolation: str = "bilinear", backend: str = "cv2") -> None:
        self.size = (int(size), int(size)) if isinstance(size, int) else (int(size[0]), int(size[1]))
        self.interpolation, self.backend = interpolation, backend

    def __call__(self, img: Array) -> Array:
        return resize(img, self.size, self.interpolation, self.backend)


class CenterCrop:
    def __init__(self, size: int) -> None:
        self.size = int(size)

    def offsets(self, h: int, w: int) -> tuple[int, int]:
        return max(0, int(round((h - self.size) / 2.0))), max(0, int(round((w - self.size) / 2.0)))

    def __call__(self, img: Array) -> Array:
        top, left = self.offsets(*img.shape[:2])
        return img[top : top + self.size, left : left + self.size]


class RandomCrop:
    """Zero-pad `padding` px on every side, then crop `size` x `size` at a random offset."""

    def __init__(self, size: int, padding: int = 0) -> None:
        self.size, self.padding = int(size), int(padding)

    def __call__(self, img: Array) -> Array:
        if self.padding:
            p = self.padding
            img = cv2.copyMakeBorder(img, p, p, p, p, cv2.BORDER_CONSTANT, value=(0, 0, 0))
        top, left = self.offsets(*img.shape[:2])
        return img[top : top + self.size, left : left + self.size]

    def offsets(self, h: int, w: int) -> tuple[int, int]:
        """(top, left) in the padded image of h x w, drawn from torch's RNG."""
        return _randint(h - self.size), _randint(w - self.size)


class HFlip:
    def __init__(self, p: float = 0.5) -> None:
        self.p = float(p)

    def draw(self) -> bool:
        return torch.rand(1).item() < self.p

    def __call__(self, img: Array) -> Array:
        return img[:, ::-1] if self.draw() else img


TRANSFORMS: dict[str, Callable[..., Callable[[Array], Array]]] = {
    "random_resized_crop": RandomResizedCrop,
    "resize_short": ResizeShort,
    "resize": Resize,
    "center_crop": CenterCrop,
    "random_crop": RandomCrop,
    "hflip": HFlip,
    "rand_augment": RandAugment,
}


class Pipeline:
    """Apply the steps in order; return a contiguous uint8 3xHxW tensor."""

    def __init__(self, steps: Sequence[Callable[[Array], Array]]) -> None:
        self.steps = list(steps)

    def __call__(self, img: Array) -> torch.Tensor:
        for step in self.steps:
            img = step(img)
        return torch.from_numpy(np.ascontiguousarray(img.transpose(2, 0, 1)))


def build_pipeline(specs: Sequence[dict[str, Any]]) -> Pipeline:
    steps = []
    for spec in specs:
        spec = dict(spec)
        name = spec.pop("type")
        if name not in TRANSFORMS:
            raise ValueError(f"unknown transform type={name!r}; allowed: {', '.join(TRANSFORMS)}")
        steps.append(TRANSFORMS[name](**spec))
    return Pipeline(steps)
