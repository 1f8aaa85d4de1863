"""`python -m resnet_repro.report`: see resnet_repro.report.cli."""

import sys

from resnet_repro.report.cli import main

sys.exit(main())
