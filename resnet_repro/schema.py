"""Types and allowed values of the settings that are not recipe numbers (`trainer`, `tracking`).

The dataclasses are registered in Hydra's ConfigStore as `trainer/schema` and `tracking/schema`, which
the YAML files list first in their defaults: Hydra then refuses unknown keys and values of the wrong
type (`trainer.micro_batch=abc`). What a type cannot say — a choice among words, a range — is in
each field's metadata (`choices`: an Enum of the allowed values; `min`: the least allowed number)
and checked by `check_values`, so every rule stands beside its field.
"""

from __future__ import annotations

from dataclasses import dataclass, field, fields
from enum import Enum
from typing import Any

from omegaconf import DictConfig, OmegaConf


class Switch(Enum):
    AUTO = "auto"
    ON = True
    OFF = False


class Decode(Enum):
    AUTO = "auto"  # device on CUDA for the recipes it runs (data.device_decode)
    CPU = "cpu"
    DEVICE = "device"


class Compile(Enum):
    OFF = False
    DEFAULT = True
    REDUCE_OVERHEAD = "reduce-overhead"  # CUDA graphs: small launch-bound steps
    MAX_AUTOTUNE = "max-autotune"


class BnGroupKernel(Enum):
    AUTO = "auto"  # one-kernel on CUDA, per-group elsewhere (bn_groups.resolve_kernel)
    PER_GROUP = "per-group"
    ONE_KERNEL = "one-kernel"


class Checkpoints(Enum):
    LAST_BEST = "last+best"
    LAST = "last"
    NONE = "none"


class OptimizerName(Enum):
    SGD = "sgd"
    LAMB = "lamb"


class Decay(Enum):
    STEP = "step"
    COSINE = "cosine"


class CosineSpan(Enum):
    AFTER_WARMUP = "after_warmup"  # mmengine
    WHOLE_RUN = "whole_run"  # mmcv 1.x release configs


class LossName(Enum):
    SOFTMAX_CE = "softmax_ce"
    BCE = "bce"


class DropPathRule(Enum):
    LINEAR = "linear"
    UNIFORM = "uniform"


class AutocastDtype(Enum):
    NONE = None
    FLOAT16 = "float16"
    BFLOAT16 = "bfloat16"


def _choices(enum: type[Enum], default: Any) -> Any:
    return field(default=default, metadata={"choices": enum})


def _at_least(least: int, default: Any) -> Any:
    return field(default=default, metadata={"min": least})


@dataclass
class TrainerSchema:
    device: str = "auto"  # checked by distributed.check_device (cuda:N needs a visible GPU N)
    nproc_per_node: int = _at_least(1, 1)
    max_restarts: int = _at_least(0, 0)
    threads: Any = "auto"  # checked in check_values: auto or a count >= 1
    micro_batch: int | None = _at_least(1, None)
    forward_batch: int | None = _at_least(1, None)
    data_on_device: Any = _choices(Switch, "auto")
    decode: str = _choices(Decode, "auto")
    num_workers: Any = "auto"
    channels_last: Any = _choices(Switch, "auto")
    compile: Any = _choices(Compile, False)
    bn_group_kernel: str = _choices(BnGroupKernel, "auto")
    tf32: Any = _choices(Switch, "auto")
    deterministic: bool = False
    resume: str = "auto"
    warm_start: bool = False
    trust_checkpoint: bool = False
    skip_finished: bool = True
    checkpoint_root: str = "checkpoints"
    checkpoints: str = _choices(Checkpoints, "last+best")
    keep_archived: int = _at_least(0, 2)
    log_every_n_steps: int = _at_least(1, 50)
    limit_train_batches: int | None = _at_least(1, None)
    limit_val_batches: int | None = _at_least(1, None)


@dataclass
class TrackingSchema:
    uri: str | None = None  # null: sqlite:///<launch dir>/mlflow.db; none: no tracking (tracking.uri.uri_problem)
    experiment: str = "resnet_repro"
    log_checkpoint: bool = False
    log_model: bool = False
    system_metrics: bool = True


# Recipe and precision words (their numbers are the recipe's and checked in config.validate)
OTHER_CHOICES: dict[str, type[Enum]] = {
    "precision.autocast_dtype": AutocastDtype,
    "recipe.optimizer.name": OptimizerName,
    "recipe.schedule.decay": Decay,
    "recipe.schedule.cosine_span": CosineSpan,
    "recipe.loss.name": LossName,
    "recipe.model.drop_path_rule": DropPathRule,
}


def register() -> None:
    from hydra.core.config_store import ConfigStore

    store = ConfigStore.instance()
    store.store(group="trainer", name="schema", node=TrainerSchema)
    store.store(group="tracking", name="schema", node=TrackingSchema)


def _allowed(enum: type[Enum]) -> str:
    return ", ".join("null" if m.value is None else str(m.value).lower() for m in enum)


def _check_choice(key: str, value: Any, enum: type[Enum]) -> str | None:
    if any(value == m.value and type(value) is type(m.value) for m in enum):
        return None
    return f"{key}={value} is not allowed; allowed: {_allowed(enum)}"


def check_values(cfg: DictConfig) -> str | None:
    """The first value outside its field's choices or range, as a one-line message; None when all fit."""
    for section, schema in (("trainer", TrainerSchema), ("tracking", TrackingSchema)):
        for f in fields(schema):
            key, value = f"{section}.{f.name}", OmegaConf.select(cfg, f"{section}.{f.name}")
            if "choices" in f.metadata and (problem := _check_choice(key, value, f.metadata["choices"])):
                return problem
            least = f.metadata.get("min")
            if least is not None and value is not None and value < least:
                return f"{key}={value} is out of range; allowed: an integer >= {least}" + (
                    " or null" if f.default is None else ""
                )
    for key in ("threads", "num_workers"):
        value, least = OmegaConf.select(cfg, f"trainer.{key}"), 1 if key == "threads" else 0
        if value != "auto" and not (isinstance(value, int) and not isinstance(value, bool) and value >= least):
            return f"trainer.{key}={value} is not allowed; allowed: auto or an integer >= {least}"
    for key, enum in OTHER_CHOICES.items():
        if problem := _check_choice(key, OmegaConf.select(cfg, key), enum):
            return problem
    return None
