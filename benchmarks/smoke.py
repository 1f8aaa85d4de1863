"""Smoke test of every row family on the device: a few real trainer steps each, the first one against the CPU.

    python -m benchmarks.smoke --device cuda --json results.jsonl
    python -m benchmarks.smoke --tiny                      # the CPU test's sizes (compiled cases skipped)

Each case composes its table row through Hydra (resnet_repro.config.compose_row) and builds the engine's own
Trainer on the device; the data is a synthetic image folder with the row's classes (nothing is decoded: the
steps are fed random uint8 batches). The first step runs on the device and on a CPU Trainer of the same row and
precision from the same weights and batch, with TF32 off and no batch mixing (its draws may differ between
devices); its loss and the gradients the optimizer receives (all tensors as one vector, relative L2) must agree
within the precision's tolerance (TOLERANCE). Then `--steps` more steps as training runs them (mixing on, TF32 as
the trainer sets it; compiled cases keep it off): their losses must be finite, their median time is reported.
The r18 cases but `compile=true` also run CIFAR's short last batch (80 of 128; one recompile at most).
Compiled cases report the graphs compiled and CUDA-graph skips; torch logs why (recompiles, cudagraphs) in the
stage's log. Batches (`batch`: GPUs x per-GPU batch: passes x images, BN group): r18 the recipe's whole 8 x 16;
r50 one GPU's 1 x 32 of 8 x 32; RSB-A3 2 x 16 of 8 x 256 (SyncBN recipe: 2 accumulated passes of 16); CUB
one GPU's 1 x 8 of 8 x 8 — a CPU step of the recipe's whole batch at 224 or 448 px would take minutes.
--tiny: ResNet-18 for the r50 rows, 32 px, 2 images per GPU.
"""

from __future__ import annotations

import argparse
import contextlib
import functools
import gc
import random
import statistics
import tempfile
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from benchmarks.common import (
    Deadline,
    Recorder,
    existing_overrides,
    missing_import,
    stage_parser,
    start_stage,
    sync,
    tf32_off,
    write_image_folder,
)

# relative tolerance (loss, all gradients) of a device step against the CPU's step in the same precision;
# reduced precision rounds differently on each device (the figures say how much)
TOLERANCE = {"fp32": (1e-4, 1e-3), "bf16": (2e-2, 0.3), "amp-fp16-static512": (5e-3, 0.15), "amp-fp16": (5e-3, 0.15)}
# the folder each dataset is given: (classes, train split, test split)
FOLDERS = {"cifar10": (10, "train", "test"), "imagenet1k": (1000, "train", "val"), "cub200": (200, "train", "test")}
CIFAR_LAST = 50_000 % 128  # the short last batch of every CIFAR epoch


@dataclass(frozen=True)
class Case:
    key: str
    name: str
    row: str
    batch: tuple[str, ...]  # the recipe's GPUs x per-GPU batch that run (device sizes)
    px: int
    extra: tuple[str, ...] = ()  # settings that make the case (precision, compile)
    tiny: tuple[str, ...] = ("model=resnet18", "recipe.gpus=1", "recipe.batch_per_gpu=2")  # --tiny: model, sizes
    compiled: bool = False
    optional: bool = False  # extra names a setting this version may not have yet: skipped when absent


R18 = "resnet18_8xb16_cifar10"
R18_TINY = ("recipe.gpus=2", "recipe.batch_per_gpu=4")
R50 = ("recipe.gpus=1", "recipe.batch_per_gpu=32")
CASES = [  # the row families in order of value; compiled ones last (each compile costs minutes on a GPU)
    Case("r18", "r18 CIFAR faithful, eager", R18, (), 32, tiny=R18_TINY),
    Case("r50-fp32", "r50 @224 fp32", "resnet50_8xb32_in1k", R50, 224),
    Case("r50-fp16", "r50 @224 amp-fp16-static512", "resnet50_8xb32-fp16_in1k", R50, 224),
    Case("r50-bf16", "r50 @224 bf16", "resnet50_8xb32_in1k", R50, 224, ("precision=bf16",)),
    Case(
        "rsb-a3",
        "RSB-A3 (LAMB, BCE, Mixup/CutMix)",
        "resnet50_8xb256-rsb-a3-100e_in1k",
        ("recipe.gpus=2", "recipe.batch_per_gpu=16"),
        224,
        tiny=("model=resnet18", "recipe.gpus=2", "recipe.batch_per_gpu=2"),
    ),
    Case("cub", "CUB @448", "resnet50_8xb8_cub", ("recipe.gpus=1", "recipe.batch_per_gpu=8"), 448),
    Case(
        "r18-per-group",
        "r18 CIFAR faithful, per-group BN kernels",
        R18,
        (),
        32,
        ("trainer.bn_group_kernel=per-group",),
        R18_TINY,
        optional=True,
    ),
    Case(
        "r18-one-kernel",
        "r18 CIFAR faithful, one-kernel BN",
        R18,
        (),
        32,
        ("trainer.bn_group_kernel=one-kernel",),
        R18_TINY,
        optional=True,
    ),
    Case(
        "r18-cudagraphs",
        "r18 CIFAR faithful, reduce-overhead",
        R18,
        (),
        32,
        ("trainer.compile=reduce-overhead",),
        R18_TINY,
        True,
    ),
    Case("r18-compiled", "r18 CIFAR faithful, compiled", R18, (), 32, ("trainer.compile=true",), R18_TINY, True),
]
SHORT_BATCH = ("r18", "r18-per-group", "r18-one-kernel", "r18-cudagraphs")  # at most one recompile in the stage


class Smoke:
    """Builds the cases' Trainers (a synthetic image folder per dataset, a CPU reference per row and batch)."""

    def __init__(self, device: str, tiny: bool, steps: int, folder: Path) -> None:
        self.device, self.tiny, self.steps, self.folder = device, tiny, steps, folder
        self._refs: dict[tuple[str, ...], dict[str, Any]] = {}

    def overrides(self, case: Case, device: str, extra: tuple[str, ...]) -> list[str]:
        dataset = row_dataset(case.row)
        classes, train, test = FOLDERS[dataset]
        root = self.folder / dataset
        if not root.exists():
            write_image_folder(root, classes, 1, 8, (train, test))
        sizes = [*case.tiny, "dataset.input_size=32"] if self.tiny else list(case.batch)
        return [
            "dataset.format=imagefolder",
            f"dataset.root={root}",
            f"dataset.train_split={train}",
            f"dataset.test_split={test}",
            "recipe.init.pretrained=null",  # CUB fine-tunes from downloaded weights; random ones do here
            f"trainer.device={device}",
            "trainer.num_workers=0",
            "trainer.data_on_device=false",
            "trainer.checkpoints=none",
            *sizes,
            *extra,
        ]

    def trainer(self, case: Case, device: str, extra: tuple[str, ...]) -> Any:
        from resnet_repro.checkpoint import RunFolder
        from resnet_repro.config import compose_row, to_plain, validate
        from resnet_repro.engine import RunInfo, Trainer

        cfg = compose_row(case.row, self.overrides(case, device, extra))
        info = RunInfo(row_name=case.row, config_hash="smoke", plan=validate(cfg))
        with tempfile.TemporaryDirectory() as tmp:
            return Trainer(to_plain(cfg), info, RunFolder(Path(tmp)))

    def batch(self, case: Case, trainer: Any) -> tuple[torch.Tensor, torch.Tensor]:
        px = 32 if self.tiny else case.px
        gen = torch.Generator().manual_seed(0)
        n, classes = trainer.plan.device_batch, int(trainer.cfg["dataset"]["num_classes"])
        images = torch.randint(0, 256, (n, 3, px, px), dtype=torch.uint8, generator=gen)
        return images, torch.randint(0, classes, (n,), generator=gen)

    def reference(self, case: Case) -> dict[str, Any]:
        """The CPU's first step of the case's row, batch and precision (shared by compile modes, BN kernels)."""
        precision = tuple(o for o in case.extra if o.startswith("precision="))
        key = (case.row, *case.batch, *precision)
        if key not in self._refs:
            trainer = self.trainer(case, "cpu", precision)
            images, labels = self.batch(case, trainer)
            weights = {k: v.clone() for k, v in trainer.model.state_dict().items()}
            loss, grads = first_step(trainer, images, labels)
            self._refs[key] = {"weights": weights, "loss": loss, "grads": grads, "images": images, "labels": labels}
        return self._refs[key]

    def run(self, case: Case, rec: Recorder, deadline: Deadline) -> None:
        ref = self.reference(case)
        start = time.perf_counter()
        trainer = self.trainer(case, self.device, case.extra)
        setup_s = time.perf_counter() - start
        trainer.model.load_state_dict(ref["weights"])  # the CPU's initial weights, whatever the device drew
        dev = trainer.device
        if dev.type == "cuda":
            torch.cuda.reset_peak_memory_stats(dev)
        # compiled cases keep TF32 off throughout: dynamo guards on the matmul flag, switching back recompiles
        before = compile_counts()
        with compile_logs(case.compiled), tf32_off() if case.compiled else contextlib.nullcontext():
            t0 = time.perf_counter()
            loss, grads = first_step(trainer, ref["images"], ref["labels"])
            first_s = time.perf_counter() - t0
            losses, times = smoke_steps(trainer, ref["images"], ref["labels"], self.steps)
            short = short_batch(trainer, ref, deadline) if case.key in SHORT_BATCH else {}
        problems, figures = verdict(str(trainer.cfg["precision"]["name"]), loss, grads, ref, losses)
        problems += [short.pop("problem")] if "problem" in short else []
        plan, recipe = trainer.plan, trainer.recipe
        rec.write(
            case.name,
            "fail" if problems else "ok",
            batch=f"{recipe['gpus']}x{recipe['batch_per_gpu']}: {plan.accum_steps}x{plan.forward_batch}, "
            f"BN {plan.bn_group}",
            **figures,
            setup_s=round(setup_s, 1),
            first_s=round(first_s, 2),
            ms_step=round(statistics.median(times) * 1e3, 2),
            **({"peak_mib": round(torch.cuda.max_memory_allocated(dev) / 2**20)} if dev.type == "cuda" else {}),
            **short,
            **(compile_counts(before) if case.compiled else {}),
            **({"reason": "; ".join(problems)} if problems else {}),
        )
        del trainer
        release(dev, case.compiled)


def verdict(
    precision: str, loss: float, grads: dict[str, torch.Tensor], ref: dict[str, Any], losses: list[torch.Tensor]
) -> tuple[list[str], dict[str, Any]]:
    """What differs from the CPU's first step beyond the precision's tolerance, and the figures that say so."""
    tol_loss, tol_grad = TOLERANCE[precision]
    loss_rel = abs(loss - ref["loss"]) / max(abs(ref["loss"]), 1e-12)
    grad_rel, grad_cos, worst = compare_grads(grads, ref["grads"])
    problems = [
        *([f"loss differs by {loss_rel:.1e} > {tol_loss:g}"] if not loss_rel <= tol_loss else []),
        *([f"gradients differ by {grad_rel:.1e} > {tol_grad:g}"] if not grad_rel <= tol_grad else []),
        *(["a non-finite loss in the steps after"] if not torch.isfinite(torch.stack(losses)).all() else []),
    ]
    figures = {
        "loss": round(ref["loss"], 5),
        "loss_rel": float(f"{loss_rel:.1e}"),
        "grad_rel": float(f"{grad_rel:.1e}"),
        "grad_cos": round(grad_cos, 6),
        "worst": worst,
        "tol": f"{tol_loss:g}/{tol_grad:g}",
    }
    return problems, figures


@functools.cache
def row_dataset(row: str) -> str:
    from resnet_repro.config import compose_row

    return str(compose_row(row).dataset.name)


def first_step(trainer: Any, images: torch.Tensor, labels: torch.Tensor) -> tuple[float, dict[str, torch.Tensor]]:
    """The trainer's step on this batch without mixing and TF32, seeded alike; (loss, the optimizer's gradients)."""
    names = {id(p): n for n, p in trainer.model.named_parameters()}
    grads: dict[str, torch.Tensor] = {}

    def keep(optimizer: torch.optim.Optimizer, *_: Any) -> None:  # after unscaling (fp16), before the update
        for group in optimizer.param_groups:
            for p in group["params"]:
                if p.grad is not None:
                    grads[names[id(p)]] = p.grad.detach().double().cpu()

    hook = trainer.optimizer.register_step_pre_hook(keep)
    mixer, trainer.mixer = trainer.mixer, None
    try:
        seed_all(0)
        with tf32_off():
            loss = float(trainer.train_step(images, labels))
    finally:
        hook.remove()
        trainer.mixer = mixer
    return loss, grads


def smoke_steps(trainer: Any, images: torch.Tensor, labels: torch.Tensor, steps: int) -> tuple[list, list]:
    """`steps` more steps as training runs them (mixing on); their losses (left on the device) and times."""
    losses, times = [], []
    x, y = images.to(trainer.device), labels.to(trainer.device)
    for _ in range(steps):
        sync(trainer.device)
        t0 = time.perf_counter()
        losses.append(trainer.train_step(x, y).detach().float())
        sync(trainer.device)
        times.append(time.perf_counter() - t0)
    return losses, times[1:] or times  # the first of them may still warm up (CUDA graph recording)


def short_batch(trainer: Any, ref: dict[str, Any], deadline: Deadline) -> dict[str, Any]:
    """CIFAR's last batch of an epoch (80 of 128) must run; its time and the graphs compiled for it."""
    if deadline.passed(90):  # a recompile can take a minute
        return {"short": "not run (time)"}
    n = ref["images"].shape[0] * CIFAR_LAST // 128  # 80 of 128; 5 of the tiny 8
    before = graphs()
    sync(trainer.device)
    t0 = time.perf_counter()
    loss = trainer.train_step(ref["images"][:n].to(trainer.device), ref["labels"][:n].to(trainer.device))
    finite = bool(torch.isfinite(loss))
    seconds = time.perf_counter() - t0
    added = f", +{graphs() - before} graphs" if before is not None else ""
    return {"short": f"{n} images: {seconds:.2f} s{added}"} | (
        {} if finite else {"problem": "short batch: loss not finite"}
    )


def compare_grads(ours: dict[str, torch.Tensor], ref: dict[str, torch.Tensor]) -> tuple[float, float, str]:
    """All gradients as one vector: relative L2 difference and cosine; the tensor that differs most (relatively)."""
    if not ref or set(ours) != set(ref):
        missing = sorted(set(ref) ^ set(ours))
        return float("inf"), 0.0, f"not the same parameters with gradients: {', '.join(missing[:3])}"
    a, b = torch.cat([ours[k].flatten() for k in ref]), torch.cat([ref[k].flatten() for k in ref])
    rel = float((a - b).norm() / b.norm().clamp_min(1e-300))
    cos = float(torch.nn.functional.cosine_similarity(a, b, dim=0))
    worst = max(ref, key=lambda k: float((ours[k] - ref[k]).norm() / ref[k].norm().clamp_min(1e-30)))
    worst_rel = float((ours[worst] - ref[worst]).norm() / ref[worst].norm().clamp_min(1e-30))
    return rel, cos, f"{worst} {worst_rel:.1e}"


def seed_all(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)


def graphs() -> int | None:
    return compile_counts().get("graphs")


def compile_counts(since: dict[str, int] | None = None) -> dict[str, int]:
    """Graphs dynamo compiled and CUDA-graph skips by inductor, in all or since `since` (torch's own counters)."""
    try:
        from torch._dynamo.utils import counters  # private, but stable since torch 2.0
    except ImportError:
        return {}
    skips = sum(n for k, n in counters["inductor"].items() if "cudagraph" in k)
    now = {"graphs": int(counters["stats"]["unique_graphs"]), "cudagraph_skips": int(skips)}
    return {k: v - (since or {}).get(k, 0) for k, v in now.items()}


@contextmanager
def compile_logs(compiled: bool) -> Iterator[None]:
    """For a compiled case, torch's own words in the stage's log while inside: why it recompiled, why it skipped
    CUDA graphs (e.g. "mutated inputs"), its performance hints."""
    if not compiled:
        yield
        return
    try:
        torch._logging.set_logs(recompiles=True, perf_hints=True, cudagraphs=True)
    except TypeError:  # a torch without the cudagraphs artifact
        torch._logging.set_logs(recompiles=True, perf_hints=True)
    try:
        yield
    finally:
        torch._logging.set_logs()


def release(device: torch.device, compiled: bool) -> None:
    gc.collect()
    if compiled:
        torch._dynamo.reset()
    if device.type == "cuda":
        torch.cuda.empty_cache()


def build_parser() -> argparse.ArgumentParser:
    parser = stage_parser(__doc__)
    parser.add_argument("--steps", type=int, default=None, help="steps after the compared one (default 6; tiny 1)")
    parser.add_argument(
        "--cases",
        default=None,
        help=f"comma-separated keys of the cases to run, in the order given (default: all): "
        f"{', '.join(c.key for c in CASES)}",
    )
    parser.add_argument(
        "--no-compile", action="store_true", help="skip the compiled cases (implied by --tiny: CPU inductor is slow)"
    )
    parser.add_argument("--compile", action="store_true", help="run the compiled cases with --tiny too")
    return parser


def main(argv: list[str] | None = None) -> None:
    parser = build_parser()
    args, rec, deadline, dev = start_stage(parser, "smoke", argv)
    chosen = {c.key: c for c in CASES}
    keys = args.cases.split(",") if args.cases else list(chosen)
    unknown = [k for k in keys if k not in chosen]
    if unknown:
        parser.error(f"unknown case(s) {', '.join(unknown)}; allowed: {', '.join(chosen)}")
    try:
        import hydra  # noqa: F401 - the cases are composed through Hydra
    except ModuleNotFoundError as err:
        rec.skip("all cases", missing_import(err))
        return
    steps = args.steps if args.steps is not None else (1 if args.tiny else 6)
    if steps < 1:
        parser.error(f"--steps {steps}: allowed: 1 or more")
    with tempfile.TemporaryDirectory() as tmp:
        smoke = Smoke(args.device, args.tiny, steps, Path(tmp))
        for case in (chosen[k] for k in keys):
            if case.compiled and (args.no_compile or (args.tiny and not args.compile)):
                rec.skip(case.name, "compiled cases skipped (--tiny / --no-compile)")
            elif case.optional and not existing_overrides(case.extra):
                rec.skip(case.name, f"{case.extra[0].split('=')[0]} is not a setting of this version")
            elif deadline.passed(20 if not case.compiled else 90):
                rec.skip(case.name, f"not started: {deadline.left():.0f} s left of --max-seconds")
            else:
                with rec.case(case.name):
                    smoke.run(case, rec, deadline)
    rec.print_table()


if __name__ == "__main__":
    main()
