"""What MLflow's UI shows of a run beyond our own tags, written the way MLflow itself writes it.

- source tags (`mlflow.source.name`, `mlflow.source.git.commit`, `mlflow.user`, ...): what MLflow's fluent
  `start_run` records; our runs are opened with `MlflowClient.create_run`, which records none of them;
- system metrics (`system/cpu_utilization_percentage`, GPU utilisation and memory, ...): MLflow's own
  `SystemMetricsMonitor`, which needs `psutil` (and `nvidia-ml-py` for NVIDIA GPUs); without them the run
  simply has none;
- parent and child runs (`mlflow.parentRunId`): a sweep's jobs under the sweep's run, an evaluation under
  the training run of its checkpoint; the sweep's run id is in a file of the sweep's folder, so jobs in
  other processes (submitit) find it;
- the final model as an MLflow model (`mlflow.pytorch.log_model`, with a signature and an input example).
"""

from __future__ import annotations

import contextlib
import getpass
import json
import logging
import subprocess
from pathlib import Path
from typing import Any

from resnet_repro.tracking.uri import mlflow_environ

PARENT = "mlflow.parentRunId"
NOTE = "mlflow.note.content"
SWEEP_PARENT_FILE = "mlflow_sweep_run.json"
REPO = Path(__file__).resolve().parents[2]
log = logging.getLogger("resnet_repro")


def _git(*args: str) -> str:
    try:
        done = subprocess.run(["git", "-C", str(REPO), *args], capture_output=True, text=True, timeout=5)
    except (OSError, subprocess.SubprocessError):
        return ""
    return done.stdout.strip() if done.returncode == 0 else ""


def source_tags(entry_point: str) -> dict[str, str]:
    """MLflow's standard source tags: the command (`python -m <entry_point>`), git commit/branch/repo, user."""
    tags = {
        "mlflow.source.type": "LOCAL",
        "mlflow.source.name": f"python -m {entry_point}",
        "mlflow.user": _user(),
    }
    commit = _git("rev-parse", "HEAD")
    if commit:
        tags["mlflow.source.git.commit"] = commit
        tags["mlflow.source.git.branch"] = _git("rev-parse", "--abbrev-ref", "HEAD")
        tags["mlflow.source.git.dirty"] = str(bool(_git("status", "--porcelain", "--untracked-files=no"))).lower()
        url = _git("config", "--get", "remote.origin.url")
        if url:
            tags["mlflow.source.git.repoURL"] = url
    return {k: v for k, v in tags.items() if v}


def _user() -> str:
    try:
        return getpass.getuser()
    except Exception:  # no user name in the environment (some containers)
        return ""


# ---- system metrics ---------------------------------------------------------------------------
def start_system_metrics(uri: str, run_id: str, resume: bool, interval_s: float = 10.0) -> Any:
    """MLflow's system-metrics monitor on the run (a thread), or None where psutil is missing."""
    try:
        import psutil  # noqa: F401 - MLflow's CPU monitor needs it; without it: no system metrics, silently
        from mlflow.system_metrics.system_metrics_monitor import SystemMetricsMonitor

        logging.getLogger("mlflow.system_metrics").setLevel(logging.ERROR)  # optional: never a line of its own
        monitor = SystemMetricsMonitor(run_id, sampling_interval=interval_s, resume_logging=resume, tracking_uri=uri)
        monitor.start()
        return monitor
    except Exception:  # optional: a run never fails for its system metrics
        return None


def stop_system_metrics(monitor: Any, wait_s: float = 5.0) -> None:
    """Stop the sampling thread and flush its last samples. MLflow's `finish()` joins the thread without a
    limit, and a store that went away keeps it in HTTP retries for minutes: it gets `wait_s`, then it is left
    (a daemon thread: it ends with the process) and its last samples with it (the run's own writes are kept by
    tracking.outbox; system metrics are only nice to have)."""
    thread = getattr(monitor, "_process", None)
    if monitor is None or thread is None:
        return
    with contextlib.suppress(Exception):
        monitor._shutdown_event.set()
        thread.join(wait_s)
        if not thread.is_alive():
            monitor.finish()  # the thread has ended: this only flushes


# ---- sweeps -----------------------------------------------------------------------------------
def write_sweep_parent(sweep_dir: str, run_id: str, uri: str, experiment: str) -> None:
    folder = Path(sweep_dir)
    folder.mkdir(parents=True, exist_ok=True)
    (folder / SWEEP_PARENT_FILE).write_text(json.dumps({"run_id": run_id, "uri": uri, "experiment": experiment}))


def sweep_parent(sweep_dir: str, uri: str, experiment: str) -> str | None:
    """The run id of the sweep's own run, when the sweep has one in this store and experiment."""
    path = Path(sweep_dir) / SWEEP_PARENT_FILE
    if not sweep_dir or not path.is_file():
        return None
    try:
        found = json.loads(path.read_text())
    except (OSError, ValueError):
        return None
    same = found.get("uri") == uri and found.get("experiment") == experiment
    return str(found["run_id"]) if same and found.get("run_id") else None


# ---- the model --------------------------------------------------------------------------------
def log_model(uri: str, experiment_id: str, run_id: str, model: Any, input_size: int) -> str:
    """The model as an MLflow pytorch model of the run (MLflow 3: a logged model, `models:/<id>`), saved with
    torch.export (MLflow's default: loading runs no pickle): input a normalised float32 batch (N, 3, input_size,
    input_size), output the logits (N, classes), with an example; ready to register and serve. Returns its URI."""
    import mlflow
    import mlflow.pytorch
    import numpy as np
    import torch
    from mlflow.models import infer_signature
    from mlflow.tracking._tracking_service.utils import _use_tracking_uri

    model = model.cpu().eval()
    # two images: an example of one would fix the batch dimension of the exported graph at 1
    example = np.zeros((2, 3, input_size, input_size), dtype=np.float32)
    with torch.no_grad():
        logits = model(torch.from_numpy(example)).numpy()
    signature = infer_signature(example, logits)
    requirements = [f"torch=={torch.__version__.split('+')[0]}", f"timm=={_version('timm')}"]
    # MLflow 3 files a logged model under the active experiment (by default "Default", artifacts in ./mlruns)
    with _use_tracking_uri(uri), mlflow_environ({"MLFLOW_EXPERIMENT_ID": experiment_id}), _quiet():
        info = mlflow.pytorch.log_model(
            model,
            name="model",
            signature=signature,
            input_example=example,
            pip_requirements=requirements,  # named: inferring them imports and times every package
            run_id=run_id,
        )
    return str(info.model_uri)


def _version(package: str) -> str:
    from importlib.metadata import version

    return version(package)


@contextlib.contextmanager
def _quiet() -> Any:
    """MLflow's INFO/progress chatter while a model is saved."""
    logger = logging.getLogger("mlflow")
    level = logger.level
    logger.setLevel(logging.ERROR)
    try:
        yield
    finally:
        logger.setLevel(level)
