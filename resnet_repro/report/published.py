"""mmpretrain's published training log of a row, to draw beside our curves.

The log lies beside the row's checkpoint (the checkpoint URL with `.json` for `.pth`) and goes through the
same cache as checkpoints (torch.hub's `<hub dir>/checkpoints/<name>`, `convert.cached_download`). The
report only looks in that cache unless asked to fetch (`--fetch-logs`): without network a download would
only wait, and a figure without the published curve says so.

Two layouts, both one JSON object per line:
- mmcls 0.x (`*.log.json`): maybe an env line {"env_info": ..., "config": "<the python config>"}, training
  lines {"mode": "train", "epoch": 1, "iter": 100, "lr": 0.1, "loss": 2.3, ...}, validation lines
  {"mode": "val", "epoch": 1, "accuracy_top-1": 45.1, "accuracy_top-5": 90.2, ...};
- mmengine (`scalars.json`): training lines {"lr": 0.1, "loss": 2.3, "epoch": 1, "iter": 100, "step": 100, ...},
  validation lines {"accuracy/top1": 45.1, "accuracy/top5": 90.2, "step": 1} where step is the epoch.
Accuracy keys are matched loosely ("accuracy_top-1", "accuracy/top1", "top-1", "top1_acc"...).

A log that is not one of these, or that is another row's (its config names another depth or number of
classes, or it validates at an epoch past the row's recipe), is a one-line UserError naming the file.
"""

from __future__ import annotations

import json
import os
import re
import socket
import sys
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any
from urllib.parse import urlparse

import pandas as pd

from resnet_repro.errors import UserError
from resnet_repro.rows import Row

FETCH_TIMEOUT_S = 20.0


@dataclass(frozen=True)
class PublishedLog:
    name: str
    val: pd.DataFrame  # index epoch; columns top1 (and top5 when logged)
    train_loss: pd.Series  # mean training loss per epoch


def log_url(row: Row) -> str:
    return row.checkpoint_url.rsplit(".", 1)[0] + ".json"  # the training log sits beside the checkpoint


def log_name(row: Row) -> str:
    return Path(urlparse(log_url(row)).path).name


def hub_dir() -> Path:
    """torch.hub's folder, without importing torch (seconds) when nothing imported it yet.

    Only code that imported torch can have moved it (torch.hub.set_dir); otherwise it is torch's default:
    $TORCH_HOME/hub, TORCH_HOME defaulting to $XDG_CACHE_HOME/torch, that to ~/.cache/torch.
    """
    if "torch" in sys.modules:
        return Path(sys.modules["torch"].hub.get_dir())
    cache = os.getenv("XDG_CACHE_HOME", os.path.join("~", ".cache"))
    return Path(os.path.expanduser(os.getenv("TORCH_HOME", os.path.join(cache, "torch")))) / "hub"


def cache_path(row: Row) -> Path:
    """Where `convert.cached_download` keeps the log (torch.hub's checkpoint cache)."""
    return hub_dir() / "checkpoints" / log_name(row)


def fetch(row: Row) -> str:
    """Download the log into the cache (a short timeout); "" or the one-line reason it could not."""
    from resnet_repro.convert import cached_download

    previous = socket.getdefaulttimeout()
    socket.setdefaulttimeout(FETCH_TIMEOUT_S)  # torch.hub's download has no timeout of its own
    try:
        cached_download(log_url(row))
        return ""
    except UserError as err:
        return str(err).split(";")[0]
    finally:
        socket.setdefaulttimeout(previous)


# ---- parsing ----------------------------------------------------------------------------------
def _key(name: str) -> str:
    """ "accuracy_top-1", "accuracy/top1", "top-1" -> "top1"."""
    return re.sub(r"[^a-z0-9]", "", name.lower()).replace("accuracy", "").replace("acc", "")


def _objects(path: Path) -> Iterator[dict[str, Any]]:
    try:
        lines = path.read_text(encoding="utf-8").splitlines()
    except (OSError, UnicodeDecodeError) as err:
        raise UserError(f"{path}: cannot read the published training log ({err})") from None
    for number, line in enumerate(lines, start=1):
        if not line.strip():
            continue
        try:
            obj = json.loads(line)
        except json.JSONDecodeError as err:
            raise UserError(f"{path}: line {number} is not JSON ({err.msg}): not an mmpretrain training log") from None
        if not isinstance(obj, dict):
            raise UserError(f"{path}: line {number} is not a JSON object: not an mmpretrain training log")
        yield obj


def _check_config(path: Path, config: str, row: Row) -> None:
    """The env line's config names the row's depth and classes (the first of each: the model's)."""
    for field, want in (("depth", row.depth), ("num_classes", row.num_classes)):
        found = re.search(rf"\b{field}\s*=\s*(\d+)", config)
        if found and int(found.group(1)) != want:
            raise UserError(
                f"{path}: the log's config has {field}={found.group(1)}, {row.name} has {want}: another row's log"
            )


def _epoch(obj: dict[str, Any], path: Path) -> int:
    epoch = obj.get("epoch", obj.get("step"))  # mmengine's validation lines count epochs in step
    if not isinstance(epoch, int) or isinstance(epoch, bool) or epoch < 1:
        raise UserError(f"{path}: a line without a positive integer epoch ({json.dumps(obj)[:80]})")
    return epoch


def parse(path: Path, row: Row, recipe_epochs: int) -> PublishedLog:
    """The validation accuracies and mean training loss per epoch of a log file, checked against the row."""
    val: dict[int, dict[str, float]] = {}
    loss: dict[int, list[float]] = {}
    for obj in _objects(path):
        if isinstance(obj.get("config"), str):
            _check_config(path, obj["config"], row)
        accuracy = {_key(k): v for k, v in obj.items() if _key(k) in ("top1", "top5") and isinstance(v, (int, float))}
        if "top1" in accuracy:
            val[_epoch(obj, path)] = {k: float(v) for k, v in accuracy.items()}
        elif isinstance(obj.get("loss"), (int, float)) and obj.get("mode", "train") == "train":
            loss.setdefault(_epoch(obj, path), []).append(float(obj["loss"]))
    if not val:
        raise UserError(f"{path}: no validation top-1 in it: not an mmpretrain training log")
    if max(val) > recipe_epochs:
        raise UserError(f"{path}: validates at epoch {max(val)}, {row.name} trains {recipe_epochs}: another row's log")
    frame = pd.DataFrame.from_dict(val, orient="index").sort_index()
    return PublishedLog(path.name, frame, pd.Series({e: sum(v) / len(v) for e, v in sorted(loss.items())}, dtype=float))


def find(row: Row, recipe_epochs: int, fetch_missing: bool) -> tuple[PublishedLog | None, str]:
    """The row's published log from the cache (fetched first when asked), or None and the note to show."""
    path = cache_path(row)
    problem = fetch(row) if fetch_missing and not path.is_file() else ""
    if path.is_file():
        return parse(path, row, recipe_epochs), ""
    if problem:
        return None, f"mmpretrain's log {log_name(row)}\ncould not be downloaded"
    return None, f"mmpretrain's log {log_name(row)}\nis not in torch.hub's cache (--fetch-logs downloads it)"
