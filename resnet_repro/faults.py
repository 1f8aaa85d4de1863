"""Fault injection for the kill-and-resume tests. Unset, `RESNET_REPRO_CRASH_AT` does nothing.

It holds entries separated by `;`, each `WHERE [SIGNAL] [rank=R] [restart=N]`:
- WHERE: a named point (before-first-checkpoint, between-last-and-best, before-finish, after-epoch-<N>: epoch N's
  metrics logged, checkpoint-write: while a checkpoint's temporary file is complete but not yet renamed,
  evaluate: when an evaluation starts, before-start: before the data and model are built), or `E.S`: right after
  step S of epoch E (both 1-based);
- SIGNAL: KILL (the default: no cleanup, as a power cut or the OOM killer), TERM, INT, USR1, USR2 (sent to this
  process, as a scheduler or Ctrl-C would), or `raise` (a RuntimeError: a crash that Python sees);
- rank=R: only the process of global rank R; restart=N: only in the N-th restart of the worker group
  (`trainer.max_restarts`, or torchrun's TORCHELASTIC_RESTART_COUNT).

Each entry fires at most once per process. `RESNET_REPRO_CRASH_AT=before-finish` = a SIGKILL at that point.
"""

from __future__ import annotations

import os
import signal

_fired: set[tuple[str, int]] = set()


def restart_count() -> int:
    """Which start of the worker group this process belongs to (0 = the first)."""
    return int(os.environ.get("RESNET_REPRO_RESTART") or os.environ.get("TORCHELASTIC_RESTART_COUNT") or 0)


def crash_point(name: str) -> None:
    spec = os.environ.get("RESNET_REPRO_CRASH_AT", "")
    if not spec or not name:
        return
    for i, entry in enumerate(e.split() for e in spec.split(";")):
        if not entry or entry[0] != name or (spec, i) in _fired or not _matches(entry[1:]):
            continue
        _fired.add((spec, i))
        action = next((t for t in entry[1:] if "=" not in t), "KILL")
        if action == "raise":
            raise RuntimeError(f"injected fault at {name}")
        os.kill(os.getpid(), getattr(signal, f"SIG{action}"))


def step_point(epoch: int, step: int) -> None:
    """After step `step` of epoch `epoch` (1-based)."""
    crash_point(f"{epoch}.{step}")


def _matches(options: list[str]) -> bool:
    wanted = dict(t.split("=", 1) for t in options if "=" in t)
    if "rank" in wanted and int(wanted["rank"]) != int(os.environ.get("RANK", "0")):
        return False
    return "restart" not in wanted or int(wanted["restart"]) == restart_count()
