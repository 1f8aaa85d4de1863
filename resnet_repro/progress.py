"""Live progress of long work: loss, LR, img/s and ETAs (epoch and whole run), on a bar or as log lines.

On a terminal a tqdm bar carries the numbers: one line of at most 100 columns, our ETA only (tqdm's own
elapsed/remaining/rate are left out: two ETAs that disagree help nobody), and the fields (the loss...) read
afresh at each redraw, at most every REFRESH_S seconds. Without a terminal (a log file, SLURM, a pipe) a
line is logged at the first step, every `every` steps and at least every `MAX_SILENCE_S` seconds, so a run
never goes quiet. Reading the loss synchronises the device, which is why it happens only at those points.
"""

from __future__ import annotations

import logging
import shutil
import sys
import time
from collections.abc import Callable
from typing import IO

from tqdm import tqdm

log = logging.getLogger("resnet_repro")
MAX_SILENCE_S = 30.0
REFRESH_S = 1.0  # the terminal bar's redraws (and the device syncs its live fields cost)
MAX_COLUMNS = 100
BAR_FORMAT = "{desc} {percentage:3.0f}%|{bar}| {n_fmt}/{total_fmt}"
NARROW_FORMAT = "{desc} {percentage:3.0f}% {n_fmt}/{total_fmt}"  # a narrow terminal: the numbers before the bar
MIN_BAR = 10  # columns a drawn bar needs to say anything

Fields = dict[str, str]  # name -> shown value, in order (other code may add its own fields)


def fmt_time(seconds: float) -> str:
    seconds = max(0, int(round(seconds)))
    h, rest = divmod(seconds, 3600)
    return f"{h}:{rest // 60:02d}:{rest % 60:02d}" if h else f"{rest // 60}:{rest % 60:02d}"


class Progress:
    """Progress of one loop of `total` steps; `due(step)` says when a report is worth a device sync.

    `later`: (loops after this one, extra seconds each) — e.g. the epochs left and one evaluation's time —
    for the ETA of the whole run, each later loop taken to last as long as this one. `done`: steps finished
    before this start (a resumed epoch): the pace is that of the steps timed here.
    """

    def __init__(
        self,
        desc: str,
        total: int,
        every: int,
        enabled: bool,
        unit: str = "step",
        first: bool = True,
        later: tuple[int, float] | None = None,
        stream: IO[str] | None = None,
        done: int = 0,
    ) -> None:
        self.desc, self.total, self.every, self.enabled, self.first = desc, total, max(1, every), enabled, first
        self.later, self.done = later, done
        self._fields: Fields = {}
        self.start = self.last_report = self.last_refresh = time.perf_counter()
        stream = stream or sys.stderr
        terminal = enabled and stream.isatty()
        self.columns = columns = min(MAX_COLUMNS, shutil.get_terminal_size((MAX_COLUMNS, 24)).columns)
        self.bar = tqdm(
            total=total,
            desc=desc,
            unit=unit,
            leave=False,
            ncols=columns,
            bar_format=BAR_FORMAT,
            mininterval=REFRESH_S,
            file=stream,
            disable=not terminal,
        )

    def due(self, step: int) -> bool:
        """Step `step` (1-based) is a reporting point: the first, every `every`-th, or after a long silence.
        Only where enabled (rank 0): never put a collective operation behind it."""
        if not self.enabled:
            return False
        quiet = time.perf_counter() - self.last_report >= MAX_SILENCE_S
        return (step == 1 and self.first) or step % self.every == 0 or quiet

    def elapsed(self) -> float:
        return time.perf_counter() - self.start

    def advance(self, step: int, live: Callable[[], Fields] | None = None) -> None:
        """Move the terminal bar to `step`, redrawing it at most every REFRESH_S with `live()`'s fields read
        afresh (without a terminal this does nothing, and `live` is never called)."""
        if self.bar.disable:
            return
        self.bar.n = step  # tqdm draws only when told (refresh): each redraw then has fresh fields
        if time.perf_counter() - self.last_refresh >= REFRESH_S:
            self._show(step, live() if live is not None else self._fields)

    def etas(self, step: int, run_left_s: float | None = None) -> tuple[float, float | None]:
        """(seconds left in this loop, seconds left in the whole run or None), at this loop's pace."""
        per_step = self.elapsed() / max(step - self.done, 1)
        left = (self.total - step) * per_step
        if run_left_s is None and self.later is not None:
            loops, extra = self.later
            run_left_s = loops * (self.total * per_step + extra)
        return left, (None if run_left_s is None else left + run_left_s)

    def report(self, step: int, fields: Fields, run_left_s: float | None = None) -> None:
        """Show `fields` and the ETAs of this loop (and of the whole run, when known) at a reporting point."""
        self.last_report = time.perf_counter()
        if not self.bar.disable:
            self._show(step, fields, run_left_s)
            return
        if step < self.total:
            left, run_left = self.etas(step, run_left_s)
            shown = {**fields, "eta": fmt_time(left)}
            if run_left is not None:
                shown["run eta"] = fmt_time(run_left)
            log.info("%s [%d/%d]  %s", self.desc, step, self.total, "  ".join(f"{k} {v}" for k, v in shown.items()))

    def _show(self, step: int, fields: Fields, run_left_s: float | None = None) -> None:
        """The bar's text: the fields and one ETA, the whole run's when known (the bar shows the loop's share)."""
        self.last_refresh, self._fields = time.perf_counter(), dict(fields)
        left, run_left = self.etas(step, run_left_s)
        shown = {**fields, "eta": fmt_time(left if run_left is None else run_left)}
        text = " ".join(f"{k} {v}" for k, v in shown.items())
        numbers = len(f"{self.desc} 100%|| {self.total}/{self.total} {text}")
        layout = BAR_FORMAT if numbers + MIN_BAR <= self.columns else NARROW_FORMAT
        self.bar.bar_format = f"{layout} {text.replace('{', '{{').replace('}', '}}')}"
        self.bar.refresh()

    def close(self) -> None:
        self.bar.close()
