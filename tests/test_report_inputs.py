"""What the report reads: a store given by URI must be an MLflow store (one-line error otherwise, and the file
left as it was), run records must be well-formed and in their row's folder, and no run at all changes no
existing file unless --allow-empty."""

from __future__ import annotations

import contextlib
import json
import sqlite3
import time
from pathlib import Path

import pytest

from resnet_repro import report
from resnet_repro.report import records

ROW = "resnet18_8xb16_cifar10"


def make_record(run_id: str, row: str = ROW, seed: int = 0, top1: tuple[float, ...] = (60.0, 90.0, 94.6)) -> dict:
    """A finished, faithful, full-length training record as `--export` writes it (no MLflow needed)."""
    return {
        "schema": records.SCHEMA,
        "run_id": run_id,
        "run_name": run_id,
        "experiment": "resnet_repro",
        "status": "FINISHED",
        "start_time": 1_700_000_000_000 + seed,
        "end_time": None,
        "tags": {
            "row": row,
            "run_type": "train",
            "faithful": "true",
            "deviations": "",
            "data_verified": "True",
            "world_size": "1",
            "device": "cpu",
        },
        "params": {"recipe.epochs": str(len(top1)), "seed": str(seed)},
        "metrics": {"val_top1": top1[-1], "epochs_completed": float(len(top1))},
        "epochs": [
            {"epoch": i, "val_top1": v, "train_loss": 2.0 / i, "lr": 0.1, "epoch_time_s": 10.0}
            for i, v in enumerate(top1, start=1)
        ],
        "config": {},
        "config_source": "params",
    }


def run_report(argv: list[str], capsys: pytest.CaptureFixture[str]) -> tuple[int, str, str]:
    """report.main as the command runs it: (exit status, stdout, stderr)."""
    try:
        code = report.main(argv)
    except SystemExit as exc:
        code = int(exc.code or 0)
    out = capsys.readouterr()
    return code, out.out, out.err


def one_line_error(code: int, err: str, *names: str) -> bool:
    lines = err.strip().splitlines()
    return (
        code == 2 and len(lines) == 1 and lines[0].startswith("resnet_repro: error: ") and all(n in err for n in names)
    )


# ---- stores given with --tracking-uri ----------------------------------------------------------
def _foreign_sqlite(path: Path) -> None:
    with contextlib.closing(sqlite3.connect(path)) as con:
        con.execute("CREATE TABLE notes (id INTEGER PRIMARY KEY, text TEXT)")
        con.execute("INSERT INTO notes (text) VALUES ('not mlflow')")
        con.commit()


@pytest.mark.parametrize("kind", ["missing", "empty", "foreign", "text"])
def test_a_file_that_is_no_mlflow_store_is_a_one_line_error_and_left_alone(
    kind: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    monkeypatch.chdir(tmp_path)
    db = tmp_path / "store.db"
    if kind == "empty":
        db.touch()
    elif kind == "foreign":
        _foreign_sqlite(db)
    elif kind == "text":
        db.write_text("just some notes\n" * 100)
    before = db.read_bytes() if db.exists() else None
    code, _, err = run_report(["--tracking-uri", f"sqlite:///{db}"], capsys)
    assert one_line_error(code, err, str(db)), err
    assert (db.read_bytes() if db.exists() else None) == before  # no MLflow schema written, no file created
    assert sorted(p.name for p in tmp_path.iterdir()) == ([] if before is None else ["store.db"])


@pytest.mark.parametrize("uri", ["bogus://nowhere", "notascheme:::/x", "http://127.0.0.1:9", "file:///nonexistent/x"])
def test_a_bad_uri_is_a_quick_one_line_error(
    uri: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    monkeypatch.chdir(tmp_path)
    start = time.monotonic()
    code, _, err = run_report(["--tracking-uri", uri], capsys)
    assert one_line_error(code, err, uri.removeprefix("file://")), err
    assert time.monotonic() - start < 15  # MLflow's own retries would take minutes on the http one
    assert list(tmp_path.iterdir()) == []


# ---- run records -------------------------------------------------------------------------------
def test_a_malformed_record_is_a_one_line_error_naming_it(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    monkeypatch.chdir(tmp_path)
    records.write(make_record("good"), tmp_path / "results" / "logs")
    bad = tmp_path / "results" / "logs" / ROW / "broken.json"
    bad.write_text('{"schema": 1, "run_id": "broken"')
    code, _, err = run_report([], capsys)
    assert one_line_error(code, err, str(Path("results/logs") / ROW / "broken.json"), "not a run record"), err
    bad.write_text(json.dumps({**make_record("broken"), "epochs": [{"epoch": "one"}]}))
    code, _, err = run_report([], capsys)
    assert one_line_error(code, err, "broken.json", "epoch"), err
    assert not (tmp_path / "results" / "runs.csv").exists()


def test_a_record_in_another_rows_folder_is_a_one_line_error(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    monkeypatch.chdir(tmp_path)
    folder = tmp_path / "results" / "logs" / "resnet34_8xb16_cifar10"
    folder.mkdir(parents=True)
    (folder / "r1.json").write_text(records.dumps(make_record("r1")))  # a resnet18 run in resnet34's folder
    code, _, err = run_report([], capsys)
    assert one_line_error(code, err, "r1.json", f"belongs in {ROW}/"), err


def test_records_are_read_from_any_folder_and_can_be_turned_off(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    monkeypatch.chdir(tmp_path)
    records.write(make_record("r1"), tmp_path / "elsewhere")
    code, out, _ = run_report(["--runs", "elsewhere", "--no-readme"], capsys)
    assert code == 0 and "1 from run records" in out and "[94.60](../elsewhere/" in out
    assert (tmp_path / "results" / "curves" / "runs" / "r1.png").is_file()
    code, out, err = run_report(["--runs", "none"], capsys)
    assert code == 1 and "0 runs" in out and "--allow-empty" in err  # nothing to show: files left alone


# ---- an empty result --------------------------------------------------------------------------
def test_no_runs_change_no_existing_file_unless_allowed(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    monkeypatch.chdir(tmp_path)
    readme = "# x\n<!-- results:begin -->\nreal results\n<!-- results:end -->\n"
    (tmp_path / "README.md").write_text(readme)
    (tmp_path / "results").mkdir()
    (tmp_path / "results" / "cifar-10.md").write_text("real results\n")
    code, _, err = run_report([], capsys)
    assert code == 1 and "no runs" in err and "--allow-empty" in err
    assert (tmp_path / "README.md").read_text() == readme
    assert sorted(p.name for p in (tmp_path / "results").iterdir()) == ["cifar-10.md"]
    code, _, _ = run_report(["--allow-empty"], capsys)
    assert code == 0 and "real results" not in (tmp_path / "README.md").read_text()
    assert "| `resnet18_8xb16_cifar10` | From scratch |" in (tmp_path / "results" / "cifar-10.md").read_text()
    code, _, _ = run_report([], capsys)  # the empty tables are there now: nothing would change, no refusal
    assert code == 0


def test_help_says_what_export_writes(capsys: pytest.CaptureFixture[str]) -> None:
    code, out, _ = run_report(["--help"], capsys)
    text = " ".join(out.split())
    assert code == 0 and "every training run of the 22 table rows, counting or not (smoke runs too)" in text
    for flag in ("--export", "--runs", "--allow-empty", "--fetch-logs", "--readme", "--out", "--tracking-uri"):
        assert flag in out


# ---- issue 20: one line each; nothing counted from a null or twice ------------------------------
def _store_with_runs(tmp: Path, values: list[list[float]]) -> str:
    """A store (a copy of an empty one) with one finished training run of ROW per list of epoch top-1s."""
    from resnet_repro.tracking import Tracker
    from tests.conftest import train_args

    uri = train_args(tmp)[0].removeprefix("tracking.uri=")
    for i, top1 in enumerate(values):
        tracker = Tracker(uri, "resnet_repro")
        tracker.start(f"r{i}", {"row": ROW, "run_type": "train", "faithful": "true", "config_hash": "h0"})
        for epoch, value in enumerate(top1, start=1):
            tracker.log_metrics({"val_top1": value}, step=epoch)
            time.sleep(0.002)  # one step logged twice: two timestamps
        tracker.finish()
    return uri


def test_export_into_a_read_only_folder_is_one_line(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    from tests.conftest import read_only

    monkeypatch.chdir(tmp_path)
    uri = _store_with_runs(tmp_path, [[50.0]])
    (tmp_path / "logs").mkdir()
    with read_only(tmp_path / "logs"):
        code, _, err = run_report(["--tracking-uri", uri, "--export", "--runs", "logs", "--no-readme"], capsys)
    assert one_line_error(code, err, "cannot write run records to logs", "--runs"), err


def test_the_last_value_logged_for_an_epoch_stands_in_the_export(tmp_path: Path) -> None:
    """An epoch logged again (a restart re-trained it): the later value stands, whatever the values' order."""
    from resnet_repro.tracking import read_runs

    uri = _store_with_runs(tmp_path, [[90.0, 10.0, 20.0]])
    with contextlib.closing(sqlite3.connect(tmp_path / "mlflow.db")) as con:  # the three values: one epoch
        con.execute("UPDATE metrics SET step = 1 WHERE key = 'val_top1'")
        con.commit()
    (run,) = read_runs(uri, "resnet_repro", histories=records.EPOCH_KEYS)
    assert records.from_store(run)["epochs"] == [{"epoch": 1, "val_top1": 20.0}]


def test_a_record_with_a_text_start_time_is_one_line(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    monkeypatch.chdir(tmp_path)
    records.write({**make_record("r1"), "start_time": "2026-11-29 10:00"}, tmp_path / "results" / "logs")
    code, _, err = run_report([], capsys)
    assert one_line_error(code, err, "r1.json", "start_time is '2026-11-29 10:00'"), err


def test_a_null_top1_never_counts_and_one_identity_counts_once() -> None:
    from resnet_repro.report import select

    null = {**make_record("null", seed=3), "metrics": {"val_top1": None, "epochs_completed": 3.0}}
    identity = {"config_hash": "h0", "data_fingerprint": "d0"}
    first, again = (make_record(run_id, top1=(94.0 + i,)) for i, run_id in enumerate(("first", "again")))
    for record, start in ((first, 1), (again, 2)):  # two checkpoint roots, one experiment
        record.update(start_time=start, params={"recipe.epochs": "1", "seed": "0"})
        record["tags"].update(identity)
    frame = select.runs_frame([null, again, first]).set_index("run_id")
    assert not frame.loc["null", "counts"] and frame.loc["null", "reason"] == "no val_top1"
    assert frame.loc["first", "counts"] and not frame.loc["again", "counts"]
    assert frame.loc["again", "reason"] == "counted once: run first has the same config, seed and data"
    assert list(select.of_row(frame.reset_index(), "train", ROW)["run_id"]) == ["first"]


def test_a_store_locked_longer_than_sqlite_waits_is_named_locked(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    from resnet_repro.tracking import store

    monkeypatch.chdir(tmp_path)
    monkeypatch.setattr(store, "LOCK_WAIT_S", 0.5)
    uri = _store_with_runs(tmp_path, [[50.0]])
    with contextlib.closing(sqlite3.connect(tmp_path / "mlflow.db", isolation_level=None)) as writer:
        writer.execute("BEGIN EXCLUSIVE")  # a long write of another process
        code, _, err = run_report(["--tracking-uri", uri, "--no-readme"], capsys)
        writer.execute("ROLLBACK")
    assert one_line_error(code, err, "mlflow.db stayed locked by another process for 0.5 s"), err
    assert "not an SQLite database" not in err
