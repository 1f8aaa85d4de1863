"""Errors a user can fix. They are printed as one line naming what is wrong and what is allowed."""

from __future__ import annotations

import contextlib
import sys
from collections.abc import Iterator
from typing import NoReturn


class UserError(Exception):
    """Bad input (config, data, checkpoint): one line on stderr and exit status 2, never a traceback.

    `before_start` marks errors found before a run started (nothing of it exists yet to keep).
    """

    before_start = False


@contextlib.contextmanager
def marked_before_start() -> Iterator[None]:
    """A UserError raised in the block came before the run started: nothing of it is left to keep."""
    try:
        yield
    except UserError as err:
        err.before_start = True
        raise


class RunFailed(Exception):
    """A run that failed for a reason outside the user's input (a worker died): one line, exit status 1."""


def one_line(err: BaseException) -> str:
    """The message; for an error re-raised from a DataLoader worker, the worker's own last line."""
    text = str(err).strip()
    if "Original Traceback" in text:  # torch wraps worker errors with the worker's traceback
        text = text.splitlines()[-1].split(": ", 1)[-1]
    return text.splitlines()[0] if text else type(err).__name__


def exit_with(err: BaseException) -> NoReturn:
    print(f"resnet_repro: error: {one_line(err)}", file=sys.stderr, flush=True)
    sys.exit(1 if isinstance(err, RunFailed) else 2)
