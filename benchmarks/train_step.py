"""The trainer's training step against a plain PyTorch loop, same model, batch and device, same process.

    python benchmarks/train_step.py                      # CPU
    python benchmarks/train_step.py --device cuda        # GPU sizes (b128 CIFAR, b256 @224, bf16 and fp16 too)

The plain loop is what one writes by hand: float inputs already normalised on the device, forward with
ordinary BatchNorm over the whole batch, cross-entropy, backward, SGD step (GradScaler for float16). The
trainer's steps convert the uint8 batch on the device and run the recipe's batch plan:
- `faithful` is resnet18_8xb16_cifar10's step: 128 images in one pass, BatchNorm over groups of 16 (the
  recipe's 8 GPUs x 16), BN running statistics from the first group (bn_groups.py);
- `accumulate` is the same step as 8 forward passes of 16 (trainer.forward_batch=16; how every faithful
  step ran before BN groups);
- the others are plain-BN steps of the whole batch (e.g. the recipe's 256 on one GPU with micro_batch=256).
Each case runs `--rounds` alternating rounds of `--iters` steps after warm-up; `speed` is the plain loop's
median time over the trainer's (1.0 = as fast as the hand-written loop; the target is >= 0.9).
"""

from __future__ import annotations

import argparse
import statistics
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

import torch
import torch.nn.functional as F

from resnet_repro.checkpoint import RunFolder
from resnet_repro.config import compose, to_plain
from resnet_repro.engine import RunInfo, Trainer

R18 = ["model=resnet18", "stem=cifar", "dataset=demo", "recipe=cifar-200e"]
R50 = ["model=resnet50", "stem=v1b", "dataset=demo", "recipe=cifar-200e"]
FAITHFUL = ["recipe.gpus=8", "recipe.batch_per_gpu=16"]
CASES = {  # name, overrides, input px, batch
    "cpu": [
        ("resnet18 CIFAR faithful (BN groups of 16)", [*R18, *FAITHFUL], 32, 128),
        ("resnet18 CIFAR accumulate (8 passes of 16)", [*R18, *FAITHFUL, "trainer.forward_batch=16"], 32, 128),
        ("resnet50 @224 b8", [*R50, "recipe.gpus=1", "recipe.batch_per_gpu=8"], 224, 8),
    ],
    "cuda": [
        ("resnet18 CIFAR faithful (BN groups of 16)", [*R18, *FAITHFUL], 32, 128),
        ("resnet18 CIFAR faithful, compiled", [*R18, *FAITHFUL, "trainer.compile=true"], 32, 128),
        ("resnet18 CIFAR faithful, CUDA graphs", [*R18, *FAITHFUL, "trainer.compile=reduce-overhead"], 32, 128),
        ("resnet18 CIFAR accumulate (8 passes of 16)", [*R18, *FAITHFUL, "trainer.forward_batch=16"], 32, 128),
        ("resnet18 CIFAR b512 bf16", [*R18, "recipe.gpus=1", "recipe.batch_per_gpu=512", "precision=bf16"], 32, 512),
        ("resnet50 @224 b256 fp32", [*R50, "recipe.gpus=1", "recipe.batch_per_gpu=256"], 224, 256),
        ("resnet50 @224 b256 bf16", [*R50, "recipe.gpus=1", "recipe.batch_per_gpu=256", "precision=bf16"], 224, 256),
        (
            "resnet50 @224 b256 fp16 static 512",
            [*R50, "recipe.gpus=1", "recipe.batch_per_gpu=256", "precision=amp-fp16-static512"],
            224,
            256,
        ),
    ],
}


def make_trainer(overrides: list[str], device: str, folder: Path) -> Trainer:
    # dataset=demo keeps construction offline; the step itself is fed synthetic batches of any size
    cfg = to_plain(compose([*overrides, f"trainer.device={device}", "trainer.num_workers=0"]))
    return Trainer(cfg, RunInfo(row_name="benchmark", config_hash="benchmark"), RunFolder(folder))


def plain_step_fn(trainer: Trainer) -> Callable[[torch.Tensor, torch.Tensor], None]:
    """A hand-written loop on a fresh model of the same architecture, ordinary BN, the same optimizer settings."""
    from resnet_repro.models import build_model_from_cfg

    model = build_model_from_cfg(trainer.cfg).to(trainer.device).train()
    if trainer.device.type == "cuda":
        model = model.to(memory_format=torch.channels_last)
    if trainer.cfg["trainer"]["compile"] is not False:
        mode = trainer.cfg["trainer"]["compile"]
        model = torch.compile(model, mode=None if mode is True else mode)
    opt_cfg = trainer.recipe["optimizer"]
    opt = torch.optim.SGD(
        model.parameters(), lr=opt_cfg["lr"], momentum=opt_cfg["momentum"], weight_decay=opt_cfg["weight_decay"]
    )
    dtype = trainer.precision.dtype
    scaler = torch.amp.GradScaler(trainer.device.type) if trainer.precision.scaler is not None else None

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


def timed(fn: Callable[[], object], iters: int, device: torch.device) -> float:
    if device.type == "cuda":
        torch.cuda.synchronize()
    start = time.perf_counter()
    for _ in range(iters):
        fn()
    if device.type == "cuda":
        torch.cuda.synchronize()
    return (time.perf_counter() - start) / iters


def bench(name: str, overrides: list[str], px: int, batch: int, device: str, iters: int, rounds: int) -> dict:
    with tempfile.TemporaryDirectory() as tmp:
        trainer = make_trainer(overrides, device, Path(tmp))
    dev = trainer.device
    images = torch.randint(0, 256, (batch, 3, px, px), dtype=torch.uint8, device=dev)
    labels = torch.randint(0, 10, (batch,), device=dev)
    x = trainer.preprocess(images)  # the plain loop gets its input normalised already
    plain = plain_step_fn(trainer)
    ours_fn, plain_fn = (lambda: trainer.train_step(images, labels)), (lambda: plain(x, labels))
    for fn in (ours_fn, plain_fn):
        timed(fn, max(3, iters), dev)  # warm-up (cudnn autotuning, compilation, CUDA graph capture)
    ours, base = [], []
    for _ in range(rounds):
        ours.append(timed(ours_fn, iters, dev))
        base.append(timed(plain_fn, iters, dev))
    t_ours, t_base = statistics.median(ours), statistics.median(base)
    plan = trainer.plan
    return {
        "case": name,
        "plan": f"{plan.accum_steps} pass x {plan.forward_batch}, BN {plan.bn_group}",
        "plain_ms": 1e3 * t_base,
        "trainer_ms": 1e3 * t_ours,
        "speed": t_base / t_ours,
        "img_s": batch / t_ours,
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--device", default="cpu", choices=["cpu", "cuda"])
    parser.add_argument("--iters", type=int, default=5)
    parser.add_argument("--rounds", type=int, default=5)
    args = parser.parse_args()
    torch.backends.cudnn.benchmark = True
    name = torch.cuda.get_device_name() if args.device == "cuda" else "CPU"
    print(f"device: {name}, torch {torch.__version__}, {torch.get_num_threads()} threads")
    print("| case | step | plain ms | trainer ms | speed vs plain | img/s |\n| :-- | :-- | --: | --: | --: | --: |")
    for case in CASES[args.device]:
        r = bench(*case, device=args.device, iters=args.iters, rounds=args.rounds)
        print(
            f"| {r['case']} | {r['plan']} | {r['plain_ms']:.1f} | {r['trainer_ms']:.1f} | {r['speed']:.3f} "
            f"| {r['img_s']:,.0f} |",
            flush=True,
        )


if __name__ == "__main__":
    main()
