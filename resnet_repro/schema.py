"""Types and allowed values of the settings, each rule beside its field.

The dataclasses are registered in Hydra's ConfigStore as `trainer/schema` and `tracking/schema`, which
the YAML files list first in their defaults: Hydra then refuses unknown keys and values of the wrong
type (`trainer.micro_batch=abc`). What a type cannot say — a choice among words, a range — is the `rule`
in each field's metadata. The recipe, precision, dataset and seed values (YAML groups without a dataclass:
the recipe's own files) have their rule beside their key in `VALUE_RULES`. `check_values` checks them all.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass, field, fields
from typing import Any

from omegaconf import DictConfig, OmegaConf

from resnet_repro.tracking.uri import URI_FORMS, uri_problem

Rule = Callable[[str, Any], str | None]  # (dotted key, value) -> the one-line problem, None when it fits
SEED_MAX = 2**32 - 1  # NumPy's seeds are 32-bit (mmengine draws its seeds below 2**31)


def _integer(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _real(value: Any) -> bool:
    return isinstance(value, int | float) and not isinstance(value, bool) and math.isfinite(value)


def choice(*allowed: Any) -> Rule:
    """One of `allowed` (of its type too: true is not "true")."""

    def rule(key: str, value: Any) -> str | None:
        if any(value == a and type(value) is type(a) for a in allowed):
            return None
        words = ", ".join("null" if a is None else str(a).lower() for a in allowed)
        return f"{key}={value} is not allowed; allowed: {words}"

    return rule


def integer(least: int, most: int | None = None, *, null: bool = False, auto: bool = False) -> Rule:
    """An integer in [least, most] (`null`: or null; `auto`: or auto)."""

    def rule(key: str, value: Any) -> str | None:
        if (null and value is None) or (auto and value == "auto"):
            return None
        if _integer(value) and least <= value and (most is None or value <= most):
            return None
        allowed = f"an integer in [{least}, {most}]" if most is not None else f"an integer >= {least}"
        allowed = f"auto or {allowed}" if auto else f"{allowed} or null" if null else allowed
        return f"{key}={value} {'is out of range' if _integer(value) else 'is not allowed'}; allowed: {allowed}"

    return rule


def number(low: float, low_ok: bool, high: float, high_ok: bool, *, null: bool = True) -> Rule:
    """A number between `low` and `high`, each end allowed or not (`null`: or absent)."""

    def rule(key: str, value: Any) -> str | None:
        if null and value is None:
            return None
        if _real(value) and (value > low or (low_ok and value == low)) and (value < high or high_ok):
            return None
        bounds = f"{'[' if low_ok else '('}{low:g}, {high:g}{']' if high_ok else ')'}"
        return f"{key}={value} {'is out of range' if _real(value) else 'is not allowed'}; allowed: a number in {bounds}"

    return rule


def loss_scale(key: str, value: Any) -> str | None:
    if value is None or value == "dynamic" or (_real(value) and value > 0):
        return None
    return f"{key}={value} is not allowed; allowed: null, dynamic, a positive number"


def milestones(key: str, value: Any) -> str | None:
    epochs = list(value or [])
    if all(_integer(m) and m > 0 for m in epochs) and epochs == sorted(epochs):
        return None
    return f"{key}={epochs} is not allowed; allowed: rising positive epoch numbers"


def experiment_name(key: str, value: Any) -> str | None:
    fits = isinstance(value, str) and value.strip()
    return None if fits else f"{key}={value!r} is not allowed; allowed: a non-empty name"


def tracking_uri(key: str, value: Any) -> str | None:
    problem = uri_problem(value)
    return f"{key}={value} {problem}; allowed: {URI_FORMS}" if problem else None


def _ruled(rule: Rule, default: Any) -> Any:
    return field(default=default, metadata={"rule": rule})


SWITCH = choice("auto", True, False)


@dataclass
class TrainerSchema:
    device: str = "auto"  # checked by distributed.check_device (cuda:N needs a visible GPU N)
    nproc_per_node: int = _ruled(integer(1), 1)
    max_restarts: int = _ruled(integer(0), 0)
    threads: Any = _ruled(integer(1, auto=True), "auto")
    micro_batch: int | None = _ruled(integer(1, null=True), None)
    forward_batch: int | None = _ruled(integer(1, null=True), None)
    data_on_device: Any = _ruled(SWITCH, "auto")
    decode: str = _ruled(choice("auto", "cpu", "device"), "auto")  # auto: device on CUDA where it runs the recipe
    num_workers: Any = _ruled(integer(0, auto=True), "auto")
    channels_last: Any = _ruled(SWITCH, "auto")
    compile: Any = _ruled(choice(False, True, "reduce-overhead", "max-autotune"), False)  # reduce-overhead: CUDA graphs
    bn_group_kernel: str = _ruled(choice("auto", "per-group", "one-kernel"), "auto")  # bn_groups.resolve_kernel
    tf32: Any = _ruled(SWITCH, "auto")
    deterministic: bool = False
    resume: str = "auto"  # checked by checkpoint.check_resume_setting (auto, none, or a checkpoint of this config)
    warm_start: bool = False
    trust_checkpoint: bool = False
    skip_finished: bool = True
    checkpoint_root: str = "checkpoints"
    checkpoints: str = _ruled(choice("last+best", "last", "none"), "last+best")
    keep_archived: int = _ruled(integer(0), 2)
    log_every_n_steps: int = _ruled(integer(1), 50)
    limit_train_batches: int | None = _ruled(integer(1, null=True), None)
    limit_val_batches: int | None = _ruled(integer(1, null=True), None)


@dataclass
class TrackingSchema:
    # null: sqlite:///<launch dir>/mlflow.db; none: no tracking (tracking.uri.uri_problem)
    uri: str | None = _ruled(tracking_uri, None)
    experiment: str = _ruled(experiment_name, "resnet_repro")
    log_checkpoint: bool = False
    log_model: bool = False
    system_metrics: bool = True


# The values of the YAML groups without a schema (the recipe's own files), each beside its rule
VALUE_RULES: dict[str, Rule] = {
    "seed": integer(0, SEED_MAX),
    "dataset.input_size": integer(1),  # both hashed into the run's identity: they must be what is trained
    "dataset.num_classes": integer(1),
    "precision.autocast_dtype": choice(None, "float16", "bfloat16"),
    "precision.loss_scale": loss_scale,
    "recipe.epochs": integer(1),
    "recipe.gpus": integer(1),
    "recipe.batch_per_gpu": integer(1),
    "recipe.optimizer.name": choice("sgd", "lamb"),
    "recipe.optimizer.lr": number(0.0, False, math.inf, False, null=False),
    "recipe.optimizer.weight_decay": number(0.0, True, math.inf, False),
    "recipe.optimizer.momentum": number(0.0, True, 1.0, False),
    "recipe.schedule.decay": choice("step", "cosine"),
    "recipe.schedule.cosine_span": choice("after_warmup", "whole_run"),  # mmengine's; mmcv 1.x release configs'
    "recipe.schedule.warmup_epochs": integer(0),  # a smoke run shorter than the warmup stays in it, as mmengine's
    "recipe.schedule.warmup_start_factor": number(0.0, False, 1.0, True),
    "recipe.schedule.milestones": milestones,
    "recipe.schedule.gamma": number(0.0, False, 1.0, True),
    "recipe.schedule.min_lr": number(0.0, True, math.inf, False),
    "recipe.sampler.repeats": integer(1, null=True),
    "recipe.loss.name": choice("softmax_ce", "bce"),
    "recipe.loss.label_smoothing": number(0.0, True, 1.0, False),
    "recipe.model.drop_path_rule": choice("linear", "uniform"),
    "recipe.model.drop_path_rate": number(0.0, True, 1.0, False),
}


def register() -> None:
    from hydra.core.config_store import ConfigStore

    store = ConfigStore.instance()
    store.store(group="trainer", name="schema", node=TrainerSchema)
    store.store(group="tracking", name="schema", node=TrackingSchema)


def check_values(cfg: DictConfig) -> str | None:
    """The first value outside its rule, as a one-line message; None when all fit."""
    schemas = {"trainer": TrainerSchema, "tracking": TrackingSchema}
    ruled = {f"{s}.{f.name}": f.metadata["rule"] for s, d in schemas.items() for f in fields(d) if "rule" in f.metadata}
    for key, rule in {**ruled, **VALUE_RULES}.items():
        if problem := rule(key, OmegaConf.select(cfg, key)):
            return problem
    return None
