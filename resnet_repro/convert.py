"""Loading weights into our timm-based ResNets: our checkpoints, plain state dicts, mmpretrain's checkpoints.

mmpretrain (and mmcls 0.x) save `{"state_dict": ..., "meta": ...}` with keys `backbone.*` and
`head.fc.*`. The names differ from timm's only in three places, mapped explicitly here:

- deep stem (v1c/v1d): mmpretrain's `stem.<i>.conv/bn` (three ConvModules) are timm's
  `conv1.0, conv1.1, conv1.3, conv1.4, conv1.6` and `bn1` (timm keeps the last BN outside the
  Sequential; the ReLUs at 2 and 5 have no weights);
- average-pool shortcuts (v1d): timm's `downsample` is always (pool or Identity, conv, BN). mmpretrain's
  `ResLayer` only adds the pool when the stride is not 1, so the stride-1 projection of a bottleneck's
  first stage is (conv, BN) at indices 0/1 where timm has 1/2; the stride-2 ones agree (1/2);
- the head: `head.fc.*` is timm's `fc.*`.

Every load is strict: a key the model expects but the checkpoint lacks, or one the checkpoint has
but the model does not, or a shape that differs, is a one-line UserError naming the first few.
The one tolerated gap is a missing `num_batches_tracked` BatchNorm counter (torch's own strict load
allows it too): it only matters for BN with momentum=None, and third-party conversions often omit it.
"""

from __future__ import annotations

import os
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any
from urllib.parse import urlparse

import torch
from torch import nn

from resnet_repro import checkpoint
from resnet_repro.download import DownloadError, fetch
from resnet_repro.errors import UserError

SHOWN_KEYS = 4  # keys named in an error message; the rest are counted
BLOCK_LAYERS = ("conv1", "bn1", "conv2", "bn2", "conv3", "bn3")
# timm's deep stem Sequential index -> mmpretrain's ConvModule part (2 and 5 are ReLUs)
DEEP_STEM = {"0": "stem.0.conv", "1": "stem.0.bn", "3": "stem.1.conv", "4": "stem.1.bn", "6": "stem.2.conv"}
TOLERATED_MISSING = ".num_batches_tracked"
Tensors = Mapping[str, torch.Tensor]


@dataclass
class Loaded:
    """What a load found besides the weights: the format, the class names and the file's metadata."""

    kind: str  # "ours" (resnet_repro checkpoint or plain state dict) or "mmpretrain"
    classes: list[str] | None = None
    meta: dict[str, Any] = field(default_factory=dict)


# ---- naming -----------------------------------------------------------------------------------


def describe(model: nn.Module) -> str:
    """ "ResNet-50 v1d"-style name of a model's architecture, for error messages."""
    blocks = sum(len(getattr(model, f"layer{i}")) for i in range(1, 5))
    depth = 2 + blocks * (3 if hasattr(model.layer1[0], "conv3") else 2)  # stem + fc, 2 or 3 convs per block
    if isinstance(model.conv1, nn.Sequential):
        stem = "v1d" if _avg_down(model) else "v1c"
    else:
        stem = "cifar" if isinstance(model.maxpool, nn.Identity) else "v1b"
    return f"ResNet-{depth} {stem}, {model.fc.out_features} classes"


def _avg_down(model: nn.Module) -> bool:
    return any(isinstance(m, nn.AvgPool2d) for m in model.modules())


def _downsample_shift(model: nn.Module, block_path: str) -> int:
    """-1 where timm's average-pool shortcut has an Identity in place of the pool (mmpretrain has nothing)."""
    downsample = model.get_submodule(f"{block_path}.downsample")
    return -1 if isinstance(downsample[0], nn.Identity) else 0


def _mm_module(model: nn.Module, module: str) -> str:
    """mmpretrain's name of one of our parameterised modules (dotted path without the tensor name)."""
    parts = module.split(".")
    deep = isinstance(model.conv1, nn.Sequential)
    if parts == ["fc"]:
        return "head.fc"
    if parts[0] == "conv1" and deep and len(parts) == 2 and parts[1] in DEEP_STEM:
        return f"backbone.{DEEP_STEM[parts[1]]}"
    if parts == ["bn1"]:
        return "backbone.stem.2.bn" if deep else "backbone.bn1"
    if parts == ["conv1"] and not deep:
        return "backbone.conv1"
    if parts[0] in ("layer1", "layer2", "layer3", "layer4") and len(parts) >= 3:
        block = ".".join(parts[:2])
        if len(parts) == 3 and parts[2] in BLOCK_LAYERS:
            return f"backbone.{module}"
        if len(parts) == 4 and parts[2] == "downsample":
            return f"backbone.{block}.downsample.{int(parts[3]) + _downsample_shift(model, block)}"
    raise ValueError(f"no mmpretrain name for module {module!r} of {describe(model)}")


def mmpretrain_names(model: nn.Module) -> dict[str, str]:
    """Our state-dict key -> mmpretrain's, for every key of `model` (parameters and BN buffers)."""
    names = {}
    for key in model.state_dict():
        module, _, tensor = key.rpartition(".")
        names[key] = f"{_mm_module(model, module)}.{tensor}"
    return names


# ---- strict matching --------------------------------------------------------------------------


def _listing(keys: list[str]) -> str:
    shown = ", ".join(keys[:SHOWN_KEYS])
    return f"{shown}, ... ({len(keys)} in all)" if len(keys) > SHOWN_KEYS else shown


def _check_keys(expected: Iterable[str], found: Iterable[str], what: str) -> None:
    """UserError naming the missing and the unexpected keys, in model / file order (BN counters may be missing)."""
    expected, found = list(expected), list(found)
    wanted, present = set(expected), set(found)
    missing = [k for k in expected if k not in present and not k.endswith(TOLERATED_MISSING)]
    unexpected = [k for k in found if k not in wanted]
    if not missing and not unexpected:
        return
    parts = [f"missing keys: {_listing(missing)}"] if missing else []
    parts += [f"unexpected keys: {_listing(unexpected)}"] if unexpected else []
    raise UserError(f"{what}: {'; '.join(parts)}")


def _check_shapes(model_sd: Tensors, state_dict: Tensors, what: str) -> None:
    bad = [
        f"{k} (checkpoint {tuple(v.shape)}, model {tuple(model_sd[k].shape)})"
        for k, v in state_dict.items()
        if k in model_sd and tuple(v.shape) != tuple(model_sd[k].shape)
    ]
    if bad:
        raise UserError(f"{what}: shape mismatch: {_listing(bad)}")


def from_mmpretrain(state_dict: Tensors, model: nn.Module, *, backbone_only: bool = False) -> dict[str, torch.Tensor]:
    """An mmpretrain ResNet state dict renamed to `model`'s keys; any key that does not map is a UserError.

    backbone_only: use only `backbone.*` (mmpretrain's `init_cfg` prefix "backbone."); the checkpoint's
    head is ignored and the model's head keeps its own weights.
    """
    names = mmpretrain_names(model)
    if backbone_only:
        names = {ours: mm for ours, mm in names.items() if mm.startswith("backbone.")}
        state_dict = {k: v for k, v in state_dict.items() if k.startswith("backbone.")}
    _check_keys(names.values(), state_dict, f"mmpretrain checkpoint does not fit {describe(model)}")
    return {ours: state_dict[mm] for ours, mm in names.items() if mm in state_dict}


def load_state_dict_strict(model: nn.Module, state_dict: Tensors, what: str, *, backbone_only: bool = False) -> None:
    """Load our-named tensors, refusing any missing, unexpected or mis-shaped key (one line)."""
    model_sd = model.state_dict()
    expected = [k for k in model_sd if not (backbone_only and k.startswith("fc."))]
    found = [k for k in state_dict if not (backbone_only and k.startswith("fc."))]
    _check_keys(expected, found, f"{what} does not fit {describe(model)}")
    chosen = {k: state_dict[k] for k in found}
    _check_shapes(model_sd, chosen, f"{what} does not fit {describe(model)}")
    # strict=False only lets through the tolerated BN counters and, backbone_only, the head: both checked above
    model.load_state_dict(chosen, strict=False)


# ---- reading files and URLs -------------------------------------------------------------------


def is_url(source: str | os.PathLike) -> bool:
    return "://" in str(source)


def cached_download(url: str, check_hash: bool = False) -> Path:
    """`url` in torch.hub's checkpoint cache (`<hub dir>/checkpoints/<file name>`), downloaded once.

    check_hash: the name's `-<hex>.` suffix is the start of the file's sha256 (mmcv's publish_model and
    torchvision name checkpoints so); a download that does not match it is refused. (torch.hub's
    load_state_dict_from_url does this too, but it also unpickles: loading stays checkpoint.load's, so
    every file goes through the same weights_only rule and one-line errors.)
    """
    name = os.path.basename(urlparse(url).path)
    if not name:
        raise UserError(f"{url} does not name a file; give the URL of a checkpoint file")
    target = Path(torch.hub.get_dir()) / "checkpoints" / name
    if target.is_file():
        return target
    target.parent.mkdir(parents=True, exist_ok=True)
    match = torch.hub.HASH_REGEX.search(name) if check_hash else None
    try:  # our downloader: torch.hub's has no timeout (resnet_repro.download says why)
        fetch(url, target, checksum=("sha256", match.group(1)) if match else None)
    except DownloadError as err:
        raise UserError(
            f"{err}; fetch it where there is network and pass the local file instead of the URL, or copy it to "
            f"{target} (torch.hub's cache)"
        ) from None
    return target


def read_checkpoint(source: str | os.PathLike, trusted: bool = False) -> Any:
    """The object at a local path or URL (URLs through torch.hub's cache), loaded without running code."""
    path = cached_download(str(source), check_hash=True) if is_url(source) else Path(source)
    return checkpoint.load(path, trusted=trusted)


def split_checkpoint(obj: Any, source: str | os.PathLike) -> tuple[dict[str, torch.Tensor], Loaded]:
    """(state dict, what else the file says) of our checkpoints, mmpretrain's, or a plain state dict."""
    if not isinstance(obj, Mapping):
        raise UserError(f"{source} is not a checkpoint: it holds a {type(obj).__name__}, not a dict")
    if isinstance(obj.get("model"), Mapping):  # ours: {"model": ..., "config": ..., "classes": ...}
        return dict(obj["model"]), Loaded("ours", _names(obj.get("classes")), dict(obj))
    if isinstance(obj.get("state_dict"), Mapping):  # mmpretrain / mmcls: {"state_dict": ..., "meta": ...}
        state_dict, meta = dict(obj["state_dict"]), dict(obj.get("meta") or {})
    elif obj and all(isinstance(v, torch.Tensor) for v in obj.values()):
        state_dict, meta = dict(obj), {}
    else:
        keys = ", ".join(map(str, list(obj)[:SHOWN_KEYS]))
        raise UserError(f"{source} is not a checkpoint: no 'model' or 'state_dict' entry (top-level keys: {keys})")
    if any(k.startswith(("backbone.", "head.")) for k in state_dict):
        return state_dict, Loaded("mmpretrain", _mm_classes(meta), meta)
    return state_dict, Loaded("ours", None, meta)


def _names(classes: Any) -> list[str] | None:
    return [str(c) for c in classes] if isinstance(classes, list | tuple) and classes else None


def _mm_classes(meta: Mapping[str, Any]) -> list[str] | None:
    """mmcls 0.x stores meta["CLASSES"]; mmpretrain 1.x meta["dataset_meta"]["classes"]."""
    dataset_meta = meta.get("dataset_meta")
    nested = dataset_meta.get("classes") if isinstance(dataset_meta, Mapping) else None
    return _names(meta.get("CLASSES")) or _names(nested)


# ---- entry points -----------------------------------------------------------------------------


def apply_checkpoint(model: nn.Module, obj: Any, source: str | os.PathLike, *, backbone_only: bool = False) -> Loaded:
    """Load an already read checkpoint object (ours, mmpretrain's or a plain state dict) into `model`, strictly."""
    state_dict, loaded = split_checkpoint(obj, source)
    if loaded.kind == "mmpretrain":
        try:
            state_dict = from_mmpretrain(state_dict, model, backbone_only=backbone_only)
        except UserError as err:
            raise UserError(f"{source}: {err}") from None
    load_state_dict_strict(model, state_dict, f"checkpoint {source}", backbone_only=backbone_only)
    return loaded


def load_checkpoint(
    model: nn.Module, source: str | os.PathLike, *, backbone_only: bool = False, trusted: bool = False
) -> Loaded:
    """Load `source` (path or URL; ours, mmpretrain's or a plain state dict) into `model`, strictly."""
    return apply_checkpoint(model, read_checkpoint(source, trusted), source, backbone_only=backbone_only)


def load_pretrained(
    model: nn.Module, source: str | os.PathLike, prefix: str | None = None, trusted: bool = False
) -> Loaded:
    """Initialise `model` from a checkpoint (the recipe's `init:`); prefix "backbone." loads all but the head."""
    if prefix not in (None, "", "backbone."):
        raise UserError(f"recipe.init.prefix={prefix} is not supported; allowed: null, backbone.")
    return load_checkpoint(model, source, backbone_only=prefix == "backbone.", trusted=trusted)
