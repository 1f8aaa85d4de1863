"""What every stage of the device check shares: its options, its JSON lines, its time limit, synthetic data.

A stage appends one JSON object per case to `--json FILE`: {"stage", "case", "status", figures..., "device",
"torch"}; status is "ok", "fail" (the case ran and a check failed, or it raised) or "skipped" (with a reason).
gpu_check.py renders those lines as one Markdown table per stage.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import logging
import time
import traceback
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch


def stage_parser(doc: str | None) -> argparse.ArgumentParser:
    """An argument parser with the options every stage takes."""
    parser = argparse.ArgumentParser(description=doc, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--device", choices=["cpu", "cuda"], default="cpu", help="where the measured work runs")
    parser.add_argument("--json", metavar="FILE", help="append one JSON line per case to FILE (the check's results)")
    parser.add_argument(
        "--max-seconds",
        type=float,
        default=None,
        metavar="S",
        help="start no new case (epoch, round) once S seconds have passed since the stage began; default: no limit",
    )
    parser.add_argument(
        "--tiny", action="store_true", help="test sizes: a few images per batch, one or two steps (CPU tests)"
    )
    return parser


def start_stage(
    parser: argparse.ArgumentParser, stage: str, argv: list[str] | None
) -> tuple[argparse.Namespace, Recorder, Deadline, torch.device]:
    """What every stage's main begins with: its options, quiet logs, its recorder, deadline and device."""
    args = parser.parse_args(argv)
    quiet()
    device = torch.device(args.device)
    return args, Recorder(args.json, stage, device), Deadline(args.max_seconds), device


def device_name(device: torch.device) -> str:
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    return f"CPU ({torch.get_num_threads()} threads)"


class Deadline:
    """The stage's soft time limit (the driver's `timeout` is the hard one)."""

    def __init__(self, seconds: float | None) -> None:
        self.start, self.seconds = time.monotonic(), seconds

    def elapsed(self) -> float:
        return time.monotonic() - self.start

    def left(self) -> float:
        return float("inf") if self.seconds is None else self.seconds - self.elapsed()

    def passed(self, needed: float = 0.0) -> bool:
        """True when less than `needed` seconds are left."""
        return self.left() < needed


class Recorder:
    """Appends a stage's results as JSON lines and echoes each one on stdout."""

    def __init__(self, path: str | None, stage: str, device: torch.device) -> None:
        self.path, self.stage = Path(path) if path else None, stage
        self.common = {"device": device_name(device), "torch": torch.__version__}
        self.lines: list[dict[str, Any]] = []

    def write(self, case: str, status: str = "ok", **figures: Any) -> dict[str, Any]:
        line = {"stage": self.stage, "case": case, "status": status, **figures, **self.common}
        text = json.dumps(line, default=str)
        print(text, flush=True)
        self.lines.append(line)
        if self.path is not None:
            with open(self.path, "a") as f:
                f.write(text + "\n")
        return line

    def print_table(self) -> None:
        """The stage's lines as one Markdown table (as the check's summary.md shows them)."""
        from benchmarks.gpu_check import markdown_table

        print(f"\n{self.stage} on {self.common['device']}, torch {self.common['torch']}:\n")
        print(markdown_table(self.lines), flush=True)

    def skip(self, case: str, reason: str) -> None:
        self.write(case, "skipped", reason=reason)

    @contextlib.contextmanager
    def case(self, case: str) -> Iterator[None]:
        """Run one case; an exception becomes a "fail" line with its last line, and the stage goes on."""
        try:
            yield
        except Exception as err:  # a broken case must not lose the stage's other cases
            traceback.print_exc()
            self.write(case, "fail", reason=one_line(err))


def one_line(err: BaseException) -> str:
    text = str(err).strip().splitlines()
    return f"{type(err).__name__}: {text[0][:300] if text else ''}"


CARRIED = ("hydra", "omegaconf", "antlr4", "ptflops")  # the wheels gpu_check.sh --prepare brings along


def missing_import(err: ModuleNotFoundError) -> str:
    name = str(err.name or err)
    hint = " (bash benchmarks/gpu_check.sh --prepare carries it)" if name.split(".")[0] in CARRIED else ""
    return f"needs the module {name!r}, not installed here{hint}"


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def quiet() -> None:
    """Keep the stage logs to what matters (each case's JSON line, warnings)."""
    logging.getLogger("resnet_repro").setLevel(logging.WARNING)


def existing_overrides(candidates: Sequence[str]) -> list[str]:
    """The `key=value` overrides whose key the composed config has: settings another change adds (trainer.tf32,
    trainer.bn_group_kernel) are passed where the code knows them and left out where it does not yet."""
    if not candidates:
        return []
    from omegaconf import OmegaConf

    from resnet_repro.config import compose

    cfg, absent = compose([]), object()
    return [o for o in candidates if OmegaConf.select(cfg, o.split("=", 1)[0], default=absent) is not absent]


@contextlib.contextmanager
def tf32_off() -> Iterator[None]:
    """Full fp32 convolutions and matmuls inside (cuDNN convolutions use TF32 by default on Ampere and later)."""
    matmul, conv = torch.backends.cuda.matmul, torch.backends.cudnn
    if hasattr(matmul, "fp32_precision") and hasattr(conv, "conv"):  # torch >= 2.9: the precision API
        targets = [(matmul, "fp32_precision"), (conv.conv, "fp32_precision")]
        off: Any = "ieee"
    else:
        targets, off = [(matmul, "allow_tf32"), (conv, "allow_tf32")], False
    saved = [getattr(obj, name) for obj, name in targets]
    for obj, name in targets:
        setattr(obj, name, off)
    try:
        yield
    finally:
        for (obj, name), value in zip(targets, saved, strict=True):
            setattr(obj, name, value)


def write_image_folder(root: Path, classes: int, per_class: int, size: int, splits: Sequence[str]) -> Path:
    """`root/<split>/<class>/<i>.jpg`: small random JPEGs (an ImageFolder layout), class-dependent brightness."""
    import cv2

    rng = np.random.default_rng(0)
    for split in splits:
        for c in range(classes):
            folder = root / split / f"c{c:04d}"
            folder.mkdir(parents=True, exist_ok=True)
            for i in range(per_class):
                base = 40 + (c * 170) // max(1, classes - 1)
                img = np.clip(base + rng.normal(0, 20, (size, size, 3)), 0, 255).astype(np.uint8)
                cv2.imwrite(str(folder / f"{i}.jpg"), img)
    return root
