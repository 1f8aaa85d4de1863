"""The command line before Hydra sees it: check every job it would launch, and share one output
directory between the ranks of a torchrun launch."""

from __future__ import annotations

import os
import re
from datetime import datetime

from resnet_repro.config import ConfigError, compose, expand_sweep, hydra_internals, user_overrides, validate
from resnet_repro.tracking.uri import default_uri
from resnet_repro.usage import banner

SAFE_VALUE = re.compile(r"[\w/:.+-]+")  # a value Hydra's override grammar reads unquoted


def prepare_argv(argv: list[str]) -> list[str]:
    """Raise ConfigError for any job that would fail to compose; return argv, adjusted for torchrun ranks."""
    get_args_parser, _ = hydra_internals()
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

    world = distributed.env_world_size() if distributed.under_torchrun() else None
    for i, job in enumerate(jobs):
        validate(compose(job) if i else first, world_size=world)
    if args.cfg and first.tracking.uri is None:  # show the store the run would use, not `uri: null`
        uri = default_uri()
        return [f"tracking.uri={uri if SAFE_VALUE.fullmatch(uri) else repr(uri)}", *argv]  # before any --flag
    if distributed.under_torchrun() and not args.cfg:
        if args.multirun:
            raise ConfigError("--multirun cannot run under torchrun; sweep with trainer.nproc_per_node=N instead")
        return argv + _torchrun_overrides(args.overrides)
    return argv


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
