"""Fault injection for the kill-and-resume tests: `RESNET_REPRO_CRASH_AT=<point>` kills the process (SIGKILL,
no cleanup, as a power cut or the OOM killer would) when the run reaches that point. Unset, it does nothing.

Points: before-first-checkpoint, between-last-and-best, before-finish (after the final checkpoint),
after-epoch-<N> (epoch N's metrics logged: a kill in epoch N + 1).
"""

from __future__ import annotations

import os
import signal


def crash_point(name: str) -> None:
    if os.environ.get("RESNET_REPRO_CRASH_AT") == name:
        os.kill(os.getpid(), signal.SIGKILL)
