"""The trainer's training step against a plain PyTorch loop, same model, batch and device, same process.

    python benchmarks/train_step.py                      # CPU: resnet18 CIFAR stem @32 b128, resnet50 @224 b8
    python benchmarks/train_step.py --device cuda        # GPU sizes: b128 CIFAR, b256 @224 (bf16 too)

The plain loop is what one writes by hand: float inputs already normalised on the device, forward,
cross-entropy, backward, SGD step (with torch's GradScaler for float16). The trainer's step also
converts the uint8 batch on the device and runs its precision / accumulation logic. Both run `--rounds` alternating
rounds of `--iters` steps after warm-up; the ratio is the median trainer time over the median plain
time (the trainer may not be more than 5% slower: ratio <= 1.05).
"""

from __future__ import annotations

import argparse
import copy
import statistics
import time
from collections.abc import Callable

import torch
import torch.nn.functional as F

from resnet_repro.config import compose, to_plain
from resnet_repro.engine import RunInfo, Trainer

CASES = {
    "cpu": [
        ("resnet18-cifar", ["model=resnet18", "stem=cifar"], 32, 128, "fp32"),
        ("resnet50", ["model=resnet50", "stem=v1b"], 224, 8, "fp32"),
    ],
    "cuda": [
        ("resnet18-cifar", ["model=resnet18", "stem=cifar"], 32, 128, "fp32"),
        ("resnet18-cifar", ["model=resnet18", "stem=cifar"], 32, 512, "bf16"),
        ("resnet50", ["model=resnet50", "stem=v1b"], 224, 256, "fp32"),
        ("resnet50", ["model=resnet50", "stem=v1b"], 224, 256, "bf16"),
        ("resnet50", ["model=resnet50", "stem=v1b"], 224, 256, "amp-fp16-static512"),
    ],
}


def make_trainer(groups: list[str], batch: int, precision: str, device: str) -> Trainer:
    # dataset=demo keeps construction offline; the step itself is fed synthetic batches of any size
    overrides = [
        "dataset=demo",
        *groups,
        f"precision={precision}",
        "recipe.gpus=1",
        f"recipe.batch_per_gpu={batch}",
        f"trainer.device={device}",
        "trainer.num_workers=0",
    ]
    cfg = to_plain(compose(overrides))
    return Trainer(cfg, RunInfo(row_name="benchmark", config_hash="benchmark"))


def plain_step_fn(trainer: Trainer) -> Callable[[torch.Tensor, torch.Tensor], None]:
    """A hand-written loop on a copy of the trainer's model, with the same optimizer settings."""
    model = copy.deepcopy(trainer.model).train()
    opt_cfg = trainer.recipe["optimizer"]
    opt = torch.optim.SGD(
        model.parameters(), lr=opt_cfg["lr"], momentum=opt_cfg["momentum"], weight_decay=opt_cfg["weight_decay"]
    )
    dtype = trainer.autocast_dtype
    # a hand-written float16 loop scales its loss too (torch's GradScaler, dynamic)
    scaler = torch.amp.GradScaler(trainer.device.type) if trainer.scaler is not None else None

    def step(x: torch.Tensor, y: torch.Tensor) -> None:
        with torch.autocast(x.device.type, dtype=dtype, enabled=dtype is not None):
            loss = F.cross_entropy(model(x), y)
        if scaler is None:
            loss.backward()
            opt.step()
        else:
            scaler.scale(loss).backward()
            scaler.step(opt)
            scaler.update()
        opt.zero_grad(set_to_none=True)

    return step


def timed(fn: Callable[[], None], iters: int, device: torch.device) -> float:
    if device.type == "cuda":
        torch.cuda.synchronize()
    start = time.perf_counter()
    for _ in range(iters):
        fn()
    if device.type == "cuda":
        torch.cuda.synchronize()
    return (time.perf_counter() - start) / iters


def bench(
    name: str, groups: list[str], px: int, batch: int, precision: str, device: str, iters: int, rounds: int
) -> dict[str, float | str]:
    trainer = make_trainer(groups, batch, precision, device)
    dev = trainer.device
    images = torch.randint(0, 256, (batch, 3, px, px), dtype=torch.uint8, device=dev)
    labels = torch.randint(0, 10, (batch,), device=dev)
    x = trainer.preprocess(images)  # the plain loop gets its input normalised already
    plain = plain_step_fn(trainer)
    ours_fn, plain_fn = (lambda: trainer.train_step(images, labels)), (lambda: plain(x, labels))
    for fn in (ours_fn, plain_fn):
        timed(fn, max(2, iters // 2), dev)  # warm-up (cudnn autotuning, allocator)
    ours, base = [], []
    for _ in range(rounds):
        ours.append(timed(ours_fn, iters, dev))
        base.append(timed(plain_fn, iters, dev))
    t_ours, t_base = statistics.median(ours), statistics.median(base)
    return {
        "case": f"{name} @{px} b{batch} {precision}",
        "device": str(dev),
        "plain_ms": 1e3 * t_base,
        "trainer_ms": 1e3 * t_ours,
        "ratio": t_ours / t_base,
        "img_s": batch / t_ours,
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--device", default="cpu", choices=["cpu", "cuda"])
    parser.add_argument("--iters", type=int, default=5)
    parser.add_argument("--rounds", type=int, default=5)
    args = parser.parse_args()
    torch.backends.cudnn.benchmark = True
    print(f"{'case':44} {'device':8} {'plain ms':>9} {'trainer ms':>11} {'ratio':>6} {'img/s':>8}")
    for case in CASES[args.device]:
        r = bench(*case, device=args.device, iters=args.iters, rounds=args.rounds)
        print(
            f"{r['case']:44} {r['device']:8} {r['plain_ms']:9.1f} {r['trainer_ms']:11.1f} {r['ratio']:6.3f} "
            f"{r['img_s']:8.0f}",
            flush=True,
        )


if __name__ == "__main__":
    main()
