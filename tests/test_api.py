"""The table's API (`get_model`, `inference_model`) and `python -m resnet_repro.test`, on CPU, offline."""

from __future__ import annotations

import hashlib
import urllib.error
from pathlib import Path

import cv2
import numpy as np
import pytest
import torch
from PIL import Image

from resnet_repro import get_model, inference_model
from resnet_repro.errors import UserError
from resnet_repro.rows import get_row
from tests.conftest import mlflow_runs, randomise, run_cli
from tests.test_convert import mmpretrain_state_dict

ROW = "resnet18_8xb16_cifar10"
CIFAR10 = ["airplane", "automobile", "bird", "cat", "deer", "dog", "frog", "horse", "ship", "truck"]


@pytest.fixture
def hub_dir(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """torch.hub's cache inside the test's folder."""
    folder = tmp_path / "hub"
    monkeypatch.setattr(torch.hub, "_hub_dir", str(folder))
    return folder


def same_weights(a: torch.nn.Module, b: torch.nn.Module) -> bool:
    sb = b.state_dict()
    return all(torch.equal(v, sb[k]) for k, v in a.state_dict().items())


def save_ours(model: torch.nn.Module, path: Path, classes: list[str] | None = None) -> Path:
    """A checkpoint in the trainer's best.pt layout."""
    obj = {"model": model.state_dict(), "config": model.cfg, "row_name": model.row_name, "classes": classes}
    torch.save(obj, path)
    return path


@pytest.fixture
def mm_checkpoint(tmp_path: Path) -> tuple[Path, torch.nn.Module]:
    source = randomise(get_model(ROW))
    path = tmp_path / "resnet18_b16x8_cifar10_20210528.pth"
    torch.save({"state_dict": mmpretrain_state_dict(source, 18, "cifar"), "meta": {"CLASSES": CIFAR10}}, path)
    sha = hashlib.sha256(path.read_bytes()).hexdigest()  # named as mmcv's publish_model names its files
    return path.rename(path.with_name(f"{path.stem}-{sha[:8]}.pth")), source


def test_get_model_builds_the_row() -> None:
    model = get_model(ROW)
    assert model.cfg["row_name"] == ROW and model.row_name == ROW
    assert model.fc.out_features == 10 and model.classes == CIFAR10
    x = torch.rand(1, 3, 224, 224)
    assert model(x).shape == (1, 10) and model.extract_feat(x).shape == (1, 512)


def test_get_model_pretrained_local_file(mm_checkpoint: tuple[Path, torch.nn.Module]) -> None:
    path, source = mm_checkpoint
    model = get_model(ROW, pretrained=path)
    assert same_weights(model, source) and model.classes == CIFAR10
    assert same_weights(get_model(ROW, pretrained=str(path)), source)


def test_get_model_pretrained_file_url(mm_checkpoint: tuple[Path, torch.nn.Module], hub_dir: Path) -> None:
    path, source = mm_checkpoint
    model = get_model(ROW, pretrained=path.as_uri())
    assert same_weights(model, source)
    assert (hub_dir / "checkpoints" / path.name).is_file()  # fetched once into torch.hub's cache


def test_a_download_that_does_not_match_its_hash_is_refused(
    mm_checkpoint: tuple[Path, torch.nn.Module], hub_dir: Path
) -> None:
    path, _ = mm_checkpoint
    wrong = path.with_name("resnet18_b16x8_cifar10_20210528-bd6371c8.pth")  # the published name, other bytes
    path.rename(wrong)
    with pytest.raises(UserError, match="its sha256 is .*expected bd6371c8"):
        get_model(ROW, pretrained=wrong.as_uri())
    assert not list((hub_dir / "checkpoints").glob("*"))


def test_pretrained_true_offline_is_one_clear_line(hub_dir: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    from resnet_repro import download

    def offline(*args: object, **kwargs: object) -> None:
        raise urllib.error.URLError("[Errno -3] Temporary failure in name resolution")

    monkeypatch.setattr(download.urllib.request, "urlopen", offline)
    monkeypatch.setattr(download, "BACKOFF_S", 0.0)
    with pytest.raises(UserError) as info:
        get_model(ROW, pretrained=True)
    message = str(info.value)
    assert "\n" not in message
    assert f"could not download {get_row(ROW).checkpoint_url}" in message
    assert "pass the local file" in message and str(hub_dir / "checkpoints") in message
    assert not list((hub_dir / "checkpoints").glob("*"))  # no partial file left in the cache


def test_get_model_from_our_checkpoint(tmp_path: Path) -> None:
    source = randomise(get_model(ROW))
    path = save_ours(source, tmp_path / "best.pt", classes=[f"k{i}" for i in range(10)])
    model = get_model(path)
    assert same_weights(model, source) and model.row_name == ROW and model.classes[3] == "k3"
    with pytest.raises(UserError, match="only applies to a row name"):
        get_model(path, pretrained=True)


def test_get_model_refuses_unknown_names(tmp_path: Path) -> None:
    with pytest.raises(UserError, match="neither a table row nor a checkpoint file"):
        get_model("resnet19_cifar")
    torch.save({"state_dict": {"backbone.conv1.weight": torch.zeros(1)}}, tmp_path / "mm.pth")
    with pytest.raises(UserError, match="holds no resnet_repro config"):
        get_model(tmp_path / "mm.pth")


def test_inference_model_path_pil_and_array(tmp_path: Path) -> None:
    source = randomise(get_model(ROW))
    ckpt = save_ours(source, tmp_path / "best.pt", classes=CIFAR10)
    rng = np.random.default_rng(0)
    array = rng.integers(0, 256, size=(32, 32, 3), dtype=np.uint8)
    image_path = tmp_path / "bird.png"
    cv2.imwrite(str(image_path), cv2.cvtColor(array, cv2.COLOR_RGB2BGR))  # lossless: the same RGB pixels back

    model = get_model(ckpt)
    results = [inference_model(model, image) for image in (image_path, Image.open(image_path), array)]
    results.append(inference_model(str(ckpt), array))  # a checkpoint file instead of a model
    for result in results:
        assert set(result) == {"pred_label", "pred_score", "pred_class", "pred_scores"}
        assert isinstance(result["pred_label"], int) and isinstance(result["pred_score"], float)
        assert result["pred_class"] == CIFAR10[result["pred_label"]]
        assert result["pred_scores"].shape == (10,) and np.isclose(result["pred_scores"].sum(), 1.0, atol=1e-5)
        assert result["pred_score"] == pytest.approx(float(result["pred_scores"].max()))
        assert result["pred_label"] == results[0]["pred_label"]
        np.testing.assert_allclose(result["pred_scores"], results[0]["pred_scores"], atol=1e-6)

    mean, std = torch.tensor(model.cfg["dataset"]["mean"]), torch.tensor(model.cfg["dataset"]["std"])
    x = (torch.from_numpy(array).permute(2, 0, 1)[None].float() - mean.view(1, 3, 1, 1)) / std.view(1, 3, 1, 1)
    with torch.no_grad():
        expected = torch.softmax(source.eval()(x), dim=1)[0].numpy()
    np.testing.assert_allclose(results[0]["pred_scores"], expected, atol=1e-5)


def test_inference_model_refuses_bad_input(tmp_path: Path) -> None:
    from resnet_repro.models import build_model

    with pytest.raises(UserError, match="carries no config"):
        inference_model(build_model(18, 10, small_input=True), np.zeros((32, 32, 3), np.uint8))
    model = get_model(ROW)
    with pytest.raises(UserError, match="uint8"):
        inference_model(model, np.zeros((32, 32, 3), np.float32))
    with pytest.raises(UserError, match="no image file"):
        inference_model(model, tmp_path / "missing.png")


def _expected_top1(model: torch.nn.Module, data: Path) -> float:
    """Top-1 of the tiny test split, computed here without the CLI's loader or metrics."""
    import pickle

    with open(data / "cifar-10-batches-py" / "test_batch", "rb") as f:
        batch = pickle.load(f, encoding="latin1")
    images = torch.from_numpy(batch["data"].reshape(-1, 3, 32, 32)).float()
    mean, std = torch.tensor(model.cfg["dataset"]["mean"]), torch.tensor(model.cfg["dataset"]["std"])
    with torch.no_grad():
        logits = model.eval()((images - mean.view(1, 3, 1, 1)) / std.view(1, 3, 1, 1))
    return 100.0 * float((logits.argmax(1) == torch.tensor(batch["labels"])).float().mean())


def test_cli_evaluates_and_logs_an_eval_run(tmp_path: Path, tiny_cifar: Path) -> None:
    model = randomise(get_model(ROW))
    ckpt = save_ours(model, tmp_path / "best.pt", classes=CIFAR10)
    args = [
        f"row={ROW}",
        f"checkpoint={ckpt}",
        f"dataset.root={tiny_cifar}",
        "dataset.download=false",
        "trainer.device=cpu",
        "trainer.num_workers=0",
        f"tracking.uri=sqlite:///{tmp_path}/mlflow.db",
    ]
    proc = run_cli(args, cwd=tmp_path, module="resnet_repro.test", timeout=300)
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert "test top-1" in proc.stdout

    runs = mlflow_runs(tmp_path)
    assert len(runs) == 1
    run = runs[0]
    tags, metrics = run.data.tags, run.data.metrics
    assert run.info.status == "FINISHED"
    assert tags["run_type"] == "eval" and tags["row"] == ROW and tags["checkpoint"] == str(ckpt)
    assert len(tags["config_hash"]) == 12 and tags["faithful"] == "true"
    assert metrics["test_top1"] == pytest.approx(_expected_top1(model, tiny_cifar), abs=1e-4)
    assert 0.0 <= metrics["test_top1"] <= metrics["test_top5"] <= 100.0


@pytest.mark.parametrize(
    ("args", "expected"),
    [
        ([f"row={ROW}", "checkpoint=missing.pt"], "no checkpoint at missing.pt"),
        (["row=resnet19_cifar", "checkpoint=missing.pt"], "row=resnet19_cifar is not an option"),
    ],
)
def test_cli_bad_input_is_one_line_and_exit_2(tmp_path: Path, args: list[str], expected: str) -> None:
    proc = run_cli([*args, f"tracking.uri=sqlite:///{tmp_path}/mlflow.db"], cwd=tmp_path, module="resnet_repro.test")
    assert proc.returncode == 2
    assert proc.stderr.strip().splitlines() == [proc.stderr.strip()]
    assert proc.stderr.startswith("resnet_repro: error:") and expected in proc.stderr
    assert "Traceback" not in proc.stderr
