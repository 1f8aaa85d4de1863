"""Curves against mmpretrain's published training log: both log layouts from a temporary torch.hub cache,
the figure without the log, and logs that are malformed or another row's (one-line errors naming the file)."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest

from resnet_repro.report import published, records
from resnet_repro.rows import get_row
from tests.test_report_inputs import ROW, make_record, one_line_error, run_report

ENV = {"env_info": "sys.platform: linux", "seed": 0}
CONFIG = "model = dict(backbone=dict(type='ResNet_CIFAR', depth=18), head=dict(num_classes=10, topk=(1, 5)))"
VAL = [(1, 45.1, 90.2), (2, 60.5, 95.0), (3, 70.25, 97.5)]
LOSS = {1: (2.0, 1.8), 2: (1.2, 1.0), 3: (0.8, 0.6)}  # two logged iterations per epoch: mean 1.9, 1.1, 0.7


def mmcls_log(config: str = CONFIG, val: list[tuple[int, float, float]] = VAL) -> str:
    """mmcls 0.x json lines: env and config, then train and val lines."""
    lines = [{**ENV, "config": config}]
    for epoch, top1, top5 in val:
        for i, loss in enumerate(LOSS.get(epoch, (1.0,)), start=1):
            lines.append({"mode": "train", "epoch": epoch, "iter": i * 100, "lr": 0.1, "loss": loss})
        lines.append(
            {"mode": "val", "epoch": epoch, "iter": 391, "lr": 0.1, "accuracy_top-1": top1, "accuracy_top-5": top5}
        )
    return "\n".join(json.dumps(line) for line in lines) + "\n"


def scalars_log() -> str:
    """mmengine's scalars.json: train lines with epoch and iteration step, val lines whose step is the epoch."""
    lines = []
    for epoch, top1, top5 in VAL:
        for i, loss in enumerate(LOSS[epoch], start=1):
            step = (epoch - 1) * 2 + i
            lines.append(
                {"lr": 0.1, "data_time": 0.01, "loss": loss, "time": 0.1, "epoch": epoch, "iter": step, "step": step}
            )
        lines.append({"accuracy/top1": top1, "accuracy/top5": top5, "data_time": 0.01, "time": 0.02, "step": epoch})
    return "\n".join(json.dumps(line) for line in lines) + "\n"


@pytest.fixture
def hub(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """An empty torch.hub cache; the log's place in it (where convert.cached_download would put it)."""
    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "torch"))
    if "torch" in sys.modules:  # a test before may have moved torch.hub's folder
        monkeypatch.setattr(sys.modules["torch"].hub, "_hub_dir", None)
    path = tmp_path / "torch" / "hub" / "checkpoints" / published.log_name(get_row(ROW))
    assert published.cache_path(get_row(ROW)) == path
    path.parent.mkdir(parents=True)
    return path


def test_both_log_layouts_parse_to_the_same_curves(tmp_path: Path) -> None:
    old, new = tmp_path / "old.json", tmp_path / "scalars.json"
    old.write_text(mmcls_log())
    new.write_text(scalars_log())
    for path in (old, new):
        log = published.parse(path, get_row(ROW), recipe_epochs=3)
        assert log.val["top1"].to_dict() == {1: 45.1, 2: 60.5, 3: 70.25}
        assert log.val["top5"].to_dict() == {1: 90.2, 2: 95.0, 3: 97.5}
        assert log.train_loss.round(6).to_dict() == {1: 1.9, 2: 1.1, 3: 0.7}
    variant = tmp_path / "variant.json"
    variant.write_text(json.dumps({"mode": "val", "epoch": 1, "top-1": 50.0}) + "\n")
    assert published.parse(variant, get_row(ROW), recipe_epochs=3).val["top1"].to_dict() == {1: 50.0}


def test_row_curves_drawn_beside_the_published_log_when_cached(
    hub: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    monkeypatch.chdir(tmp_path)
    for seed, run_id in enumerate(("s0", "s1")):
        records.write(make_record(run_id, seed=seed, top1=(50.0 + seed, 65.0, 70.0 + seed)), Path("results/logs"))
    png = tmp_path / "results" / "curves" / f"{ROW}.png"

    def draw() -> bytes:
        code, out, err = run_report(["--no-readme"], capsys)
        assert code == 0, err
        return png.read_bytes()

    without = draw()  # offline, nothing cached: the figure says so and the report goes on
    hub.write_text(mmcls_log())
    old_layout = draw()
    hub.write_text(scalars_log())
    new_layout = draw()
    assert without.startswith(b"\x89PNG") and old_layout != without and new_layout == old_layout
    assert {p.name for p in (tmp_path / "results" / "curves" / "runs").iterdir()} == {"s0.png", "s1.png"}


@pytest.mark.parametrize(
    ("text", "words"),
    [
        ("<html>not found</html>\n", "line 1 is not JSON"),
        (json.dumps({"mode": "train", "epoch": 1, "loss": 2.0}) + "\n", "no validation top-1"),
        (mmcls_log(config=CONFIG.replace("depth=18", "depth=50")), "depth=50"),
        (mmcls_log(val=[*VAL, (4, 71.0, 98.0)]), "validates at epoch 4"),
    ],
    ids=["malformed", "no-accuracy", "other-depth", "more-epochs"],
)
def test_a_malformed_or_other_rows_log_is_a_one_line_error_naming_it(
    text: str,
    words: str,
    hub: Path,
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture[str],
) -> None:
    monkeypatch.chdir(tmp_path)
    records.write(make_record("s0"), Path("results/logs"))
    hub.write_text(text)
    code, _, err = run_report(["--no-readme"], capsys)
    assert one_line_error(code, err, str(hub), words), err


def test_logs_are_downloaded_only_when_asked(
    hub: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    """Without --fetch-logs only the cache is read; with it, a failed download is a note, a done one is drawn."""
    from resnet_repro import convert
    from resnet_repro.errors import UserError

    calls: list[str] = []

    def offline(url: str) -> Path:
        calls.append(url)
        raise UserError(f"could not download {url} (no network); fetch it where there is network")

    monkeypatch.chdir(tmp_path)
    monkeypatch.setattr(convert, "cached_download", offline)
    records.write(make_record("s0"), Path("results/logs"))
    code, _, err = run_report(["--no-readme"], capsys)
    assert code == 0 and calls == [] and err == ""
    without = (tmp_path / "results" / "curves" / f"{ROW}.png").read_bytes()
    code, _, err = run_report(["--no-readme", "--fetch-logs"], capsys)
    assert code == 0 and calls == [published.log_url(get_row(ROW))] and "could not be downloaded" in err

    def download(url: str) -> Path:
        hub.write_text(scalars_log())
        return hub

    monkeypatch.setattr(convert, "cached_download", download)
    code, _, err = run_report(["--no-readme", "--fetch-logs"], capsys)
    assert code == 0 and err == "" and (tmp_path / "results" / "curves" / f"{ROW}.png").read_bytes() != without
