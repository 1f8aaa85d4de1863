"""The report: which runs count, the regenerated tables, curves, README section, idempotence (tiny stores)."""

from __future__ import annotations

import contextlib
import io
import os
import statistics
from pathlib import Path
from typing import Any

import pandas as pd
import pytest

from resnet_repro import report
from resnet_repro.rows import get_row
from resnet_repro.tracking import Tracker, store_missing

ROW = "resnet18_8xb16_cifar10"
EXPERIMENT = "report-test"
README = "# Project\n\nintro\n\n<!-- results:begin -->\nstale tables\n<!-- results:end -->\n\n## Citation\n"
URL = get_row(ROW).checkpoint_url


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
    data_verified: str = "True",
) -> str:
    """A training run with the tags, params and metrics the engine records."""
    tracker = Tracker(uri, EXPERIMENT)
    tags = {
        "row": row,
        "run_type": "train",
        "faithful": str(faithful).lower(),
        "deviations": deviations,
        "data_verified": data_verified,
    }
    run_id = tracker.start(name, {**tags, "config_hash": f"hash{seed}", "section": "CIFAR-10"})
    tracker.log_params({"recipe.epochs": epochs, "seed": seed})
    tracker.log_metrics({"params": 11173962, "flops_g": 0.5562}, step=0)
    for epoch, value in enumerate(top1, start=1):
        tracker.log_metrics({"val_top1": value, "val_top5": 99.0 + epoch / 10, "train_loss": 2.0 / epoch}, step=epoch)
    if finish:
        tracker.log_metrics({"epochs_completed": len(top1), "best_val_top1": max(top1)}, step=len(top1))
        tracker.finish()
    assert run_id is not None
    return run_id


def _eval_run(uri: str, checkpoint: str = URL, faithful: str = "true", deviations: str = "", **tags: str) -> str:
    """An evaluation run as `python -m resnet_repro.test` records it."""
    tracker = Tracker(uri, EXPERIMENT)
    tags = {"data_verified": "True", **tags}
    tags |= {"row": ROW, "run_type": "eval", "checkpoint": checkpoint, "faithful": faithful, "deviations": deviations}
    run_id = tracker.start("test", tags)
    tracker.log_metrics({"test_top1": 94.8, "test_top5": 99.87}, step=0)
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


@pytest.fixture(scope="module")
def store(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Any]:
    """Two seeds of one row, a smoke, an unfinished, a short, a custom run, an eval run; the report run twice."""
    root = tmp_path_factory.mktemp("report")
    uri = f"sqlite:///{root / 'mlflow.db'}"
    ids = {
        "seed0": _train_run(uri, "s0", 0, [60.0, 90.0, 94.1]),
        "seed1": _train_run(uri, "s1", 1, [62.0, 91.0, 94.5]),
        "smoke": _train_run(uri, "smoke", 2, [40.0], epochs=1, faithful=False, deviations="recipe.epochs=1"),
        "unfinished": _train_run(uri, "u", 3, [50.0], row="resnet50_8xb16_cifar100", finish=False),
        "short": _train_run(uri, "short", 4, [50.0, 60.0], row="resnet34_8xb16_cifar10"),
        "custom": _train_run(
            uri, "c", 5, [70.0], row="custom:resnet18-cifar-cifar10-cifar-200e-bf16", epochs=1, faithful=False
        ),
        "eval": _eval_run(uri),
        "eval_ours": _eval_run(uri, "/somewhere/ckpt/best.pt", source_run_id="abc123"),
        "eval_smoke": _eval_run(uri, faithful="false", deviations="trainer.limit_val_batches=2"),
    }
    work = root / "work"
    work.mkdir()
    (work / "README.md").write_text(README)
    argv = ["--tracking-uri", uri, "--experiment", EXPERIMENT, "--out", str(work / "results")]
    argv += ["--readme", str(work / "README.md")]
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


def test_only_finished_faithful_full_length_runs_count(store: dict[str, Any]) -> None:
    runs = pd.read_csv(store["work"] / "results" / "runs.csv", dtype=str, keep_default_na=False).set_index("run_id")
    ids = store["ids"]
    assert len(runs) == len(ids)
    assert set(runs.index[runs["counts"] == "yes"]) == {ids["seed0"], ids["seed1"], ids["eval"], ids["eval_ours"]}
    reason = runs["reason"]
    assert reason[ids["smoke"]] == "smoke: recipe.epochs=1"
    assert reason[ids["unfinished"]] == "not finished (RUNNING)"
    assert reason[ids["short"]] == "not full length: 2 of 3 epochs"
    assert reason[ids["custom"]] == "custom composition"
    assert reason[ids["eval_smoke"]] == "smoke: trainer.limit_val_batches=2"
    assert runs.loc[ids["seed1"], ["top1", "epochs", "seed", "config_hash"]].tolist() == ["94.5000", "3", "1", "hash1"]
    assert runs.loc[ids["eval"], "run_type"] == "eval" and runs.loc[ids["eval"], "top1"] == "94.8000"


def test_exclusion_reasons_of_other_deviations() -> None:
    run = {"status": "FINISHED", "params": {"recipe.epochs": "200"}, "metrics": {"val_top1": 1.0}}
    run["metrics"]["epochs_completed"] = 200.0
    tags = {"row": ROW, "run_type": "train", "faithful": "false", "data_verified": "True"}
    lr = report.exclusion({**run, "tags": {**tags, "deviations": "recipe.optimizer.lr=0.2"}})
    assert lr == "deviates: recipe.optimizer.lr=0.2"
    assert report.exclusion({**run, "tags": {**tags, "faithful": "true"}}) == ""
    untyped = {**run, "tags": {"row": ROW, "data_verified": "True"}}
    assert report.exclusion(untyped) == "not a training or evaluation run (run_type=missing)"


def test_seeds_give_mean_std_n_and_the_difference(store: dict[str, Any]) -> None:
    md = (store["work"] / "results" / "cifar-10.md").read_text()
    cells, ids = _cells(md, ROW), store["ids"]
    mean, std = statistics.mean([94.1, 94.5]), statistics.stdev([94.1, 94.5])
    assert (f"{mean:.2f}", f"{std:.2f}") == ("94.30", "0.28")
    each = f"[94.10](#run-{ids['seed0']}), [94.50](#run-{ids['seed1']})"
    assert cells["Top-1 (%)"] == f"94.30 ± 0.28 (n=2: {each})"
    assert cells["Published Top-1 (%)"] == "94.82"
    assert cells["Δ Top-1"] == f"{mean - 94.82:+.2f}" == "-0.52"
    assert (cells["Params (M)"], cells["Flops (G)"]) == ("11.17", "0.56")  # from the runs' metrics
    assert cells["Curves"] == f"[curves](curves/{ROW}.png)"
    config = os.path.relpath(report.REPO_ROOT / "conf" / "row" / f"{ROW}.yaml", store["work"] / "results")
    assert cells["Config"] == f"[config]({Path(config).as_posix()})"
    assert "Top-5 (%)" not in cells  # the seed's CIFAR-10 table has no Top-5
    counted, others = md.split("that do not count:")
    assert f'<a id="run-{ids["seed0"]}"></a>`{ids["seed0"]}`' in counted and ids["smoke"] not in counted
    smoke = next(line for line in others.splitlines() if ids["smoke"] in line)  # listed apart, with its reason
    assert "| 40.00 | 94.82 | -54.82 | smoke: recipe.epochs=1 |" in smoke


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
    in1k = (results / "imagenet-1k.md").read_text()
    assert _cells(in1k, "resnet34_8xb32_in1k")["Params (M)"] == "2.18¹"
    assert "¹ The published table prints 2.18 for `resnet34_8xb32_in1k`; the model has 21,797,672" in in1k
    download = _cells(in1k, "resnet18_8xb32_in1k")["Download"]
    assert download.startswith(f"[model]({get_row('resnet18_8xb32_in1k').checkpoint_url})")


def test_eval_runs_show_as_checkpoint_retests(store: dict[str, Any]) -> None:
    md = (store["work"] / "results" / "cifar-10.md").read_text()
    retest = md.split("Checkpoint re-tests on CIFAR-10")[1].split("Runs behind these numbers")[0]
    lines = [x for x in retest.splitlines() if x.startswith(f"| `{ROW}` |")]
    ids = store["ids"]
    assert len(lines) == 2 and ids["eval_smoke"] not in retest
    assert f"| `published` | [94.80](#run-{ids['eval']}) | 94.82 | -0.02 |" in lines[0]
    assert f"| `best.pt` of run `abc123` | [94.80](#run-{ids['eval_ours']}) |" in lines[1]


def test_readme_section_replaced_and_second_call_changes_nothing(store: dict[str, Any]) -> None:
    work = store["work"]
    assert store["code"] == store["code2"] == 0
    text = (work / "README.md").read_text()
    assert text.startswith("# Project\n\nintro\n\n<!-- results:begin -->\n")
    assert text.endswith("<!-- results:end -->\n\n## Citation\n") and "stale tables" not in text
    for section in ("ImageNet-1k", "CIFAR-10", "CIFAR-100", "CUB-200-2011"):
        assert f"### Image Classification on {section}" in text
    assert f"[curves](results/curves/{ROW}.png)" in text and "[runs.csv](results/runs.csv)" in text
    assert _snapshot(work) == store["first"]  # same bytes, and no file rewritten (same mtimes)
    assert "# Image Classification on CIFAR-10" in store["stdout"]
    assert sorted(p.name for p in (work / "results").iterdir()) == [
        "cifar-10.md",
        "cifar-100.md",
        "cub-200-2011.md",
        "curves",
        "imagenet-1k.md",
        "runs.csv",
    ]


def test_curves_png_for_reproduced_rows_only(store: dict[str, Any]) -> None:
    curves = store["work"] / "results" / "curves"
    assert [p.name for p in curves.iterdir()] == [f"{ROW}.png"]
    png = (curves / f"{ROW}.png").read_bytes()
    assert png.startswith(b"\x89PNG") and b"Software" not in png and len(png) > 10_000


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


def test_missing_store_prints_published_tables(tmp_path: Path) -> None:
    db = tmp_path / "absent.db"
    code, stdout = _report(["--tracking-uri", f"sqlite:///{db}", "--out", str(tmp_path / "r"), "--no-readme"])
    assert code == 0 and not db.exists() and store_missing(f"sqlite:///{db}")
    cub = _cells(stdout.split("# Image Classification on CUB-200-2011")[1], "resnet50_8xb8_cub")
    assert (cub["Top-1 (%)"], cub["Published Top-1 (%)"], cub["Pretrain"]) == ("—", "88.45", "From scratch¹")
    assert (tmp_path / "r" / "runs.csv").read_text().startswith("run_id,run_type,row,status,counts,reason,top1")


def test_cifar_runs_count_only_on_the_official_archives(tmp_path: Path) -> None:
    """A faithful, full-length run on a re-encoded image-folder copy of CIFAR-10 is listed, not counted."""
    uri = f"sqlite:///{tmp_path}/m.db"
    run_id = _train_run(uri, "jpeg-copy", 0, [90.0, 91.0, 92.0], data_verified="None")
    code, _ = _report(
        [f"--tracking-uri={uri}", f"--experiment={EXPERIMENT}", f"--out={tmp_path / 'results'}", "--no-readme"]
    )
    assert code == 0
    runs = pd.read_csv(tmp_path / "results" / "runs.csv").set_index("run_id")
    assert runs.loc[run_id, "counts"] == "no" and runs.loc[run_id, "reason"].startswith("data:")
