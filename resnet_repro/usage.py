"""What the commands say before any work: `--help` of the trainer and of `resnet_repro.test`, and the first
line of a run (the composed row, device and data), printed before torch is imported.

Hydra's own `--help` lists internal groups (schemas, recipe parts) and the whole config; ours lists what a
user chooses from, reading only conf/ and the table (no torch, no composition), so it answers at once.
"""

from __future__ import annotations

import textwrap
from collections.abc import Mapping
from typing import Any

from resnet_repro.config import group_options
from resnet_repro.rows import SECTIONS, all_rows

WIDTH = 100
# the groups a user composes a run from, and what each option means
GROUPS = {
    "model": "",
    "stem": "",
    "dataset": "  (picks the stem and recipe the table pairs with it)",
    "recipe": "  (mmpretrain's numbers: epochs, batch, optimizer, schedule, augmentation, loss)",
    "precision": "",
}
SETTINGS = (
    ("row=<name>", "one of the 22 rows below; groups and keys after it still override"),
    ("seed=0", "the run's seed (several: --multirun seed=0,1,2)"),
    ("dataset.root=PATH", "where the data lies (default data/<dataset>, or $RESNET_REPRO_DATA/...)"),
    ("recipe.epochs=N", "any recipe number can change; the run then records a deviation"),
    ("trainer.device=auto", "auto | cpu | cuda | cuda:N (pick GPUs with CUDA_VISIBLE_DEVICES)"),
    ("trainer.nproc_per_node=N", "start N local worker processes (DDP) for this job"),
    ("trainer.resume=auto", "continue this config's checkpoint | none | <its last.pt>"),
    ("trainer.checkpoints=last+best", "last+best | last | none"),
    ("trainer.log_every_n_steps=50", "progress line and MLflow step metrics interval"),
    ("trainer.compile=false", "true | reduce-overhead (CUDA graphs) | max-autotune"),
    (
        "trainer.decode=auto",
        "cpu | device | auto (device on CUDA): ImageNet v1b and CUB JPEGs decoded and cropped on the device; "
        "v1c/v1d (Pillow) and RSB (RandAugment) rows stay on the CPU pipeline",
    ),
    ("trainer.num_workers=auto", "loader processes per training process (a run waiting > 10% for data says so)"),
    ("tracking.uri=URI", "MLflow store (default sqlite:///<launch dir>/mlflow.db); none: no tracking, no MLflow"),
    ("tracking.log_model=true", "also log the final model as an MLflow model, to serve it"),
)
EXAMPLES = (
    ("python -m resnet_repro model=resnet18 dataset=demo trainer.device=cpu", "offline demo (a minute)"),
    ("python -m resnet_repro row=resnet18_8xb16_cifar10", "a table row"),
    ("python -m resnet_repro --multirun +sweep=cifar10_depths", "a sweep (sweeps/)"),
)


def _wrapped(label: str, text: str, indent: int) -> list[str]:
    """`label` padded to `indent`, then `text` wrapped to WIDTH with its continuation lines aligned."""
    pad = " " * indent
    first = f"  {label}".ljust(indent)
    return textwrap.wrap(text, WIDTH, initial_indent=first, subsequent_indent=pad, break_on_hyphens=False)


def rows_by_dataset() -> list[str]:
    """The 22 rows, one per line, under their dataset (with the published top-1)."""
    lines, width = [], max(len(r.name) for r in all_rows()) + 3
    for section in SECTIONS:
        rows = [r for r in all_rows() if r.section == section]
        lines.append(f"{section} (dataset={rows[0].dataset}):")
        lines += [f"  {r.name.ljust(width)}published top-1 {r.top1_table:.2f}" for r in rows]
    return lines


def main_help() -> str:
    """`python -m resnet_repro --help`."""
    lines = [
        "resnet_repro: re-run a row of the mmpretrain ResNet table, or any composition of its parts.",
        "",
        "usage: python -m resnet_repro [row=<row>] [group=option ...] [key=value ...] [--multirun|--cfg job]",
        "",
        "Examples:",
    ]
    width = max(len(cmd) for cmd, _ in EXAMPLES) + 2
    lines += [f"  {cmd.ljust(width)}# {what}" for cmd, what in EXAMPLES]
    lines += ["", "== Config groups (group=option) =="]
    for group, meaning in GROUPS.items():
        lines += _wrapped(group, f"{', '.join(group_options(group))}{meaning}", 14)
    lines += _wrapped("+sweep", f"{', '.join(group_options('sweep'))}  (with --multirun)", 14)
    lines += _wrapped("+smoke", "on  (1 epoch of 4 batches, 4 evaluation batches, no checkpoints)", 14)
    lines += ["", "== Rows (row=<name>) =="] + rows_by_dataset()
    lines += ["", "== Main settings =="]
    lines += [line for key, what in SETTINGS for line in _wrapped(key, what, 34)]
    lines += [
        "",
        "The full config of a run: python -m resnet_repro [overrides] --cfg job (--resolve for the values);",
        "Hydra's own options: --hydra-help. Test a checkpoint: python -m resnet_repro.test --help",
    ]
    return "\n".join(lines)


TEST_USAGE = (
    "usage: python -m resnet_repro.test checkpoint=<path or URL> [row=<row>] [trust_checkpoint=true] [key=value ...]"
)


def test_help() -> str:
    """`python -m resnet_repro.test --help` (no torch import: it answers at once)."""
    lines = [
        TEST_USAGE,
        "",
        "Evaluate a checkpoint on its row's test split with the row's test transform (every image once), print",
        "top-1/top-5 and record an MLflow evaluation run (run_type=eval) beside the table.",
        "",
        "  checkpoint=PATH             one of our checkpoints (its config says the row, data, transform and",
        "                              MLflow store: nothing else is needed) or mmpretrain's (give row=)",
        "  row=<name>                  the row to test the checkpoint as (mmpretrain's checkpoints, or a URL)",
        "  key=value                   any config override, e.g. dataset.root=PATH dataset.download=true",
        "                              trainer.device=cpu tracking.uri=URI trainer.micro_batch=N (batch)",
        "  trust_checkpoint=true       unpickle a trusted file that holds more than tensors and plain data",
        "",
        "Examples:",
        "  python -m resnet_repro.test checkpoint=checkpoints/<row>/seed0-<hash>/best.pt",
        "  python -m resnet_repro.test row=resnet18_8xb16_cifar10 checkpoint=<the row's Download URL>",
        "",
        "Rows:",
    ]
    return "\n".join(lines + rows_by_dataset())


def _data(dataset: Mapping[str, Any]) -> str:
    if dataset["format"] == "digits":
        return "scikit-learn's bundled digits (no download)"
    kind = {"pickle": "the official archives", "imagefolder": "image folders", "cub": "the official folder"}
    how = "; downloaded when missing" if dataset.get("download") else ""
    return f"{kind.get(str(dataset['format']), dataset['format'])} in {dataset['root']}{how}"


def banner(cfg: Any) -> str:
    """The first line of a run: what it trains, where and on what data (from the composed config)."""
    device = str(cfg.trainer.device)
    shown = "auto (cuda when available)" if device == "auto" else device
    recipe = cfg.recipe
    epochs = f"{recipe.epochs} epoch{'s' if recipe.epochs != 1 else ''}"
    return (
        f"resnet_repro: {cfg.row_name} seed {cfg.seed}: {epochs} of batch "
        f"{recipe.gpus}x{recipe.batch_per_gpu} on {shown}; data: {cfg.dataset.name}, {_data(cfg.dataset)}"
    )
