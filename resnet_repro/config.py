"""Composing and checking configs: conf/ lookup, one-line errors, row naming, config identity.

Hydra reports a bad override as a multi-line message (or a traceback with HYDRA_FULL_ERROR); the
command line is checked here first so that every mistake is one line naming the bad key and what
is allowed, before any job starts.
"""

from __future__ import annotations

import functools
import hashlib
import json
import math
import re
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from omegaconf import DictConfig, OmegaConf

from resnet_repro import batches, schema
from resnet_repro.batches import BatchPlan
from resnet_repro.errors import UserError
from resnet_repro.rows import Row, composition_name, get_row, match_row
from resnet_repro.tracking.run import flat_params
from resnet_repro.tracking.uri import URI_FORMS, uri_problem

CONF_DIR = Path(__file__).resolve().parents[1] / "conf"
GROUP_DIRS = ("model", "stem", "dataset", "recipe", "precision", "row", "trainer", "tracking", "sweep", "smoke")
# torch (distributed, checkpoint) is imported only where a check needs it: composing a command line, and the
# first line a run prints, come before the seconds its import takes

# dataset.* keys that say where the data lies, not what it is: they never change a run's identity
# (`format` does: an image-folder copy of CIFAR is other data than the official archives)
DATA_LOCATION_KEYS = ("root", "download")
_ABSENT = object()
# trainer.* keys that change what is trained (the rest only change how fast or where)
TRAINER_IDENTITY_KEYS = ("micro_batch", "limit_train_batches", "limit_val_batches")


class ConfigError(UserError):
    """A composition or value that makes no sense: printed as one line, exit status 2."""


def register_resolvers() -> None:
    """`${table_row:...}` names the composition (conf/config.yaml: row_name); the trainer/tracking schemas."""
    if not OmegaConf.has_resolver("table_row"):
        OmegaConf.register_new_resolver("table_row", _table_row)
    schema.register()


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
    added = check_overrides(overrides)
    with _hydra_context():
        try:
            cfg = hydra_compose(config_name="config", overrides=overrides)
        except Exception as err:
            raise ConfigError(_one_line(err, overrides)) from None
        if added:
            _check_added(added, overrides)
    return cfg


def _check_added(added: Sequence[str], overrides: Sequence[str]) -> None:
    """`+key=value` adds a key the config lacks (Hydra lets it through its schemas): nothing would read it, so
    a typo would change nothing while the run is recorded as changed. Only keys the config has are taken."""
    from hydra import compose as hydra_compose

    rest = [o for o in overrides if o.split("=", 1)[0].lstrip("+~") not in added]
    base = hydra_compose(config_name="config", overrides=rest)
    for key in added:
        if OmegaConf.select(base, key, default=_ABSENT) is _ABSENT:
            raise ConfigError(_unknown(key, rest, how=" (added with +)"))


def _one_line(err: Exception, overrides: Sequence[str]) -> str:
    """Hydra's message in one line; for an unknown key, the keys its parent does have."""
    first = str(err).strip().splitlines()[0]
    bad = re.match(r"Could not override '([^']+)'", first)
    if not bad:
        return first
    key = bad.group(1)
    return _unknown(key, [o for o in overrides if o.split("=", 1)[0].lstrip("+~") != key])


def _unknown(key: str, rest: Sequence[str], how: str = "") -> str:
    """ "unknown key 'a.b'" with the keys of the config it may have meant, or else the keys its parent has."""
    from hydra import compose as hydra_compose

    close = _did_you_mean(key, rest)
    parent = key.rpartition(".")[0]
    try:
        node = OmegaConf.select(hydra_compose(config_name="config", overrides=rest), parent) if parent else None
    except Exception:
        node = None
    known = f"; {parent} has: {', '.join(map(str, node.keys()))}" if isinstance(node, DictConfig) else ""
    return f"unknown key '{key}'{how}{close or known}"


def _did_you_mean(key: str, overrides: Sequence[str]) -> str:
    """`epochs=1` -> "; did you mean recipe.epochs?": keys of the config ending like the unknown one."""
    import difflib

    from hydra import compose as hydra_compose

    try:
        leaves = list(flatten(hydra_compose(config_name="config", overrides=list(overrides))))
    except Exception:
        return ""
    last = key.rpartition(".")[2]
    same = [k for k in leaves if k.rpartition(".")[2] == last]
    close = same or difflib.get_close_matches(key, leaves, n=3, cutoff=0.75)
    return f"; did you mean {' or '.join(close[:3])}?" if close else ""


def compose_row(name: str, overrides: Sequence[str] = ()) -> DictConfig:
    get_row(name)  # a clear KeyError for an unknown row
    return compose([f"row={name}", *overrides])


def _parse(overrides: Sequence[str]) -> list[Any]:
    from hydra.core.override_parser.overrides_parser import OverridesParser

    try:
        return OverridesParser.create().parse_overrides(list(overrides))
    except Exception as err:
        raise ConfigError(_unquoted(overrides) or str(err).strip().splitlines()[0]) from None


def _unquoted(overrides: Sequence[str]) -> str:
    """Hydra's grammar takes only ASCII in an unquoted value (LexerNoViableAltException): say to quote it."""
    for override in overrides:
        key, _, value = override.partition("=")
        odd = [c for c in value if not c.isascii()]
        if odd and value[:1] not in ("'", '"'):
            return (
                f"{override}: the value has a character Hydra's override parser takes only in quotes ({odd[0]!r}); "
                f"quote it: \"{key}='{value}'\""
            )
    return ""


def check_overrides(overrides: Sequence[str]) -> list[str]:
    """Every `group=option` names an existing option (each value of a sweep too); the keys added with `+`
    (or `++`) that are not config groups, for `_check_added`."""
    added = []
    for ov in _parse(overrides):
        group = ov.key_or_group
        if (ov.is_add() or ov.is_force_add()) and group not in GROUP_DIRS:
            added.append(group)
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
    return added


def hydra_internals() -> tuple[Callable[[], Any], Any]:
    """Hydra's command-line parser and basic sweeper, so that a command line is read and expanded exactly as
    Hydra will. Private modules (stable since Hydra 1.1): the only place that touches hydra._internal."""
    from hydra._internal.core_plugins.basic_sweeper import BasicSweeper
    from hydra._internal.utils import get_args_parser

    return get_args_parser, BasicSweeper


def expand_sweep(overrides: Sequence[str]) -> list[list[str]]:
    """The override list of every job a `--multirun` command line would launch (basic sweeper)."""
    _, BasicSweeper = hydra_internals()  # noqa: N806 - a class
    parsed = [ov for ov in _parse(overrides) if not ov.key_or_group.startswith("hydra")]
    if any(ov.value_type is not None and "GLOB" in ov.value_type.name for ov in parsed):
        return [list(overrides)]
    batches = BasicSweeper.split_arguments(parsed, None)
    return [job for batch in batches for job in batch]


def user_overrides(overrides: Sequence[str]) -> list[str]:
    """The overrides that shape the job (Hydra's own `hydra.*` settings left out)."""
    return [o for o in overrides if not o.lstrip("+~").startswith(("hydra.", "hydra/"))]


def flatten(node: Any) -> dict[str, Any]:
    """{"recipe.optimizer.lr": 0.1, ...}; lists stay whole (as JSON) so pipelines read as one value."""
    return flat_params(OmegaConf.to_container(node, resolve=True) if isinstance(node, DictConfig) else node)


def identity(cfg: DictConfig) -> dict[str, Any]:
    """What a run trains: two configs with equal identities give the same experiment."""
    plain = OmegaConf.to_container(cfg, resolve=True)
    ident = {k: plain[k] for k in ("model", "stem", "recipe", "precision", "seed")}
    ident["dataset"] = {k: v for k, v in plain["dataset"].items() if k not in DATA_LOCATION_KEYS}
    ident["trainer"] = {k: plain["trainer"][k] for k in TRAINER_IDENTITY_KEYS}
    if plain["trainer"]["warm_start"]:  # a new run from another run's weights is another experiment
        ident["trainer"]["warm_start"] = str(plain["trainer"]["resume"])
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


def deviations(cfg: DictConfig, world_size: int | None = None) -> list[str]:
    """How this run departs from its table row's exact recipe (`key=value`); [] = faithful.

    Empty only for a table row composed with nothing changed but where the data lies and how the
    run executes. Custom compositions deviate by definition. BatchNorm over another number of images
    than the recipe (a changed micro_batch, or a SyncBN recipe on fewer GPUs) is one deviation,
    computed by the batch plan on `world_size` processes (default: trainer.nproc_per_node).
    """
    row = table_row(cfg)
    if row is None:
        return [f"custom composition {cfg.row_name}"]
    reference = _reference_identity(row.name)
    actual = flatten(identity(cfg))
    diffs = [
        f"{k}={actual.get(k)}"
        for k in sorted(set(reference) | set(actual))
        if k != "trainer.micro_batch" and reference.get(k) != actual.get(k)
    ]
    bn = batch_plan(cfg, world_size).bn_deviation()
    return diffs + ([bn] if bn else [])


@functools.cache
def _reference_identity(row: str) -> dict[str, Any]:
    """The flattened identity of a row as its preset composes it (composed once per row and process)."""
    return flatten(identity(compose_row(row)))


def batch_plan(cfg: DictConfig, world_size: int | None = None) -> BatchPlan:
    from resnet_repro import distributed

    world = world_size or int(cfg.trainer.nproc_per_node)
    try:
        return batches.plan(cfg, world, distributed.uses_cuda(str(cfg.trainer.device)))
    except UserError as err:
        raise ConfigError(str(err)) from None


def to_plain(cfg: DictConfig) -> dict[str, Any]:
    """The resolved config as plain Python (what the engine and the workers receive)."""
    return OmegaConf.to_container(cfg, resolve=True)  # type: ignore[return-value]


def validate(cfg: DictConfig, world_size: int | None = None) -> None:
    """Refuse compositions and values that make no sense, with one line naming the key and what is allowed.

    Everything that can be known from the config is checked here, before any job of a sweep starts;
    the data is checked when the job builds it, before the first step.
    """
    problem = schema.check_values(cfg)
    if problem:
        raise ConfigError(problem)
    _check_identity_values(cfg)
    _check_composition(cfg)
    _check_recipe_numbers(cfg)
    if cfg.trainer.decode == "device":  # on a recipe or dataset the device cannot run?
        from resnet_repro.data.device_decode import check_setting

        try:
            check_setting(to_plain(cfg))
        except ValueError as err:
            raise ConfigError(str(err)) from None
    batch_plan(cfg, world_size)
    from resnet_repro import distributed

    try:
        distributed.check_device(str(cfg.trainer.device))
    except UserError as err:
        raise ConfigError(str(err)) from None
    _check_tracking(cfg)
    _check_resume(cfg)


def _check_tracking(cfg: DictConfig) -> None:
    experiment = cfg.tracking.experiment
    if not isinstance(experiment, str) or not experiment.strip():
        raise ConfigError(f"tracking.experiment={experiment!r} is not allowed; allowed: a non-empty name")
    problem = uri_problem(cfg.tracking.uri)
    if problem:
        raise ConfigError(f"tracking.uri={cfg.tracking.uri} {problem}; allowed: {URI_FORMS}")


SEED_MAX = 2**32 - 1  # NumPy's seeds are 32-bit (mmengine draws its seeds below 2**31)


def _check_identity_values(cfg: DictConfig) -> None:
    """The seed and the dataset's sizes: values a run's identity is hashed from must be what is trained."""
    seed = cfg.seed
    if not _integer(seed) or not 0 <= seed <= SEED_MAX:
        raise ConfigError(f"seed={seed} is not allowed; allowed: an integer in [0, {SEED_MAX}]")
    for key in ("dataset.input_size", "dataset.num_classes"):
        value = OmegaConf.select(cfg, key)
        if not _integer(value) or value < 1:
            raise ConfigError(f"{key}={value} must be a positive integer")


def _integer(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _check_composition(cfg: DictConfig) -> None:
    ds, stem, recipe = cfg.dataset, cfg.stem, cfg.recipe
    if stem.name not in ds.stems:
        raise ConfigError(f"stem={stem.name} does not fit dataset={ds.name}; allowed stems: {', '.join(ds.stems)}")
    if ds.name not in recipe.datasets:
        fits = ", ".join(r for r in group_options("recipe") if ds.name in _recipe_datasets(r))
        raise ConfigError(f"recipe={recipe.name} is not for dataset={ds.name}; recipes for {ds.name}: {fits}")


def _check_recipe_numbers(cfg: DictConfig) -> None:
    scale = cfg.precision.loss_scale
    if not (scale is None or scale == "dynamic" or (_number(scale) and scale > 0)):
        raise ConfigError(f"precision.loss_scale={scale} is not allowed; allowed: null, dynamic, a positive number")
    for key in ("recipe.epochs", "recipe.gpus", "recipe.batch_per_gpu"):
        value = OmegaConf.select(cfg, key)
        if not isinstance(value, int) or isinstance(value, bool) or value < 1:
            raise ConfigError(f"{key}={value} must be a positive integer")
    ranges = {  # key: (least, least allowed?, most, most allowed?)
        "recipe.optimizer.lr": (0.0, False, math.inf, False),
        "recipe.optimizer.weight_decay": (0.0, True, math.inf, False),
        "recipe.optimizer.momentum": (0.0, True, 1.0, False),
    }
    ranges |= {
        "recipe.schedule.warmup_start_factor": (0.0, False, 1.0, True),
        "recipe.schedule.gamma": (0.0, False, 1.0, True),
        "recipe.schedule.min_lr": (0.0, True, math.inf, False),
        "recipe.loss.label_smoothing": (0.0, True, 1.0, False),
        "recipe.model.drop_path_rate": (0.0, True, 1.0, False),
    }
    _check_counts(cfg)
    for key, (low, low_ok, high, high_ok) in ranges.items():
        value = OmegaConf.select(cfg, key)
        if value is None and key != "recipe.optimizer.lr":
            continue
        fits = _number(value) and (value > low or (low_ok and value == low)) and (value < high or high_ok)
        if not fits:
            bounds = f"{'[' if low_ok else '('}{low:g}, {high:g}{']' if high_ok else ')'}"
            raise ConfigError(f"{key}={value} is out of range; allowed: a number in {bounds}")


def _check_counts(cfg: DictConfig) -> None:
    """Epoch counts of the schedule: a warmup of >= 0 epochs (a smoke run shorter than the warmup stays in it,
    as mmengine's would), rising milestones, repeats >= 1."""
    warmup = OmegaConf.select(cfg, "recipe.schedule.warmup_epochs")
    if not _integer(warmup) or warmup < 0:
        raise ConfigError(f"recipe.schedule.warmup_epochs={warmup} is out of range; allowed: an integer >= 0")
    milestones = OmegaConf.select(cfg, "recipe.schedule.milestones") or []
    if not all(_integer(m) and m > 0 for m in milestones) or list(milestones) != sorted(milestones):
        raise ConfigError(
            f"recipe.schedule.milestones={list(milestones)} is not allowed; allowed: rising positive epoch numbers"
        )
    repeats = OmegaConf.select(cfg, "recipe.sampler.repeats")
    if repeats is not None and (not _integer(repeats) or repeats < 1):
        raise ConfigError(f"recipe.sampler.repeats={repeats} must be a positive integer")


def _number(value: Any) -> bool:
    return isinstance(value, int | float) and not isinstance(value, bool) and math.isfinite(value)


def _check_resume(cfg: DictConfig) -> None:
    """A checkpoint named by trainer.resume loads (without running code) and, unless warm_start, is this
    config's last.pt."""
    from resnet_repro.checkpoint import RESUME_MODES, check_resumable, load

    resume, trusted = str(cfg.trainer.resume), bool(cfg.trainer.trust_checkpoint)
    if resume not in RESUME_MODES and not Path(resume).is_file():
        raise ConfigError(f"trainer.resume={resume} is not a file; allowed: auto, none, or a checkpoint path")
    if cfg.trainer.warm_start and resume in RESUME_MODES:
        raise ConfigError("trainer.warm_start=true needs trainer.resume=<checkpoint path> to start from")
    if resume in RESUME_MODES:
        return
    try:
        if cfg.trainer.warm_start:
            load(Path(resume), mmap=True, trusted=trusted)
        else:
            check_resumable(Path(resume), config_hash(cfg), trusted)
    except UserError as err:
        raise ConfigError(str(err)) from None


def _recipe_datasets(name: str) -> list[str]:
    from hydra import compose as hydra_compose

    with _hydra_context():
        return list(hydra_compose(config_name="config", overrides=[f"recipe={name}"]).recipe.datasets)
