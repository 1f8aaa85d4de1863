"""One training epoch and one evaluation of a row on real data, end to end (loader, steps, evaluation),
without MLflow or checkpoints: the throughput a real run gets.

    python benchmarks/epoch.py model=resnet18 dataset=cifar10 dataset.format=imagefolder \
        dataset.root=<extracted CIFAR-10 JPEGs> trainer.device=cuda [trainer.micro_batch=128]
"""

from __future__ import annotations

import sys
import time

from resnet_repro.config import compose, to_plain, validate
from resnet_repro.engine import RunInfo, Trainer


def main(overrides: list[str]) -> None:
    cfg = compose(overrides)
    validate(cfg)
    trainer = Trainer(to_plain(cfg), RunInfo(row_name=cfg.row_name, config_hash="benchmark"))
    start = time.perf_counter()
    train = trainer.train_one_epoch(0)
    mid = time.perf_counter()
    val = trainer.evaluate()
    end = time.perf_counter()
    ours, recipe = trainer.bn_batch()
    print(
        f"{cfg.row_name} on {trainer.device}: batch {trainer.global_batch} in micro-batches of {trainer.micro_batch} "
        f"(BN over {ours}, recipe {recipe})"
    )
    print(
        f"  train epoch {mid - start:.1f} s, {train['train_img_per_s']:.0f} img/s, loss {train['train_loss']:.4f}; "
        f"eval {end - mid:.1f} s; " + ", ".join(f"{k} {v:.2f}" for k, v in val.items()),
        flush=True,
    )


if __name__ == "__main__":
    main(sys.argv[1:])
