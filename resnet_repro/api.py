"""The table's Python API, as in mmpretrain's README: `get_model`, `inference_model`, `model.extract_feat`.

    from resnet_repro import get_model, inference_model
    model = get_model("resnet18_8xb16_cifar10", pretrained=True)   # the row's published checkpoint
    inference_model(model, "bird.jpg")["pred_class"]

Models built here carry their resolved config (`model.cfg`, a plain dict), `model.row_name` and
`model.classes`, so `inference_model` can apply the row's test pipeline and normalisation.
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from resnet_repro.errors import UserError
from resnet_repro.models import ResNet

CIFAR10_CLASSES = ("airplane", "automobile", "bird", "cat", "deer", "dog", "frog", "horse", "ship", "truck")
_CIFAR100_WORDS = """apple aquarium_fish baby bear beaver bed bee beetle bicycle bottle bowl boy bridge bus
    butterfly camel can
    castle caterpillar cattle chair chimpanzee clock cloud cockroach couch crab crocodile cup dinosaur dolphin
    elephant flatfish forest fox girl hamster house kangaroo keyboard lamp lawn_mower leopard lion lizard lobster
    man maple_tree motorcycle mountain mouse mushroom oak_tree orange orchid otter palm_tree pear pickup_truck
    pine_tree plain plate poppy porcupine possum rabbit raccoon ray road rocket rose sea seal shark shrew skunk
    skyscraper snail snake spider squirrel streetcar sunflower sweet_pepper table tank telephone television tiger
    tractor train trout tulip turtle wardrobe whale willow_tree wolf woman worm"""
CIFAR100_CLASSES = tuple(_CIFAR100_WORDS.split())  # the fine labels, in the archive's (alphabetical) order
KNOWN_CLASSES = {"cifar10": CIFAR10_CLASSES, "cifar100": CIFAR100_CLASSES, "demo": tuple(map(str, range(10)))}

ImageLike = str | os.PathLike | np.ndarray | Any  # Any: a PIL image (PIL is imported only when given one)


def default_classes(dataset: Mapping[str, Any]) -> list[str]:
    """The dataset's class names where they are fixed (CIFAR, digits), else the label indices as text."""
    known = KNOWN_CLASSES.get(str(dataset["name"]))
    n = int(dataset["num_classes"])
    return list(known) if known and len(known) == n else [str(i) for i in range(n)]


def _build(cfg: Mapping[str, Any], row_name: str, classes: list[str] | None) -> ResNet:
    """The config's model, with what inference needs attached."""
    from resnet_repro.models import build_model_from_cfg

    model = build_model_from_cfg(cfg)
    model.cfg, model.row_name = dict(cfg), row_name
    model.classes = classes
    return model


def _attach_classes(model: ResNet, classes: list[str] | None) -> ResNet:
    """Names from the checkpoint when it has one per output, else the dataset's."""
    fits = classes is not None and len(classes) == model.fc.out_features
    model.classes = list(classes) if fits else default_classes(model.cfg["dataset"])
    return model


def get_model(
    row_or_checkpoint: str | os.PathLike, pretrained: bool | str | os.PathLike = False, *, trusted: bool = False
) -> ResNet:
    """A table row's model, or the model of one of our checkpoints (built from the config it stores).

    pretrained: False (mmpretrain's initialisation), True (the row's published checkpoint, from
    reference.csv, through torch.hub's cache), or a path / URL of a checkpoint (ours or mmpretrain's).
    trusted: unpickle files that hold more than tensors and plain data (may run code: trusted files only).
    """
    from resnet_repro.config import compose_row, to_plain
    from resnet_repro.convert import apply_checkpoint, load_checkpoint, read_checkpoint
    from resnet_repro.rows import all_rows, find_row

    name = os.fspath(row_or_checkpoint)
    row = find_row(name)
    if row is not None:
        model = _build(to_plain(compose_row(name)), name, None)
        source = row.checkpoint_url if pretrained is True else pretrained
        loaded = load_checkpoint(model, source, trusted=trusted) if source else None
        return _attach_classes(model, loaded.classes if loaded else None)
    if "://" not in name and not Path(name).is_file():
        rows = ", ".join(r.name for r in all_rows())
        raise UserError(f"{name!r} is neither a table row nor a checkpoint file; rows: {rows}")
    if pretrained not in (False, None):
        raise UserError("pretrained= only applies to a row name; a checkpoint already holds its weights")
    obj = read_checkpoint(name, trusted)
    if not (isinstance(obj, Mapping) and isinstance(obj.get("config"), Mapping)):
        raise UserError(
            f"{name} holds no resnet_repro config, so its architecture is unknown; "
            f"load it into a row's model: get_model('<row>', pretrained={name!r})"
        )
    model = _build(obj["config"], str(obj.get("row_name") or obj["config"].get("row_name", "")), None)
    return _attach_classes(model, apply_checkpoint(model, obj, name).classes)


def _model_of(row_or_model: str | os.PathLike | nn.Module) -> nn.Module:
    if isinstance(row_or_model, nn.Module):
        if not isinstance(getattr(row_or_model, "cfg", None), Mapping):
            raise UserError("this model carries no config (model.cfg); build it with resnet_repro.get_model")
        return row_or_model
    from resnet_repro.rows import find_row

    name = os.fspath(row_or_model)
    return get_model(name, pretrained=True) if find_row(name) else get_model(name)


def _as_array(image: ImageLike) -> np.ndarray:
    """RGB H x W x 3 uint8 from a file (decoded with OpenCV, like the datasets), a PIL image or an array."""
    if isinstance(image, str | os.PathLike):
        from resnet_repro.data.datasets import read_image

        if not Path(image).is_file():
            raise UserError(f"no image file at {image}")
        return read_image(image)
    if isinstance(image, np.ndarray):
        arr = np.repeat(image[..., None], 3, axis=-1) if image.ndim == 2 else image
        if arr.ndim != 3 or arr.shape[-1] not in (3, 4) or arr.dtype != np.uint8:
            raise UserError(f"image array must be H x W x 3 RGB uint8; got shape {image.shape}, dtype {image.dtype}")
        return np.ascontiguousarray(arr[..., :3])
    if hasattr(image, "convert") and hasattr(image, "size"):  # a PIL image
        return np.asarray(image.convert("RGB"))
    raise UserError(f"image must be a path, a PIL image or an H x W x 3 uint8 array; got {type(image).__name__}")


@torch.no_grad()
def inference_model(row_or_model: str | os.PathLike | nn.Module, image: ImageLike) -> dict[str, Any]:
    """Classify one image with the row's test pipeline and normalisation (mmpretrain's `inference_model`).

    row_or_model: a row name (its published checkpoint), one of our checkpoint files, or a model
    from `get_model`. Returns pred_label (int), pred_score (softmax probability), pred_class (name)
    and pred_scores (every class's probability, a numpy array).
    """
    from resnet_repro.data.preprocess import Preprocessor
    from resnet_repro.data.transforms import build_pipeline

    model = _model_of(row_or_model)
    cfg = model.cfg
    device = next(model.parameters()).device
    images = build_pipeline(cfg["recipe"]["test_pipeline"])(_as_array(image))[None]
    size = int(cfg["dataset"]["input_size"])
    if tuple(images.shape[-2:]) != (size, size):  # CIFAR rows have no resize in their test transform
        raise UserError(
            f"{model.row_name} expects {size}x{size} images (its test transform gives "
            f"{images.shape[-1]}x{images.shape[-2]}); resize the image to {size}x{size} first"
        )
    x = Preprocessor(list(cfg["dataset"]["mean"]), list(cfg["dataset"]["std"]), device, False)(images.to(device))
    was_training = model.training
    model.eval()
    try:
        scores = torch.softmax(model(x).float(), dim=1)[0].cpu()
    finally:
        model.train(was_training)
    label = int(scores.argmax())
    classes = getattr(model, "classes", None) or default_classes(cfg["dataset"])
    return {
        "pred_label": label,
        "pred_score": float(scores[label]),
        "pred_class": str(classes[label]),
        "pred_scores": scores.numpy(),
    }
