"""What a `--multirun` sweep records and says: its own MLflow run with the jobs' runs as children, and one
line per job when it ends (with a non-zero exit when a job failed).

`SweepSummary`, a Hydra callback (conf/config.yaml), opens the sweep's run when the sweep starts and writes its
id into the sweep's folder, where every job finds it (whatever the launcher: in-process, local processes or
SLURM through submitit; tracking.standard). Each job writes `job_summary.json` into its own output folder,
and the callback reads them all at the end. A job that fails does not stop the ones after it
(job.run_and_summarise); a job skipped because its config already finished shows that run's result.
"""

from __future__ import annotations

import json
import logging
import sys
from pathlib import Path
from typing import Any

from hydra.experimental.callback import Callback
from omegaconf import DictConfig

from resnet_repro.progress import fmt_time

log = logging.getLogger("resnet_repro")

SUMMARY = "job_summary.json"


def write_summary(output_dir: str, **fields: Any) -> None:
    """The job's line of the sweep summary: row, overrides, status, top-1, wall time, MLflow run id (and the
    error)."""
    path = Path(output_dir) / SUMMARY
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(fields, indent=1))


def summary_lines(sweep_dir: Path) -> tuple[list[str], int]:
    """One line per job (in job order) and the number of failed jobs."""
    lines, failed = [], 0
    for path in sorted(sweep_dir.glob(f"*/{SUMMARY}"), key=lambda p: (len(p.parent.name), p.parent.name)):
        job = json.loads(path.read_text())
        top1 = f"top-1 {job['top1']:.2f}" if isinstance(job.get("top1"), float) else "top-1 —"
        why = f"  ({job['error']})" if job.get("error") else ""
        run = f"  run {job['run_id']}" if job.get("run_id") else ""
        lines.append(
            f"  #{path.parent.name} {job['status']:<8} {top1:<12} {fmt_time(job.get('wall_s', 0)):>8}  "
            f"{job['row']} {' '.join(job.get('overrides', []))}{run}{why}"
        )
        failed += job["status"] == "FAILED"
    return lines, failed


class SweepSummary(Callback):
    """The sweep's MLflow run (its jobs' parent) from start to end, and the summary lines at the end."""

    def on_multirun_start(self, config: DictConfig, **kwargs: Any) -> None:
        self.tracker = _sweep_run(config)

    def on_multirun_end(self, config: DictConfig, **kwargs: Any) -> None:
        lines, failed = summary_lines(Path(config.hydra.sweep.dir))
        tracker = getattr(self, "tracker", None)
        if not lines:
            if tracker is not None:
                tracker.finish("FINISHED")
            return
        parent = f"; MLflow run {tracker.run_id} holds its jobs' runs" if tracker is not None else ""
        print(f"sweep {config.hydra.sweep.dir}: {len(lines)} job(s), {failed} failed{parent}", flush=True)
        print("\n".join(lines), flush=True)
        if tracker is not None:
            tracker.log_text("\n".join(lines) + "\n", "sweep_summary.txt")
            tracker.finish("FAILED" if failed else "FINISHED")
        if failed:
            sys.exit(1)


def _sweep_run(config: DictConfig) -> Any:
    """Open the sweep's own run (run_type=sweep) and record its id in the sweep's folder; None when the store
    cannot be written (the jobs then stand alone, and their own check of the store says why)."""
    from resnet_repro.tracking import Tracker, standard
    from resnet_repro.tracking.run import provenance_tags

    sweep_dir = str(config.hydra.sweep.dir)
    try:
        tracker = Tracker(config.tracking.uri, str(config.tracking.experiment))
        if tracker.off:  # tracking.uri=none: no run for the sweep either
            return None
        tags = provenance_tags(run_type="sweep", sweep=sweep_dir, hydra_overrides=" ".join(config.hydra.overrides.task))
        tracker.start(f"sweep {'/'.join(Path(sweep_dir).parts[-2:])}", tags)
        standard.write_sweep_parent(sweep_dir, str(tracker.run_id), tracker.uri, tracker.experiment)
        return tracker
    except Exception as err:  # the sweep runs without a parent run rather than not at all
        log.warning("no MLflow run for the sweep (%s): its jobs' runs stand alone", str(err).splitlines()[0][:200])
        return None
