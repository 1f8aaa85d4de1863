"""Composing and checking configs: conf/ lookup, one-line errors, row naming, config identity.

Hydra reports a bad override as a multi-line message (or a traceback with HYDRA_FULL_ERROR); the
command line is checked here first so that every mistake is one line naming the bad key and what
is allowed, before any job starts.
"""

from __future__ import annotations

import hashlib
import json
import re
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from omegaconf import DictConfig, ListConfig, OmegaConf

from resnet_repro.errors import UserError
from resnet_repro.rows import Row, composition_name, get_row, match_row

CONF_DIR = Path(__file__).resolve().parents[1] / "conf"
GROUP_DIRS = ("model", "stem", "dataset", "recipe", "precision", "row", "trainer", "tracking", "sweep")

# dataset.* keys that say where the data lies, not what it is: they never change a run's identity
# (`format` does: an image-folder copy of CIFAR is other data than the official archives)
DATA_LOCATION_KEYS = ("root", "download")
# trainer.* keys that change what is trained (the rest only change how fast or where)
TRAINER_IDENTITY_KEYS = ("micro_batch", "limit_train_batches", "limit_val_batches")


class ConfigError(UserError):
    """A composition or value that makes no sense: printed as one line, exit status 2."""


def register_resolvers() -> None:
    """`${table_row:...}` names the composition (conf/config.yaml: row_name)."""
    if not OmegaConf.has_resolver("table_row"):
        OmegaConf.register_new_resolver("table_row", _table_row)


def _table_row(depth: Any, stem: str, dataset: str, recipe: str, precision: str) -> str:
    choices = {"model": f"resnet{depth}", "stem": stem, "dataset": dataset, "recipe": recipe, "precision": precision}
    return composition_name(choices)


def group_options(group: str) -> list[str]:
    folder = CONF_DIR / group
    names = [p.stem for p in folder.glob("*.yaml")] if folder.is_dir() else []
    return sorted(names, key=lambda n: [int(t) if t.isdigit() else t for t in re.split(r"(\d+)", n)])


@contextmanager
def _hydra_context() -> Iterator[None]:
    """Hydra's compose API on conf/, also when called from inside a running Hydra app."""
    from hydra import initialize_config_dir
    from hydra.core.global_hydra import GlobalHydra

    if not CONF_DIR.is_dir():
        raise ConfigError(f"no config folder at {CONF_DIR}: install the project with `pip install -e .`")
    register_resolvers()
    if GlobalHydra.instance().is_initialized():
        saved = GlobalHydra.instance().hydra
        GlobalHydra.instance().clear()
    else:
        saved = None
    try:
        with initialize_config_dir(config_dir=str(CONF_DIR), version_base="1.3"):
            yield
    finally:
        if saved is not None:
            GlobalHydra.instance().initialize(saved)


def compose(overrides: Sequence[str] = ()) -> DictConfig:
    """The composed job config for these command-line overrides; any mistake is a ConfigError."""
    from hydra import compose as hydra_compose

    overrides = list(overrides)
    check_overrides(overrides)
    with _hydra_context():
        try:
            return hydra_compose(config_name="config", overrides=overrides)
        except Exception as err:
            raise ConfigError(_one_line(err, overrides)) from None


def _one_line(err: Exception, overrides: Sequence[str]) -> str:
    """Hydra's message in one line; for an unknown key, the keys its parent does have."""
    from hydra import compose as hydra_compose

    first = str(err).strip().splitlines()[0]
    bad = re.match(r"Could not override '([^']+)'", first)
    if not bad:
        return first
    key = bad.group(1)
    parent = key.rpartition(".")[0]
    rest = [o for o in overrides if o.split("=", 1)[0].lstrip("+~") != key]
    try:
        node = OmegaConf.select(hydra_compose(config_name="config", overrides=rest), parent) if parent else None
    except Exception:
        node = None
    known = f"; {parent} has: {', '.join(map(str, node.keys()))}" if isinstance(node, DictConfig) else ""
    return f"unknown key '{key}'{known}"


def compose_row(name: str, overrides: Sequence[str] = ()) -> DictConfig:
    get_row(name)  # a clear KeyError for an unknown row
    return compose([f"row={name}", *overrides])


def _parse(overrides: Sequence[str]) -> list[Any]:
    from hydra.core.override_parser.overrides_parser import OverridesParser

    try:
        return OverridesParser.create().parse_overrides(list(overrides))
    except Exception as err:
        raise ConfigError(str(err).strip().splitlines()[0]) from None


def check_overrides(overrides: Sequence[str]) -> None:
    """Every `group=option` names an existing option (each value of a sweep too)."""
    for ov in _parse(overrides):
        group = ov.key_or_group
        if group not in GROUP_DIRS or ov.is_delete() or ov.value_type is None:
            continue
        if ov.is_sweep_override():
            if "GLOB" in ov.value_type.name:
                continue
            values = list(ov.sweep_string_iterator())
        else:
            values = [ov.value()]
        allowed = group_options(group)
        for value in values:
            if value is not None and str(value) not in allowed:
                raise ConfigError(f"{group}={value} is not an option of '{group}'; allowed: {', '.join(allowed)}")


def expand_sweep(overrides: Sequence[str]) -> list[list[str]]:
    """The override list of every job a `--multirun` command line would launch (basic sweeper)."""
    from hydra._internal.core_plugins.basic_sweeper import BasicSweeper

    parsed = [ov for ov in _parse(overrides) if not ov.key_or_group.startswith("hydra")]
    if any(ov.value_type is not None and "GLOB" in ov.value_type.name for ov in parsed):
        return [list(overrides)]
    batches = BasicSweeper.split_arguments(parsed, None)
    return [job for batch in batches for job in batch]


def user_overrides(overrides: Sequence[str]) -> list[str]:
    """The overrides that shape the job (Hydra's own `hydra.*` settings left out)."""
    return [o for o in overrides if not o.lstrip("+~").startswith(("hydra.", "hydra/"))]


def flatten(node: Any, prefix: str = "") -> dict[str, Any]:
    """{"recipe.optimizer.lr": 0.1, ...}; lists stay whole (as JSON) so pipelines read as one value."""
    if isinstance(node, DictConfig | dict):
        container = node if isinstance(node, dict) else OmegaConf.to_container(node, resolve=True)
        out: dict[str, Any] = {}
        for key, value in container.items():
            out.update(flatten(value, f"{prefix}{key}."))
        return out
    if isinstance(node, ListConfig):
        node = OmegaConf.to_container(node, resolve=True)
    return {prefix[:-1]: json.dumps(node) if isinstance(node, list) else node}


def identity(cfg: DictConfig) -> dict[str, Any]:
    """What a run trains: two configs with equal identities give the same experiment."""
    plain = OmegaConf.to_container(cfg, resolve=True)
    ident = {k: plain[k] for k in ("model", "stem", "recipe", "precision", "seed")}
    ident["dataset"] = {k: v for k, v in plain["dataset"].items() if k not in DATA_LOCATION_KEYS}
    ident["trainer"] = {k: plain["trainer"][k] for k in TRAINER_IDENTITY_KEYS}
    return ident


def config_hash(cfg: DictConfig) -> str:
    blob = json.dumps(identity(cfg), sort_keys=True, default=str)
    return hashlib.sha256(blob.encode()).hexdigest()[:12]


def table_row(cfg: DictConfig) -> Row | None:
    """The table row a composed config stands for (a release recipe counts as its table recipe), or None."""
    return match_row(
        {
            "model": f"resnet{cfg.model.depth}",
            "stem": cfg.stem.name,
            "dataset": cfg.dataset.name,
            "recipe": cfg.recipe.table_recipe,
            "precision": cfg.precision.name,
        }
    )


def deviations(cfg: DictConfig) -> list[str]:
    """How this run departs from its table row's exact recipe (`key=value`); [] = faithful.

    Empty only for a table row composed with nothing changed but where the data lies and how the
    run executes. Custom compositions deviate by definition.
    """
    row = table_row(cfg)
    if row is None:
        return [f"custom composition {cfg.row_name}"]
    reference = flatten(identity(compose_row(row.name)))
    actual = flatten(identity(cfg))
    diffs = [
        f"{k}={actual.get(k)}"
        for k in sorted(set(reference) | set(actual))
        if k != "trainer.micro_batch" and reference.get(k) != actual.get(k)
    ]
    micro = cfg.trainer.micro_batch
    if micro is not None and int(micro) != int(cfg.recipe.batch_per_gpu):
        diffs.append(f"trainer.micro_batch={micro} (BN statistics over {micro}, recipe: {cfg.recipe.batch_per_gpu})")
    return diffs


def to_plain(cfg: DictConfig) -> dict[str, Any]:
    """The resolved config as plain Python (what the engine and the workers receive)."""
    return OmegaConf.to_container(cfg, resolve=True)  # type: ignore[return-value]


CHOICES: dict[str, tuple[Any, ...]] = {
    "trainer.device": ("auto", "cpu", "cuda"),
    "trainer.channels_last": ("auto", True, False),
    "precision.autocast_dtype": (None, "float16", "bfloat16"),
    "recipe.optimizer.name": ("sgd", "lamb"),
    "recipe.schedule.decay": ("step", "cosine"),
    "recipe.schedule.cosine_span": ("after_warmup", "whole_run"),
    "recipe.loss.name": ("softmax_ce", "bce"),
    "recipe.model.drop_path_rule": ("linear", "uniform"),
}


def validate(cfg: DictConfig, world_size: int | None = None) -> None:
    """Refuse compositions and values that make no sense, with one line naming the key and what is allowed."""
    for key, allowed in CHOICES.items():
        value = OmegaConf.select(cfg, key)
        if value not in allowed:
            raise ConfigError(f"{key}={value} is not allowed; allowed: {', '.join(map(str, allowed))}")
    ds, stem, recipe = cfg.dataset, cfg.stem, cfg.recipe
    if stem.name not in ds.stems:
        raise ConfigError(f"stem={stem.name} does not fit dataset={ds.name}; allowed stems: {', '.join(ds.stems)}")
    if ds.name not in recipe.datasets:
        fits = ", ".join(r for r in group_options("recipe") if ds.name in _recipe_datasets(r))
        raise ConfigError(f"recipe={recipe.name} is not for dataset={ds.name}; recipes for {ds.name}: {fits}")
    scale = cfg.precision.loss_scale
    if not (scale is None or scale == "dynamic" or (isinstance(scale, int | float) and scale > 0)):
        raise ConfigError(f"precision.loss_scale={scale} is not allowed; allowed: null, dynamic, a positive number")
    for key in ("recipe.epochs", "recipe.gpus", "recipe.batch_per_gpu", "trainer.nproc_per_node"):
        value = OmegaConf.select(cfg, key)
        if not isinstance(value, int) or value < 1:
            raise ConfigError(f"{key}={value} must be a positive integer")
    for k in recipe.eval_topk:
        if k > ds.num_classes:
            raise ConfigError(f"recipe.eval_topk has {k} but dataset={ds.name} has {ds.num_classes} classes")
    workers = cfg.trainer.num_workers
    if workers != "auto" and not (isinstance(workers, int) and workers >= 0):
        raise ConfigError(f"trainer.num_workers={workers} is not allowed; allowed: auto or a count >= 0")
    _check_batches(cfg, world_size or int(cfg.trainer.nproc_per_node))
    resume = str(cfg.trainer.resume)
    if resume not in ("auto", "none", "None") and not Path(resume).is_file():
        raise ConfigError(f"trainer.resume={resume} is not a file; allowed: auto, none, or a checkpoint path")


def _recipe_datasets(name: str) -> list[str]:
    from hydra import compose as hydra_compose

    with _hydra_context():
        return list(hydra_compose(config_name="config", overrides=[f"recipe={name}"]).recipe.datasets)


def global_batch(cfg: DictConfig) -> int:
    return int(cfg.recipe.gpus) * int(cfg.recipe.batch_per_gpu)


def micro_batch(cfg: DictConfig) -> int:
    return int(cfg.trainer.micro_batch or cfg.recipe.batch_per_gpu)


def _check_batches(cfg: DictConfig, world_size: int) -> None:
    total, micro = global_batch(cfg), micro_batch(cfg)
    if total % world_size:
        raise ConfigError(
            f"the global batch {total} ({cfg.recipe.gpus}x{cfg.recipe.batch_per_gpu}) does not split "
            f"over {world_size} processes; use a world size dividing {total}"
        )
    per_device = total // world_size
    if per_device % micro:
        raise ConfigError(f"trainer.micro_batch={micro} does not divide the per-device batch {per_device}")
