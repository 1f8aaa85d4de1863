"""Live progress of long work: loss, LR, img/s and ETAs (epoch and whole run), on a bar or as log lines.

On a terminal a tqdm bar carries the numbers; without one (a log file, SLURM, a pipe) a line is logged
at the first step, every `every` steps and at least every `MAX_SILENCE_S` seconds, so a run never goes
quiet. Reading the loss synchronises the device, which is why it happens only at those points.
"""

from __future__ import annotations

import logging
import sys
import time

from tqdm import tqdm

log = logging.getLogger("resnet_repro")
MAX_SILENCE_S = 30.0


def fmt_time(seconds: float) -> str:
    seconds = max(0, int(round(seconds)))
    h, rest = divmod(seconds, 3600)
    return f"{h}:{rest // 60:02d}:{rest % 60:02d}" if h else f"{rest // 60}:{rest % 60:02d}"


class Progress:
    """Progress of one loop of `total` steps; `due(step)` says when a report is worth a device sync."""

    def __init__(
        self, desc: str, total: int, every: int, enabled: bool, unit: str = "step", first: bool = True
    ) -> None:
        self.desc, self.total, self.every, self.enabled, self.first = desc, total, max(1, every), enabled, first
        self.start = self.last_report = time.perf_counter()
        terminal = enabled and sys.stderr.isatty()
        self.bar = tqdm(total=total, desc=desc, unit=unit, leave=False, dynamic_ncols=True, disable=not terminal)

    def due(self, step: int) -> bool:
        """Step `step` (1-based) is a reporting point: the first, every `every`-th, or after a long silence.
        Only where enabled (rank 0): never put a collective operation behind it."""
        if not self.enabled:
            return False
        quiet = time.perf_counter() - self.last_report >= MAX_SILENCE_S
        return (step == 1 and self.first) or step % self.every == 0 or quiet

    def elapsed(self) -> float:
        return time.perf_counter() - self.start

    def advance(self, step: int) -> None:
        """Move the terminal bar to `step` (tqdm limits its redraws; without a terminal this does nothing)."""
        self.bar.update(step - self.bar.n)

    def report(self, step: int, fields: dict[str, str], run_left_s: float | None = None) -> None:
        """Show `fields` and the ETAs of this loop (and of the whole run, when given) at a reporting point."""
        self.last_report = time.perf_counter()
        left = (self.total - step) * self.elapsed() / step
        shown = {**fields, "eta": fmt_time(left)}
        if run_left_s is not None:
            shown["run eta"] = fmt_time(left + run_left_s)
        if not self.bar.disable:
            self.bar.set_postfix(shown, refresh=True)
        elif step < self.total:
            log.info("%s [%d/%d]  %s", self.desc, step, self.total, "  ".join(f"{k} {v}" for k, v in shown.items()))

    def close(self) -> None:
        self.bar.close()
