"""RandAugment of the RSB recipes (mmpretrain's `timm_increasing` policies), through timm's implementation.

timm's `rand_augment_transform` with `inc1` is the policy mmpretrain copied: the same 15 ops and
magnitude ranges, 2 ops drawn uniformly with replacement, each applied with p=0.5, magnitude
~ N(M, std) clipped to [0, 10], a random sign for the signed ops. The op kernels are Pillow's
(mmpretrain runs mmcv's NumPy versions of the same ops, which can differ by rounding).
timm draws from Python's `random` and NumPy; torch's DataLoader seeds both in every worker.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
from PIL import Image
from timm.data.auto_augment import rand_augment_transform

PIL_INTERP = {"nearest": Image.NEAREST, "bilinear": Image.BILINEAR, "bicubic": Image.BICUBIC}


class RandAugment:
    """uint8 HxWx3 RGB array in, same kind out. `fill` is RGB (mmpretrain's BGR pad_val reversed)."""

    def __init__(
        self,
        num_ops: int = 2,
        magnitude: int = 9,
        magnitude_std: float = 0.5,
        prob: float = 0.5,
        increasing: bool = True,
        fill: Sequence[int] = (128, 128, 128),
        interpolation: str = "bicubic",
    ) -> None:
        if int(magnitude) != magnitude:
            raise ValueError(f"rand_augment magnitude={magnitude}: timm takes an integer level")
        # the interpolation is pinned: without it timm picks bilinear or bicubic at random per op
        hparams = {"img_mean": tuple(int(v) for v in fill), "interpolation": PIL_INTERP[interpolation]}
        spec = f"rand-m{int(magnitude)}-n{int(num_ops)}-mstd{float(magnitude_std)}-p{float(prob)}-inc{int(increasing)}"
        self.transform = rand_augment_transform(spec, hparams)

    def __call__(self, img: np.ndarray) -> np.ndarray:
        out = self.transform(Image.fromarray(np.ascontiguousarray(img)))
        return np.array(out, dtype=np.uint8)

    def __repr__(self) -> str:
        return repr(self.transform)
