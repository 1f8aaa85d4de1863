"""What a `--multirun` sweep says when it ends: one line per job, and a non-zero exit when a job failed.

Each job writes `job_summary.json` into its own output folder (whatever the launcher: in-process, local
processes or SLURM through submitit), and `SweepSummary`, a Hydra callback (conf/config.yaml), reads
them all at the end of the sweep. A job that fails does not stop the ones after it (train.run_job).
"""

from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import Any

from hydra.experimental.callback import Callback
from omegaconf import DictConfig

from resnet_repro.progress import fmt_time

SUMMARY = "job_summary.json"


def write_summary(output_dir: str, **fields: Any) -> None:
    """The job's line of the sweep summary: row, overrides, status, top-1, wall time (and the error)."""
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
        lines.append(
            f"  #{path.parent.name} {job['status']:<8} {top1:<12} {fmt_time(job.get('wall_s', 0)):>8}  "
            f"{job['row']} {' '.join(job.get('overrides', []))}{why}"
        )
        failed += job["status"] == "FAILED"
    return lines, failed


class SweepSummary(Callback):
    def on_multirun_end(self, config: DictConfig, **kwargs: Any) -> None:
        lines, failed = summary_lines(Path(config.hydra.sweep.dir))
        if not lines:
            return
        print(f"sweep {config.hydra.sweep.dir}: {len(lines)} job(s), {failed} failed", flush=True)
        print("\n".join(lines), flush=True)
        if failed:
            sys.exit(1)
