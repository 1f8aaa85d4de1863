"""The report: which runs count, the regenerated tables, verdict, cost, curves, README section, idempotence,
records that rebuild the same outputs without the store (tiny stores, made once and copied)."""

from __future__ import annotations

import contextlib
import io
import json
import os
import shutil
import statistics
from pathlib import Path
from typing import Any

import pandas as pd
import pytest

from resnet_repro import report
from resnet_repro.identity import Deviation, batchnorm_deviation, deviations_tag, read_deviations, read_flag
from resnet_repro.report import records, render, select
from resnet_repro.rows import get_row
from resnet_repro.tracking import Tracker

ROW = "resnet18_8xb16_cifar10"
EXPERIMENT = "report-test"
README = "# Project\n\nintro\n\n<!-- results:begin -->\nstale tables\n<!-- results:end -->\n\n## Citation\n"
URL = get_row(ROW).checkpoint_url
H100 = "NVIDIA H100 80GB HBM3"
CONFIG_YAML = "model:\n  depth: 18\nrecipe:\n  epochs: 3\n  optimizer:\n    lr: 0.1\nseed: 0\n"
ONE_EPOCH = deviations_tag([Deviation("recipe.epochs", 3, 1, "smoke")])  # as a run writes it now


def _train_run(
    uri: str,
    name: str,
    seed: int,
    top1: list[float],
    *,
    row: str = ROW,
    epochs: int = 3,
    faithful: bool = True,
    deviations: str = "",
    finish: bool = True,
    data_verified: str = "true",
    experiment: str = EXPERIMENT,
    tags: dict[str, str] | None = None,
    config: str | None = None,
) -> str:
    """A training run with the tags, params and metrics the engine records."""
    tracker = Tracker(uri, experiment)
    tags = {
        "row": row,
        "run_type": "train",
        "faithful": str(faithful).lower(),
        "deviations": deviations,
        "data_verified": data_verified,
        "world_size": "1",
        "device": "cuda:0",
        "device_name": H100,
        **(tags or {}),
    }
    run_id = tracker.start(name, {**tags, "config_hash": f"hash{seed}", "section": "CIFAR-10"})
    tracker.log_params({"recipe.epochs": epochs, "seed": seed, "model.depth": 18})
    tracker.log_metrics({"params": 11173962, "flops_g": 0.5562}, step=0)
    for epoch, value in enumerate(top1, start=1):
        per_epoch = {"val_top1": value, "val_top5": 99.0 + epoch / 10, "train_loss": 2.0 / epoch, "lr": 0.1 / epoch}
        tracker.log_metrics({**per_epoch, "epoch_time_s": 600.0, "train_img_per_s": 83.3}, step=epoch)
        tracker.log_metrics({"step/train_loss": 2.5 / epoch, "step/lr": 0.1}, step=epoch * 40)  # per step: ignored
    if config is not None:
        tracker.log_text(config, records.CONFIG_ARTIFACT)
    if finish:
        tracker.log_metrics({"epochs_completed": len(top1), "best_val_top1": max(top1)}, step=len(top1))
        tracker.finish()
    assert run_id is not None
    return run_id


def _eval_run(
    uri: str,
    checkpoint: str = URL,
    faithful: str = "true",
    deviations: str = "",
    experiment: str = EXPERIMENT,
    **tags: str,
) -> str:
    """An evaluation run as `python -m resnet_repro.test` records it."""
    tracker = Tracker(uri, experiment)
    tags = {"data_verified": "True", **tags}
    tags |= {"row": ROW, "run_type": "eval", "checkpoint": checkpoint, "faithful": faithful, "deviations": deviations}
    run_id = tracker.start("test", tags)
    tracker.log_metrics({"test_top1": 94.8, "test_top5": 99.87, "eval_time_s": 12.5}, step=0)
    tracker.finish()
    assert run_id is not None
    return run_id


def _report(argv: list[str]) -> tuple[int, str]:
    out = io.StringIO()
    with contextlib.redirect_stdout(out):
        code = report.main(argv)
    return code, out.getvalue()


def _snapshot(root: Path) -> dict[str, tuple[bytes, int]]:
    return {str(p): (p.read_bytes(), p.stat().st_mtime_ns) for p in sorted(root.rglob("*")) if p.is_file()}


def _bytes(root: Path, skip: str = "") -> dict[str, bytes]:
    files = (p for p in sorted(root.rglob("*")) if p.is_file() and not (skip and skip in p.parts))
    return {str(p.relative_to(root)): p.read_bytes() for p in files}


@pytest.fixture(scope="module")
def empty_store(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """An MLflow SQLite store with its schema and no run: creating the schema takes seconds, a copy does not."""
    db = tmp_path_factory.mktemp("template") / "mlflow.db"
    Tracker(f"sqlite:///{db}", "template").client  # noqa: B018  (opening the store creates its schema)
    return db


def _copy_store(empty_store: Path, folder: Path) -> str:
    folder.mkdir(parents=True, exist_ok=True)
    shutil.copy(empty_store, folder / "mlflow.db")
    return f"sqlite:///{folder / 'mlflow.db'}"


@pytest.fixture(scope="module")
def store(empty_store: Path, tmp_path_factory: pytest.TempPathFactory) -> dict[str, Any]:
    """Two seeds of one row, a smoke, an unfinished, a short, a custom, a JPEG-copy run, eval runs; reported
    twice (with --export: the second call reads every run from the store and from its record), with
    --all-runs (the runs that change no table under --out too; the default is tested in test_second_hour)."""
    root = tmp_path_factory.mktemp("report")
    uri = _copy_store(empty_store, root)
    ids = {
        "seed0": _train_run(uri, "s0", 0, [60.0, 90.0, 94.1]),
        "seed1": _train_run(uri, "s1", 1, [62.0, 91.0, 94.5], tags={"world_size": "2"}),
        "smoke": _train_run(uri, "smoke", 2, [40.0], epochs=1, faithful=False, deviations=ONE_EPOCH),
        "unfinished": _train_run(uri, "u", 3, [50.0], row="resnet50_8xb16_cifar100", finish=False),
        "short": _train_run(uri, "short", 4, [50.0, 60.0], row="resnet34_8xb16_cifar10"),
        "custom": _train_run(
            uri, "c", 5, [70.0], row="custom:resnet18-cifar-demo-cifar-200e-fp32", epochs=1, faithful=False
        ),
        "jpeg": _train_run(
            uri,
            "jpeg",
            6,
            [80.0, 90.0, 92.0],
            row="resnet50_8xb16_cifar10",
            faithful=False,
            deviations="dataset.format=imagefolder",  # a run recorded before deviations were data
            data_verified="None",
            tags={"device_name": ""},
        ),
        "eval": _eval_run(uri),
        "eval_ours": _eval_run(uri, "/somewhere/ckpt/best.pt", source_run_id="abc123"),
        "eval_smoke": _eval_run(uri, faithful="false", deviations="trainer.limit_val_batches=2"),
    }
    work = root / "work"
    work.mkdir()
    (work / "README.md").write_text(README)
    argv = ["--tracking-uri", uri, "--experiment", EXPERIMENT, "--out", str(work / "results")]
    argv += ["--readme", str(work / "README.md"), "--export", "--all-runs"]  # every run under --out
    code, stdout = _report(argv)
    first = _snapshot(work)
    code2, stdout2 = _report(argv)
    return {"uri": uri, "ids": ids, "work": work, "code": code, "stdout": stdout, "first": first, "code2": code2}


def _line(md: str, row: str) -> list[str]:
    """The cells of the row's line in the main table."""
    line = next(x for x in md.splitlines() if x.startswith(f"| `{row}` |"))
    return [c.strip() for c in line.strip("|").split(" | ")]


def _cells(md: str, row: str) -> dict[str, str]:
    header = next(x for x in md.splitlines() if x.startswith("| Model |"))
    return dict(zip([c.strip() for c in header.strip("|").split(" | ")], _line(md, row), strict=True))


def _record_link(run_id: str, row: str = ROW) -> str:
    return f"logs/{row}/{run_id}.json"


# ---- which runs count -------------------------------------------------------------------------
def test_only_finished_faithful_full_length_runs_count(store: dict[str, Any]) -> None:
    runs = pd.read_csv(store["work"] / "results" / "runs.csv", dtype=str, keep_default_na=False).set_index("run_id")
    ids = store["ids"]
    assert len(runs) == len(ids)  # the second call read every run twice (store and record): each once
    assert set(runs.index[runs["counts"] == "yes"]) == {ids["seed0"], ids["seed1"], ids["eval"], ids["eval_ours"]}
    reason = runs["reason"]
    assert reason[ids["smoke"]] == "smoke: recipe.epochs=1"
    assert reason[ids["unfinished"]] == "not finished (RUNNING)"
    assert reason[ids["short"]] == "not full length: 2 of 3 epochs"
    assert reason[ids["custom"]] == "custom composition"
    assert reason[ids["eval_smoke"]] == "smoke: trainer.limit_val_batches=2"
    assert reason[ids["jpeg"]] == select.DATA_COPY
    assert runs.loc[ids["seed1"], ["top1", "epochs", "seed", "config_hash"]].tolist() == ["94.5000", "3", "1", "hash1"]
    assert runs.loc[ids["eval"], "run_type"] == "eval" and runs.loc[ids["eval"], "top1"] == "94.8000"
    assert set(runs.index[runs["indicative"] == "yes"]) == {ids["jpeg"]}
    assert runs.loc[ids["seed1"], ["device", "world_size", "device_hours"]].tolist() == [H100, "2", "1.0000"]
    assert runs.loc[ids["jpeg"], "device"] == "cuda:0"  # no device_name: the torch device


def test_exclusion_reasons_of_other_deviations() -> None:
    run = {"status": "FINISHED", "params": {"recipe.epochs": "200"}, "metrics": {"val_top1": 1.0}}
    run["metrics"]["epochs_completed"] = 200.0
    tags = {"row": ROW, "run_type": "train", "faithful": "false", "data_verified": "True"}
    lr = report.exclusion({**run, "tags": {**tags, "deviations": "recipe.optimizer.lr=0.2"}})
    assert lr == "deviates: recipe.optimizer.lr=0.2"
    assert report.exclusion({**run, "tags": {**tags, "faithful": "true"}}) == ""
    untyped = {**run, "tags": {"row": ROW, "data_verified": "True"}}
    assert report.exclusion(untyped) == "not a training or evaluation run (run_type=missing)"
    limited = {**run, "tags": {**tags, "faithful": "true", "val_limited": "true"}}
    assert report.exclusion(limited) == "smoke: validated on a subset (val_limited=true)"


def test_deviations_are_read_as_records_and_old_runs_tags_the_same() -> None:
    """The JSON records a run writes now and the "; "-joined words of runs recorded before give the same reasons;
    yes/no tags read in either spelling."""
    records = [Deviation("recipe.epochs", 200, 1, "smoke")]
    records.append(Deviation("dataset.format", "pickle", "imagefolder", "data"))
    records.append(batchnorm_deviation(8, 16))
    old = "recipe.epochs=1; dataset.format=imagefolder; BatchNorm statistics over 8 images (recipe: 16)"
    assert read_deviations(deviations_tag(records)) == records
    assert [(d.key, d.run, d.reason) for d in read_deviations(old)] == [
        ("recipe.epochs", "1", "smoke"),
        ("dataset.format", "imagefolder", "data"),
        ("batchnorm.images", 8, "batchnorm"),
    ]
    run = {"status": "FINISHED", "params": {"recipe.epochs": "1"}, "metrics": {"val_top1": 1.0, "epochs_completed": 1}}
    tags = {"row": ROW, "run_type": "train", "faithful": "false", "data_verified": "true"}
    reasons = {report.exclusion({**run, "tags": {**tags, "deviations": t}}) for t in (deviations_tag(records), old)}
    assert reasons == {
        f"smoke: recipe.epochs=1; deviates: BatchNorm statistics over 8 images (recipe: 16); {select.DATA_COPY}"
    }
    assert not select.indicative({**run, "tags": {**tags, "deviations": old}})  # not only its data keeps it out
    assert [read_flag(t) for t in ("true", "True", "false", "False", "None", None)] == [True, True] + [False] * 4


def test_cifar_runs_count_only_on_the_official_archives(store: dict[str, Any]) -> None:
    """A faithful, full-length run on a re-encoded image-folder copy of CIFAR-10 is indicative, not counted."""
    runs = pd.read_csv(store["work"] / "results" / "runs.csv").set_index("run_id")
    run_id = store["ids"]["jpeg"]
    assert runs.loc[run_id, "counts"] == "no" and runs.loc[run_id, "reason"].startswith("data:")
    verified = {"status": "FINISHED", "params": {"recipe.epochs": "3"}, "metrics": {"val_top1": 1.0}}
    verified |= {"tags": {"row": ROW, "run_type": "train", "faithful": "true", "data_verified": "None"}}
    verified["metrics"]["epochs_completed"] = 3.0
    assert report.exclusion(verified) == select.DATA_UNVERIFIED and select.indicative(verified)


# ---- the tables -------------------------------------------------------------------------------
def test_seeds_give_mean_std_n_the_difference_verdict_and_cost(store: dict[str, Any]) -> None:
    md = (store["work"] / "results" / "cifar-10.md").read_text()
    cells, ids = _cells(md, ROW), store["ids"]
    mean, std = statistics.mean([94.1, 94.5]), statistics.stdev([94.1, 94.5])
    assert (f"{mean:.2f}", f"{std:.2f}") == ("94.30", "0.28")
    each = f"[94.10]({_record_link(ids['seed0'])}), [94.50]({_record_link(ids['seed1'])})"
    assert cells["Top-1 (%)"] == f"94.30 ± 0.28 (n=2: {each})"
    assert cells["Published Top-1 (%)"] == "94.82"
    assert cells["Δ Top-1"] == f"{mean - 94.82:+.2f}" == "-0.52"
    assert cells["Verdict Top-1"] == "reproduced"  # |-0.52| <= 2 × 0.28
    # 3 epochs × 600 s on 1 GPU + 3 × 600 s on 2 GPUs = 1.5 device-hours
    assert cells["Device-hours"] == f"1.50 (1× {H100}, 2× {H100})"
    assert (cells["Params (M)"], cells["Flops (G)"]) == ("11.17", "0.56")  # from the runs' metrics
    assert cells["Curves"] == f"[curves](curves/{ROW}.png)"
    config = os.path.relpath(render.REPO_ROOT / "conf" / "row" / f"{ROW}.yaml", store["work"] / "results")
    assert cells["Config"] == f"[config]({Path(config).as_posix()})"
    assert "Top-5 (%)" not in cells  # the seed's CIFAR-10 table has no Top-5
    counted, others = md.split("that do not count:")
    assert f"[`{ids['seed0']}`]({_record_link(ids['seed0'])}) · train" in counted and ids["smoke"] not in counted
    smoke = next(line for line in others.splitlines() if ids["smoke"] in line)  # listed apart, with its reason
    assert "| 40.00 | 94.82 | -54.82 | smoke: recipe.epochs=1 |" in smoke
    assert f"[curves](curves/runs/{ids['smoke']}.png)" in smoke


def test_indicative_runs_are_shown_not_counted(store: dict[str, Any]) -> None:
    md = (store["work"] / "results" / "cifar-10.md").read_text()
    cells, run_id = _cells(md, "resnet50_8xb16_cifar10"), store["ids"]["jpeg"]
    link = _record_link(run_id, "resnet50_8xb16_cifar10")
    assert cells["Indicative Top-1 (%)"] == f"[92.00]({link}); image-folder (JPEG) copy, not the md5-verified archives"
    assert [cells[k] for k in ("Top-1 (%)", "Δ Top-1", "Verdict Top-1", "Device-hours")] == ["—"] * 4
    assert "indicative: image-folder (JPEG) copy" in md.split("Runs behind these numbers:")[1].split("do not count")[0]


def test_verdict_rule() -> None:
    assert select.verdict([94.6], 94.82)[0] == "reproduced"  # one seed: within 0.3
    word, delta = select.verdict([94.4], 94.82)
    assert word == "not reproduced" and round(delta, 2) == -0.42
    assert select.verdict([94.52], 94.82)[0] == "reproduced"  # |Δ| = 0.30 exactly
    assert select.verdict([93.9, 95.1], 94.82)[0] == "reproduced"  # Δ -0.32 within 2 × std 0.85
    assert select.verdict([94.0, 94.1], 94.82)[0] == "not reproduced"  # Δ -0.77, std 0.07: the bound is 0.3
    assert select.verdict([], 94.82) == ("", None) and select.verdict([94.0], None) == ("", None)
    runs = pd.DataFrame({"top1": [93.9, 94.06], "run_id": ["a", "b"]})
    assert render.verdict_cell(runs, "top1", 94.82) == "not reproduced (Δ -0.84)"
    assert render.verdict_cell(runs.iloc[:0], "top1", 94.82) == "—"


def test_rows_without_counting_runs_show_published_and_dash(store: dict[str, Any]) -> None:
    results = store["work"] / "results"
    c10, c100 = (results / "cifar-10.md").read_text(), (results / "cifar-100.md").read_text()
    short = _cells(c10, "resnet34_8xb16_cifar10")  # its only run is not full length
    assert (short["Top-1 (%)"], short["Published Top-1 (%)"], short["Δ Top-1"], short["Curves"]) == (
        "—",
        "95.34",
        "—",
        "—",
    )
    assert short["Params (M)"] == "21.28"  # the table's value without a counting run
    cifar100 = _cells(c100, "resnet50_8xb16_cifar100")
    assert [cifar100[k] for k in ("Top-1 (%)", "Top-5 (%)", "Published Top-1 (%)", "Published Top-5 (%)")] == [
        "—",
        "—",
        "79.90",
        "95.19",
    ]
    assert (cifar100["Verdict Top-1"], cifar100["Verdict Top-5"]) == ("—", "—")
    in1k = (results / "imagenet-1k.md").read_text()
    assert _cells(in1k, "resnet34_8xb32_in1k")["Params (M)"] == "2.18¹"
    assert "¹ The published table prints 2.18 for `resnet34_8xb32_in1k`; the model has 21,797,672" in in1k
    download = _cells(in1k, "resnet18_8xb32_in1k")["Download"]
    assert download.startswith(f"[model]({get_row('resnet18_8xb32_in1k').checkpoint_url})")
    assert "| :--- | :---: | :---: |" in in1k  # the seed's alignment, cells not padded


def test_eval_runs_show_as_checkpoint_retests(store: dict[str, Any]) -> None:
    md = (store["work"] / "results" / "cifar-10.md").read_text()
    retest = md.split("Checkpoint re-tests on CIFAR-10")[1].split("Runs behind these numbers")[0]
    lines = [x for x in retest.splitlines() if x.startswith(f"| `{ROW}` |")]
    ids = store["ids"]
    assert len(lines) == 2 and ids["eval_smoke"] not in retest
    assert f"| `published` | [94.80]({_record_link(ids['eval'])}) | 94.82 | -0.02 |" in lines[0]
    assert f"| `best.pt` of run `abc123` | [94.80]({_record_link(ids['eval_ours'])}) |" in lines[1]


def test_other_runs_and_unfinished_runs_are_named(store: dict[str, Any]) -> None:
    ids, stdout = store["ids"], store["stdout"]
    other = (store["work"] / "results" / "other-runs.md").read_text()
    line = next(x for x in other.splitlines() if ids["custom"] in x)
    assert "`custom:resnet18-cifar-demo-cifar-200e-fp32`" in line and "| custom composition |" in line
    assert f"[curves](curves/runs/{ids['custom']}.png)" in line and line in stdout
    assert f"not finished (RUNNING): {ids['unfinished']} `resnet50_8xb16_cifar100`" in stdout
    assert "custom_resnet18" not in str(list((store["work"] / "results" / "logs").iterdir()))  # --export: rows only


def test_readme_section_replaced_and_second_call_changes_nothing(store: dict[str, Any]) -> None:
    work = store["work"]
    assert store["code"] == store["code2"] == 0
    text = (work / "README.md").read_text()
    assert text.startswith("# Project\n\nintro\n\n<!-- results:begin -->\n")
    assert text.endswith("<!-- results:end -->\n\n## Citation\n") and "stale tables" not in text
    for section in ("ImageNet-1k", "CIFAR-10", "CIFAR-100", "CUB-200-2011"):
        assert f"### Image Classification on {section}" in text
    assert f"[curves](results/curves/{ROW}.png)" in text and "[runs.csv](results/runs.csv)" in text
    assert f"[94.10](results/{_record_link(store['ids']['seed0'])})" in text
    assert _snapshot(work) == store["first"]  # same bytes, and no file rewritten (same mtimes)
    assert "# Image Classification on CIFAR-10" in store["stdout"]
    assert sorted(p.name for p in (work / "results").iterdir()) == [
        "cifar-10.md",
        "cifar-100.md",
        "cub-200-2011.md",
        "curves",
        "imagenet-1k.md",
        "logs",
        "other-runs.md",
        "runs.csv",
    ]


def test_curves_png_for_reproduced_rows_and_every_training_run(store: dict[str, Any]) -> None:
    curves = store["work"] / "results" / "curves"
    assert [p.name for p in curves.iterdir() if p.is_file()] == [f"{ROW}.png"]
    png = (curves / f"{ROW}.png").read_bytes()
    assert png.startswith(b"\x89PNG") and b"Software" not in png and len(png) > 10_000
    trained = {run_id for name, run_id in store["ids"].items() if not name.startswith("eval")}
    assert {p.stem for p in (curves / "runs").iterdir()} == trained


def test_readme_without_markers_is_a_one_line_error(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    readme = tmp_path / "README.md"
    readme.write_text("# no markers here\n")
    argv = ["--tracking-uri", f"sqlite:///{tmp_path / 'none.db'}", "--out", str(tmp_path / "results")]
    with pytest.raises(SystemExit) as exc:
        report.main([*argv, "--readme", str(readme)])
    err = capsys.readouterr().err
    assert exc.value.code == 2 and len(err.strip().splitlines()) == 1 and str(readme) in err
    assert "<!-- results:begin -->" in err and not (tmp_path / "results").exists()
    assert readme.read_text() == "# no markers here\n"


def test_no_store_here_prints_published_tables(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """No --tracking-uri and no ./mlflow.db (a fresh clone): the records only; none here: published numbers."""
    monkeypatch.chdir(tmp_path)
    code, stdout = _report(["--out", "r"])
    assert code == 0 and not (tmp_path / "mlflow.db").exists()
    cub = _cells(stdout.split("# Image Classification on CUB-200-2011")[1], "resnet50_8xb8_cub")
    assert (cub["Top-1 (%)"], cub["Published Top-1 (%)"], cub["Pretrain"]) == ("—", "88.45", "From scratch¹")
    assert (tmp_path / "r" / "runs.csv").read_text().startswith("run_id,run_type,row,status,counts,reason,top1")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["r"]


def test_report_from_any_directory_writes_curves_and_no_readme(
    store: dict[str, Any], tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.chdir(tmp_path)
    repo_readme = render.REPO_ROOT / "README.md"
    before = repo_readme.stat().st_mtime_ns if repo_readme.is_file() else None
    code, stdout = _report(["--tracking-uri", store["uri"], "--experiment", EXPERIMENT])
    assert code == 0 and "README: not updated" in stdout
    assert sorted(p.name for p in tmp_path.iterdir()) == ["outputs", "results"]  # no README, no store, no mlruns
    ids = store["ids"]
    in_tables = {ids["seed0"], ids["seed1"], ids["jpeg"]}  # counting and indicative: results/
    assert {p.stem for p in (tmp_path / "results" / "curves" / "runs").iterdir()} == in_tables
    local = {ids[k] for k in ("smoke", "unfinished", "short", "custom")}  # no table: outputs/report/
    assert {p.stem for p in (tmp_path / "outputs" / "report" / "curves" / "runs").iterdir()} == local
    assert not (tmp_path / "results" / "logs").exists()  # nothing exported unless asked
    assert (repo_readme.stat().st_mtime_ns if repo_readme.is_file() else None) == before


# ---- records: results that travel -------------------------------------------------------------
@pytest.fixture(scope="module")
def rebuilt(empty_store: Path, tmp_path_factory: pytest.TempPathFactory) -> dict[str, Any]:
    """A store of several rows and seeds and eval runs, exported, deleted, and rebuilt from the records."""
    work = tmp_path_factory.mktemp("travel")
    uri = _copy_store(empty_store, work)
    ids = {
        "a0": _train_run(uri, "a0", 0, [60.0, 90.0, 94.6], config=CONFIG_YAML),
        "a1": _train_run(uri, "a1", 1, [62.0, 91.0, 94.7]),
        "b0": _train_run(uri, "b0", 0, [30.0, 50.0, 70.0], row="resnet50_8xb16_cifar100"),
        "smoke": _train_run(uri, "smoke", 2, [40.0], epochs=1, faithful=False, deviations=ONE_EPOCH),
        "eval": _eval_run(uri),
    }
    (work / "README.md").write_text(README)
    cwd = Path.cwd()
    os.chdir(work)
    try:
        code, stdout = _report(["--tracking-uri", uri, "--experiment", EXPERIMENT, "--export"])
        exported = _bytes(work)
        shutil.rmtree(work / "mlartifacts")
        (work / "mlflow.db").unlink()
        shutil.rmtree(work / "results" / "curves")
        (work / "README.md").write_text(README)
        for md in (work / "results").glob("*.md"):
            md.unlink()
        (work / "results" / "runs.csv").unlink()
        code2, stdout2 = _report(["--experiment", EXPERIMENT])
    finally:
        os.chdir(cwd)
    return {"work": work, "ids": ids, "codes": (code, code2), "exported": exported, "stdout2": stdout2}


def test_records_rebuild_the_same_files_without_the_store(rebuilt: dict[str, Any]) -> None:
    assert rebuilt["codes"] == (0, 0)
    assert "0 from the MLflow store, 5 from run records" in rebuilt["stdout2"]
    skip = {k for k in rebuilt["exported"] if k.startswith(("mlartifacts", "mlflow.db"))}
    rebuilt_files = {k: v for k, v in _bytes(rebuilt["work"]).items() if k not in skip}
    assert {k: v for k, v in rebuilt["exported"].items() if k not in skip} == rebuilt_files
    logs = rebuilt["work"] / "results" / "logs"
    assert sorted(str(p.relative_to(logs)) for p in logs.rglob("*.json")) == sorted(
        f"{row}/{rebuilt['ids'][k]}.json"
        for k, row in [("a0", ROW), ("a1", ROW), ("b0", "resnet50_8xb16_cifar100"), ("smoke", ROW), ("eval", ROW)]
    )
    readme = (rebuilt["work"] / "README.md").read_text()
    assert f"[94.60](results/logs/{ROW}/{rebuilt['ids']['a0']}.json)" in readme


def test_record_file_holds_config_tags_params_and_every_epoch(rebuilt: dict[str, Any]) -> None:
    path = rebuilt["work"] / "results" / "logs" / ROW / f"{rebuilt['ids']['a0']}.json"
    text = path.read_text()
    record = json.loads(text)
    assert text.endswith("}\n") and list(record) == sorted(record)
    assert record["config"] == {"model": {"depth": 18}, "recipe": {"epochs": 3, "optimizer": {"lr": 0.1}}, "seed": 0}
    assert record["config_source"] == "config/config.yaml"
    assert record["tags"]["device_name"] == H100 and not any(k.startswith("mlflow.") for k in record["tags"])
    assert record["params"] == {"model.depth": "18", "recipe.epochs": "3", "seed": "0"}
    assert record["metrics"]["params"] == 11173962 and "step/train_loss" not in record["metrics"]
    assert [e["epoch"] for e in record["epochs"]] == [1, 2, 3]
    assert record["epochs"][2] == {
        "epoch": 3,
        "epoch_time_s": 600.0,
        "lr": pytest.approx(0.1 / 3),
        "train_img_per_s": 83.3,
        "train_loss": pytest.approx(2 / 3),
        "val_top1": 94.6,
        "val_top5": 99.3,
    }
    assert '\n    {"epoch": 1, "epoch_time_s": 600.0, "lr": 0.1, ' in text  # one line per epoch
    other = json.loads((path.parent / f"{rebuilt['ids']['a1']}.json").read_text())
    assert other["config_source"] == "params" and other["config"]["recipe"] == {"epochs": "3"}
    assert records.load(path) == record


def test_export_scope() -> None:
    run = {"status": "FINISHED", "tags": {"row": ROW}}
    custom = {"status": "FINISHED", "tags": {"row": "custom:resnet18-cifar-demo-cifar-200e-fp32"}}
    assert records.exportable(run, "rows") and not records.exportable(custom, "rows")
    assert records.exportable(custom, "all") and not records.exportable({**run, "status": "RUNNING"}, "all")
    assert records.row_folder(custom["tags"]["row"]) == "custom_resnet18-cifar-demo-cifar-200e-fp32"
