"""Errors a user can fix. They are printed as one line naming what is wrong and what is allowed."""

from __future__ import annotations

import sys
from typing import NoReturn


class UserError(Exception):
    """Bad input (config, data, checkpoint): one line on stderr and exit status 2, never a traceback."""


def exit_with(err: BaseException) -> NoReturn:
    print(f"resnet_repro: error: {err}", file=sys.stderr, flush=True)
    sys.exit(2)
