"""Composing and checking configs: conf/ lookup, one-line errors, the table row and deviations of a config.

Hydra reports a bad override as a multi-line message (or a traceback with HYDRA_FULL_ERROR); the
command line is checked here first so that every mistake is one line naming the bad key and what
is allowed, before any job starts.
"""

from __future__ import annotations

import re
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from omegaconf import DictConfig, OmegaConf

from resnet_repro import batches, identity, schema
from resnet_repro.batches import BatchPlan
from resnet_repro.errors import UserError
from resnet_repro.rows import composition_name, get_row
from resnet_repro.tracking.run import flat_params

CONF_DIR = Path(__file__).resolve().parents[1] / "conf"
GROUP_DIRS = ("model", "stem", "dataset", "recipe", "precision", "row", "trainer", "tracking", "sweep", "smoke")
# torch (distributed, checkpoint) is imported only where a check needs it: composing a command line, and the
# first line a run prints, come before the seconds its import takes
_ABSENT = object()


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


def parse_overrides(overrides: Sequence[str]) -> list[Any]:
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
    for ov in parse_overrides(overrides):
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


def user_overrides(overrides: Sequence[str]) -> list[str]:
    """The overrides that shape the job (Hydra's own `hydra.*` settings left out)."""
    return [o for o in overrides if not o.lstrip("+~").startswith(("hydra.", "hydra/"))]


def flatten(node: Any) -> dict[str, Any]:
    """{"recipe.optimizer.lr": 0.1, ...}; lists stay whole (as JSON) so pipelines read as one value."""
    return flat_params(OmegaConf.to_container(node, resolve=True) if isinstance(node, DictConfig) else node)


def config_hash(cfg: DictConfig) -> str:
    """The hash of what the config trains (identity.config_hash)."""
    return identity.config_hash(to_plain(cfg))


def to_plain(cfg: DictConfig) -> dict[str, Any]:
    """The resolved config as plain Python (what the engine and the workers receive)."""
    return OmegaConf.to_container(cfg, resolve=True)  # type: ignore[return-value]


def validate(cfg: DictConfig, world_size: int | None = None) -> BatchPlan:
    """Refuse compositions and values that make no sense, with one line naming the key and what is allowed; the
    batch plan on `world_size` processes (default: the job's, distributed.job_world_size).

    Everything that can be known from the config is checked here, before any job of a sweep starts;
    the data is checked when the job builds it, before the first step.
    """
    from resnet_repro import distributed
    from resnet_repro.checkpoint import check_resume_setting
    from resnet_repro.data.device_decode import check_setting

    problem = schema.check_values(cfg)
    if problem:
        raise ConfigError(problem)
    _check_composition(cfg)
    try:
        check_setting(to_plain(cfg)) if cfg.trainer.decode == "device" else None  # a recipe it cannot run?
    except ValueError as err:
        raise ConfigError(str(err)) from None
    tr = cfg.trainer
    try:
        plan = batches.plan(cfg, world_size or distributed.job_world_size(tr.nproc_per_node))
        distributed.check_device(str(tr.device), plan.world)
        check_resume_setting(str(tr.resume), bool(tr.warm_start), bool(tr.trust_checkpoint), config_hash(cfg))
    except UserError as err:
        raise ConfigError(str(err)) from None
    return plan


def _check_composition(cfg: DictConfig) -> None:
    ds, stem, recipe = cfg.dataset, cfg.stem, cfg.recipe
    if stem.name not in ds.stems:
        raise ConfigError(f"stem={stem.name} does not fit dataset={ds.name}; allowed stems: {', '.join(ds.stems)}")
    if ds.name not in recipe.datasets:
        fits = ", ".join(r for r in group_options("recipe") if ds.name in _recipe_datasets(r))
        raise ConfigError(f"recipe={recipe.name} is not for dataset={ds.name}; recipes for {ds.name}: {fits}")


def _recipe_datasets(name: str) -> list[str]:
    from hydra import compose as hydra_compose

    with _hydra_context():
        return list(hydra_compose(config_name="config", overrides=[f"recipe={name}"]).recipe.datasets)
