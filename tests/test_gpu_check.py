"""The one-call device check (benchmarks/gpu_check.sh): its driver's time limits and failure handling, and every
stage run end to end on the CPU at tiny sizes, so that a change that breaks the check fails here."""

from __future__ import annotations

import dataclasses
import json
import os
import subprocess
import sys
import tarfile
from collections.abc import Callable
from pathlib import Path

import pytest
import torch

from benchmarks import epoch, gpu_check, row_times, smoke, train_step
from benchmarks.common import Deadline, Recorder, write_image_folder

REPO = Path(__file__).resolve().parents[1]
STAGES = ("smoke", "train_step", "row_times", "epoch")  # input_pipeline joins when issue 16's script is there


def _python(code: str) -> Callable[[gpu_check.Context, float], list[str]]:
    """A stage's command running `code` (the results file is its argv[1])."""
    return lambda ctx, soft_s: [sys.executable, "-c", code, str(ctx.results)]


def _dead(pid: int) -> bool:
    stat = Path(f"/proc/{pid}/stat")
    return not stat.exists() or stat.read_text().rsplit(")", 1)[1].split()[0] == "Z"


def test_driver_survives_a_crash_a_hang_and_the_budget(tmp_path):
    writes = "import json, sys; open(sys.argv[1], 'a').write(json.dumps({'case': 'a', 'figure': 1.5}) + '\\n')"
    crash = "print('about to fail'); raise SystemExit(3)"
    hang = (  # a stage and its child (say, a data-loader worker) that never end
        "import subprocess, sys, time; child = subprocess.Popen([sys.executable, '-c', 'import time; time.sleep(600)'])"
        "; print(child.pid, flush=True); time.sleep(600)"
    )
    stages = [
        gpu_check.Stage("writes", "a stage with results", 30, 1, _python(writes)),
        gpu_check.Stage("crash", "a stage that fails", 30, 1, _python(crash)),
        gpu_check.Stage("hang", "a stage past its limit", 3, 1, _python(hang)),
        gpu_check.Stage("absent", "a stage that cannot run", 30, 1, lambda ctx, soft_s: "its script is missing"),
        gpu_check.Stage("late", "a stage the budget leaves out", None, 60, _python(writes)),
    ]
    out = tmp_path / "results"
    rc = gpu_check.main(["--device", "cpu", "--out", str(out), "--budget", "45"], stages=stages)
    assert rc == 1  # a stage failed
    lines = [json.loads(t) for t in (out / "results.jsonl").read_text().splitlines()]
    by_stage = {line["stage"]: line for line in lines}
    assert by_stage["writes"] == {"stage": "writes", "case": "a", "figure": 1.5}  # named by the driver
    assert by_stage["crash"]["status"] == "failed" and "exit 3: about to fail" in by_stage["crash"]["reason"]
    assert by_stage["hang"]["status"] == "timed out"
    assert by_stage["absent"] == {
        "stage": "absent",
        "case": "(stage)",
        "status": "skipped",
        "reason": "its script is missing",
    }
    assert by_stage["late"]["status"] == "out of time" and "of the 45 s budget" in by_stage["late"]["reason"]
    child = int((out / "stages.log").read_text().split("===== hang")[1].splitlines()[1])
    assert _dead(child)  # the whole process group was ended
    summary = (out / "summary.md").read_text()
    assert "## writes\n\n| case | figure |\n| --- | --- |\n| a | 1.5 |" in summary
    assert "about to fail" in summary.split("## crash")[1]  # the failed stage's last log lines


def test_smoke_comparison_fails_a_step_with_other_bn_groups(tmp_path):
    """The first-step check has teeth: BN over 8 images where the CPU's recipe has groups of 4 is a failed case."""
    case = dataclasses.replace(smoke.CASES[0], name="BN over 8", extra=("trainer.micro_batch=8",))
    results = tmp_path / "results.jsonl"
    recorder = Recorder(str(results), "smoke", torch.device("cpu"))
    smoke.Smoke("cpu", tiny=True, steps=1, folder=tmp_path).run(case, recorder, Deadline(None))
    line = json.loads(results.read_text())
    assert line["status"] == "fail" and "gradients differ" in line["reason"], line


def test_every_stage_option_has_help():
    for module in (smoke, train_step, row_times, epoch):
        actions = [a for a in module.build_parser()._actions if a.dest != "help"]
        assert actions and all(a.help for a in actions), module.__name__


def test_the_epoch_stage_runs_without_mlflow(tmp_path, monkeypatch):
    """A bare GPU machine has no MLflow: the epoch stage trains with tracking.uri=none, and imports none."""
    monkeypatch.setitem(sys.modules, "mlflow", None)  # any import of MLflow now fails
    write_image_folder(tmp_path / "jpeg", 10, 1, 32, ("train", "test"))
    results = tmp_path / "results.jsonl"
    epoch.main(["--device", "cpu", "--tiny", "--data", str(tmp_path / "jpeg"), "--json", str(results)])
    lines = [json.loads(t) for t in results.read_text().splitlines()]
    assert next(line for line in lines if line["case"] == "epoch 1")["status"] == "ok", lines


@pytest.mark.slow
def test_the_check_runs_every_stage_on_cpu(tmp_path):
    """`bash benchmarks/gpu_check.sh --device cpu --tiny`: each stage writes its JSON lines and its table."""
    src = tmp_path / "jpeg"
    write_image_folder(src, 10, 4, 32, ("train",))
    write_image_folder(src, 10, 2, 32, ("test",))
    archive = tmp_path / "cifar10-jpeg.tar.gz"
    with tarfile.open(archive, "w:gz") as tar:
        for split in ("train", "test"):
            tar.add(src / split, arcname=split)
    out = tmp_path / "results"
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(REPO)}
    command = ["bash", "benchmarks/gpu_check.sh", "--device", "cpu", "--tiny", "--data", str(archive)]
    done = subprocess.run([*command, "--out", str(out)], cwd=REPO, env=env, capture_output=True, text=True, timeout=900)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    lines = [json.loads(t) for t in (out / "results.jsonl").read_text().splitlines()]
    summary = (out / "summary.md").read_text()
    for stage in STAGES:
        own = [line for line in lines if line["stage"] == stage]
        assert any(line["status"] == "ok" for line in own), stage
        assert not [line for line in own if line["status"] == "fail"], stage
        assert f"## {stage} — CPU (1 threads)" in summary and "| case | status |" in summary.split(f"## {stage}")[1]
    assert next(line for line in lines if line["case"] == "epoch 1")["val_top1"] >= 0
