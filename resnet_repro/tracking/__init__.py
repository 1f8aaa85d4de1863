"""The only package that talks to MLflow: `uri` (where the store is), `run` (writing one run),
`store` (reading runs back for the report)."""

from resnet_repro.tracking.run import Tracker
from resnet_repro.tracking.store import metric_history, read_runs, run_page, store_missing
from resnet_repro.tracking.uri import default_uri, resolve_uri, retrying, sqlite_path, ui_command

__all__ = [
    "Tracker",
    "default_uri",
    "metric_history",
    "read_runs",
    "resolve_uri",
    "retrying",
    "run_page",
    "sqlite_path",
    "store_missing",
    "ui_command",
]
