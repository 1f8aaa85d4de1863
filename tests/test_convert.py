"""mmpretrain checkpoints load strictly into our models and compute the same function.

The fixtures are written from mmpretrain's published layout (ResNet / ResLayer / ConvModule naming),
listed independently here, never by calling resnet_repro.convert and without mmpretrain installed.
"""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from resnet_repro import convert
from resnet_repro.errors import UserError
from resnet_repro.models import build_model
from tests.conftest import randomise

STEM_FLAGS = {
    "v1b": {},
    "v1c": {"deep_stem": True},
    "v1d": {"deep_stem": True, "avg_down": True},
    "cifar": {"small_input": True},
}
STAGES = {18: ("basic", (2, 2, 2, 2)), 34: ("basic", (3, 4, 6, 3)), 50: ("bottleneck", (3, 4, 6, 3))}
TENSORS = {
    "conv": ("weight",),
    "bn": ("weight", "bias", "running_mean", "running_var", "num_batches_tracked"),
    "fc": ("weight", "bias"),
}


def _stem(stem: str) -> list[tuple[str, str, str]]:
    if stem in ("v1c", "v1d"):  # three ConvModules; ours: Sequential(conv, bn, relu, conv, bn, relu, conv) + bn1
        ours = [("conv1.0", "conv1.1"), ("conv1.3", "conv1.4"), ("conv1.6", "bn1")]
        return [
            entry
            for i, (conv, bn) in enumerate(ours)
            for entry in ((f"backbone.stem.{i}.conv", conv, "conv"), (f"backbone.stem.{i}.bn", bn, "bn"))
        ]
    return [("backbone.conv1", "conv1", "conv"), ("backbone.bn1", "bn1", "bn")]


def _shortcut(prefix: str, stem: str, stride: int) -> list[tuple[str, str, str]]:
    # mmpretrain: [AvgPool (v1d, stride 2 only), conv, BN]; ours (timm): v1d always (pool | Identity, conv, BN)
    mm_conv = 1 if stem == "v1d" and stride != 1 else 0
    our_conv = 1 if stem == "v1d" else 0
    return [
        (f"backbone.{prefix}.downsample.{mm_conv}", f"{prefix}.downsample.{our_conv}", "conv"),
        (f"backbone.{prefix}.downsample.{mm_conv + 1}", f"{prefix}.downsample.{our_conv + 1}", "bn"),
    ]


def mmpretrain_layout(depth: int, stem: str) -> list[tuple[str, str, str]]:
    """(mmpretrain module, our module, kind) for every parameterised module of a ResNet."""
    block, counts = STAGES[depth]
    layers = ("conv1", "bn1", "conv2", "bn2") + (("conv3", "bn3") if block == "bottleneck" else ())
    expansion = 4 if block == "bottleneck" else 1
    out, in_ch = _stem(stem), 64
    for s, n in enumerate(counts, start=1):
        stride, out_ch = (1 if s == 1 else 2), 64 * 2 ** (s - 1) * expansion
        for b in range(n):
            prefix = f"layer{s}.{b}"
            out += [(f"backbone.{prefix}.{name}", f"{prefix}.{name}", name[:-1]) for name in layers]
            if b == 0 and (stride != 1 or in_ch != out_ch):
                out += _shortcut(prefix, stem, stride)
        in_ch = out_ch
    return [*out, ("head.fc", "fc", "fc")]


def mmpretrain_state_dict(model: torch.nn.Module, depth: int, stem: str) -> dict[str, torch.Tensor]:
    """`model`'s tensors under mmpretrain's names (the layout above)."""
    ours = model.state_dict()
    return {
        f"{mm}.{t}": ours[f"{mine}.{t}"].clone()
        for mm, mine, kind in mmpretrain_layout(depth, stem)
        for t in TENSORS[kind]
    }


def randomised(depth: int, stem: str, num_classes: int = 10, seed: int = 0) -> torch.nn.Module:
    return randomise(build_model(depth, num_classes, **STEM_FLAGS[stem]), seed)


def save_mm(model: torch.nn.Module, depth: int, stem: str, path: Path, **extra: torch.Tensor) -> Path:
    state = {**mmpretrain_state_dict(model, depth, stem), **extra}
    torch.save({"state_dict": state, "meta": {"CLASSES": [f"c{i}" for i in range(model.fc.out_features)]}}, path)
    return path


def _input(stem: str) -> torch.Tensor:
    return torch.randn(2, 3, 32 if stem == "cifar" else 64, 32 if stem == "cifar" else 64)


@pytest.mark.parametrize("depth", [18, 50])
@pytest.mark.parametrize("stem", ["v1b", "v1c", "v1d", "cifar"])
def test_mmpretrain_checkpoint_loads_strictly_and_computes_the_same(tmp_path: Path, stem: str, depth: int) -> None:
    source = randomised(depth, stem)
    path = save_mm(source, depth, stem, tmp_path / "mm.pth")
    target = build_model(depth, 10, **STEM_FLAGS[stem]).eval()
    fixture = torch.load(path)["state_dict"]

    assert set(fixture) == set(convert.mmpretrain_names(target).values())  # the layouts agree, key for key
    assert set(convert.from_mmpretrain(fixture, target)) == set(target.state_dict())
    loaded = convert.load_checkpoint(target, path)

    assert loaded.kind == "mmpretrain" and loaded.classes == [f"c{i}" for i in range(10)]
    for key, value in source.state_dict().items():
        assert torch.equal(target.state_dict()[key], value), key
    x = _input(stem)
    with torch.no_grad():
        assert torch.allclose(target(x), source(x), atol=1e-6)
        assert torch.allclose(target.extract_feat(x), source.extract_feat(x), atol=1e-6)


def test_v1d_stride1_projection_has_no_pool_in_mmpretrain() -> None:
    """mmpretrain adds the AvgPool only for stride 2: stage 1's projection is (conv, BN) at 0/1."""
    fixture = mmpretrain_state_dict(randomised(50, "v1d"), 50, "v1d")
    assert fixture["backbone.layer1.0.downsample.0.weight"].shape == (256, 64, 1, 1)
    assert "backbone.layer1.0.downsample.1.running_mean" in fixture
    assert not any(k.startswith("backbone.layer1.0.downsample.2.") for k in fixture)
    assert fixture["backbone.layer2.0.downsample.1.weight"].shape == (512, 256, 1, 1)
    assert "backbone.layer2.0.downsample.2.running_var" in fixture
    names = convert.mmpretrain_names(build_model(50, 10, deep_stem=True, avg_down=True))
    assert names["layer1.0.downsample.1.weight"] == "backbone.layer1.0.downsample.0.weight"
    assert names["layer2.0.downsample.1.weight"] == "backbone.layer2.0.downsample.1.weight"


def _one_line_error(model: torch.nn.Module, source: Path, **kwargs: object) -> str:
    with pytest.raises(UserError) as info:
        convert.load_checkpoint(model, source, **kwargs)
    message = str(info.value)
    assert "\n" not in message
    return message


def test_unexpected_key_is_named(tmp_path: Path) -> None:
    extra = {"backbone.layer5.0.conv1.weight": torch.zeros(1)}
    path = save_mm(randomised(18, "v1c"), 18, "v1c", tmp_path / "mm.pth", **extra)
    message = _one_line_error(build_model(18, 10, deep_stem=True), path)
    assert "unexpected keys: backbone.layer5.0.conv1.weight" in message and "missing" not in message


def test_missing_key_is_named(tmp_path: Path) -> None:
    state = mmpretrain_state_dict(randomised(50, "v1d"), 50, "v1d")
    del state["backbone.layer1.0.downsample.0.weight"]
    torch.save({"state_dict": state}, tmp_path / "mm.pth")
    message = _one_line_error(build_model(50, 10, deep_stem=True, avg_down=True), tmp_path / "mm.pth")
    assert "missing keys: backbone.layer1.0.downsample.0.weight" in message


def test_wrong_stem_is_refused(tmp_path: Path) -> None:
    path = save_mm(randomised(18, "v1b"), 18, "v1b", tmp_path / "v1b.pth")
    message = _one_line_error(build_model(18, 10, deep_stem=True), path)
    assert "backbone.stem.0.conv.weight" in message and "backbone.conv1.weight" in message
    assert "ResNet-18 v1c" in message


def test_error_messages_name_every_depth_and_stem() -> None:
    from resnet_repro.convert import describe

    named = [describe(build_model(d, 10)) for d in (18, 34, 50, 101, 152)]
    assert named == [f"ResNet-{d} v1b, 10 classes" for d in (18, 34, 50, 101, 152)]
    assert describe(build_model(50, 200, deep_stem=True, avg_down=True)) == "ResNet-50 v1d, 200 classes"
    assert describe(build_model(18, 100, small_input=True)) == "ResNet-18 cifar, 100 classes"


def test_wrong_head_shape_is_refused(tmp_path: Path) -> None:
    path = save_mm(randomised(18, "cifar", num_classes=10), 18, "cifar", tmp_path / "mm.pth")
    message = _one_line_error(build_model(18, 100, small_input=True), path)
    assert "shape mismatch: fc.weight (checkpoint (10, 512), model (100, 512))" in message


def test_missing_bn_counters_are_tolerated(tmp_path: Path) -> None:
    source = randomised(18, "v1b")
    state = {k: v for k, v in mmpretrain_state_dict(source, 18, "v1b").items() if "num_batches_tracked" not in k}
    torch.save({"state_dict": state}, tmp_path / "mm.pth")
    target = build_model(18, 10).eval()
    convert.load_checkpoint(target, tmp_path / "mm.pth")
    x = _input("v1b")
    with torch.no_grad():
        assert torch.allclose(target(x), source(x), atol=1e-6)


def test_backbone_prefix_loads_all_but_the_head(tmp_path: Path) -> None:
    """The CUB init: an IN-21k checkpoint's backbone into a 200-class model, whose head stays as built."""
    path = save_mm(randomised(50, "v1b", num_classes=30), 50, "v1b", tmp_path / "in21k.pth")
    source = torch.load(path)["state_dict"]
    target = build_model(50, 200)
    head = target.fc.weight.detach().clone()
    convert.load_pretrained(target, path, prefix="backbone.")
    assert torch.equal(target.fc.weight, head)
    assert torch.equal(target.layer4[2].conv3.weight, source["backbone.layer4.2.conv3.weight"])
    del source["backbone.bn1.weight"]
    torch.save({"state_dict": source}, path)
    assert "missing keys: backbone.bn1.weight" in _one_line_error(build_model(50, 200), path, backbone_only=True)
    with pytest.raises(UserError, match="prefix"):
        convert.load_pretrained(target, path, prefix="head.")


def test_our_checkpoint_and_plain_state_dict(tmp_path: Path) -> None:
    source = randomised(18, "cifar")
    torch.save({"model": source.state_dict(), "classes": list("abcdefghij")}, tmp_path / "ours.pt")
    torch.save(source.state_dict(), tmp_path / "plain.pt")
    for name in ("ours.pt", "plain.pt"):
        target = build_model(18, 10, small_input=True)
        loaded = convert.load_checkpoint(target, tmp_path / name)
        assert loaded.kind == "ours"
        assert all(torch.equal(target.state_dict()[k], v) for k, v in source.state_dict().items())
    assert loaded.classes is None  # a plain state dict names no classes
    assert convert.load_checkpoint(target, tmp_path / "ours.pt").classes == list("abcdefghij")
    torch.save({**source.state_dict(), "extra.weight": torch.zeros(1)}, tmp_path / "extra.pt")
    assert "unexpected keys: extra.weight" in _one_line_error(target, tmp_path / "extra.pt")


def test_not_a_checkpoint(tmp_path: Path) -> None:
    torch.save({"epoch": 3}, tmp_path / "odd.pt")
    assert "not a checkpoint" in _one_line_error(build_model(18, 10), tmp_path / "odd.pt")
    assert "no checkpoint at" in _one_line_error(build_model(18, 10), tmp_path / "absent.pt")
