"""Estimated wall time of every CIFAR row's full recipe on this machine, from measured training steps.

    python -m benchmarks.row_times [--device cuda] [--steps 20] [overrides ...]

Each row's faithful step (its global batch of 128 in one pass, BN groups of 16) is timed on synthetic
batches; an epoch is the row's steps per epoch (391 for 50,000 images) plus an evaluation pass of 10,000
images, and the recipe is 200 epochs. Data loading is left out: with CIFAR held on the device it is a
gather per step (benchmarks/epoch.py measures whole epochs on real data). --tiny times two rows with
2 x 2 images per step (the CPU test's size: the projection then says nothing about the recipe).
"""

from __future__ import annotations

import argparse
import math
import statistics
import tempfile
import time
from pathlib import Path
from typing import Any

import torch

from benchmarks.common import missing_import, stage_parser, start_stage, sync

TRAIN, TEST = 50_000, 10_000
TINY_ROWS = ("resnet18_8xb16_cifar10", "resnet50_8xb16_cifar100")
TINY = ("recipe.gpus=2", "recipe.batch_per_gpu=2")


def _timed(fn: Any, steps: int, device: torch.device) -> float:
    fn()  # warm-up
    times = []
    for _ in range(steps):
        sync(device)
        start = time.perf_counter()
        fn()
        sync(device)
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def row_time(row: str, device: str, steps: int, overrides: list[str]) -> tuple[float, float, int, int]:
    """(seconds per train step, per eval batch, epochs, images per step) of the row's step on synthetic batches."""
    from resnet_repro.batches import plan
    from resnet_repro.checkpoint import RunFolder
    from resnet_repro.config import compose_row, to_plain
    from resnet_repro.engine import RunInfo, Trainer

    overrides = ["dataset=demo", f"trainer.device={device}", "trainer.num_workers=0", *overrides]
    cfg = to_plain(compose_row(row, overrides))  # the demo's 10 classes: a 100-way head costs the same
    with tempfile.TemporaryDirectory() as tmp:
        trainer = Trainer(cfg, RunInfo(row_name=row, config_hash="benchmark", plan=plan(cfg, 1)), RunFolder(Path(tmp)))
    dev, batch = trainer.device, trainer.plan.device_batch
    images = torch.randint(0, 256, (batch, 3, 32, 32), dtype=torch.uint8, device=dev)
    labels = torch.randint(0, 10, (batch,), device=dev)
    step = _timed(lambda: trainer.train_step(images, labels), steps, dev)
    model = trainer.model.eval()
    with torch.no_grad():
        ev = _timed(lambda: model(trainer.preprocess(images)), steps, dev)
    return step, ev, int(cfg["recipe"]["epochs"]), batch


def build_parser() -> argparse.ArgumentParser:
    parser = stage_parser(__doc__)
    parser.add_argument("--steps", type=int, default=None, help="timed steps per row, median taken (default 3; tiny 1)")
    parser.add_argument("--rows", default=None, help="comma-separated rows (default: every CIFAR row of the table)")
    parser.add_argument("overrides", nargs="*", help="Hydra overrides for every row, e.g. trainer.compile=true")
    return parser


def main(argv: list[str] | None = None) -> None:
    parser = build_parser()
    args, rec, deadline, dev = start_stage(parser, "row_times", argv)
    try:
        from resnet_repro.progress import fmt_time
        from resnet_repro.rows import all_rows
    except ModuleNotFoundError as err:
        rec.skip("all rows", missing_import(err))
        return
    cifar = [r.name for r in all_rows() if r.dataset in ("cifar10", "cifar100")]
    rows = args.rows.split(",") if args.rows else list(TINY_ROWS if args.tiny else cifar)
    if any(r not in cifar for r in rows):
        parser.error(f"--rows {args.rows}: allowed: {', '.join(cifar)}")
    steps = args.steps or (1 if args.tiny else 3)
    overrides = [*(TINY if args.tiny else ()), *args.overrides]
    torch.backends.cudnn.benchmark = True
    for row in rows:
        if deadline.passed(10):
            rec.skip(row, f"not started: {deadline.left():.0f} s left of --max-seconds")
            continue
        with rec.case(row):
            step, ev, epochs, batch = row_time(row, args.device, steps, overrides)
            # a step of `batch` images stands for one of the recipe's 128: the epoch has 391 of them
            epoch = math.ceil(TRAIN / 128) * step + math.ceil(TEST / 128) * ev
            rec.write(
                row,
                images_per_step=batch,
                train_step_ms=round(1e3 * step, 1),
                eval_batch_ms=round(1e3 * ev, 1),
                epoch=fmt_time(epoch),
                full_recipe=fmt_time(epochs * epoch),
                full_recipe_min=round(epochs * epoch / 60, 1),
            )
    rec.print_table()


if __name__ == "__main__":
    main()
