"""`python -m resnet_repro [group=option ...] [key=value ...]`: compose, check, train one row.

The command line is checked before Hydra starts (one-line errors, every job of a sweep included);
Hydra then composes conf/ and calls `job.run_and_summarise` once per job. Under torchrun every rank
runs this same entry, and all ranks share rank 0's output directory.
"""

from __future__ import annotations

import sys
from typing import Any

import hydra
from omegaconf import DictConfig

from resnet_repro.config import CONF_DIR, register_resolvers
from resnet_repro.errors import UserError, exit_with


@hydra.main(version_base="1.3", config_path=str(CONF_DIR), config_name="config")
def _hydra_main(cfg: DictConfig) -> dict[str, Any] | None:
    from hydra.core.hydra_config import HydraConfig

    from resnet_repro.job import run_and_summarise

    return run_and_summarise(cfg, multirun=str(HydraConfig.get().mode) == "RunMode.MULTIRUN")


def main(argv: list[str] | None = None) -> None:
    from resnet_repro import stopping

    argv = sys.argv[1:] if argv is None else argv
    if "--help" in argv or "-h" in argv:  # ours, short and at once (Hydra's: --hydra-help)
        from resnet_repro.usage import main_help

        print(main_help())
        return
    with stopping.handling():  # Ctrl-C or SIGTERM from here on ends in one line (job.train says where)
        from resnet_repro.cli import prepare_argv

        register_resolvers()
        try:
            argv = prepare_argv(argv)
        except UserError as err:
            exit_with(err)
        sys.argv = [sys.argv[0], *argv]
        _hydra_main()


if __name__ == "__main__":
    main()
