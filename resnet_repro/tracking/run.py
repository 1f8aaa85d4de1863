"""One MLflow run of one job, written by rank 0 (the training and evaluation side of the store).

Default store: an SQLite file at an absolute path (`sqlite:///<launch dir>/mlflow.db`), artifacts
beside it, no server. `tracking.uri=http://host:5000` (or any MLflow URI) uses another store.
Parallel jobs share one SQLite file; every call retries while SQLite reports the database locked.

What a training run records (the report reads these names):
- tags (run_books.run_tags): row, section, config_hash, faithful, deviations (identity.Deviation records as
  JSON; older runs: "; "-joined words), run_type ("train"/"eval"; "sweep" for a sweep's own run), sweep,
  git_commit, hydra_overrides, world_size, device, device_name, data_verified, data_fingerprint, data_on_device,
  val_limited, tf32 (fp32 convs/matmuls may use TF32), bn_group_kernel, decode (cpu / device: where JPEGs were
  decoded and cropped), output_dir, checkpoint_dir; yes/no tags are "true"/"false" (older runs wrote
  data_verified as "True"/"False"/"None");
  pid/host/claimed_at (who writes it, since when), versions; MLflow's standard ones (tracking.standard):
  mlflow.source.*, mlflow.user, and mlflow.parentRunId for a sweep's job (and an evaluation of our
  checkpoint: its training run)
- params: the flattened composed config (recipe.epochs, ...) plus the batch plan (batches.BatchPlan.params:
  batch_global, batch_per_device, batch_forward, batch_bn_group, bn_images, accum_steps), num_train, num_val,
  steps_per_epoch, num_params, flops_g (runs before these two params logged them as metrics params, flops_g)
- metrics per epoch (step = epoch, 1-based): train_loss, lr, val_top1, val_top5 (percent),
  epoch_time_s, train_img_per_s, data_wait_frac (share of step time waiting for the next batch); every log
  interval (step = optimizer step): step/train_loss, step/lr; at the end: best_val_top1, epochs_completed;
  system/* (MLflow's system metrics, tracking.system_metrics)
- artifacts: config/config.yaml (resolved), config/overrides.yaml, the job's log, best.pt on request;
  the final model as an MLflow model on request (tracking.log_model)

Once a run is open, `keep_pending` routes its writes through tracking.outbox: a store that goes away during
the run does not stop it (the writes are kept in the checkpoint folder and sent when it answers again).
"""

from __future__ import annotations

import logging
import os
import platform
import subprocess
import time
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from resnet_repro.errors import UserError
from resnet_repro.tracking import standard
from resnet_repro.tracking.outbox import PENDING_FILE, GuardedClient, Outbox, deliver
from resnet_repro.tracking.uri import (
    PROBE_ENV,
    mlflow_environ,
    mlflow_quiet,
    resolve_uri,
    retrying,
    sqlite_path,
    tracking_off,
)

FINISHED = "FINISHED"


class Tracker:
    """One MLflow run of one job. On ranks other than 0 every method does nothing, without importing MLflow; with
    tracking.uri=none (`off`) neither, and the store's readers find nothing (no run, no rival, no history)."""

    def __init__(self, uri: str | None, experiment: str, enabled: bool = True) -> None:
        self.uri, self.experiment, self.off = resolve_uri(uri), experiment, tracking_off(uri)
        self.enabled = enabled and not self.off
        self.run_id: str | None = None
        self.claimed_at: float = float("inf")  # when this process took its run up (ms), for rival starts
        self._client: Any = None
        self._experiment_id: str | None = None
        self._monitor: Any = None  # MLflow's system-metrics thread (tracking.standard)

    @property
    def active(self) -> bool:
        """This process writes a started run (rank 0, after start)."""
        return self.enabled and self.run_id is not None

    @property
    def client(self) -> Any:
        if self._client is None:
            from mlflow import MlflowClient

            logging.getLogger("mlflow").setLevel(logging.WARNING)  # not its database-migration chatter
            logging.getLogger("alembic").setLevel(logging.WARNING)
            db = sqlite_path(self.uri)
            if db is not None:
                from filelock import FileLock

                # opening the store creates its schema the first time; parallel jobs doing it at once collide
                with FileLock(str(db) + ".lock"):
                    client = MlflowClient(tracking_uri=self.uri)
                    client.search_experiments(max_results=1)
            else:
                client = MlflowClient(tracking_uri=self.uri)
            self._client = client
        return self._client

    def probe(self) -> None:
        """Check the store answers and takes a write (a few seconds at most), so that a store that only reads
        fails now, not at the first metric; a UserError naming tracking.uri otherwise."""
        if self.off:
            return
        try:
            with mlflow_environ(PROBE_ENV):  # not after minutes of MLflow's retries
                self.client.search_experiments(max_results=1)
        except Exception as err:
            raise UserError(
                f"tracking.uri={self.uri} does not answer as an MLflow store ({_first_line(err)}); allowed: "
                f"sqlite:///<file>, file:<folder>, http(s)://<server>:<port>"
            ) from None
        try:
            with mlflow_environ(PROBE_ENV), mlflow_quiet():
                self.client.set_experiment_tag(self.experiment_id(), "resnet_repro.writable", "true")
        except Exception as err:
            raise UserError(
                f"tracking.uri={self.uri}: cannot write to this MLflow store ({_first_line(err)}); give a store "
                "this process can write (file permissions, free space)"
            ) from None

    @retrying
    def experiment_id(self) -> str:
        if self._experiment_id is None:
            exp = self.client.get_experiment_by_name(self.experiment)
            self._experiment_id = exp.experiment_id if exp is not None else self._create_experiment()
        return self._experiment_id

    def _create_experiment(self) -> str:
        db = sqlite_path(self.uri)  # keep artifacts beside the database, not in the cwd
        artifacts = (db.parent / "mlartifacts").as_uri() if db is not None else None
        try:
            return self.client.create_experiment(self.experiment, artifact_location=artifacts)
        except Exception:  # a parallel job created it first
            exp = self.client.get_experiment_by_name(self.experiment)
            if exp is None:
                raise
            return exp.experiment_id

    @retrying
    def search(self, filter_string: str = "", max_results: int = 5000) -> list[Any]:
        if self.off:
            return []
        return list(self.client.search_runs([self.experiment_id()], filter_string, max_results=max_results))

    def find_finished(self, config_hash: str, fingerprint: str | None = None) -> str | None:
        """The id of a finished training run of the same config (on the same data, when given), if any."""
        query = f"tags.config_hash = '{config_hash}' and tags.run_type = 'train' and attributes.status = '{FINISHED}'"
        if fingerprint is not None:
            query += f" and tags.data_fingerprint = '{fingerprint}'"
        runs = self.search(query)
        return runs[0].info.run_id if runs else None

    @retrying
    def status(self, run_id: str) -> str | None:
        """The run's status, None when this store has no such run (or it was deleted: it is never written again)."""
        if self.off:
            return None
        try:
            info = self.client.get_run(run_id).info
            return None if info.lifecycle_stage == "deleted" else info.status
        except Exception as err:
            if "RESOURCE_DOES_NOT_EXIST" in str(err) or "not found" in str(err).lower():
                return None
            raise

    def close_dead_runs(self, config_hash: str, keep: str | None, checkpoint_dir: str | None = None) -> list[str]:
        """Runs of this config left RUNNING by a process that no longer lives: KILLED. Dead means: it trained in
        `checkpoint_dir`, whose lock the caller holds (any host), or its pid is gone from this host."""
        host, closed = platform.node(), []
        for run in self.search(f"tags.config_hash = '{config_hash}' and attributes.status = 'RUNNING'"):
            tags = run.data.tags
            ours = checkpoint_dir is not None and tags.get("checkpoint_dir") == checkpoint_dir
            dead = ours or (tags.get("host") == host and not pid_alive(tags.get("pid", "")))
            if run.info.run_id == keep or not dead:
                continue
            self.client.set_terminated(run.info.run_id, status="KILLED")
            closed.append(run.info.run_id)
        return closed

    def running(self, config_hash: str, fingerprint: str | None) -> list[dict[str, Any]]:
        """The RUNNING training runs of this config (and seed) on this data other than ours: run_id, tags and
        claimed (ms: when its process took it up; its start for runs without the tag)."""
        query = f"tags.config_hash = '{config_hash}' and tags.run_type = 'train' and attributes.status = 'RUNNING'"
        if fingerprint is not None:
            query += f" and tags.data_fingerprint = '{fingerprint}'"
        return [
            {
                "run_id": run.info.run_id,
                "tags": dict(run.data.tags),
                "claimed": int(run.data.tags.get("claimed_at") or run.info.start_time or 0),
            }
            for run in self.search(query)
            if run.info.run_id != self.run_id
        ]

    def withdraw(self, adopted: bool) -> None:
        """Give the run up before training (another process trains this config): a run this start created is
        deleted, an adopted one is left KILLED."""
        if not self.active:
            return
        if adopted:
            self.close_run(self.run_id, "KILLED")
        else:
            retrying(self.client.delete_run)(self.run_id)
        self.run_id = None

    @retrying
    def close_run(self, run_id: str, status: str) -> None:
        """End another run of ours (not the one this tracker writes)."""
        self.client.set_terminated(run_id, status=status)

    @retrying
    def start(self, run_name: str, tags: Mapping[str, Any], run_id: str | None = None) -> str | None:
        """Open a new run, or continue `run_id` (a resumed job) unless it FINISHED; returns the run id."""
        if not self.enabled:
            return None
        owner = {"pid": os.getpid(), "host": platform.node(), "claimed_at": int(time.time() * 1000)}
        self.claimed_at = owner["claimed_at"]
        if run_id is not None:
            if self.status(run_id) == FINISHED:
                raise UserError(f"MLflow run {run_id} is FINISHED and is never written again; use trainer.resume=none")
            self.client.update_run(run_id, status="RUNNING")
            self.run_id = run_id
            self.set_tags(owner)
        else:
            job = tags.get("run_type") != "sweep" and tags.get("sweep")
            parent = standard.sweep_parent(str(tags["sweep"]), self.uri, self.experiment) if job else None
            link = {standard.PARENT: parent} if parent else {}  # a sweep's job: a child of the sweep's run
            tags = {k: str(v) for k, v in {**tags, **owner, **link}.items()}
            self.run_id = self.client.create_run(self.experiment_id(), run_name=run_name, tags=tags).info.run_id
        return self.run_id

    def open(
        self,
        run_name: str,
        *,
        adopt: str | None,
        tags: Mapping[str, Any],
        params: Mapping[str, Any],
        texts: Mapping[str, str],
        resumed_tags: Mapping[str, Any],
        system_metrics: bool = False,
    ) -> bool:
        """Continue the run `adopt` when this store has it and it is not FINISHED (a job killed before), tagging
        it with `resumed_tags`; otherwise start a new run that records `tags`, `params` and the `texts`
        artifact. True when a run was adopted. `system_metrics`: MLflow's CPU/memory/GPU sampling until
        `finish`."""
        if not self.enabled:
            return False
        adopted = adopt is not None and self.status(adopt) not in (None, FINISHED)
        if adopted:
            self.start(run_name, {}, run_id=adopt)
            self.set_tags(resumed_tags)
        else:
            self.start(run_name, tags)
            self.log_params(params)
            for artifact, text in texts.items():
                self.log_text(text, artifact)
        if system_metrics and self.active:
            self._monitor = standard.start_system_metrics(self.uri, str(self.run_id), resume=adopted)
        return adopted

    @retrying
    def log_params(self, params: Mapping[str, Any]) -> None:
        if self.active:  # MLflow splits the batch into its own size limits
            from mlflow.entities import Param  # imported only where something is tracked (rank 0)

            self.client.log_batch(self.run_id, params=[Param(k, str(v)[:6000]) for k, v in params.items()])

    @retrying
    def log_metrics(self, metrics: Mapping[str, float], step: int) -> None:
        if self.active:
            from mlflow.entities import Metric

            now = int(time.time() * 1000)
            self.client.log_batch(self.run_id, metrics=[Metric(k, float(v), now, step) for k, v in metrics.items()])

    @retrying
    def set_tags(self, tags: Mapping[str, Any]) -> None:
        if self.active:
            from mlflow.entities import RunTag

            self.client.log_batch(self.run_id, tags=[RunTag(k, str(v)) for k, v in tags.items()])

    @retrying
    def log_text(self, text: str, artifact_file: str) -> None:
        if self.active:
            self.client.log_text(self.run_id, text, artifact_file)

    @retrying
    def log_file(self, path: Path, folder: str) -> None:
        if self.active and path.is_file():
            self.client.log_artifact(self.run_id, str(path), folder)

    def finish(self, status: str = FINISHED) -> None:
        standard.stop_system_metrics(self._monitor)
        self._monitor = None
        self._terminate(status)

    @retrying
    def _terminate(self, status: str) -> None:
        if self.active:
            self.client.set_terminated(self.run_id, status=status)

    # ---- a store that goes away during the run (tracking.outbox) ---------------------------------
    def keep_pending(self, folder: Path) -> None:
        """From now on a write the store does not take is kept in `folder` and sent later (never raised)."""
        if self.enabled and not isinstance(self._client, GuardedClient):
            self._client = GuardedClient(self.client, Outbox(folder / PENDING_FILE, self.uri))

    @property
    def pending(self) -> int:
        """Writes kept because the store did not take them (0 once all were sent)."""
        return len(self._client.outbox) if isinstance(self._client, GuardedClient) else 0

    @property
    def pending_file(self) -> Path | None:
        return self._client.outbox.path if isinstance(self._client, GuardedClient) else None

    def flush(self) -> bool:
        """Try once more to send what is kept; True when nothing is left."""
        return self._client.outbox.flush(self._client.inner) if isinstance(self._client, GuardedClient) else True

    def deliver_pending(self, folder: Path) -> int:
        """Send what an earlier run of this folder could not (its end, when the store was away then); the number
        of writes still kept."""
        return deliver(self.client, folder / PENDING_FILE, self.uri) if self.enabled else 0

    # ---- what MLflow users look for (tracking.standard) ---------------------------------------------
    def log_model(self, model: Any, input_size: int) -> str | None:
        """The model as an MLflow model of this run (tracking.log_model=true); its URI."""
        if not self.active:
            return None
        return standard.log_model(self.uri, self.experiment_id(), str(self.run_id), model, input_size)

    def name_of(self, run_id: str) -> str | None:
        """The run's name, None when this store has no such run."""
        return self._run_name(run_id) if self.status(run_id) is not None else None

    @retrying
    def _run_name(self, run_id: str) -> str | None:
        return self.client.get_run(run_id).info.run_name

    @retrying
    def final_metrics(self, run_id: str) -> dict[str, float]:
        """The latest value of each metric of a run (e.g. a finished run a re-issued sweep skips)."""
        return dict(self.client.get_run(run_id).data.metrics)

    @retrying
    def experiment_of(self, run_id: str | None) -> str | None:
        """The name of the experiment a run lives in (None: no such run)."""
        if not self.active or run_id is None:
            return None
        exp = self.client.get_experiment(self.client.get_run(run_id).info.experiment_id)
        return exp.name if exp is not None else None

    def last_step(self, run_id: str | None, key: str) -> int:
        """The highest step of a metric the run holds (0: none)."""
        if not self.active or run_id is None:
            return 0
        return max((step for step, _ in self.history(run_id, key)), default=0)

    @retrying
    def history(self, run_id: str, key: str) -> list[tuple[int, float]]:
        if self.off:
            return []
        return [(m.step, m.value) for m in self.client.get_metric_history(run_id, key)]

    def backfill(self, history: Mapping[int, Mapping[str, float]]) -> None:
        """Log the epochs a checkpoint holds that the run lacks (a kill between checkpoint and MLflow)."""
        if not self.active:
            return
        logged = {step for step, _ in self.history(self.run_id, "val_top1")}
        for epoch, metrics in sorted(history.items()):
            if epoch not in logged:
                self.log_metrics(metrics, step=epoch)


def _first_line(err: BaseException) -> str:
    text = str(err).strip()
    return (text.splitlines()[0] if text else type(err).__name__)[:200]


def pid_alive(pid: str) -> bool:
    """Whether process `pid` of this host lives (an unknown pid counts as living: left alone)."""
    if not pid.isdigit():
        return True  # unknown owner: leave it alone
    try:
        os.kill(int(pid), 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


# ---- provenance: what every run (training or evaluation) records about where it came from ------------
def versions() -> dict[str, str]:
    import timm
    import torch
    import torchvision

    return {
        "torch": torch.__version__,
        "torchvision": torchvision.__version__,
        "timm": timm.__version__,
        "python": platform.python_version(),
    }


def git_commit() -> str:
    repo = Path(__file__).resolve().parents[2]
    try:
        head = subprocess.run(["git", "-C", str(repo), "rev-parse", "HEAD"], capture_output=True, text=True, timeout=5)
        dirty = subprocess.run(
            ["git", "-C", str(repo), "status", "--porcelain", "--untracked-files=no"],
            capture_output=True,
            text=True,
            timeout=5,
        ).stdout.strip()
    except (OSError, subprocess.SubprocessError):
        return "unknown"
    return head.stdout.strip() + ("-dirty" if dirty else "") if head.returncode == 0 else "unknown"


def flat_params(node: Any, prefix: str = "") -> dict[str, Any]:
    """{"recipe.optimizer.lr": 0.1, ...} of a nested mapping; lists stay whole (as JSON) so pipelines read as one."""
    import json

    if isinstance(node, Mapping):
        return {k: v for key, value in node.items() for k, v in flat_params(value, f"{prefix}{key}.").items()}
    return {prefix[:-1]: json.dumps(node) if isinstance(node, list) else node}


ENTRY_POINTS = {"train": "resnet_repro", "eval": "resnet_repro.test", "sweep": "resnet_repro --multirun"}


def provenance_tags(**tags: Any) -> dict[str, Any]:
    """The given tags plus the git commit, library versions and MLflow's standard source tags."""
    source = standard.source_tags(ENTRY_POINTS.get(str(tags.get("run_type")), "resnet_repro"))
    return {**tags, "git_commit": git_commit(), **{f"version.{k}": v for k, v in versions().items()}, **source}
