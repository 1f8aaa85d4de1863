"""What a job is, said once before it runs: how it departs from its table row (deviations), its config hash, its
name in the MLflow UI and where Hydra put it — the `RunInfo` the engine (and each worker) receives with the job's
batch plan. `python -m resnet_repro.test` describes its evaluation with the same."""

from __future__ import annotations

import functools
from pathlib import Path
from typing import Any

from omegaconf import DictConfig, OmegaConf

from resnet_repro import identity
from resnet_repro.batches import BatchPlan
from resnet_repro.config import compose_row, config_hash, flatten, to_plain, user_overrides
from resnet_repro.engine import RunInfo
from resnet_repro.identity import Deviation
from resnet_repro.rows import GROUPS, find_row

NAME_WIDTH = 40  # about what MLflow's run-name column shows


def deviations(cfg: DictConfig, plan: BatchPlan) -> list[Deviation]:
    """How this run departs from its table row's exact recipe ([] = faithful): the keys that change the experiment
    (identity.changes_experiment), a custom composition, or BatchNorm over other images than the recipe's (a changed
    micro_batch, or a SyncBN recipe on fewer GPUs: the `plan`'s to say)."""
    row = find_row(cfg.row_name)  # the row_name resolver matched the choices (a release recipe: its table recipe)
    run = flatten(identity.identity(to_plain(cfg)))
    if row is None:
        return identity.deviations(None, run, cfg.row_name)
    bn = plan.bn_deviation()
    return identity.deviations(_row_identity(row.name), run, cfg.row_name) + ([bn] if bn else [])


@functools.cache
def _row_identity(row: str) -> dict[str, Any]:
    """The flattened identity of a row as its preset composes it (composed once per row and process)."""
    return flatten(identity.identity(to_plain(compose_row(row))))


def run_info(cfg: DictConfig, plan: BatchPlan) -> RunInfo:
    """The job's identity and provenance, read from Hydra's runtime where there is one."""
    from hydra.core.hydra_config import HydraConfig

    overrides, output_dir, sweep, log_file = [], ".", "", ""
    if HydraConfig.initialized():
        hc = HydraConfig.get()
        overrides = user_overrides(list(hc.overrides.task))
        output_dir = hc.runtime.output_dir
        log_file = str(Path(output_dir) / f"{hc.job.name}.log")
        if str(hc.mode) == "RunMode.MULTIRUN":
            sweep = hc.sweep.dir
    row = find_row(cfg.row_name)
    return RunInfo(
        row_name=cfg.row_name,
        config_hash=config_hash(cfg),
        plan=plan,
        run_name=run_name(cfg.row_name, int(cfg.seed), overrides),
        deviations=deviations(cfg, plan),
        overrides=overrides,
        output_dir=output_dir,
        log_file=log_file,
        sweep=sweep,
        config_yaml=OmegaConf.to_yaml(cfg, resolve=True),
        section=row.section if row else "custom",
    )


def run_name(row: str, seed: int, overrides: list[str], width: int = NAME_WIDTH) -> str:
    """A name a person can tell apart in the MLflow UI's column: the row (a custom composition: its model,
    dataset and the groups chosen besides), the seed, then the overrides that change the experiment
    (identity.changes_experiment) by their last key (`recipe.optimizer.lr=0.2` -> `lr=0.2`, `+smoke=on` ->
    `smoke`); cut with … past `width`."""
    keys = [o.split("=", 1)[0].lstrip("+~") for o in overrides]
    given = {k: o.split("=", 1)[1] for k, o in zip(keys, overrides, strict=True) if k in GROUPS}
    head = row
    if row.startswith("custom:"):  # custom:<model>-<stem>-<dataset>-<recipe>-<precision>; only recipe and
        model, _, dataset = (row.removeprefix("custom:").split("-") + ["", ""])[:3]  # precision hold hyphens
        chosen = [given[g] for g in ("stem", "recipe", "precision") if g in given and given[g] != dataset]
        head = " ".join([model, dataset, *chosen])
    named = (*GROUPS, "seed")  # said by the head and `s<seed>`
    changes = [o for k, o in zip(keys, overrides, strict=True) if identity.changes_experiment(k) and k not in named]
    name = " ".join([head, f"s{seed}", *map(_short, changes)])
    return name if len(name) <= width else name[: width - 1] + "…"


def _short(override: str) -> str:
    key, _, value = override.lstrip("+~").partition("=")
    if override.startswith("+") and "." not in key:  # an added group: +smoke=on -> smoke
        return key if value in ("on", "true") else f"{key}={value}"
    return f"{key.rpartition('.')[2]}={value}"
