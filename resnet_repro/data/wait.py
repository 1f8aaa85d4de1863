"""How long a loop waits for its next batch: the share of step time the input pipeline costs (data_wait_frac).

The first batch is left out (it pays the loader's start-up: worker processes, the first reads); the share is
the time spent in the loader's `next()` over the time since that first batch arrived. On a GPU the CPU runs
ahead of the device, so a compute-bound run waits in the step (a full launch queue), not here: a high share
means the input pipeline is what bounds the run. With trainer.decode=device the main process decodes and
resamples each batch inside `next()` (data.device_decode.DecodeLoader), so that work counts as waiting too: on a
GPU its share is an upper bound of the device's idle time (its kernels may still overlap the previous step's).
"""

from __future__ import annotations

import time
from collections.abc import Callable, Iterable, Iterator, Mapping
from typing import Any

INPUT_BOUND = 0.10  # above this share an epoch's line says once how to feed the step faster


class WaitClock:
    """Iterate `batches`, timing each `next()`; `fraction()` is the share of time spent waiting so far."""

    def __init__(self, batches: Iterable[Any], clock: Callable[[], float] = time.perf_counter) -> None:
        self._it, self._clock = iter(batches), clock
        self.waited, self.first_at = 0.0, None

    def __iter__(self) -> Iterator[Any]:
        return self

    def __next__(self) -> Any:
        start = self._clock()
        batch = next(self._it)
        now = self._clock()
        if self.first_at is None:
            self.first_at = now
        else:
            self.waited += now - start
        return batch

    def fraction(self) -> float:
        if self.first_at is None:
            return 0.0
        span = self._clock() - self.first_at
        return min(1.0, self.waited / span) if span > 0 else 0.0


def input_bound_message(fraction: float, epoch: int, cfg: Mapping[str, Any], workers: int, decode: str) -> str | None:
    """The advice (given once a run) when an epoch waited more than INPUT_BOUND of its step time; else None.
    trainer.decode=device is suggested where the run decodes on the CPU and the recipe could run on the device."""
    from resnet_repro.data.device_decode import reason

    if fraction <= INPUT_BOUND:
        return None
    ways = [f"raise trainer.num_workers (now {workers})"]
    if decode == "cpu" and reason(cfg) is None:
        ways.append("use trainer.decode=device")
    where = " (with trainer.decode=device: the batch's decode and resample included)" if decode == "device" else ""
    return (
        f"the input pipeline bounds this run: epoch {epoch} waited {fraction:.0%} of its step time for the next "
        f"batch{where}; {' or '.join(ways)}"
    )
