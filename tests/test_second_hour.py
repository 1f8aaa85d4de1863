"""The second hour of a new user (issue 19): test what you trained, a report that leaves the clone alone, MLflow
that shows what users look for, a progress bar that tells the truth, help that helps, no silences."""

from __future__ import annotations

import contextlib
import io
import json
import re
import subprocess
import sys
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
from mlflow import MlflowClient

from resnet_repro import progress
from resnet_repro import test as test_command
from resnet_repro.config import compose, group_options
from resnet_repro.provenance import run_name
from resnet_repro.report import compare, curves, local, records, select
from resnet_repro.rows import all_rows
from resnet_repro.tracking import Tracker
from tests.conftest import _empty_store, mlflow_runs, run_cli, train_args, write_cifar10

DEMO = ["model=resnet18", "dataset=demo"]


# ---- a run's first and last lines, its MLflow run, and its checkpoint tested alone --------------------------
@pytest.fixture(scope="module")
def demo_run(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Any]:
    """A smoke run of the demo that keeps its checkpoints, logs every 2 steps and logs its model as an MLflow
    model, with MLflow's system metrics sampled twice a second; then its checkpoint tested with nothing else."""
    tmp = tmp_path_factory.mktemp("demo")
    args = [*DEMO, "+smoke=on", "trainer.checkpoints=last+best", "trainer.log_every_n_steps=2"]
    args += ["tracking.log_model=true", *train_args(tmp)]
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("MLFLOW_SYSTEM_METRICS_SAMPLING_INTERVAL", "0.5")
        proc = run_cli(args, cwd=tmp)
    assert proc.returncode == 0, proc.stderr[-3000:]
    (train,) = mlflow_runs(tmp)
    out = io.StringIO()
    with pytest.MonkeyPatch.context() as mp, contextlib.redirect_stdout(out):
        mp.chdir(tmp)  # the checkpoint's path as the run printed it, relative to where it ran
        test_command.main(
            ["checkpoint=ckpt/custom_resnet18-cifar-demo-demo-fp32/seed0-*/best.pt", "trainer.num_workers=0"]
        )
    return {"tmp": tmp, "proc": proc, "train": train, "test_out": out.getvalue()}


@pytest.mark.slow
@pytest.mark.xdist_group("demo_run")  # one worker: one run of the module fixture
def test_a_run_says_what_it_trains_first_and_ends_with_its_checkpoint_and_next_commands(demo_run: dict) -> None:
    tmp, proc, train = demo_run["tmp"], demo_run["proc"], demo_run["train"]
    assert proc.stdout.splitlines()[0] == (
        "resnet_repro: custom:resnet18-cifar-demo-demo-fp32 seed 0: 1 epoch of batch 1x32 on cpu; "
        "data: demo, scikit-learn's bundled digits (no download)"
    )
    best = f"ckpt/custom_resnet18-cifar-demo-demo-fp32/seed0-{train.data.tags['config_hash']}/best.pt"
    assert (tmp / best).is_file()
    end = (proc.stdout + proc.stderr).split("wall\n", 1)[1].splitlines()[:4]
    assert end == [
        f"best checkpoint: {best}",
        f"next: test it    python -m resnet_repro.test checkpoint={best}",
        "      curves     python -m resnet_repro.report",
        f"      MLflow UI  mlflow ui --backend-store-uri sqlite:///{tmp}/mlflow.db",
    ]


@pytest.mark.slow
@pytest.mark.xdist_group("demo_run")  # one worker: one run of the module fixture
def test_mlflow_shows_source_tags_system_metrics_fixed_facts_as_params_and_a_readable_name(demo_run: dict) -> None:
    train = demo_run["train"]
    tags, params, metrics = train.data.tags, train.data.params, train.data.metrics
    assert tags["mlflow.runName"] == "resnet18 demo s0 smoke"
    assert tags["mlflow.source.name"] == "python -m resnet_repro" and tags["mlflow.source.type"] == "LOCAL"
    assert re.fullmatch(r"[0-9a-f]{40}", tags["mlflow.source.git.commit"]) and tags["mlflow.user"]
    assert params["num_params"] == "11173962" and float(params["flops_g"]) > 0 and params["steps_per_epoch"] == "4"
    assert "params" not in metrics and "flops_g" not in metrics
    assert metrics["system/cpu_utilization_percentage"] >= 0 and "system/system_memory_usage_megabytes" in metrics


@pytest.mark.slow
@pytest.mark.xdist_group("demo_run")  # one worker: one run of the module fixture
def test_the_final_model_is_an_mlflow_model_with_a_signature_that_serves_a_batch(demo_run: dict) -> None:
    import mlflow.pyfunc
    from mlflow.tracking._tracking_service.utils import _use_tracking_uri

    uri = f"sqlite:///{demo_run['tmp']}/mlflow.db"
    (output,) = MlflowClient(uri).get_run(demo_run["train"].info.run_id).outputs.model_outputs
    with _use_tracking_uri(uri):
        model = mlflow.pyfunc.load_model(f"models:/{output.model_id}")
    assert str(model.metadata.get_input_schema()) == "[Tensor('float32', (-1, 3, 16, 16))]"
    assert model.predict(np.zeros((3, 3, 16, 16), np.float32)).shape == (3, 10)


@pytest.mark.slow
@pytest.mark.xdist_group("demo_run")  # one worker: one run of the module fixture
def test_our_checkpoint_alone_is_tested_on_its_own_data_and_logged_beside_its_run(demo_run: dict) -> None:
    train = demo_run["train"]
    assert "custom:resnet18-cifar-demo-demo-fp32: test top-1" in demo_run["test_out"]
    assert f"beside training run {train.info.run_id}" in demo_run["test_out"]
    (evaluation,) = [r for r in mlflow_runs(demo_run["tmp"]) if r.data.tags["run_type"] == "eval"]
    tags = evaluation.data.tags
    assert tags["row"] == train.data.tags["row"] and tags["source_run_id"] == train.info.run_id
    assert tags["mlflow.parentRunId"] == train.info.run_id and tags["mlflow.runName"] == "eval resnet18 demo s0 smoke"
    assert tags["num_test"] == "359"  # the whole test split, though the smoke run validated on 4 batches
    assert tags["mlflow.source.name"] == "python -m resnet_repro.test"
    assert 0.0 <= evaluation.data.metrics["test_top1"] <= 100.0


def test_the_test_command_downloads_what_the_checkpoints_row_needs(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A CIFAR-10 checkpoint whose data is not there: `dataset.download=true` fetches it (here: writes the tiny
    archives where torchvision would extract them) before the test."""
    from resnet_repro import get_model
    from resnet_repro.data import datasets

    model = get_model("resnet18_8xb16_cifar10")
    config = {**model.cfg, "dataset": {**model.cfg["dataset"], "root": str(tmp_path / "elsewhere")}}
    torch.save({"model": model.state_dict(), "config": config, "row_name": model.row_name}, tmp_path / "best.pt")
    fetched = []

    def fetch(url: str, target: Path, **kwargs: Any) -> Path:
        fetched.append(url)
        return target

    def extract(archive: str, into: str) -> None:  # the tiny archives where the release's would be extracted
        write_cifar10(Path(into), n_train=10, n_test=10)

    monkeypatch.setattr(datasets, "fetch", fetch)
    monkeypatch.setattr(datasets, "extract_archive", extract)
    store = f"sqlite:///{tmp_path}/mlflow.db"
    (tmp_path / "mlflow.db").write_bytes(_empty_store().read_bytes())
    root = tmp_path / "cifar10"
    argv = [f"checkpoint={tmp_path / 'best.pt'}", f"dataset.root={root}", "dataset.download=true"]
    metrics = test_command.run([*argv, "trainer.num_workers=0", "trainer.device=cpu", f"tracking.uri={store}"])
    assert (
        fetched == [datasets.CIFAR_RELEASES["cifar10"].url] and (root / "cifar-10-batches-py" / "test_batch").is_file()
    )
    (run,) = mlflow_runs(tmp_path)
    assert run.data.tags["row"] == "resnet18_8xb16_cifar10" and run.data.params["dataset.root"] == str(root)
    assert run.data.metrics["test_top1"] == metrics["test_top1"]


# ---- the report leaves the clone alone; compare runs ------------------------------------------------------
def _run(uri: str, name: str, row: str, lr: float, top1: list[float], **tags: str) -> str:
    """A finished run as the trainer records it (config artifact, epoch and step metrics, params)."""
    tracker = Tracker(uri, "resnet_repro")
    faithful = "false" if row.startswith("custom:") else "true"
    run_id = tracker.start(name, {"row": row, "run_type": "train", "faithful": faithful, "world_size": "1", **tags})
    tracker.log_params({"recipe.epochs": len(top1), "steps_per_epoch": 4, "num_params": 11173962, "flops_g": 0.5572})
    tracker.log_text(
        f"recipe:\n  epochs: {len(top1)}\n  optimizer:\n    lr: {lr}\nrow_name: {row}\n", "config/config.yaml"
    )
    for epoch, value in enumerate(top1, start=1):
        for step in (2, 4):
            tracker.log_metrics(
                {"step/train_loss": 3.0 / (epoch + step / 4), "step/lr": lr}, step=(epoch - 1) * 4 + step
            )
        tracker.log_metrics({"val_top1": value, "train_loss": 2.0 / epoch, "lr": lr}, step=epoch)
    tracker.log_metrics({"epochs_completed": len(top1), "best_val_top1": max(top1)}, step=len(top1))
    tracker.finish()
    assert run_id is not None
    return run_id


@pytest.fixture(scope="module")
def clone(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Any]:
    """A clone's README and results/ as the report writes them with no runs, and a store with two demo runs
    (one of them a sweep's job) that change no table."""
    from resnet_repro import report

    work = tmp_path_factory.mktemp("clone")
    (work / "README.md").write_text("# x\n<!-- results:begin -->\n<!-- results:end -->\n")
    with pytest.MonkeyPatch.context() as mp:
        mp.chdir(work)
        with contextlib.redirect_stdout(io.StringIO()):
            assert report.main(["--allow-empty"]) == 0  # no store here yet: the published tables
    before = {p: (p.read_bytes(), p.stat().st_mtime_ns) for p in sorted(work.rglob("*")) if p.is_file()}
    (work / "mlflow.db").write_bytes(_empty_store().read_bytes())
    uri = f"sqlite:///{work}/mlflow.db"
    custom = "custom:resnet18-cifar-demo-demo-fp32"
    ids = {
        "a": _run(uri, "resnet18 demo s0", custom, 0.2, [40.0, 80.0, 96.0], sweep="multirun/x/1"),
        "b": _run(uri, "resnet18 demo s0 lr=0.05", custom, 0.05, [20.0, 50.0, 70.0]),
    }
    out = io.StringIO()
    with pytest.MonkeyPatch.context() as mp, contextlib.redirect_stdout(out):
        mp.chdir(work)
        code = report.main([])
    return {"work": work, "uri": uri, "ids": ids, "before": before, "code": code, "stdout": out.getvalue()}


@pytest.mark.xdist_group("clone")
def test_runs_that_change_no_table_leave_the_tracked_files_alone(clone: dict) -> None:
    work, ids = clone["work"], clone["ids"]
    assert clone["code"] == 0
    after = {p: (p.read_bytes(), p.stat().st_mtime_ns) for p in clone["before"]}
    assert after == clone["before"]  # README.md, results/*.md, runs.csv: same bytes, not even rewritten
    assert not (work / "results" / "curves").exists()
    shown = [Path(f"outputs/report/curves/runs/{ids[k]}.png") for k in ("a", "b")]
    assert clone["stdout"].splitlines()[:2] == [f"figure: {p}" for p in sorted(shown)]  # where each figure went, first
    assert all((work / p).read_bytes().startswith(b"\x89PNG") for p in shown)
    listed = (work / local.LOCAL_OUT / "runs.csv").read_text()
    assert ids["a"] in listed and ids["b"] in listed


@pytest.mark.xdist_group("clone")
def test_compare_draws_runs_named_by_id_name_or_sweep_and_prints_what_differs(clone: dict) -> None:
    from resnet_repro import report

    ids, out = clone["ids"], io.StringIO()
    with pytest.MonkeyPatch.context() as mp, contextlib.redirect_stdout(out):
        mp.chdir(clone["work"])
        code = report.main(["--compare", "multirun/x/1", "resnet18 demo s0 lr=0.05", ids["a"][:8]])
    lines = out.getvalue().splitlines()
    assert code == 0 and lines[0].startswith("figure: outputs/report/compare-") and "(2 runs:" in lines[0]
    assert (clone["work"] / lines[0].split()[1]).read_bytes().startswith(b"\x89PNG")
    table = "\n".join(lines[1:])
    assert re.search(r"\| recipe.optimizer.lr\s+\|\s+0.2\s+\|\s+0.05\s+\|", table), table
    assert re.search(r"\| last val top-1\s+\|\s+96.00\s+\|\s+70.00\s+\|", table), table
    assert "recipe.epochs" not in table  # equal in both runs: no difference to show
    assert "| run id " in table and ids["b"] in table


@pytest.mark.xdist_group("clone")
def test_compare_refuses_an_unknown_run_in_one_line(clone: dict, capsys: pytest.CaptureFixture[str]) -> None:
    from resnet_repro import report

    with pytest.raises(SystemExit) as exc:
        report.main(["--tracking-uri", clone["uri"], "--compare", "nosuchrun"])
    err = capsys.readouterr().err
    assert exc.value.code == 2 and err.count("\n") == 1 and "no run 'nosuchrun'" in err


def test_the_run_figure_has_a_grid_readable_legends_and_the_step_level_loss() -> None:
    run = records.from_store(
        {
            "run_id": "r1",
            "experiment": "resnet_repro",
            "status": "FINISHED",
            "tags": {"row": "x"},
            "params": {"steps_per_epoch": "4"},
            "metrics": {},
            "history": {"train_loss": [(1, 2.0), (2, 1.0)], "step/train_loss": [(2, 3.0), (4, 2.5), (6, 1.5)]},
        }
    )
    fig = curves.run_figure(run, None)
    acc, loss, lr = fig.axes
    assert all(ax.xaxis.get_gridlines()[0].get_visible() for ax in (acc, loss, lr))
    steps = next(line for line in loss.get_lines() if line.get_label().startswith("logged steps"))
    assert list(steps.get_xdata()) == [0.5, 1.0, 1.5] and list(steps.get_ydata()) == [3.0, 2.5, 1.5]
    assert loss.get_legend().get_texts()[0].get_fontsize() > 7.5  # "small", not "x-small"


def test_params_and_flops_are_read_from_params_and_from_older_runs_metrics() -> None:
    base = {"run_id": "n", "status": "FINISHED", "tags": {"row": "x"}, "epochs": []}
    new = {**base, "params": {"num_params": "11173962", "flops_g": "0.5572"}, "metrics": {}}
    old = {**base, "run_id": "o", "params": {}, "metrics": {"params": 11173962.0, "flops_g": 0.5572}}
    frame = select.runs_frame([new, old]).set_index("run_id")
    assert frame.loc["n", ["params_n", "flops_g"]].tolist() == frame.loc["o", ["params_n", "flops_g"]].tolist()
    assert frame.loc["n", "params_n"] == 11173962


# ---- MLflow extras ----------------------------------------------------------------------------------------
def test_without_psutil_a_run_has_no_system_metrics_and_nothing_else_changes(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setitem(sys.modules, "psutil", None)  # import psutil now fails
    (tmp_path / "mlflow.db").write_bytes(_empty_store().read_bytes())
    tracker = Tracker(f"sqlite:///{tmp_path}/mlflow.db", "resnet_repro")
    tracker.open("r", adopt=None, tags={}, params={}, texts={}, resumed_tags={}, system_metrics=True)
    tracker.finish()
    (run,) = mlflow_runs(tmp_path)
    assert run.info.status == "FINISHED" and not any(k.startswith("system/") for k in run.data.metrics)


def test_run_names_fit_the_ui_column_and_say_what_changed() -> None:
    assert run_name("custom:resnet18-cifar-demo-demo-fp32", 0, [*DEMO, "trainer.device=cpu"]) == "resnet18 demo s0"
    stem = ["row=resnet18_8xb16_cifar10", "stem=v1d", "recipe.optimizer.lr=0.2", "tracking.uri=x"]
    assert run_name("custom:resnet18-v1d-cifar10-cifar-200e-fp32", 1, stem) == "resnet18 cifar10 v1d s1 lr=0.2"
    assert run_name("resnet18_8xb16_cifar10", 2, ["trainer.micro_batch=8"]) == "resnet18_8xb16_cifar10 s2 micro_batch=8"
    long = run_name("resnet50_8xb256-rsb-a1-600e_in1k", 0, ["+smoke=on", "recipe.epochs=2"])
    assert len(long) == 40 and long.endswith("…")


def test_the_smoke_preset_is_one_epoch_of_four_batches_without_checkpoints() -> None:
    cfg = compose([*DEMO, "+smoke=on"])
    assert cfg.recipe.epochs == 1 and cfg.trainer.limit_train_batches == cfg.trainer.limit_val_batches == 4
    assert cfg.trainer.checkpoints == "none" and compose([*DEMO, "+smoke=on", "recipe.epochs=2"]).recipe.epochs == 2


# ---- the progress bar -------------------------------------------------------------------------------------
class _Terminal(io.StringIO):
    def isatty(self) -> bool:
        return True


def test_the_terminal_bar_has_one_eta_fits_100_columns_and_shows_the_live_loss(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(progress, "REFRESH_S", 0.0)  # a redraw at every step
    monkeypatch.setenv("COLUMNS", "80")  # a narrow terminal: the numbers stay whole, the drawn bar gives way
    screen = _Terminal()
    bar = progress.Progress("epoch 100/200", 1000, 50, enabled=True, later=(199, 30.0), stream=screen)
    for step in range(1, 1001):
        fields = {"loss": f"{3.0 / step:.4f}", "lr": "0.0001", "img/s": "12345", "data_wait": "12%"}
        bar.advance(step, live=lambda f=fields: f)
    bar.close()
    frames = [f for f in re.split(r"[\r\n]", screen.getvalue()) if "loss" in f]
    assert len(frames) == 1000
    for step, frame in enumerate(frames, start=1):
        assert len(frame) <= 100 and frame.count("eta") == 1 and "it/s" not in frame and "<" not in frame, frame
        assert f"{step}/1000 loss {3.0 / step:.4f} " in frame, frame


def test_without_a_terminal_the_log_lines_keep_both_etas(caplog: pytest.LogCaptureFixture) -> None:
    bar = progress.Progress("epoch 1/3", 45, 20, enabled=True, later=(2, 0.0), stream=io.StringIO())
    with caplog.at_level("INFO", logger="resnet_repro"):
        bar.advance(1, live=lambda: pytest.fail("no live fields without a terminal"))
        bar.report(1, {"loss": "2.3159"})
    assert re.fullmatch(r"epoch 1/3 \[1/45\]  loss 2.3159  eta [\d:]+  run eta [\d:]+", caplog.messages[-1])


# ---- help and small things --------------------------------------------------------------------------------
def test_help_is_short_lists_rows_by_dataset_and_starts_with_the_demo(capsys: pytest.CaptureFixture[str]) -> None:
    from resnet_repro.__main__ import main

    main(["--help"])
    text = capsys.readouterr().out
    lines = text.splitlines()
    assert len(lines) < 80 and max(map(len, lines)) <= 100
    examples = lines[lines.index("Examples:") + 1 :][:3]
    assert "dataset=demo" in examples[0] and all(e.startswith("  python -m resnet_repro ") for e in examples)
    for row in all_rows():  # one per line, under its dataset's heading
        (line,) = [x for x in lines if x.startswith(f"  {row.name} ")]
        heading = next(x for x in reversed(lines[: lines.index(line)]) if x.endswith("):"))
        assert heading.startswith(row.section) and f"dataset={row.dataset}" in heading
    assert "recipe_parts" not in text and "schema" not in text and "--cfg job" in text
    groups = text.split("== Config groups")[1].split("== Rows")[0]
    for group in ("model", "stem", "dataset", "recipe", "precision"):
        assert f"\n  {group} " in groups and all(opt in groups for opt in group_options(group)), group
    for key in ("trainer.device=auto", "cuda:N", "CUDA_VISIBLE_DEVICES", "trainer.resume", "tracking.uri"):
        assert key in text, key


def test_the_test_commands_help_is_at_once_without_torch_and_lists_rows() -> None:
    code = "import sys; from resnet_repro.test import main; main(['--help']); print('torch' in sys.modules)"
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0 and proc.stdout.splitlines()[-1] == "False", proc.stderr
    assert proc.stdout.startswith("usage: python -m resnet_repro.test checkpoint=")
    assert all(f"  {row.name} " in proc.stdout for row in all_rows())


def test_cfg_job_shows_the_store_a_run_would_use(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    from resnet_repro.__main__ import main

    monkeypatch.chdir(tmp_path)
    monkeypatch.setattr(sys, "argv", ["resnet_repro"])
    main([*DEMO, "--cfg", "job"])
    out = capsys.readouterr().out
    assert f"  uri: sqlite:///{tmp_path.resolve()}/mlflow.db\n" in out and "uri: null" not in out
    assert not (tmp_path / "mlflow.db").exists()  # shown, not created


def test_compare_table_lists_differing_keys_only() -> None:
    """A config read from config.yaml (lists) and one read from the params (the same lists as JSON) agree."""
    a = {"run_id": "a" * 32, "run_name": "x", "status": "FINISHED", "metrics": {}, "epochs": []}
    a["config"] = {"k": 1, "s": 0, "pipeline": [{"type": "crop", "size": 16}]}
    b = {
        **a,
        "run_id": "b" * 32,
        "run_name": "y",
        "config": {"k": "2", "s": "0", "pipeline": '[{"type": "crop", "size": 16}]'},
    }
    frame = compare.differences([a, b], compare.labels([a, b]))
    assert list(frame.columns) == ["", "x", "y"] and frame.iloc[0].tolist() == ["k", "1", "2"]
    assert not {"s", "pipeline"} & set(frame[""])


def test_compare_table_shows_a_training_runs_latest_evaluation() -> None:
    """`resnet_repro.test` logs its evaluation as a run of its own (source_run_id): the table finds it."""
    base = {"run_name": "x", "config": {}, "epochs": [], "tags": {}, "metrics": {}}
    trained = {**base, "run_id": "t" * 32, "status": "FINISHED"}
    evals = [
        {**base, "run_id": f"e{i}" * 16, "status": status, "start_time": when, "tags": {"source_run_id": "t" * 32}}
        | {"metrics": {"test_top1": top1}}
        for i, (status, when, top1) in enumerate([("FINISHED", 1, 90.0), ("FINISHED", 3, 91.5), ("FAILED", 5, 1.0)])
    ]
    frame = compare.differences([trained], ["x"], [trained, *evals])
    assert frame.set_index("").loc["test top-1", "x"] == "91.50"


def test_records_keep_the_logged_steps(tmp_path: Path) -> None:
    record = records.from_store(
        {
            "run_id": "abc",
            "experiment": "e",
            "status": "FINISHED",
            "tags": {"row": "x"},
            "params": {},
            "metrics": {"step/train_loss": 1.0, "system/cpu_utilization_percentage": 5.0, "val_top1": 1.0},
            "history": {"step/train_loss": [(2, 2.0), (4, 1.0)], "step/lr": [(2, 0.1), (4, 0.1)]},
        }
    )
    assert record["steps"] == [{"step": 2, "train_loss": 2.0, "lr": 0.1}, {"step": 4, "train_loss": 1.0, "lr": 0.1}]
    assert record["metrics"] == {"val_top1": 1.0}
    path = records.write(record, tmp_path)
    assert records.load(path) == record and '\n    {"lr": 0.1, "step": 2, "train_loss": 2.0},\n' in path.read_text()
    assert json.loads(path.read_text())["steps"] == record["steps"]
