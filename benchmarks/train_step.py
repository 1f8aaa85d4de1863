"""The trainer's training step against a plain PyTorch loop, same model, batch and device, same process.

    python -m benchmarks.train_step                      # CPU: faithful, one pass (both BN-group kernels), r50-b8
    python -m benchmarks.train_step --device cuda        # the same and accumulate, r50-bf16
    python -m benchmarks.train_step --device cuda --cases faithful,compiled,cudagraphs,r18-b512,r50-fp32,r50-fp16

The plain loop is what one writes by hand: float inputs already normalised on the device, forward with
ordinary BatchNorm over the whole batch, cross-entropy, backward, SGD step (GradScaler for float16),
channels_last on a GPU, compiled when the case's trainer is. The trainer's steps convert the uint8 batch on
the device and run the recipe's batch plan:
- `faithful` is resnet18_8xb16_cifar10's step as the trainer runs it by default (batches.py): on a GPU 128
  images in one pass, BatchNorm over groups of 16 (the recipe's 8 GPUs x 16), BN running statistics from the
  first group (bn_groups.py); on a CPU 8 passes of 16, which run faster there;
- `one-pass-per-group` / `one-pass-one-kernel` force the one pass with BN groups (trainer.forward_batch=128),
  each BN-group kernel; `accumulate` forces 8 forward passes of 16 (trainer.forward_batch=16);
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
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F

from benchmarks.common import (
    existing_overrides,
    missing_import,
    stage_parser,
    start_stage,
    sync,
)

R18 = ("model=resnet18", "stem=cifar", "dataset=demo", "recipe=cifar-200e")
R50 = ("model=resnet50", "stem=v1b", "dataset=demo", "recipe=cifar-200e")
FAITHFUL = (*R18, "recipe.gpus=8", "recipe.batch_per_gpu=16")
ONE_GPU = ("recipe.gpus=1",)
R18_TINY = (*R18, "recipe.gpus=2", "recipe.batch_per_gpu=4")  # --tiny: 8 images, BN groups of 4
R50_TINY = ("model=resnet18", "stem=v1b", "dataset=demo", "recipe=cifar-200e", *ONE_GPU, "recipe.batch_per_gpu=4")


@dataclass(frozen=True)
class Case:
    key: str
    name: str
    overrides: tuple[str, ...]  # the composition (dataset=demo keeps construction offline; batches are synthetic)
    px: int
    tiny: tuple[str, ...]  # --tiny's composition (32 px)
    optional: tuple[str, ...] = ()  # settings another change adds: the case is skipped where they do not exist


CASES = [
    Case("faithful", "resnet18 CIFAR faithful, the default plan", FAITHFUL, 32, R18_TINY),
    Case(
        "one-pass-per-group",
        "resnet18 CIFAR faithful, one pass, per-group BN kernels",
        (*FAITHFUL, "trainer.forward_batch=128"),
        32,
        (*R18_TINY, "trainer.forward_batch=8"),
        ("trainer.bn_group_kernel=per-group",),
    ),
    Case(
        "one-pass-one-kernel",
        "resnet18 CIFAR faithful, one pass, one-kernel BN",
        (*FAITHFUL, "trainer.forward_batch=128"),
        32,
        (*R18_TINY, "trainer.forward_batch=8"),
        ("trainer.bn_group_kernel=one-kernel",),
    ),
    Case(
        "accumulate",
        "resnet18 CIFAR accumulate (8 passes of 16)",
        (*FAITHFUL, "trainer.forward_batch=16"),
        32,
        (*R18_TINY, "trainer.forward_batch=4"),
    ),
    Case("compiled", "resnet18 CIFAR faithful, compiled", (*FAITHFUL, "trainer.compile=true"), 32, R18_TINY),
    Case(
        "cudagraphs",
        "resnet18 CIFAR faithful, CUDA graphs",
        (*FAITHFUL, "trainer.compile=reduce-overhead"),
        32,
        R18_TINY,
    ),
    Case(
        "r18-b512",
        "resnet18 CIFAR b512 bf16",
        (*R18, *ONE_GPU, "recipe.batch_per_gpu=512", "precision=bf16"),
        32,
        R18_TINY,
    ),  # fmt: skip
    Case("r50-b8", "resnet50 @224 b8", (*R50, *ONE_GPU, "recipe.batch_per_gpu=8"), 224, R50_TINY),
    Case("r50-fp32", "resnet50 @224 b256 fp32", (*R50, *ONE_GPU, "recipe.batch_per_gpu=256"), 224, R50_TINY),
    Case(
        "r50-bf16",
        "resnet50 @224 b256 bf16 channels_last",
        (*R50, *ONE_GPU, "recipe.batch_per_gpu=256", "precision=bf16"),
        224,
        (*R50_TINY, "precision=bf16"),
    ),
    Case(
        "r50-fp16",
        "resnet50 @224 b256 fp16 static 512",
        (*R50, *ONE_GPU, "recipe.batch_per_gpu=256", "precision=amp-fp16-static512"),
        224,
        (*R50_TINY, "precision=amp-fp16-static512"),
    ),
]
DEFAULT = {
    "cpu": "faithful,one-pass-per-group,one-pass-one-kernel,r50-b8",
    "cuda": "faithful,one-pass-per-group,one-pass-one-kernel,accumulate,r50-bf16",
}


def make_trainer(overrides: list[str], device: str, folder: Path) -> Any:
    from resnet_repro.batches import plan
    from resnet_repro.checkpoint import RunFolder
    from resnet_repro.config import compose, to_plain
    from resnet_repro.engine import RunInfo, Trainer

    cfg = to_plain(compose([*overrides, f"trainer.device={device}", "trainer.num_workers=0"]))
    return Trainer(cfg, RunInfo(row_name="benchmark", config_hash="benchmark", plan=plan(cfg, 1)), RunFolder(folder))


def plain_step_fn(trainer: Any) -> Callable[[torch.Tensor, torch.Tensor], None]:
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
    sync(device)
    start = time.perf_counter()
    for _ in range(iters):
        fn()
    sync(device)
    return (time.perf_counter() - start) / iters


def bench(overrides: list[str], px: int, device: str, iters: int, rounds: int, warmup: int) -> dict[str, Any]:
    with tempfile.TemporaryDirectory() as tmp:
        trainer = make_trainer(overrides, device, Path(tmp))
    dev, batch = trainer.device, trainer.plan.device_batch
    images = torch.randint(0, 256, (batch, 3, px, px), dtype=torch.uint8, device=dev)
    labels = torch.randint(0, 10, (batch,), device=dev)
    x = trainer.preprocess(images)  # the plain loop gets its input normalised already
    plain = plain_step_fn(trainer)
    ours_fn, plain_fn = (lambda: trainer.train_step(images, labels)), (lambda: plain(x, labels))
    for fn in (ours_fn, plain_fn):
        timed(fn, warmup, dev)  # cudnn autotuning, compilation, CUDA graph capture
    ours, base = [], []
    for _ in range(rounds):
        ours.append(timed(ours_fn, iters, dev))
        base.append(timed(plain_fn, iters, dev))
    t_ours, t_base = statistics.median(ours), statistics.median(base)
    plan = trainer.plan
    return {
        "step": f"{plan.accum_steps} pass x {plan.forward_batch}, BN {plan.bn_group}",
        "batch": batch,
        "px": px,
        "plain_ms": round(1e3 * t_base, 2),
        "trainer_ms": round(1e3 * t_ours, 2),
        "speed": round(t_base / t_ours, 3),
        "img_s": round(batch / t_ours),
    }


def build_parser() -> argparse.ArgumentParser:
    parser = stage_parser(__doc__)
    parser.add_argument("--iters", type=int, default=None, help="steps per case per timed round (default 5; tiny 1)")
    parser.add_argument("--rounds", type=int, default=None, help="alternating timed rounds, median taken (5; tiny 1)")
    parser.add_argument("--warmup", type=int, default=None, help="untimed steps of each loop first (default 3; tiny 1)")
    parser.add_argument(
        "--cases",
        default=None,
        help=f"comma-separated case keys (default: cpu {DEFAULT['cpu']}; cuda {DEFAULT['cuda']}); "
        f"all: {', '.join(c.key for c in CASES)}",
    )
    return parser


def main(argv: list[str] | None = None) -> None:
    parser = build_parser()
    args, rec, deadline, dev = start_stage(parser, "train_step", argv)
    known = {c.key: c for c in CASES}
    keys = (args.cases or DEFAULT[args.device]).split(",")
    if any(k not in known for k in keys):
        parser.error(f"unknown case in --cases {args.cases}; allowed: {', '.join(known)}")
    small = 1 if args.tiny else None
    iters, rounds, warmup = (args.iters or small or 5), (args.rounds or small or 5), (args.warmup or small or 3)
    torch.backends.cudnn.benchmark = True
    for case in (known[k] for k in keys):
        if deadline.passed(15):
            rec.skip(case.name, f"not started: {deadline.left():.0f} s left of --max-seconds")
            continue
        try:
            optional = existing_overrides(case.optional)
        except ModuleNotFoundError as err:
            rec.skip(case.name, missing_import(err))
            continue
        if len(optional) < len(case.optional):
            rec.skip(case.name, f"{case.optional[0].split('=')[0]} is not a setting of this version")
            continue
        with rec.case(case.name):
            overrides, px = (list(case.tiny), 32) if args.tiny else (list(case.overrides), case.px)
            rec.write(case.name, **bench([*overrides, *optional], px, args.device, iters, rounds, warmup))
    rec.print_table()


if __name__ == "__main__":
    main()
