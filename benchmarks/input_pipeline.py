"""The input pipeline of the ImageNet recipes: images/s of the CPU pipeline per loader worker and of the device
pipeline (trainer.decode=device), and the CPU cores each needs to feed one GPU at a given step rate.

    python benchmarks/input_pipeline.py                                  # CPU tensors, about 2 minutes
    python benchmarks/input_pipeline.py --device cuda --json results.jsonl --max-seconds 120

On a synthetic ImageNet-like folder (JPEGs of 500 x 375 or 375 x 500 at quality 90, cut from real photos:
scikit-learn's two and, where installed, scikit-image's) with imagenet-basic-100e's pipelines:
- cpu: one worker's rate for the recipe's train pipeline (OpenCV decode, RandomResizedCrop, flip; the
  per-sample seeding included) and test pipeline (resize 256, center crop 224), one thread;
- device: one worker's rate for its share (read the file, parse the header, draw the crop and flip), and the
  device's rate for the rest (batched decode_jpeg, then the batched cv2-exact resample), separately and
  together;
- the resample against the same function called image by image (the per-image loop it replaces), against
  torchvision.ops.roi_align (aligned=True, sampling_ratio=1: bilinear at OpenCV's sample points, but float
  arithmetic, and it clamps at the image's border, not the crop's) and per-image F.interpolate (bilinear,
  no antialias), with their pixel differences from the exact resample;
- fidelity on this device: decode_jpeg vs cv2.imdecode, and the device pipeline vs the CPU pipeline for the
  same samples and seeds (max and mean absolute difference in levels of 255);
- cores: the step rate / a worker's rate, for either pipeline (the device pipeline also takes the share
  step rate / device rate of each step's time on the device).

--max-seconds bounds the whole run (start-up and the folder included). --json appends one JSON line per case,
{"stage": "input_pipeline", "case", "status", figures..., "device", "torch"}, as each case ends (the lines of
benchmarks/gpu_check's results).
"""

from __future__ import annotations

import argparse
import json
import platform
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import cv2
import numpy as np
import torch
import yaml

from resnet_repro.data import TransformedDataset
from resnet_repro.data.datasets import FileDataset
from resnet_repro.data.device_decode import (
    DecodeLoader,
    EncodedDataset,
    collate,
    decode_images,
    output_size,
    resample,
)
from resnet_repro.data.samplers import sample_seed
from resnet_repro.data.transforms import build_pipeline

REPO = Path(__file__).resolve().parents[1]
STAGE = "input_pipeline"
# one H100's ResNet-50 step rate, bf16 channels_last, eager, batch 256 (DESIGN.md "Facts already checked")
H100_R50_BF16_IMG_S = 3980.0
SHARES = {  # of the time left for measuring, by stage
    "cpu_train": 0.2,
    "cpu_test": 0.1,
    "worker": 0.1,
    "device": 0.3,
    "loop": 0.1,
    "roi_align": 0.1,
    "interpolate": 0.05,
}
RESERVE = 0.15  # of the time left: warm-up calls, which are not counted, and the report


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument(
        "--device", choices=["cpu", "cuda"], default="cpu", help="where the device pipeline runs (default: cpu)"
    )
    parser.add_argument("--json", type=Path, default=None, metavar="FILE", help="append one JSON line per case to FILE")
    parser.add_argument(
        "--max-seconds",
        type=float,
        default=120.0,
        metavar="S",
        help="time for the whole run, start-up and the synthetic folder included (default 120)",
    )
    parser.add_argument(
        "--step-rate",
        type=float,
        default=H100_R50_BF16_IMG_S,
        metavar="IMG_PER_S",
        help=f"images/s one GPU trains at, to feed (default {H100_R50_BF16_IMG_S:.0f}: one H100, ResNet-50 bf16, "
        "DESIGN.md; 1860 for fp32/TF32)",
    )
    parser.add_argument("--images", type=int, default=64, help="JPEGs in the synthetic folder (default 64)")
    parser.add_argument("--batch", type=int, default=None, help="device batch (default: 256 on cuda, 32 on cpu)")
    parser.add_argument("--tiny", action="store_true", help="test sizes: 8 JPEGs, batches of 4 (CPU tests)")
    return parser.parse_args()


# ---- the folder ----------------------------------------------------------------------------------------------


def real_photos() -> list[np.ndarray]:
    """RGB photos shipped by scikit-learn (china, flower) and, where installed, scikit-image."""
    out = []
    try:
        import sklearn.datasets

        folder = Path(sklearn.datasets.__file__).parent / "images"
        out += [cv2.cvtColor(cv2.imread(str(folder / n)), cv2.COLOR_BGR2RGB) for n in ("china.jpg", "flower.jpg")]
    except ImportError:
        pass
    try:
        from skimage import data

        out += [getattr(data, n)() for n in ("astronaut", "coffee", "chelsea", "rocket", "hubble_deep_field")]
    except ImportError:
        pass
    if not out:
        raise SystemExit("input_pipeline.py: needs real photos: pip install scikit-learn (or scikit-image)")
    return out


def make_folder(root: Path, n: int, seed: int = 0) -> FileDataset:
    """n JPEGs of 500 x 375 (a quarter portrait), quality 90: random crops of the photos, resized."""
    rng, photos = np.random.default_rng(seed), real_photos()
    samples = []
    for i in range(n):
        src = photos[i % len(photos)]
        portrait = i % 4 == 3
        aspect = 375 / 500 if not portrait else 500 / 375
        h = int(rng.integers(min(src.shape[0], 200), src.shape[0] + 1))
        w = min(src.shape[1], int(h / aspect))
        h = int(w * aspect)
        top, left = int(rng.integers(0, src.shape[0] - h + 1)), int(rng.integers(0, src.shape[1] - w + 1))
        size = (375, 500) if portrait else (500, 375)
        image = cv2.resize(src[top : top + h, left : left + w], size, interpolation=cv2.INTER_AREA)
        path = root / f"{i:05d}.JPEG"
        cv2.imwrite(str(path), cv2.cvtColor(image, cv2.COLOR_RGB2BGR), [cv2.IMWRITE_JPEG_QUALITY, 90])
        samples.append((str(path), 0))
    return FileDataset(samples, ["synthetic"])


# ---- timing --------------------------------------------------------------------------------------------------


def rate(work: Callable[[int], int], seconds: float, sync: Callable[[], None] = lambda: None) -> float:
    """Items/s of `work(call) -> items done`, called until `seconds` passed (at least twice; the first call,
    a warm-up, is not counted)."""
    work(0)
    sync()
    start, done, call = time.perf_counter(), 0, 1
    while True:
        done += work(call)
        call += 1
        sync()
        elapsed = time.perf_counter() - start
        if elapsed >= seconds:
            return done / elapsed


def one(fetch: Callable[[int], Any]) -> Callable[[int], int]:
    """A work function for `rate` that fetches one sample per call."""
    return lambda call: (fetch(call), 1)[1]


def diff(a: torch.Tensor, b: torch.Tensor) -> dict[str, float]:
    d = (a.int() - b.int()).abs()
    return {"max": int(d.max()), "mean": float(d.float().mean())}


# ---- the measurements ----------------------------------------------------------------------------------------


class Cases:
    """The run's figures by case; each case is appended to --json as one line when it ends."""

    def __init__(self, path: Path | None, device: torch.device) -> None:
        self.path, self.figures = path, {}
        name = torch.cuda.get_device_name(device) if device.type == "cuda" else f"CPU ({platform.machine()}, 1 thread)"
        self.common = {"device": name, "torch": torch.__version__, "opencv": cv2.__version__}

    def write(self, case: str, status: str = "ok", **figures: Any) -> None:
        line = {"stage": STAGE, "case": case, "status": status, **figures, **self.common}
        print(json.dumps(line), flush=True)
        if status == "ok":
            self.figures[case] = figures
        if self.path is not None:
            with open(self.path, "a") as f:
                f.write(json.dumps(line) + "\n")


def measure(args: argparse.Namespace, base: FileDataset, spec: dict[str, Any], deadline: float) -> Cases:
    device = torch.device(args.device)
    cases = Cases(args.json, device)
    sync = torch.cuda.synchronize if device.type == "cuda" else (lambda: None)
    batch, n = args.batch, len(base)
    keys = [(i, sample_seed(0, 0, i)) for i in range(n)]
    cpu_train = TransformedDataset(base, build_pipeline(spec["train_pipeline"]))
    cpu_test = TransformedDataset(base, build_pipeline(spec["test_pipeline"]))
    encoded = EncodedDataset(base, spec["train_pipeline"])
    out_hw = output_size(encoded.steps)
    batches = [collate([encoded[keys[(s + j) % n]] for j in range(batch)]) for s in range(0, n, batch)]
    decoded = [decode_images(b, device, encoded.path) for b in batches]
    geometry = [b.geometry.to(device) for b in batches]
    images, geo = decoded[0], geometry[0]
    exact = resample(images, geo, out_hw)
    cases.write(
        "fidelity", **fidelity(base, batches, decoded, exact, [cpu_train[keys[i % n]][0] for i in range(batch)])
    )

    left = max(0.0, deadline - time.monotonic()) * (1 - RESERVE)
    seconds = {stage: share * left for stage, share in SHARES.items()}
    cases.write(
        "CPU pipeline, per worker",
        train_img_s=rate(one(lambda c: cpu_train[keys[c % n]]), seconds["cpu_train"]),
        test_img_s=rate(one(lambda c: cpu_test[c % n]), seconds["cpu_test"]),
    )
    worker = rate(one(lambda c: encoded[keys[c % n]]), seconds["worker"])
    loader, k = DecodeLoader(encoded, keys, batch, 0, device), len(batches)
    cases.write(
        "device pipeline",
        worker_img_s=worker,
        decode_img_s=rate(
            lambda c: len(decode_images(batches[c % k], device, encoded.path)), seconds["device"] / 3, sync
        ),
        resample_img_s=rate(
            lambda c: len(resample(decoded[c % k], geometry[c % k], out_hw)), seconds["device"] / 3, sync
        ),
        total_img_s=rate(lambda c: len(loader.images(batches[c % k])), seconds["device"] / 3, sync),
    )
    roi, interp = roi_align_resample(images, geo, out_hw), interpolate_resample(images, geo, out_hw)
    cases.write(
        "resample alternatives",
        exact_per_image_loop_img_s=rate(
            lambda c: sum(len(resample([im], geo[i : i + 1], out_hw)) for i, im in enumerate(images)),
            seconds["loop"],
            sync,
        ),
        roi_align_img_s=rate(lambda c: len(roi_align_resample(images, geo, out_hw)), seconds["roi_align"], sync),
        roi_align_vs_exact=diff(roi, exact),
        interpolate_loop_img_s=rate(
            lambda c: len(interpolate_resample(images, geo, out_hw)), seconds["interpolate"], sync
        ),
        interpolate_vs_exact=diff(interp, exact),
    )
    cpu, dev = cases.figures["CPU pipeline, per worker"], cases.figures["device pipeline"]
    cases.write(
        "cores to feed one GPU",
        step_rate_img_s=args.step_rate,
        cpu_pipeline_cores=args.step_rate / cpu["train_img_s"],
        device_pipeline_cores=args.step_rate / dev["worker_img_s"],
        device_pipeline_share_of_device_time=args.step_rate / dev["total_img_s"],
    )
    return cases


def fidelity(
    base: FileDataset, batches: list[Any], decoded: list[list[torch.Tensor]], exact: torch.Tensor, cpu: list[Any]
) -> dict[str, Any]:
    """decode_jpeg on this device vs cv2.imdecode (every image); the device pipeline vs the CPU pipeline (the
    first batch, same seeds)."""
    worst, total, count = 0, 0.0, 0
    for b, images in zip(batches, decoded, strict=True):
        for index, image in zip(b.indices.tolist(), images, strict=True):
            ref = cv2.cvtColor(cv2.imread(base.samples[index][0]), cv2.COLOR_BGR2RGB)
            d = (image.cpu().permute(1, 2, 0).int() - torch.from_numpy(ref).int()).abs()
            worst, total, count = max(worst, int(d.max())), total + float(d.sum()), count + d.numel()
    return {
        "decode_vs_cv2": {"max": worst, "mean": total / count},
        "pipeline_vs_cpu": diff(exact.cpu(), torch.stack(cpu)),
    }


def roi_align_resample(images: list[torch.Tensor], geo: torch.Tensor, out_hw: tuple[int, int]) -> torch.Tensor:
    """torchvision.ops.roi_align on the images padded into one float batch (no flip): bilinear at OpenCV's
    sample points (aligned=True shifts by half a pixel; sampling_ratio=1: one sample per output pixel)."""
    from torchvision.ops import roi_align

    h = max(im.shape[1] for im in images)
    w = max(im.shape[2] for im in images)
    padded = torch.zeros((len(images), 3, h, w), device=geo.device)
    for i, im in enumerate(images):
        padded[i, :, : im.shape[1], : im.shape[2]] = im
    top, left, bh, bw = geo[:, 0], geo[:, 1], geo[:, 2], geo[:, 3]
    boxes = torch.stack([torch.arange(len(images), device=geo.device), left, top, left + bw, top + bh], 1).float()
    out = roi_align(padded, boxes, out_hw, spatial_scale=1.0, sampling_ratio=1, aligned=True)
    flipped = torch.where(geo[:, 8].bool()[:, None, None, None], out.flip(3), out)
    return flipped.round().clamp(0, 255).to(torch.uint8)


def interpolate_resample(images: list[torch.Tensor], geo: torch.Tensor, out_hw: tuple[int, int]) -> torch.Tensor:
    """The per-image loop of F.interpolate (bilinear, align_corners=False, no antialias) on each crop."""
    out = []
    for im, (top, left, bh, bw, *_rest, flip) in zip(images, geo.tolist(), strict=True):
        crop = im[None, :, top : top + bh, left : left + bw].float()
        x = torch.nn.functional.interpolate(crop, size=out_hw, mode="bilinear", align_corners=False)
        out.append(x.flip(3) if flip else x)
    return torch.cat(out).round().clamp(0, 255).to(torch.uint8)


def main() -> None:
    begun = time.monotonic()
    args = parse_args()
    if args.device == "cuda" and not torch.cuda.is_available():
        raise SystemExit("input_pipeline.py: --device cuda, but torch sees no CUDA device")
    if args.tiny:
        args.images, args.batch = 8, 4
    args.batch = args.batch or (256 if args.device == "cuda" else 32)
    torch.set_num_threads(1)  # one loader worker = one core; the device part on CPU tensors too
    cv2.setNumThreads(1)
    spec = yaml.safe_load((REPO / "conf" / "recipe" / "imagenet-basic-100e.yaml").read_text())
    with tempfile.TemporaryDirectory() as tmp:
        cases = measure(args, make_folder(Path(tmp), args.images), spec, begun + args.max_seconds)
    report(args, cases)


def report(args: argparse.Namespace, cases: Cases) -> None:
    f, common = cases.figures, cases.common
    cpu, dev, alt, cores = (
        f[c] for c in ("CPU pipeline, per worker", "device pipeline", "resample alternatives", "cores to feed one GPU")
    )
    fid = f["fidelity"]
    print(
        f"\ninput pipeline of imagenet-basic-100e on {args.device} ({common['device']}), torch {common['torch']}, "
        f"OpenCV {common['opencv']}; {args.images} JPEGs of 500 x 375 q90, device batch {args.batch}\n"
    )
    print("| stage | images/s |\n| :-- | --: |")
    for label, value in (
        ("CPU pipeline, train (decode + RandomResizedCrop + flip), per worker", cpu["train_img_s"]),
        ("CPU pipeline, test (decode + resize 256 + crop 224), per worker", cpu["test_img_s"]),
        ("device pipeline, worker share (read + header + draws), per worker", dev["worker_img_s"]),
        ("device: batched decode_jpeg", dev["decode_img_s"]),
        ("device: batched cv2-exact resample", dev["resample_img_s"]),
        ("device: decode + resample", dev["total_img_s"]),
        ("cv2-exact resample, image by image", alt["exact_per_image_loop_img_s"]),
        ("roi_align (padded float batch)", alt["roi_align_img_s"]),
        ("F.interpolate, image by image", alt["interpolate_loop_img_s"]),
    ):
        print(f"| {label} | {value:,.0f} |")
    roi, interp = alt["roi_align_vs_exact"], alt["interpolate_vs_exact"]
    print(
        f"\nresample differences from cv2-exact (max / mean levels): roi_align {roi['max']} / {roi['mean']:.3f}, "
        f"F.interpolate {interp['max']} / {interp['mean']:.3f}"
    )
    dec, pipe = fid["decode_vs_cv2"], fid["pipeline_vs_cpu"]
    print(
        f"fidelity here: decode_jpeg vs cv2.imdecode {dec['max']} / {dec['mean']:.4f}, device vs CPU pipeline "
        f"{pipe['max']} / {pipe['mean']:.4f}"
    )
    print(
        f"to feed one GPU at {cores['step_rate_img_s']:,.0f} img/s: {cores['cpu_pipeline_cores']:.1f} cores with "
        f"the CPU pipeline; {cores['device_pipeline_cores']:.1f} cores with the device pipeline, which also takes "
        f"{cores['device_pipeline_share_of_device_time']:.0%} of the device's time at that rate"
    )


if __name__ == "__main__":
    main()
