"""Checkpoints: written atomically, so a crash at any moment leaves the previous one intact.

Layout: <trainer.checkpoint_root>/<row>/<config hash>/{last.pt, best.pt}. `last.pt` holds everything a
resume needs (model, optimizer, scaler, epoch, RNG states, MLflow run id); `best.pt` the model of the
best validation top-1 with the config that built it (what `get_model` / `resnet_repro.test` load).
"""

from __future__ import annotations

import os
import random
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch

from resnet_repro.errors import UserError


def save_atomic(obj: Any, path: Path) -> None:
    """torch.save to a temporary file in the same folder, fsync, then rename over `path`."""
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, "wb") as f:
            torch.save(obj, f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def load(path: str | Path, mmap: bool = False) -> dict[str, Any]:
    """A checkpoint on the CPU; `mmap=True` maps tensors lazily (cheap when only metadata is read)."""
    try:
        return torch.load(path, map_location="cpu", weights_only=False, mmap=mmap)
    except FileNotFoundError:
        raise UserError(f"no checkpoint at {path}") from None
    except Exception as err:  # truncated or not a torch file
        raise UserError(f"cannot read checkpoint {path}: {type(err).__name__}: {err}") from None


def run_dir(root: str | Path, row_name: str, config_hash: str) -> Path:
    return Path(root) / row_name.replace(":", "_").replace("/", "_") / config_hash


def archive(folder: Path) -> Path | None:
    """Move an earlier run's checkpoints aside (never delete them) before a fresh start in `folder`."""
    if not folder.is_dir() or not any(folder.iterdir()):
        return None
    target = folder.with_name(f"{folder.name}.{time.strftime('%Y%m%d-%H%M%S')}")
    folder.rename(target)
    return target


def rng_state() -> dict[str, Any]:
    state = {"python": random.getstate(), "numpy": np.random.get_state(), "torch": torch.get_rng_state()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict[str, Any]) -> None:
    random.setstate(state["python"])
    np.random.set_state(state["numpy"])
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])
