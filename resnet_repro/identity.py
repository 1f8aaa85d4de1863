"""What changes a run: which config keys make the experiment (its identity, hashed) and which only say where or
how it runs; how a run departs from its table row (deviation records, written as a JSON tag); the spelling of
yes/no tags. The config hash, run names (provenance), the deviations a run records and the report read it here.
"""

from __future__ import annotations

import hashlib
import json
import re
from collections.abc import Mapping, Sequence
from dataclasses import asdict, dataclass
from typing import Any

from resnet_repro.rows import GROUPS

EXPERIMENT = (*GROUPS, "seed")  # what is trained: the five group choices of a row, and the seed
PRESETS = ("smoke",)  # config groups that set experiment keys (conf/smoke: a shortened run)
LOCATION_KEYS = ("dataset.root", "dataset.download")  # where the data lies, not what it is (`format` is what)
# the trainer keys that change what is trained (BatchNorm's images, a shortened run); the others say how or where
TRAINER_KEYS = ("trainer.micro_batch", "trainer.limit_train_batches", "trainer.limit_val_batches")
SMOKE_KEYS = ("recipe.epochs", "trainer.limit_train_batches", "trainer.limit_val_batches")  # a shortened run
DATA_KEYS = ("dataset.format",)  # other images than the row's (an image-folder copy of CIFAR)
CUSTOM, BATCHNORM, SMOKE, DATA, CHANGED = "custom", "batchnorm", "smoke", "data", "changed"  # Deviation.reason
BATCHNORM_KEY = "batchnorm.images"  # images behind each BatchNorm statistic: the batch plan's, not one key's


def changes_experiment(key: str) -> bool:
    """Whether a dotted config key is part of what a run trains (its identity), not of where or how it runs."""
    section = key.split(".", 1)[0]
    if section == "trainer":
        return key in TRAINER_KEYS
    return (section in EXPERIMENT and key not in LOCATION_KEYS) or section in PRESETS


def identity(cfg: Mapping[str, Any]) -> dict[str, Any]:
    """What a resolved config trains: two configs with equal identities give the same experiment."""
    ident = {k: cfg[k] for k in EXPERIMENT if k != "dataset"}
    ident["dataset"] = {k: v for k, v in cfg["dataset"].items() if changes_experiment(f"dataset.{k}")}
    ident["trainer"] = {k: cfg["trainer"][k] for k in (key.split(".")[1] for key in TRAINER_KEYS)}
    if cfg["trainer"]["warm_start"]:  # a new run from another run's weights is another experiment
        ident["trainer"]["warm_start"] = str(cfg["trainer"]["resume"])
    return ident


def config_hash(cfg: Mapping[str, Any]) -> str:
    blob = json.dumps(identity(cfg), sort_keys=True, default=str)
    return hashlib.sha256(blob.encode()).hexdigest()[:12]


@dataclass(frozen=True)
class Deviation:
    """One way a run departs from its table row's exact recipe."""

    key: str  # the dotted config key; "row" for a custom composition, BATCHNORM_KEY for BatchNorm's images
    recipe: Any  # the row's value (None: a custom composition, or a run recorded before deviations were data)
    run: Any  # this run's value
    reason: str  # custom | batchnorm | smoke | data | changed

    def __str__(self) -> str:
        """In words, as runs.csv says it (and as runs recorded before deviations were data wrote their tag)."""
        if self.reason == CUSTOM:
            return f"custom composition {self.run}"
        if self.reason == BATCHNORM:
            return f"BatchNorm statistics over {self.run} images (recipe: {self.recipe})"
        return f"{self.key}={self.run}"


def reason_of(key: str) -> str:
    return SMOKE if key in SMOKE_KEYS else DATA if key in DATA_KEYS else CHANGED


def deviations(row: Mapping[str, Any] | None, run: Mapping[str, Any], row_name: str) -> list[Deviation]:
    """How a run's flattened identity departs from its `row`'s (None: a custom composition). BatchNorm's images
    are the batch plan's to say (batchnorm_deviation: trainer.micro_batch alone says too little)."""
    if row is None:
        return [Deviation("row", None, row_name, CUSTOM)]
    keys = sorted(k for k in set(row) | set(run) if k != "trainer.micro_batch" and row.get(k) != run.get(k))
    return [Deviation(k, row.get(k), run.get(k), reason_of(k)) for k in keys]


def batchnorm_deviation(run_images: int, recipe_images: int) -> Deviation | None:
    return None if run_images == recipe_images else Deviation(BATCHNORM_KEY, recipe_images, run_images, BATCHNORM)


def deviations_tag(devs: Sequence[Deviation]) -> str:
    """The run's `deviations` tag: the records as JSON ("[]": faithful)."""
    return json.dumps([asdict(d) for d in devs], default=str)


def read_deviations(tag: str | None) -> list[Deviation]:
    """The records of a `deviations` tag: JSON, or the "; "-joined words of runs recorded before (whose
    `key=value` parts name no recipe value)."""
    text = (tag or "").strip()
    if text.startswith("["):
        return [Deviation(**d) for d in json.loads(text)]
    return [_old_deviation(part.strip()) for part in text.split(";") if part.strip()]


def _old_deviation(words: str) -> Deviation:
    if words.startswith("custom composition "):
        return Deviation("row", None, words.removeprefix("custom composition "), CUSTOM)
    if bn := re.fullmatch(r"BatchNorm statistics over (\d+) images \(recipe: (\d+)\)", words):
        return Deviation(BATCHNORM_KEY, int(bn[2]), int(bn[1]), BATCHNORM)
    key, _, value = words.partition("=")
    return Deviation(key, None, value, reason_of(key))


def flag(value: Any) -> str:
    """A yes/no tag: "true" or "false" (None, a check that could not be made, is "false")."""
    return "true" if value else "false"


def read_flag(tag: str | None) -> bool:
    """A yes/no tag read back; runs recorded before one spelling wrote Python's ("True", "False", "None")."""
    return str(tag).strip().lower() == "true"
