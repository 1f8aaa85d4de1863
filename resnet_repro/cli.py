"""The command line before Hydra sees it: check every job it would launch, and share one output
directory between the ranks of a torchrun launch."""

from __future__ import annotations

import os
import re
from collections.abc import Sequence
from datetime import datetime

# Hydra's own command-line parser and basic sweeper, so that a command line is read and expanded exactly as Hydra
# will: private modules (stable since Hydra 1.1), touched only here
from hydra._internal.core_plugins.basic_sweeper import BasicSweeper
from hydra._internal.utils import get_args_parser

from resnet_repro.config import ConfigError, compose, parse_overrides, user_overrides, validate
from resnet_repro.tracking.uri import default_uri
from resnet_repro.usage import banner

SAFE_VALUE = re.compile(r"[\w/:.+-]+")  # a value Hydra's override grammar reads unquoted


def prepare_argv(argv: list[str]) -> list[str]:
    """Raise ConfigError for any job that would fail to compose; return argv, adjusted for torchrun ranks."""
    try:
        args = get_args_parser().parse_args(argv)
    except SystemExit:  # a malformed command line: let Hydra print its usage
        return argv
    modes = [
        flag
        for flag, on in (
            ("--run", args.run),
            ("--multirun", args.multirun),
            ("--cfg", args.cfg),
            ("--info", args.info),
            ("--shell-completion", args.shell_completion),
        )
        if on
    ]
    if len(modes) > 1:  # Hydra raises a ValueError (a traceback) for this
        raise ConfigError(f"{' and '.join(modes)} cannot be combined; give one of --run, --multirun, --cfg, --info")
    if args.help or args.hydra_help or args.info or args.shell_completion or args.config_name or args.config_path:
        return argv
    overrides = user_overrides(args.overrides)
    jobs = expand_sweep(overrides) if args.multirun else [overrides]
    first = compose(jobs[0])
    if not args.multirun and not args.cfg and os.environ.get("RANK", "0") == "0":
        print(banner(first), flush=True)  # before torch's import: seconds on a loaded machine
    from resnet_repro import distributed

    for i, job in enumerate(jobs):
        validate(compose(job) if i else first)  # on the job's world (torchrun's, or trainer.nproc_per_node)
    if args.cfg and first.tracking.uri is None:  # show the store the run would use, not `uri: null`
        uri = default_uri()
        return [f"tracking.uri={uri if SAFE_VALUE.fullmatch(uri) else repr(uri)}", *argv]  # before any --flag
    if distributed.under_torchrun() and not args.cfg:
        if args.multirun:
            raise ConfigError("--multirun cannot run under torchrun; sweep with trainer.nproc_per_node=N instead")
        return argv + _torchrun_overrides(args.overrides)
    return argv


def expand_sweep(overrides: Sequence[str]) -> list[list[str]]:
    """The override list of every job a `--multirun` command line would launch (basic sweeper)."""
    parsed = [ov for ov in parse_overrides(overrides) if not ov.key_or_group.startswith("hydra")]
    if any(ov.value_type is not None and "GLOB" in ov.value_type.name for ov in parsed):
        return [list(overrides)]
    batches = BasicSweeper.split_arguments(parsed, None)
    return [job for batch in batches for job in batch]


def _torchrun_overrides(overrides: list[str]) -> list[str]:
    """All ranks write into rank 0's run directory; only rank 0 writes Hydra's files and log."""
    from resnet_repro import distributed

    distributed.init_from_env()
    extra = []
    if not any(o.startswith("hydra.run.dir=") for o in overrides):
        stamp = distributed.broadcast_object(datetime.now().strftime("%Y-%m-%d/%H-%M-%S"))
        extra.append(f"hydra.run.dir={os.path.join('outputs', stamp)}")
    if distributed.rank() != 0:
        extra += ["hydra.output_subdir=null", "hydra/job_logging=disabled", "hydra/hydra_logging=disabled"]
    return extra
