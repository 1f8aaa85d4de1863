"""The results report: the README's tables rebuilt from this project's runs, beside the published ones.

`python -m resnet_repro.report` (cli) reads the runs of the MLflow store and the run records in
results/logs (records: one JSON file per run, the form every output is computed from), decides which runs
count and the verdict per row (select), and writes the Markdown tables and runs.csv (render, markdown),
the curves (curves, with mmpretrain's published logs: published) and the README section (outputs).
"""

from resnet_repro.report.cli import main
from resnet_repro.report.select import exclusion

__all__ = ["exclusion", "main"]
