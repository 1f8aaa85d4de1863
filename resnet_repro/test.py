"""`python -m resnet_repro.test row=<row> checkpoint=<path or URL> [overrides]`: re-test a checkpoint.

Evaluates the checkpoint (ours, or mmpretrain's from the table's Download column) on the row's test
split with the row's test pipeline, exactly (every image once, top-1/top-5 with torchmetrics), prints
the numbers and records an MLflow run with run_type=eval that the report lists beside the table.
Any config override works as for training, e.g. `dataset.root=... trainer.device=cpu tracking.uri=...`;
images per forward pass: trainer.micro_batch (default: the recipe's per-GPU batch).
Checkpoints are loaded without running code from them; `trust_checkpoint=true` unpickles a trusted file
that holds more than tensors and plain data.
"""

from __future__ import annotations

import sys
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from resnet_repro import distributed
from resnet_repro.config import compose, config_hash, deviations, table_row, to_plain, validate
from resnet_repro.convert import load_checkpoint
from resnet_repro.data import build_eval_loader, resolve_workers
from resnet_repro.data.preprocess import Preprocessor
from resnet_repro.errors import UserError, exit_with
from resnet_repro.evaluation import topk_accuracy
from resnet_repro.models import build_model_from_cfg
from resnet_repro.progress import Progress
from resnet_repro.tracking import Tracker, ui_command
from resnet_repro.tracking.run import flat_params, provenance_tags

USAGE = "usage: python -m resnet_repro.test row=<row> checkpoint=<path or URL> [trust_checkpoint=true] [key=value ...]"


def split_args(argv: Sequence[str]) -> tuple[str, bool, list[str]]:
    """(checkpoint source, trusted, the Hydra overrides); a missing checkpoint= or row= is a UserError."""
    sources = [a.split("=", 1)[1] for a in argv if a.startswith("checkpoint=")]
    trust = [a.split("=", 1)[1].lower() for a in argv if a.startswith("trust_checkpoint=")]
    overrides = [a for a in argv if not a.startswith(("checkpoint=", "trust_checkpoint="))]
    if len(sources) != 1 or not sources[0]:
        raise UserError(f"give exactly one checkpoint=<path or URL>; {USAGE}")
    if not any(a.startswith("row=") for a in overrides):
        raise UserError(f"give the row the checkpoint belongs to (row=<name>); {USAGE}")
    if any(t not in ("true", "false") for t in trust):
        raise UserError(f"trust_checkpoint={trust[0]} is not allowed; allowed: true, false")
    return sources[0], trust == ["true"], overrides


def run(argv: Sequence[str]) -> dict[str, float]:
    source, trusted, overrides = split_args(argv)
    cfg = compose(overrides)
    validate(cfg, world_size=1)
    if "://" not in source and not Path(source).is_file():
        raise UserError(f"no checkpoint at {source}")
    plain = to_plain(cfg)
    Tracker(cfg.tracking.uri, cfg.tracking.experiment).probe()
    model = build_model_from_cfg(plain)
    loaded = load_checkpoint(model, source, trusted=trusted)
    device = distributed.select_device(str(cfg.trainer.device))
    batch = int(cfg.trainer.micro_batch or cfg.recipe.batch_per_gpu)
    loader = build_eval_loader(plain, batch, resolve_workers(cfg.trainer.num_workers, 1))
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
    tracker = Tracker(cfg.tracking.uri, cfg.tracking.experiment)
    verified = getattr(loader.dataset.base, "verified", None)
    tracker.start(f"eval {cfg.row_name}", _tags(cfg, source, loaded, device, num_test, verified))
    try:
        tracker.log_params({**flat_params(plain), "checkpoint": source})
        tracker.log_metrics({**metrics, "eval_time_s": elapsed}, step=0)
    except BaseException:
        tracker.finish("FAILED")
        raise
    tracker.finish("FINISHED")
    print(f"MLflow run {tracker.run_id}: see it with `{ui_command(tracker.uri)}`", flush=True)
    return metrics


def _tags(cfg: Any, source: str, loaded: Any, device: Any, num_test: int, verified: Any) -> dict[str, Any]:
    """The same provenance as a training run's (tracking.run.provenance_tags), and what was tested."""
    row = table_row(cfg)
    devs = deviations(cfg, 1)
    return provenance_tags(
        run_type="eval",
        row=cfg.row_name,
        section=row.section if row else "custom",
        checkpoint=source,
        checkpoint_format=loaded.kind,
        source_run_id=(loaded.meta.get("mlflow_run_id") if loaded.kind == "ours" else "") or "",
        config_hash=config_hash(cfg),
        faithful=str(not devs).lower(),
        deviations="; ".join(devs),
        device=str(device),
        device_name=distributed.device_name(device),
        num_test=num_test,
        data_verified=verified,
    )


def main(argv: Sequence[str] | None = None) -> None:
    argv = list(sys.argv[1:] if argv is None else argv)
    if any(a in ("-h", "--help") for a in argv):
        print(USAGE + "\n\n" + (__doc__ or ""))
        return
    try:
        run(argv)
    except UserError as err:
        exit_with(err)


if __name__ == "__main__":
    main()
