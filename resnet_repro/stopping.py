"""Stopping on a signal without losing work: SIGTERM, SIGUSR1/SIGUSR2 (what SLURM and submitit send before a
time limit or a preemption) and SIGINT (Ctrl-C).

Before training starts, a signal stops the process at once: there is nothing to keep (`Stopped`, exit status
128 + the signal's number, as a shell reports a process ended by that signal). Once the steps run
(`StopRequest.deferred`), a signal only records the request: every rank finishes its step, the ranks agree at
a step boundary (`StepVote`: one collective), rank 0 writes a checkpoint of that exact point and the process
ends with one line and `EXIT_STOPPED`; the same command continues there. Signals that come while stopping
(a second Ctrl-C, the launcher forwarding the same signal) change nothing, so a checkpoint being written is
never cut short.

A handler that was there before (submitit's checkpoint-and-requeue) is handed the signal once the
checkpoint is written (`hand_over`), so a SLURM job requeues itself only after our state is safe.
"""

from __future__ import annotations

import contextlib
import os
import signal
import sys
import threading
from collections.abc import Callable, Iterator
from typing import Any

SIGNALS = ("SIGTERM", "SIGINT", "SIGUSR1", "SIGUSR2")
EXIT_STOPPED = 75  # EX_TEMPFAIL (sysexits.h): stopped on a signal, resumable: the same command continues


class Stopped(SystemExit):
    """The run stopped on a signal. Its code is the exit status (EXIT_STOPPED when a checkpoint holds the stop
    point, 128 + the signal's number when nothing is left to resume); `line` says where and how to go on.

    A SystemExit: it passes `except Exception` (a sweep's error handling, Hydra, submitit) and ends the
    process with its code and no traceback."""

    def __init__(self, line: str, code: int, signal_name: str) -> None:
        super().__init__(code)
        self.line, self.signal_name = line, signal_name
        self.printed = False

    @property
    def resumable(self) -> bool:
        return self.code == EXIT_STOPPED


def exit_code(signal_name: str) -> int:
    """The status of a process ended by this signal before it kept anything (a shell's 128 + N)."""
    return 128 + int(getattr(signal, signal_name))


def before_start(signal_name: str) -> Stopped:
    return Stopped(
        f"stopped before the first step ({signal_name}); nothing to resume", exit_code(signal_name), signal_name
    )


def while_ending(signal_name: str) -> Stopped:
    """A signal after the steps were left (a failure being recorded, the books closing): no boundary to keep."""
    line = (
        f"stopped ({signal_name}) while the run was ending; the same command resumes from its last checkpoint, if any"
    )
    return Stopped(line, exit_code(signal_name), signal_name)


# ---- the line a training run stops with (engine.Trainer) ----------------------------------------------------
def at_boundary(where: str, kept: bool) -> Stopped:
    """The stop after a checkpoint of this step boundary (`where`: "at epoch 2 step 5/10", "after epoch 1");
    `kept`: a checkpoint holds it (trainer.checkpoints=none keeps nothing: the same command starts over)."""
    sig = requested() or "SIGTERM"
    if not kept:
        line = f"stopped {where} ({sig}); trainer.checkpoints=none kept nothing: the same command starts over"
        return Stopped(line, exit_code(sig), sig)
    return Stopped(f"stopped {where} ({sig}); the same command resumes here", EXIT_STOPPED, sig)


def at_start(stop: Stopped, resumes_at: str | None) -> Stopped:
    """A signal before the first step: a run that resumes a checkpoint still resumes it (`resumes_at`: "epoch 3
    step 0/10"); a new one has nothing to keep."""
    if resumes_at is None:
        return stop
    line = f"stopped before the first step ({stop.signal_name}); the same command resumes at {resumes_at}"
    return Stopped(line, EXIT_STOPPED, stop.signal_name)


def by_error(err: Exception, resumable: bool) -> Stopped:
    """Asked to stop, the run failed before it reached a step boundary: what the folder last got resumes
    (`resumable`: there is a last checkpoint)."""
    sig = requested() or "SIGTERM"
    why = f"stopped ({sig}) by an error while stopping ({type(err).__name__}: {str(err).strip()[:160]})"
    if not resumable:
        return Stopped(f"{why}; nothing to resume", exit_code(sig), sig)
    return Stopped(f"{why}; the same command resumes from the last checkpoint", EXIT_STOPPED, sig)


class StopRequest:
    """What the handlers saw: the first signal (`signal`) and whether training defers it to a step boundary."""

    def __init__(self) -> None:
        self.signal: str | None = None
        self.deferred = False
        self.stepped = False  # training was entered: a later signal is no longer "before the first step"
        self.previous: dict[int, Any] = {}  # the handlers ours replaced, by signal number

    def handle(self, signum: int, frame: Any) -> None:
        # records only: no logging here (a handler that writes to a stream the main thread is writing to fails)
        name = signal.Signals(signum).name
        if self.signal is None:
            self.signal = name
        if not self.deferred:
            raise while_ending(name) if self.stepped else before_start(name)
        if signum == signal.SIGTERM and int(signal.SIGCHLD) not in self.previous:
            # a SIGTERM sent to the whole process tree (scancel, preemption) also ends the data-loader workers;
            # torch's SIGCHLD handler would then raise anywhere in the step: finish it, stop at its boundary
            self.previous[int(signal.SIGCHLD)] = signal.signal(signal.SIGCHLD, signal.SIG_DFL)

    @contextlib.contextmanager
    def deferring(self) -> Iterator[StopRequest]:
        """Training: signals are recorded, acted on at the next step boundary."""
        was, self.deferred, self.stepped = self.deferred, True, True
        try:
            yield self
        finally:
            self.deferred = was


StopRequest.handle._resnet_repro = True  # type: ignore[attr-defined]  # ours: never handed over to
_current: StopRequest | None = None


def hand_over(signal_name: str | None, handlers: dict[int, Any]) -> None:
    """Call the handler `handlers` held for this signal before ours, when it is someone else's (submitit's
    checkpoint-and-requeue; it may end the process); Python's own Ctrl-C handler and the defaults are not."""
    if signal_name is None:
        return
    number = int(getattr(signal, signal_name))
    previous = handlers.get(number)
    ours = getattr(previous, "_resnet_repro", False)
    if callable(previous) and not ours and previous is not signal.default_int_handler:
        previous(number, None)


def current() -> StopRequest:
    """The request of the innermost `handling()` block (a fresh, never-signalled one outside any)."""
    return _current if _current is not None else StopRequest()


def requested() -> str | None:
    return _current.signal if _current is not None else None


@contextlib.contextmanager
def handling() -> Iterator[StopRequest]:
    """Handle SIGNALS for the block (main thread only: Python runs handlers there), then put back the
    previous handlers. A `Stopped` leaving the block is printed once (rank 0) and, when resumable, handed to
    the previous handler of its signal (`hand_over`)."""
    global _current
    request, outer = StopRequest(), _current
    main = threading.current_thread() is threading.main_thread()
    if main:
        for name in SIGNALS:
            number = int(getattr(signal, name))
            request.previous[number] = signal.signal(number, request.handle)
    _current = request
    try:
        yield request
    except Stopped as stop:
        announce(stop)
        if stop.resumable:
            hand_over(stop.signal_name, request.previous)
        raise
    finally:
        _current = outer
        for number, previous in request.previous.items():
            signal.signal(number, previous if previous is not None else signal.SIG_DFL)


announcing = True  # False in workers whose launching process says the line (job.launch_workers)


def announce(stop: Stopped) -> None:
    """Print the stop line once, on rank 0 (the launcher's RANK: also before the process group exists)."""
    if announcing and not stop.printed and int(os.environ.get("RANK", "0")) == 0:
        print(f"resnet_repro: {stop.line}", file=sys.stderr, flush=True)
    stop.printed = True


def saved_handlers() -> dict[int, Any]:
    return {int(getattr(signal, name)): signal.getsignal(int(getattr(signal, name))) for name in SIGNALS}


def stop_codes() -> set[int]:
    """The exit statuses of a process that stopped on one of SIGNALS (resumable or not)."""
    return {EXIT_STOPPED, *(exit_code(name) for name in SIGNALS)}


def restore_handlers(handlers: dict[int, Any]) -> None:
    if threading.current_thread() is threading.main_thread():
        for number, handler in handlers.items():
            signal.signal(number, handler if handler is not None else signal.SIG_DFL)


class StepVote:
    """Whether every rank stops at this step boundary: one all-reduce (MAX) of the local requests per step.

    The vote of boundary k is started without waiting (on the CPU: gloo, no device synchronisation) and read
    at boundary k + 1, so it costs no wait; every rank reads the same result at the same boundary, so a stop
    requested on any rank during step k stops all of them after step k + 1. One process: no collective."""

    def __init__(self, world: int, wanted: Callable[[], bool]) -> None:
        import torch  # here, not at the top: a command's first line is printed before torch loads
        import torch.distributed as dist

        self.world, self.wanted, self._dist = world, wanted, dist
        self._flag = torch.zeros(1, dtype=torch.int32)
        self._work: Any = None
        self._agreed = False

    def poll(self) -> bool:
        """At a step boundary: the ranks agreed to stop (the previous boundary's vote)."""
        if self.world == 1:
            return self.wanted()
        agreed = self._settle()
        if not agreed:
            self._flag.fill_(int(self.wanted()))
            self._work = self._dist.all_reduce(self._flag, op=self._dist.ReduceOp.MAX, async_op=True)
        return agreed

    def _settle(self) -> bool:
        if self._work is not None:
            self._work.wait()
            self._work = None
            self._agreed = self._agreed or bool(self._flag.item())
        return self._agreed

    def settle(self) -> None:
        """End of the steps: read the vote still in flight (it is remembered for `now`)."""
        if self.world > 1:
            self._settle()

    def now(self) -> bool:
        """A blocking vote (the end of an epoch): any rank asked to stop, now or at the last boundary."""
        if self.world == 1:
            return self.wanted()
        agreed = self._settle()
        self._flag.fill_(int(self.wanted()))
        self._dist.all_reduce(self._flag, op=self._dist.ReduceOp.MAX)
        self._agreed = False
        return agreed or bool(self._flag.item())
