"""`python -m resnet_repro.test checkpoint=<path> [overrides]`: re-test a checkpoint on its row's test split.

Our own checkpoints hold the composed config they were trained with: alone, `checkpoint=PATH` evaluates the
model on that config's data (downloaded first when `dataset.download` allows) with its row's test
transform, and records the evaluation in that config's MLflow store, beside the training run (same row
tag; a child run of the training run, tagged source_run_id). Overrides still apply on top
(`dataset.root=... trainer.device=cpu`, or another group: `dataset=...`). mmpretrain's checkpoints (the
table's Download column) hold none: give the row (`row=<name> checkpoint=<path or URL>`); `row=` also tests
one of ours as that row.

Evaluation is exact (every image once, top-1/top-5 with torchmetrics); images per forward pass:
trainer.micro_batch (default: the recipe's per-GPU batch). Checkpoints are loaded without running code
from them; `trust_checkpoint=true` unpickles a trusted file that holds more than tensors and plain data.
Nothing heavy is imported before the arguments are read: `--help` answers at once.
"""

from __future__ import annotations

import glob
import sys
import time
from collections.abc import Iterator, Mapping, Sequence
from pathlib import Path
from typing import Any

from resnet_repro.errors import UserError, exit_with
from resnet_repro.usage import TEST_USAGE, test_help

GROUPS = ("model", "stem", "dataset", "recipe", "precision")
# what a checkpoint's config says that a test keeps: what the model is, its data and test transform, and
# where its run is recorded (how its training executed — trainer.* — says nothing about a test)
KEPT = (*GROUPS, "seed", "tracking")
CARRIED_TRAINER_KEYS = ("trainer.micro_batch",)  # part of the run's identity (its BN groups)


def split_args(argv: Sequence[str]) -> tuple[str, bool, list[str]]:
    """(checkpoint source, trusted, the Hydra overrides); a missing checkpoint= is a UserError."""
    sources = [a.split("=", 1)[1] for a in argv if a.startswith("checkpoint=")]
    trust = [a.split("=", 1)[1].lower() for a in argv if a.startswith("trust_checkpoint=")]
    overrides = [a for a in argv if not a.startswith(("checkpoint=", "trust_checkpoint="))]
    if len(sources) != 1 or not sources[0]:
        raise UserError(f"give exactly one checkpoint=<path or URL>; {TEST_USAGE}")
    if any(t not in ("true", "false") for t in trust):
        raise UserError(f"trust_checkpoint={trust[0]} is not allowed; allowed: true, false")
    return sources[0], trust == ["true"], overrides


def _leaves(node: Mapping[str, Any], prefix: str = "") -> Iterator[tuple[str, Any]]:
    """(dotted key, value) of every leaf; lists stay whole."""
    for key, value in node.items():
        if isinstance(value, Mapping):
            yield from _leaves(value, f"{prefix}{key}.")
        else:
            yield f"{prefix}{key}", value


def config_of_checkpoint(stored: Mapping[str, Any], overrides: Sequence[str]) -> Any:
    """The checkpoint's own config with `overrides` on top, composed by Hydra: its group choices (less the
    groups the overrides choose again), the overrides, then every stored value the overrides do not set."""
    from omegaconf import OmegaConf

    from resnet_repro.config import compose, parse_overrides

    parsed = parse_overrides(overrides)
    chosen = {ov.key_or_group for ov in parsed if ov.key_or_group in GROUPS}
    set_keys = {ov.key_or_group for ov in parsed}
    try:
        own = {
            "model": f"resnet{stored['model']['depth']}",
            **{g: str(stored[g]["name"]) for g in ("stem", "dataset", "recipe", "precision")},
        }
    except (KeyError, TypeError):
        raise UserError("the checkpoint's config names no model, stem, dataset, recipe or precision") from None
    cfg = compose([f"{g}={v}" for g, v in own.items() if g not in chosen] + list(overrides))
    for key, value in _leaves(stored):
        top = key.split(".", 1)[0]
        if (top not in KEPT and key not in CARRIED_TRAINER_KEYS) or top in chosen:
            continue
        if any(key == k or key.startswith(k + ".") for k in set_keys):
            continue
        if OmegaConf.select(cfg, key, default="<none>") != "<none>":  # a key this version still has
            OmegaConf.update(cfg, key, value, merge=False)
    return cfg


def expand(source: str) -> str:
    """A path with a wildcard (`checkpoints/<row>/seed0-*/best.pt`: the shell does not expand it after
    `checkpoint=`) names the one file it matches."""
    if not any(c in source for c in "*?[") or Path(source).exists():
        return source
    matches = sorted(glob.glob(source))
    if len(matches) > 1:
        raise UserError(f"{source} matches {len(matches)} checkpoints ({', '.join(matches[:3])}, ...); give one")
    return matches[0] if matches else source


def prepare(source: str, trusted: bool, overrides: list[str]) -> tuple[str, Any, Any]:
    """(the checkpoint's path, the composed config to test with, the checkpoint object)."""
    from resnet_repro.config import compose
    from resnet_repro.convert import is_url, read_checkpoint

    row_given = any(o.startswith("row=") for o in overrides)
    if row_given:
        compose(overrides)  # a bad row or override is refused before a download
    source = expand(source)
    if not is_url(source) and not Path(source).is_file():
        raise UserError(f"no checkpoint at {source}")
    obj = read_checkpoint(source, trusted)
    stored = obj.get("config") if isinstance(obj, Mapping) else None
    if row_given:
        return source, compose(overrides), obj
    if not isinstance(stored, Mapping):
        raise UserError(f"{source} holds no resnet_repro config: give the row it belongs to (row=<name>); {TEST_USAGE}")
    return source, config_of_checkpoint(stored, overrides), obj


def run(argv: Sequence[str]) -> dict[str, float]:
    from resnet_repro import distributed
    from resnet_repro.config import to_plain, validate
    from resnet_repro.convert import apply_checkpoint
    from resnet_repro.data import build_eval_loader, resolve_workers
    from resnet_repro.data.datasets import data_source, ensure_present
    from resnet_repro.data.preprocess import Preprocessor
    from resnet_repro.evaluation import topk_accuracy
    from resnet_repro.models import build_model_from_cfg
    from resnet_repro.progress import Progress
    from resnet_repro.provenance import run_info
    from resnet_repro.run_books import run_tags
    from resnet_repro.tracking import Tracker

    source, trusted, overrides = split_args(argv)
    source, cfg, obj = prepare(source, trusted, overrides)
    info = run_info(cfg, validate(cfg, world_size=1))  # the row, config hash and deviations a training run has
    plain = to_plain(cfg)
    tracker = Tracker(cfg.tracking.uri, cfg.tracking.experiment)
    tracker.probe()
    model = build_model_from_cfg(plain)
    loaded = apply_checkpoint(model, obj, source)
    device = distributed.select_device(str(cfg.trainer.device))
    batch = int(cfg.trainer.micro_batch or cfg.recipe.batch_per_gpu)
    ensure_present(plain["dataset"])  # what dataset.download allows and is missing
    loader = build_eval_loader(plain, batch, resolve_workers(cfg.trainer.num_workers, 1))
    _check_classes(loaded.classes, getattr(loader.dataset, "base", loader.dataset), source)
    preprocess = Preprocessor(cfg.dataset.mean, cfg.dataset.std, device, False)
    start = time.perf_counter()
    bar = Progress("test", len(loader), int(cfg.trainer.log_every_n_steps), enabled=True, unit="batch", first=False)
    top = topk_accuracy(model.to(device), loader, preprocess, device, int(cfg.dataset.num_classes), bar)
    metrics = {f"test_{k}": v for k, v in top.items()}
    metrics.setdefault("test_top5", metrics["test_top1"])  # fewer than 5 classes: top-5 covers every class
    elapsed = time.perf_counter() - start
    num_test = len(loader.dataset)
    print(
        f"{cfg.row_name}: test top-1 {metrics['test_top1']:.2f}  top-5 {metrics['test_top5']:.2f}  "
        f"({num_test} images, {elapsed:.1f} s, checkpoint {source})",
        flush=True,
    )
    verified = data_source(plain["dataset"]).verified()  # the same tags as a training run's, and what was tested
    source_run_id = (loaded.meta.get("mlflow_run_id") if loaded.kind == "ours" else "") or ""
    tested = {"checkpoint": source, "checkpoint_format": loaded.kind, "source_run_id": source_run_id}
    tags = run_tags(info, "eval", device, verified, **tested, num_test=num_test)
    log_evaluation(tracker, cfg, plain, source, tags, {**metrics, "eval_time_s": elapsed})
    return metrics


def _check_classes(ours: list[str] | None, test_set: Any, source: str) -> None:
    """A checkpoint trained on other classes (or another order) than the test split's: refused, not scored."""
    theirs = getattr(test_set, "classes", None)
    if ours and theirs and len(ours) == len(theirs) and list(map(str, theirs)) != list(ours):
        raise UserError(
            f"{source} was trained on classes {', '.join(ours[:3])}, ... but the test split has "
            f"{', '.join(map(str, theirs[:3]))}, ...: another dataset or class order (check dataset=, dataset.root=)"
        )


def log_evaluation(tracker: Any, cfg: Any, plain: Any, source: str, tags: dict[str, Any], metrics: Any) -> None:
    """The evaluation's MLflow run: beside its checkpoint's training run (a child of it, when this store has it)."""
    from resnet_repro.tracking import standard, ui_command
    from resnet_repro.tracking.run import flat_params

    if tracker.off:  # tracking.uri=none
        return
    trained_in = tags["source_run_id"] and tracker.name_of(tags["source_run_id"])
    if trained_in:
        tags[standard.PARENT] = tags["source_run_id"]
        tags[standard.NOTE] = f"Evaluation of {source} (training run {tags['source_run_id']}) on the test split."
    tracker.start(f"eval {trained_in or f'{cfg.row_name} s{cfg.seed}'}", tags)
    try:
        tracker.log_params({**flat_params(plain), "checkpoint": source})
        tracker.log_metrics(metrics, step=0)
    except BaseException:
        tracker.finish("FAILED")
        raise
    tracker.finish("FINISHED")
    beside = f", beside training run {tags['source_run_id']}" if trained_in else ""
    print(f"MLflow run {tracker.run_id}{beside}: see it with `{ui_command(tracker.uri)}`", flush=True)


def main(argv: Sequence[str] | None = None) -> None:
    argv = list(sys.argv[1:] if argv is None else argv)
    if any(a in ("-h", "--help") for a in argv):
        print(test_help())
        return
    try:
        run(argv)
    except UserError as err:
        exit_with(err)


if __name__ == "__main__":
    main()
