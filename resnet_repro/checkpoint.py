"""Checkpoints and the folder of one config: safe loading, atomic writes, ownership, resume policy.

Layout: <trainer.checkpoint_root>/<row>/seed<seed>-<config hash>/ holding
- `last.pt`: everything a resume needs (model, optimizer, scaler, epoch, RNG states, metrics history, best);
  written at each epoch's end, and mid-epoch when a signal stops the run (then `step` > 0: the steps of the
  next epoch done, with each rank's RNG states and loss sums at that step boundary);
- `best.pt`: the model of the best validation top-1 with the config that built it (what `get_model` and
  `resnet_repro.test` load);
- `run.json` (`run_link`): the MLflow run of this config, written when the run starts (a kill before the
  first checkpoint resumes into the same run);
- `.lock`: held (flock) by the one process training this config; the OS releases it when that process dies.

Loading never runs code from the file: `torch.load(weights_only=True)` with NumPy's plain arrays and
scalars allowed (old mmcv checkpoints keep some in their metadata). A file that needs anything else is
refused in one line naming it; `trusted=True` (`trainer.trust_checkpoint=true`) unpickles it anyway.
"""

from __future__ import annotations

import contextlib
import fcntl
import json
import logging
import os
import random
import shutil
import tempfile
from dataclasses import dataclass
from datetime import datetime
from pathlib import Path
from typing import Any

import numpy as np
import torch

from resnet_repro.errors import UserError, one_line
from resnet_repro.faults import crash_point

log = logging.getLogger("resnet_repro")
RESUME_MODES = ("auto", "none", "None")


# ---- reading and writing files ------------------------------------------------------------------
def _numpy_globals() -> list[Any]:
    """NumPy's array and scalar reconstructors, under the names NumPy 1 and 2 pickle them with."""
    from numpy.core import multiarray  # numpy 2 keeps this alias of numpy._core.multiarray

    allowed: list[Any] = [np.ndarray, np.dtype, *{type(np.dtype(c)) for c in "?bBhHiIlLqQefdgFDG"}]
    for module in ("numpy.core.multiarray", "numpy._core.multiarray"):
        allowed += [(multiarray.scalar, f"{module}.scalar"), (multiarray._reconstruct, f"{module}._reconstruct")]
    return allowed


def load(path: str | Path, *, mmap: bool = False, trusted: bool = False) -> Any:
    """A checkpoint on the CPU without running code from it; `mmap=True` maps tensors lazily."""
    path = Path(path)
    if not path.is_file():
        raise UserError(f"no checkpoint at {path}")
    if path.stat().st_size == 0:
        raise UserError(f"{path} is empty (0 bytes), not a checkpoint")
    try:
        with torch.serialization.safe_globals(_numpy_globals()):
            return torch.load(path, map_location="cpu", weights_only=not trusted, mmap=mmap)
    except Exception as err:  # a file that wants code run, a truncated file, not a torch file at all
        if "Weights only load failed" in str(err):
            raise UserError(
                f"{path} needs {_unsafe_types(path)} to load, and unpickling it could run code; refused. "
                f"Load it only if you trust the file: trainer.trust_checkpoint=true (API: trusted=True)"
            ) from None
        raise UserError(f"cannot read checkpoint {path}: {type(err).__name__}: {one_line(err)}") from None


def _unsafe_types(path: Path) -> str:
    try:
        names = torch.serialization.get_unsafe_globals_in_checkpoint(path)
    except Exception:
        names = []
    allowed = {name for item in _numpy_globals() if isinstance(item, tuple) for name in item[1:]}
    names = [n for n in names if n not in allowed and not n.startswith("numpy.")]
    return ", ".join(names[:3]) or "types other than tensors and plain data"


def save_atomic(obj: Any, path: Path) -> None:
    """Write `obj` whole or not at all: JSON for a `.json` path, else torch.save, into a temporary file in the same
    folder (created if missing), fsync, then rename over `path`. An error leaves the old file and no temporary."""
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, "wb") as f:
            if path.suffix == ".json":
                f.write(json.dumps(obj, indent=1).encode())
            else:
                torch.save(obj, f)
            f.flush()
            os.fsync(f.fileno())
            crash_point("checkpoint-write" if path.suffix != ".json" else "")
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def estimated_size(model: torch.nn.Module) -> int:
    """Bytes of a last.pt of `model`: its state plus two moments per parameter (SGD keeps one, LAMB two)."""
    state = sum(t.numel() * t.element_size() for t in model.state_dict().values())
    return state + 2 * sum(p.numel() * p.element_size() for p in model.parameters())


def check_room(folder: Path, model: torch.nn.Module) -> None:
    """Room for the two checkpoints a run writes (last.pt, best.pt: each written beside the old one, then
    renamed), before training, rather than ENOSPC after the first epoch."""
    need = estimated_size(model) + sum(t.numel() * t.element_size() for t in model.state_dict().values())
    free = shutil.disk_usage(folder).free
    if free < need:
        raise UserError(
            f"only {free / 1e6:.0f} MB free in {folder}: this run's checkpoints need about {need / 1e6:.0f} MB "
            f"(last.pt and best.pt); free space there, or set trainer.checkpoint_root (trainer.checkpoints=none "
            f"writes none)"
        )


# ---- RNG states in types weights_only accepts ------------------------------------------------------
def rng_state(device: torch.device | None = None) -> dict[str, Any]:
    """This process's RNG states: Python, NumPy, torch's CPU generator and, on a CUDA `device`, that device's
    generator only (a list of every visible GPU's would not restore where fewer GPUs are visible)."""
    kind, keys, pos, has_gauss, gauss = np.random.get_state()
    state = {
        "python": random.getstate(),
        "numpy": {"kind": kind, "keys": torch.from_numpy(keys.astype(np.int64)), "pos": int(pos)},
        "numpy_gauss": (int(has_gauss), float(gauss)),
        "torch": torch.get_rng_state(),
    }
    if device is not None and device.type == "cuda":
        state["cuda"] = torch.cuda.get_rng_state(device)
    return state


def set_rng_state(state: dict[str, Any], device: torch.device | None = None) -> None:
    """Restore what rng_state saved; the CUDA generator of `device` when both the state and the device have one.

    Checkpoints written before held a list of every visible GPU's state (`get_rng_state_all`): the entry of
    `device`'s index is this rank's own (each rank used its local GPU), and it is taken when the list has it."""
    random.setstate(state["python"])
    npy = state["numpy"]
    np.random.set_state((npy["kind"], npy["keys"].numpy().astype(np.uint32), npy["pos"], *state["numpy_gauss"]))
    torch.set_rng_state(state["torch"])
    cuda = state.get("cuda")
    if device is None or device.type != "cuda" or cuda is None:
        return
    if isinstance(cuda, list | tuple):  # the old form
        index = device.index or 0
        if index >= len(cuda):
            return
        cuda = cuda[index]
    torch.cuda.set_rng_state(cuda, device)


# ---- the folder of one config ---------------------------------------------------------------------
def run_dir(root: str | Path, row_name: str, seed: int, config_hash: str) -> Path:
    return Path(root) / row_name.replace(":", "_").replace("/", "_") / f"seed{seed}-{config_hash}"


@dataclass
class Resume:
    """What the folder says to do: start fresh, continue `path` (epoch < total), or only finish the books."""

    action: str  # "fresh" | "continue" (the books only when last.pt is complete) | "warm" (weights only)
    path: Path | None = None
    run_id: str | None = None


class RunFolder:
    """The checkpoint folder of one config, owned by the process that holds its lock."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self._lock: Any = None

    last = property(lambda self: self.path / "last.pt")
    best = property(lambda self: self.path / "best.pt")
    run_link = property(lambda self: self.path / "run.json")  # the folder's link to its MLflow run

    def acquire(self) -> None:
        """Own the folder or stop at once (one line naming the owner); proves it is writable too."""
        try:
            self.path.mkdir(parents=True, exist_ok=True)
            handle = open(self.path / ".lock", "a+")  # noqa: SIM115 - held open for the life of the run
        except OSError as err:
            raise UserError(
                f"cannot write checkpoints to {self.path} ({err.strerror}); set trainer.checkpoint_root"
            ) from None
        try:
            fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError:
            handle.seek(0)
            owner = handle.read().strip() or "another process"
            handle.close()
            raise UserError(f"{self.path} is already being trained by {owner}; wait for it or stop it") from None
        handle.seek(0)
        handle.truncate()
        handle.write(f"pid {os.getpid()} on {os.uname().nodename}")
        handle.flush()
        self._lock = handle
        self._remove_stale_temporaries()

    @staticmethod
    def lock_held(path: Path) -> bool | None:
        """Whether a process holds the folder `path`'s lock (is training it); None when it cannot be read."""
        try:
            handle = open(Path(path) / ".lock")  # noqa: SIM115 - closed below
        except OSError:
            return None
        with handle:
            try:
                fcntl.flock(handle, fcntl.LOCK_SH | fcntl.LOCK_NB)
            except OSError:
                return True
            fcntl.flock(handle, fcntl.LOCK_UN)
        return False

    def release(self) -> None:
        """Drop the lock; a folder that got nothing else (a run that failed before its start) is removed."""
        if self._lock is None:
            return
        if not any(p.name != ".lock" for p in self.path.iterdir()):
            (self.path / ".lock").unlink(missing_ok=True)
            for folder in (self.path, self.path.parent):
                with contextlib.suppress(OSError):
                    folder.rmdir()
        self._lock.close()  # closing drops the flock
        self._lock = None

    def _remove_stale_temporaries(self) -> None:
        """Writes killed half-way leave `.<name>.*.tmp`; nobody else writes here while we hold the lock."""
        for tmp in self.path.glob(".*.tmp"):
            tmp.unlink(missing_ok=True)

    def read_run_id(self) -> str | None:
        try:
            return json.loads(self.run_link.read_text()).get("mlflow_run_id")
        except (OSError, ValueError):
            return None

    def write_run_id(self, run_id: str, uri: str) -> None:
        save_atomic({"mlflow_run_id": run_id, "tracking_uri": uri}, self.run_link)

    def repair_best(self, trusted: bool = False) -> None:
        """A kill between writing last.pt and best.pt leaves best.pt behind last.pt's best, and a truncated
        best.pt cannot be read: derive it from last.pt when that holds the best epoch's model."""
        if not self.last.is_file():
            return
        last = load(self.last, mmap=True, trusted=trusted)
        try:
            best_epoch = load(self.best, mmap=True, trusted=trusted).get("epoch") if self.best.is_file() else None
        except UserError as err:
            best_epoch = -1
            log.warning("%s; it is rebuilt from last.pt where that holds the best epoch", one_line(err))
        mid_epoch = bool(last.get("step", 0))  # a stop's checkpoint: its weights are not an epoch's end
        if mid_epoch or last.get("best_epoch") != last.get("epoch") or not last.get("write_best", True):
            if best_epoch == -1:
                log.warning(
                    "%s is unreadable and last.pt holds epoch %s, not the best (%s): best.pt is written again when an "
                    "epoch beats it",
                    self.best,
                    last.get("epoch"),
                    last.get("best_epoch"),
                )
            return
        if best_epoch != last["epoch"]:
            save_atomic(best_from_last(last), self.best)

    def archive_and_start_fresh(self, keep: int) -> Path | None:
        """Move an earlier run's files aside (keeping the `keep` newest archives), leaving the folder empty."""
        files = [p for p in self.path.iterdir() if p.name != ".lock"]
        if not files:
            return None
        target = self.path.with_name(f"{self.path.name}.{datetime.now().strftime('%Y%m%d-%H%M%S-%f')}")
        target.mkdir()
        for p in files:
            p.rename(target / p.name)
        archives = sorted(self.path.parent.glob(f"{self.path.name}.*"), key=lambda p: p.name)
        for old in archives[: max(0, len(archives) - keep)]:
            shutil.rmtree(old, ignore_errors=True)
        return target if target.exists() else None

    def resume_or_archive(
        self,
        mode: str,
        *,
        epochs: int,
        config_hash: str,
        fingerprint: str | None,
        finished: Any,
        keep: int,
        trusted: bool,
        warm_start: bool = False,
    ) -> Resume:
        """Which checkpoint this run continues; what would not be continued is archived (the side effect).

        mode: trainer.resume. `finished(run_id)` says whether an MLflow run is FINISHED (never written again).
        auto: continue last.pt when it is this config's, on the same data, and not complete; a complete
        last.pt whose run was not closed only finishes the books; anything else starts fresh, keeping
        the MLflow run of run.json when the process that opened it died before the first checkpoint.
        none: start fresh, whatever the folder holds (unreadable files too: they are moved aside).
        warm_start: a fresh run that starts from the weights of the checkpoint `mode` names.
        """
        if warm_start:
            self._archive(keep)
            return Resume("warm", Path(mode))
        if mode not in RESUME_MODES:
            return self._explicit(Path(mode), config_hash, trusted, epochs, finished)
        run_id = self.read_run_id()
        if mode == "auto" and self.last.is_file():
            try:
                epoch, owner, data = read_epoch(self.last, trusted)
            except UserError as err:
                raise UserError(
                    f"{one_line(err)}; trainer.resume=none starts this config again (its files are moved aside)"
                ) from None
            run_id = run_id or load(self.last, mmap=True, trusted=trusted).get("mlflow_run_id")
            open_run = run_id is not None and not finished(run_id)
            if owner == config_hash and data == fingerprint and (epoch < epochs or open_run):
                self.repair_best(trusted)
                return Resume("continue" if epoch < epochs else "finish", self.last, run_id)
        elif mode == "auto" and run_id is not None and not finished(run_id):
            return Resume("fresh", None, run_id)  # killed before its first checkpoint: same MLflow run
        self._archive(keep)
        return Resume("fresh")

    def _archive(self, keep: int) -> None:
        archived = self.archive_and_start_fresh(keep)
        if archived is not None:
            log.info("the earlier files of this config are moved to %s; this run starts afresh", archived)

    def _explicit(self, path: Path, config_hash: str, trusted: bool, epochs: int, finished: Any) -> Resume:
        """trainer.resume=<last.pt>: continue it; a complete one only finishes its run's books, and a complete one
        whose run FINISHED has nothing left to do (copying its epochs into a new run would count it twice)."""
        epoch, _, _ = check_resumable(path, config_hash, trusted)
        run_id = load(path, mmap=True, trusted=trusted).get("mlflow_run_id")
        if epoch < epochs:
            return Resume("continue", path, run_id)
        if run_id and not finished(run_id):
            return Resume("finish", path, run_id)
        raise UserError(
            f"{path} is complete (epoch {epoch} of {epochs}) and its MLflow run {run_id or '(none)'} finished: nothing "
            f"to resume; trainer.resume=none trains this config again"
        )


def check_resume_setting(resume: str, warm_start: bool, trusted: bool, config_hash: str) -> None:
    """`trainer.resume` (with `trainer.warm_start`): auto, none, or a checkpoint that loads without running code
    and, unless warm-starting from it, is this config's last.pt; a UserError otherwise."""
    if resume not in RESUME_MODES and not Path(resume).is_file():
        raise UserError(f"trainer.resume={resume} is not a file; allowed: auto, none, or a checkpoint path")
    if warm_start and resume in RESUME_MODES:
        raise UserError("trainer.warm_start=true needs trainer.resume=<checkpoint path> to start from")
    if warm_start:
        load(Path(resume), mmap=True, trusted=trusted)
    elif resume not in RESUME_MODES:
        check_resumable(Path(resume), config_hash, trusted)


def check_resumable(path: Path, config_hash: str, trusted: bool) -> tuple[int, str | None, str | None]:
    """`trainer.resume=<path>` names a last.pt of this very config (a UserError otherwise); read_epoch's answer."""
    epoch, owner, data = read_epoch(path, trusted)
    if owner != config_hash:
        raise UserError(
            f"{path} was written by another config ({owner}, this one is {config_hash}); resume only "
            f"this config's last.pt, or start a new run from its weights with trainer.warm_start=true"
        )
    return epoch, owner, data


def best_from_last(last: dict[str, Any]) -> dict[str, Any]:
    keep = ("model", "config", "config_hash", "row_name", "classes", "mlflow_run_id", "epoch")
    return {**{k: last[k] for k in keep if k in last}, "val": last.get("best_val", {})}


def read_epoch(path: Path, trusted: bool = False) -> tuple[int, str | None, str | None]:
    """(epoch, config hash, data fingerprint) of a last.pt, reading only its small entries."""
    state = load(path, mmap=True, trusted=trusted)
    if "optimizer" not in state or "epoch" not in state:
        raise UserError(f"{path} is not a last.pt (it holds no optimizer state: a best.pt?); resume from last.pt")
    return int(state["epoch"]), state.get("config_hash"), state.get("data_fingerprint")
