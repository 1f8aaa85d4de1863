"""The only package that talks to MLflow: `uri` (where the store is), `run` (writing one run),
`store` (reading runs back for the report)."""

from resnet_repro.tracking.run import Tracker
from resnet_repro.tracking.store import read_runs
from resnet_repro.tracking.uri import default_uri, resolve_uri, tracking_off, ui_command

__all__ = ["Tracker", "default_uri", "read_runs", "resolve_uri", "tracking_off", "ui_command"]
