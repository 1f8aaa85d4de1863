"""The recipe's per-GPU BatchNorm in one pass (GroupBatchNorm2d) against plain BN and the micro-batch loop.

    python -m benchmarks.bn_groups                          # CPU, fp32, ResNet-18 CIFAR stem, 32 px, batch 128
    python -m benchmarks.bn_groups --device cuda --channels-last --compile
    python -m benchmarks.bn_groups --threads 1 --clock cpu  # a shared CPU: one thread, process CPU time

Each case is a full train step (forward, cross-entropy, backward, SGD step, zero_grad) on the same batch:
plain BN over the whole batch (fast, not the recipe); BN groups of `--group` in one pass (the recipe's 8 GPUs
x 16); the micro-batch loop (8 passes of 16, gradients accumulated). Cases alternate in `--rounds` rounds
of `--iters` steps after warm-up; the table gives medians and plain_ms / case_ms (1.0 = as fast as plain
BN; the target for the groups is >= 0.9).
"""

from __future__ import annotations

import argparse
import copy
import statistics
import time
from collections.abc import Callable

import torch
import torch.nn.functional as F
from torch import nn

from resnet_repro.bn_groups import convert_bn_groups
from resnet_repro.models import build_model

Step = Callable[[], None]


def make_step(model: nn.Module, x: torch.Tensor, y: torch.Tensor, passes: int, compile_model: bool) -> Step:
    opt = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
    net = torch.compile(model) if compile_model else model
    chunks = list(zip(x.chunk(passes), y.chunk(passes), strict=True))

    def step() -> None:
        for xc, yc in chunks:
            loss = F.cross_entropy(net(xc), yc)
            (loss * (xc.shape[0] / x.shape[0]) if passes > 1 else loss).backward()
        opt.step()
        opt.zero_grad(set_to_none=True)

    return step


def timer(device: torch.device, clock: str) -> Callable[[], float]:
    now = time.process_time if clock == "cpu" else time.perf_counter

    def read() -> float:
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        return now()

    return read


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--device", choices=["cpu", "cuda"], default="cpu", help="where the steps run")
    parser.add_argument("--rounds", type=int, default=5, help="alternating rounds (median over them)")
    parser.add_argument("--iters", type=int, default=2, help="steps per case per round")
    parser.add_argument("--warmup", type=int, default=2, help="steps per case before timing")
    parser.add_argument("--batch", type=int, default=128, help="images per step (the recipe's global batch)")
    parser.add_argument("--group", type=int, default=16, help="images per BN group (the recipe's per-GPU batch)")
    parser.add_argument("--channels-last", action="store_true", help="models and inputs in channels_last memory format")
    parser.add_argument("--compile", action="store_true", help="torch.compile each case's model")
    parser.add_argument("--threads", type=int, default=None, help="CPU intra-op threads (default: torch's)")
    parser.add_argument("--clock", choices=["wall", "cpu"], default="wall", help="cpu: process time, with --threads 1")
    return parser


def main(argv: list[str] | None = None) -> None:
    parser = build_parser()
    args = parser.parse_args(argv)
    if args.batch % args.group:
        parser.error(f"--group {args.group} does not divide --batch {args.batch}")
    if args.threads:
        torch.set_num_threads(args.threads)
    device = torch.device(args.device)
    memory_format = torch.channels_last if args.channels_last else torch.contiguous_format

    torch.manual_seed(0)
    base = build_model(18, 10, small_input=True)
    x = torch.randn(args.batch, 3, 32, 32, device=device).contiguous(memory_format=memory_format)
    y = torch.randint(0, 10, (args.batch,), device=device)
    passes = args.batch // args.group
    cases = {
        f"plain BN, batch {args.batch}": (base, 1),
        **{
            f"BN groups of {args.group}, one pass, {kernel}": (
                convert_bn_groups(copy.deepcopy(base), groups=passes, kernel=kernel),
                1,
            )
            for kernel in ("per-group", "one-kernel")
        },
        f"micro-batches, {passes} x {args.group}": (base, passes),
    }
    steps: dict[str, Step] = {}
    for name, (model, n) in cases.items():
        model = copy.deepcopy(model).to(device, memory_format=memory_format).train()
        steps[name] = make_step(model, x, y, n, args.compile)
        for _ in range(args.warmup):
            steps[name]()

    clock = timer(device, args.clock)
    times: dict[str, list[float]] = {name: [] for name in steps}
    for _ in range(args.rounds):
        for name, step in steps.items():
            start = clock()
            for _ in range(args.iters):
                step()
            times[name].append((clock() - start) / args.iters * 1e3)

    where = torch.cuda.get_device_name(device) if device.type == "cuda" else f"CPU, {torch.get_num_threads()} threads"
    flags = ", ".join(f for f, on in (("channels_last", args.channels_last), ("compile", args.compile)) if on)
    print(f"ResNet-18 CIFAR stem, 32 px, fp32, {where}{', ' + flags if flags else ''}; torch {torch.__version__}; "
          f"median of {args.rounds} rounds x {args.iters} steps ({args.clock} clock)\n")  # fmt: skip
    plain_ms = statistics.median(next(iter(times.values())))
    print("| case | ms/step | img/s | ratio to plain |")
    print("|---|---:|---:|---:|")
    for name, ts in times.items():
        ms = statistics.median(ts)
        print(f"| {name} | {ms:.1f} | {args.batch / ms * 1e3:.0f} | {plain_ms / ms:.2f} |")


if __name__ == "__main__":
    main()
