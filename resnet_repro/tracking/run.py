"""One MLflow run of one job, written by rank 0 (the training and evaluation side of the store).

Default store: an SQLite file at an absolute path (`sqlite:///<launch dir>/mlflow.db`), artifacts
beside it, no server. `tracking.uri=http://host:5000` (or any MLflow URI) uses another store.
Parallel jobs share one SQLite file; every call retries while SQLite reports the database locked.

What a training run records (the report reads these names):
- tags: row, section, config_hash, faithful ("true"/"false"), deviations, run_type ("train"/"eval"),
  sweep, git_commit, hydra_overrides, world_size, device, versions (torch, torchvision, timm, python)
- params: the flattened composed config (recipe.epochs, ...) plus batch_global, batch_per_device,
  batch_micro, accum_steps
- metrics per epoch (step = epoch, 1-based): train_loss, lr, val_top1, val_top5 (percent),
  epoch_time_s, train_img_per_s; once: params, flops_g; at the end: best_val_top1, epochs_completed
- artifacts: config/config.yaml (resolved), config/overrides.yaml
"""

from __future__ import annotations

import logging
import time
from collections.abc import Mapping
from typing import Any

from resnet_repro.tracking.uri import resolve_uri, retrying, sqlite_path


class Tracker:
    """One MLflow run of one job. On ranks other than 0 every method does nothing."""

    def __init__(self, uri: str | None, experiment: str, enabled: bool = True) -> None:
        self.uri, self.experiment, self.enabled = resolve_uri(uri), experiment, enabled
        self.run_id: str | None = None
        self._client: Any = None
        self._experiment_id: str | None = None

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

    @retrying
    def experiment_id(self) -> str:
        if self._experiment_id is None:
            exp = self.client.get_experiment_by_name(self.experiment)
            if exp is not None:
                self._experiment_id = exp.experiment_id
            else:
                self._experiment_id = self._create_experiment()
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
        return list(self.client.search_runs([self.experiment_id()], filter_string, max_results=max_results))

    def find_finished(self, config_hash: str) -> str | None:
        """The id of a finished training run of the same config, if any."""
        runs = self.search(
            f"tags.config_hash = '{config_hash}' and tags.run_type = 'train' and attributes.status = 'FINISHED'"
        )
        return runs[0].info.run_id if runs else None

    @retrying
    def start(self, run_name: str, tags: Mapping[str, Any], run_id: str | None = None) -> str | None:
        """Open a new run, or continue `run_id` (a resumed job); returns the run id."""
        if not self.enabled:
            return None
        if run_id is not None:
            self.client.update_run(run_id, status="RUNNING")
            self.run_id = run_id
        else:
            tags = {k: str(v) for k, v in tags.items()}
            self.run_id = self.client.create_run(self.experiment_id(), run_name=run_name, tags=tags).info.run_id
        return self.run_id

    @retrying
    def log_params(self, params: Mapping[str, Any]) -> None:
        from mlflow.entities import Param

        if self.enabled:
            items = [Param(k, str(v)[:6000]) for k, v in params.items()]
            for i in range(0, len(items), 100):
                self.client.log_batch(self.run_id, params=items[i : i + 100])

    @retrying
    def log_metrics(self, metrics: Mapping[str, float], step: int) -> None:
        from mlflow.entities import Metric

        if self.enabled:
            now = int(time.time() * 1000)
            self.client.log_batch(self.run_id, metrics=[Metric(k, float(v), now, step) for k, v in metrics.items()])

    @retrying
    def set_tags(self, tags: Mapping[str, Any]) -> None:
        from mlflow.entities import RunTag

        if self.enabled:
            self.client.log_batch(self.run_id, tags=[RunTag(k, str(v)) for k, v in tags.items()])

    @retrying
    def log_text(self, text: str, artifact_file: str) -> None:
        if self.enabled:
            self.client.log_text(self.run_id, text, artifact_file)

    @retrying
    def finish(self, status: str = "FINISHED") -> None:
        if self.enabled and self.run_id is not None:
            self.client.set_terminated(self.run_id, status=status)

    @retrying
    def history(self, run_id: str, key: str) -> list[tuple[int, float]]:
        return [(m.step, m.value) for m in self.client.get_metric_history(run_id, key)]
