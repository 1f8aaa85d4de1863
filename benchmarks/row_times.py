"""Estimated wall time of every CIFAR row's full recipe on this machine, from measured training steps.

    python benchmarks/row_times.py [--device cuda] [--steps 20] [overrides ...]

Each row's faithful step (its global batch of 128 in one pass, BN groups of 16) is timed on synthetic
batches; an epoch is the row's steps per epoch (391 for 50,000 images) plus an evaluation pass of 10,000
images, and the recipe is 200 epochs. Data loading is left out: with CIFAR held on the device it is a
gather per step (benchmarks/epoch.py measures whole epochs on real data).
"""

from __future__ import annotations

import argparse
import math
import statistics
import tempfile
import time
from pathlib import Path

import torch

from resnet_repro.checkpoint import RunFolder
from resnet_repro.config import compose_row, to_plain
from resnet_repro.engine import RunInfo, Trainer
from resnet_repro.progress import fmt_time
from resnet_repro.rows import Row, all_rows

TRAIN, TEST = 50_000, 10_000


def _timed(fn, steps: int, device: torch.device) -> float:
    fn()  # warm-up
    times = []
    for _ in range(steps):
        if device.type == "cuda":
            torch.cuda.synchronize()
        start = time.perf_counter()
        fn()
        if device.type == "cuda":
            torch.cuda.synchronize()
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def row_time(row: Row, device: str, steps: int, overrides: list[str]) -> tuple[float, float, int]:
    """(seconds per train step, per eval batch, epochs) of the row's faithful step on synthetic batches."""
    overrides = ["dataset=demo", f"trainer.device={device}", "trainer.num_workers=0", *overrides]
    cfg = to_plain(compose_row(row.name, overrides))  # the demo's 10 classes: a 100-way head costs the same
    with tempfile.TemporaryDirectory() as tmp:
        trainer = Trainer(cfg, RunInfo(row_name=row.name, config_hash="benchmark"), RunFolder(Path(tmp)))
    dev, batch = trainer.device, trainer.plan.device_batch
    images = torch.randint(0, 256, (batch, 3, 32, 32), dtype=torch.uint8, device=dev)
    labels = torch.randint(0, 10, (batch,), device=dev)
    step = _timed(lambda: trainer.train_step(images, labels), steps, dev)
    model = trainer.model.eval()
    with torch.no_grad():
        ev = _timed(lambda: model(trainer.preprocess(images)), steps, dev)
    return step, ev, int(cfg["recipe"]["epochs"])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--device", default="cpu", choices=["cpu", "cuda"])
    parser.add_argument("--steps", type=int, default=3)
    parser.add_argument("overrides", nargs="*")
    args = parser.parse_args()
    torch.backends.cudnn.benchmark = True
    print(f"device: {torch.cuda.get_device_name() if args.device == 'cuda' else 'CPU'}")
    print("| row | train step ms | eval batch ms | epoch | full recipe |\n| :-- | --: | --: | --: | --: |")
    for row in (r for r in all_rows() if r.dataset in ("cifar10", "cifar100")):
        step, ev, epochs = row_time(row, args.device, args.steps, args.overrides)
        epoch = math.ceil(TRAIN / 128) * step + math.ceil(TEST / 128) * ev
        print(
            f"| `{row.name}` | {1e3 * step:.1f} | {1e3 * ev:.1f} | {fmt_time(epoch)} | {fmt_time(epochs * epoch)} |",
            flush=True,
        )


if __name__ == "__main__":
    main()
