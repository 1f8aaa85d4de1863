"""Real epochs of a row end to end (loader or device-resident data, steps, evaluation), without MLflow or
checkpoints: the time a real run spends per epoch, and what the row's full recipe would take at that rate.

    python benchmarks/epoch.py --epochs 2 model=resnet18 dataset=cifar10 dataset.format=imagefolder \
        dataset.root=<extracted CIFAR-10 JPEGs> trainer.device=cuda
    # the step as it ran before BN groups and device-resident data:
    ... trainer.forward_batch=16 trainer.data_on_device=false

The first epoch pays one-off costs (cudnn autotuning, compilation, CUDA graph capture); with --epochs 2 the
estimate uses the last epoch.
"""

from __future__ import annotations

import argparse
import math
import tempfile
import time
from pathlib import Path

from resnet_repro.checkpoint import RunFolder
from resnet_repro.config import compose, to_plain, validate
from resnet_repro.engine import RunInfo, Trainer
from resnet_repro.progress import fmt_time


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--epochs", type=int, default=1, help="epochs to measure (the last one is reported)")
    parser.add_argument("overrides", nargs="*", help="Hydra overrides of the row, as for python -m resnet_repro")
    args = parser.parse_args()
    cfg = compose(args.overrides)
    validate(cfg)
    start = time.perf_counter()
    with tempfile.TemporaryDirectory() as tmp:
        trainer = Trainer(to_plain(cfg), RunInfo(row_name=cfg.row_name, config_hash="benchmark"), RunFolder(Path(tmp)))
    setup = time.perf_counter() - start
    plan, data = trainer.plan, trainer.data
    print(
        f"{cfg.row_name} on {trainer.device} ({data.num_train} train images, data on device: {data.on_device}): "
        f"{plan.accum_steps} forward pass(es) of {plan.forward_batch} per step, BN groups of {plan.bn_group}; "
        f"set-up {setup:.1f} s",
        flush=True,
    )
    for epoch in range(args.epochs):
        t0 = time.perf_counter()
        train = trainer.train_one_epoch(epoch)
        t1 = time.perf_counter()
        val = trainer.evaluate()
        t2 = time.perf_counter()
        print(
            f"  epoch {epoch + 1}: train {t1 - t0:.1f} s ({train['train_img_per_s']:,.0f} img/s, loss "
            f"{train['train_loss']:.4f}), eval {t2 - t1:.1f} s, epoch {t2 - t0:.1f} s; "
            + ", ".join(f"{k} {v:.2f}" for k, v in val.items()),
            flush=True,
        )
    # a limited epoch (trainer.limit_*_batches) is scaled to the whole split: train steps and eval batches
    val_batches = math.ceil(len(data.val.dataset) / plan.device_batch)
    full = (t1 - t0) * len(data.train) / trainer.steps + (t2 - t1) * val_batches / len(data.val)
    epochs = int(cfg.recipe.epochs)
    print(f"  estimate: an epoch of the whole split {full:.0f} s; {epochs} epochs {fmt_time(epochs * full)}")


if __name__ == "__main__":
    main()
