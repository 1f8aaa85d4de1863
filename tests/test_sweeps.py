"""Ready sweeps: every job composes a table row, a sweep's runs are grouped, and a re-issued sweep resumes."""

from __future__ import annotations

from pathlib import Path

import pytest
from omegaconf import OmegaConf

from resnet_repro.cli import expand_sweep
from resnet_repro.config import compose, group_options, validate
from resnet_repro.rows import all_rows
from tests.conftest import REPO, mlflow_runs, run_cli, train_args

ROW_NAMES = {row.name for row in all_rows()}
EXPECTED_JOBS = {
    "all_rows": 22,
    "cifar10_depths": 5,
    "imagenet_depths": 5,
    "imagenet_v1c": 3,
    "imagenet_v1d": 3,
    "rsb": 3,
    "cifar10_seeds": 3,
}


def sweep_jobs(name: str, extra: list[str]) -> list[list[str]]:
    params = OmegaConf.load(REPO / "sweeps" / f"{name}.yaml").hydra.sweeper.params
    return expand_sweep([f"{k}={v}" for k, v in params.items()] + extra)


def test_the_sweep_group_is_the_sweeps_folder() -> None:
    """One source: Hydra's `sweep` group is a link to sweeps/, the folder the README names."""
    assert (REPO / "conf" / "sweep").resolve() == (REPO / "sweeps").resolve()


@pytest.mark.parametrize("name", group_options("sweep"))
def test_every_job_of_a_sweep_is_a_table_row(name: str) -> None:
    extra = ["row=resnet18_8xb16_cifar10"] if name == "cifar10_seeds" else []
    jobs = sweep_jobs(name, extra)
    assert len(jobs) == EXPECTED_JOBS[name]
    names = []
    for job in jobs:
        cfg = compose(job)
        validate(cfg)
        names.append(cfg.row_name)
    assert set(names) <= ROW_NAMES, set(names) - ROW_NAMES
    assert len(set(names)) == (1 if name == "cifar10_seeds" else len(jobs))
    if name == "all_rows":
        assert set(names) == ROW_NAMES


@pytest.mark.slow
def test_multirun_groups_its_runs_and_a_reissued_sweep_skips_finished_jobs(tiny_cifar: Path, tmp_path: Path) -> None:
    args = [
        "--multirun",
        "+sweep=cifar10_depths",
        "model=resnet18,resnet34",
        "recipe.epochs=1",
        "recipe.gpus=2",
        *train_args(tmp_path, tiny_cifar),
    ]
    proc = run_cli(args, cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr[-3000:]
    (parent,) = [r for r in mlflow_runs(tmp_path) if r.data.tags["run_type"] == "sweep"]
    runs = [r for r in mlflow_runs(tmp_path) if r.data.tags["run_type"] == "train"]
    assert sorted(r.data.tags["row"] for r in runs) == ["resnet18_8xb16_cifar10", "resnet34_8xb16_cifar10"]
    assert all(r.info.status == "FINISHED" for r in [*runs, parent])
    sweeps = {r.data.tags["sweep"] for r in [*runs, parent]}
    assert len(sweeps) == 1 and sweeps != {""}  # one sweep tag groups the jobs
    assert {r.data.tags["mlflow.parentRunId"] for r in runs} == {parent.info.run_id}  # the jobs: its children
    lines = {r.info.run_id: f"top-1 {r.data.metrics['val_top1']:.2f}" for r in runs}
    summary = [line for line in proc.stdout.splitlines() if line.startswith("  #")]
    assert all(any(top1 in x and x.endswith(f"run {run_id}") for x in summary) for run_id, top1 in lines.items())

    again = run_cli(args, cwd=tmp_path)
    assert again.returncode == 0, again.stderr[-3000:]
    assert (again.stdout + again.stderr).count("skipping") == 2
    assert len([r for r in mlflow_runs(tmp_path) if r.data.tags["run_type"] == "train"]) == 2
    skipped = [line for line in again.stdout.splitlines() if line.startswith("  #")]
    for run_id, top1 in lines.items():  # the finished run's result and id, not `SKIPPED top-1 —`
        assert any(x.split()[1] == "SKIPPED" and top1 in x and x.endswith(f"run {run_id}") for x in skipped), skipped

    # the report on these two tiny runs: their numbers beside the published ones (they do not count: 1 epoch,
    # so only --all-runs writes them under --out)
    readme = tmp_path / "README.md"
    readme.write_text("# x\n<!-- results:begin -->\n<!-- results:end -->\n")
    report = run_cli(
        [
            f"--tracking-uri=sqlite:///{tmp_path}/mlflow.db",
            f"--out={tmp_path}/results",
            f"--readme={readme}",
            "--all-runs",
        ],
        cwd=tmp_path,
        module="resnet_repro.report",
    )
    assert report.returncode == 0, report.stderr[-3000:]
    for run in runs:
        line = next(x for x in report.stdout.splitlines() if run.info.run_id in x and x.startswith("| `"))
        assert f"| {run.data.metrics['val_top1']:.2f} |" in line and "smoke: recipe.epochs=1" in line
    assert (tmp_path / "results" / "cifar-10.md").is_file() and (tmp_path / "results" / "runs.csv").is_file()
    assert "### Image Classification on CIFAR-10" in readme.read_text()
