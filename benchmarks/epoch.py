"""Real epochs of a row end to end (loader or device-resident data, steps, evaluation), without MLflow
(tracking.uri=none: a bare GPU machine has none) or checkpoints: the time a real run spends per epoch, its val
top-1, and what the row's full recipe would take.

    python -m benchmarks.epoch --data <extracted CIFAR-10 JPEGs> --device cuda --max-seconds 240
    python -m benchmarks.epoch --data <...> --epochs 2 trainer.forward_batch=16 trainer.data_on_device=false

The run is the row (`--row`, default resnet18_8xb16_cifar10) on the image folder `--data` (train/, test/),
its first epochs of the recipe's schedule, as many as `--epochs` and `--max-seconds` allow (an epoch is not
started when the last one's time would pass the limit). The first epoch pays one-off costs (cudnn autotuning,
compilation, CUDA graph capture); the estimate uses the last epoch. --tiny runs one epoch of 2 steps of
2 x 4 images (the CPU test's size).
"""

from __future__ import annotations

import argparse
import math
import tempfile
import time
from pathlib import Path

from benchmarks.common import Deadline, Recorder, missing_import, stage_parser, start_stage

TINY = ("recipe.gpus=2", "recipe.batch_per_gpu=4", "trainer.limit_train_batches=2", "trainer.num_workers=0")


def build_parser() -> argparse.ArgumentParser:
    parser = stage_parser(__doc__)
    parser.add_argument("--data", required=True, help="image folder root with train/<class>/* and test/<class>/*")
    parser.add_argument("--row", default="resnet18_8xb16_cifar10", help="the table row to train (a CIFAR-10 row)")
    parser.add_argument("--epochs", type=int, default=None, help="at most this many epochs (default: 200; tiny 1)")
    parser.add_argument("overrides", nargs="*", help="Hydra overrides of the row, as for python -m resnet_repro")
    return parser


def main(argv: list[str] | None = None) -> None:
    parser = build_parser()
    args, rec, deadline, dev = start_stage(parser, "epoch", argv)
    try:
        run(args, rec, deadline)
    except ModuleNotFoundError as err:  # e.g. hydra-core where gpu_check.sh --prepare's wheels did not come along
        rec.skip(args.row, missing_import(err))
    rec.print_table()


def run(args: argparse.Namespace, rec: Recorder, deadline: Deadline) -> None:
    from resnet_repro.checkpoint import RunFolder
    from resnet_repro.config import compose_row, to_plain, validate
    from resnet_repro.engine import RunInfo, Trainer
    from resnet_repro.progress import fmt_time

    overrides = [
        "dataset.format=imagefolder",
        f"dataset.root={Path(args.data).resolve()}",
        f"trainer.device={args.device}",
        "trainer.checkpoints=none",
        "tracking.uri=none",
        *(TINY if args.tiny else ()),
        *args.overrides,
    ]
    cfg = compose_row(args.row, overrides)
    info = RunInfo(row_name=cfg.row_name, config_hash="benchmark", plan=validate(cfg))
    start = time.perf_counter()
    with tempfile.TemporaryDirectory() as tmp:
        trainer = Trainer(to_plain(cfg), info, RunFolder(Path(tmp)))
    setup = time.perf_counter() - start
    plan, data = trainer.plan, trainer.data
    rec.write(
        "set-up",
        seconds=round(setup, 1),
        train_images=data.num_train,
        data_on_device=data.on_device,
        step=f"{plan.accum_steps} pass x {plan.forward_batch}, BN {plan.bn_group}",
    )
    epochs = min(args.epochs or (1 if args.tiny else trainer.epochs), trainer.epochs)
    last = None
    for epoch in range(epochs):
        if last is not None and deadline.passed(1.15 * last + 5):
            rec.skip(f"epoch {epoch + 1}", f"not started: {deadline.left():.0f} s left, an epoch takes {last:.0f} s")
            break
        t0 = time.perf_counter()
        train = trainer.train_one_epoch(epoch)
        t1 = time.perf_counter()
        val = trainer.evaluate()
        t2 = time.perf_counter()
        last = t2 - t0
        rec.write(
            f"epoch {epoch + 1}",
            train_s=round(t1 - t0, 1),
            eval_s=round(t2 - t1, 1),
            img_s=round(train["train_img_per_s"]),
            train_loss=round(train["train_loss"], 4),
            lr=train["lr"],
            **{k: round(v, 2) for k, v in val.items()},
        )
    if last is None:
        return
    # a limited epoch (trainer.limit_*_batches) is scaled to the whole split: train steps and eval batches
    val_batches = math.ceil(len(data.val.dataset) / plan.device_batch)
    full = (t1 - t0) * len(data.train) / trainer.steps + (t2 - t1) * val_batches / len(data.val)
    rec.write(
        "estimate",
        epoch_s=round(full, 1),
        epochs=trainer.epochs,
        full_recipe=fmt_time(trainer.epochs * full),
        full_recipe_min=round(trainer.epochs * full / 60, 1),
    )


if __name__ == "__main__":
    main()
