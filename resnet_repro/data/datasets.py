"""Datasets as (uint8 HxWx3 RGB array, label) pairs: CIFAR archives, image folders, CUB, offline digits.

Images are decoded with OpenCV, as mmpretrain does, and handed to the recipe's pipeline untouched.
"""

from __future__ import annotations

import os
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import cv2
import numpy as np
import torchvision
from torch.utils.data import Dataset
from torchvision.datasets.folder import IMG_EXTENSIONS, find_classes, make_dataset
from torchvision.datasets.utils import check_integrity

from resnet_repro.errors import UserError


class DataError(UserError):
    """Data that is missing, unreadable or in the wrong layout."""


class ArrayDataset(Dataset):
    """Images held in memory (CIFAR, digits): N x H x W x 3 uint8."""

    def __init__(self, images: np.ndarray, labels: Sequence[int], classes: Sequence[str]) -> None:
        self.images, self.labels, self.classes = images, np.asarray(labels, dtype=np.int64), list(classes)

    def __len__(self) -> int:
        return len(self.labels)

    def __getitem__(self, i: int) -> tuple[np.ndarray, int]:
        return self.images[i], int(self.labels[i])


def read_image(path: str | os.PathLike) -> np.ndarray:
    """Decode with OpenCV (mmpretrain's backend) into RGB; an unreadable file is a DataError naming it."""
    data = np.fromfile(path, dtype=np.uint8)
    img = cv2.imdecode(data, cv2.IMREAD_COLOR) if data.size else None
    if img is None:
        raise DataError(f"cannot decode image {path} (corrupt or not an image); remove or replace it")
    return cv2.cvtColor(img, cv2.COLOR_BGR2RGB)


class FileDataset(Dataset):
    """Images on disk, decoded on access."""

    def __init__(self, samples: Sequence[tuple[str, int]], classes: Sequence[str]) -> None:
        self.samples, self.classes = list(samples), list(classes)
        self.labels = np.asarray([label for _, label in self.samples], dtype=np.int64)

    def __len__(self) -> int:
        return len(self.samples)

    def __getitem__(self, i: int) -> tuple[np.ndarray, int]:
        path, label = self.samples[i]
        return read_image(path), label


def image_folder(folder: Path) -> FileDataset:
    """`folder/<class>/<image>`: torchvision's class discovery (sorted names) and file listing."""
    if not folder.is_dir():
        raise DataError(f"no folder {folder}; expected {folder}/<class>/<image> (an ImageFolder layout)")
    try:
        classes, class_to_idx = find_classes(str(folder))
        samples = make_dataset(str(folder), class_to_idx, extensions=IMG_EXTENSIONS)
    except (FileNotFoundError, RuntimeError) as err:
        raise DataError(f"{folder}: {err}") from None
    return FileDataset(samples, classes)


class _OfficialCIFAR10(torchvision.datasets.CIFAR10):
    """torchvision's CIFAR-10 reader, accepting any copy in the official python format.

    torchvision refuses files whose md5 differs from the official release (so a hand-made set in
    the same format cannot load); here the md5 only decides `verified`, recorded with each run.
    """

    @classmethod
    def present(cls, root: str | Path) -> bool:
        return all((Path(root) / cls.base_folder / name).is_file() for name, _ in cls.train_list + cls.test_list)

    def _check_integrity(self) -> bool:
        return self.present(self.root)

    def _load_meta(self) -> None:
        import pickle

        with open(Path(self.root) / self.base_folder / self.meta["filename"], "rb") as f:
            self.classes = pickle.load(f, encoding="latin1")[self.meta["key"]]
        self.class_to_idx = {c: i for i, c in enumerate(self.classes)}

    @property
    def verified(self) -> bool:
        files = self.train_list + self.test_list + [(self.meta["filename"], self.meta["md5"])]
        return all(check_integrity(str(Path(self.root) / self.base_folder / name), md5) for name, md5 in files)


class _OfficialCIFAR100(_OfficialCIFAR10, torchvision.datasets.CIFAR100):
    pass


def cifar(cfg: Mapping[str, Any], train: bool) -> ArrayDataset:
    cls = {"cifar10": _OfficialCIFAR10, "cifar100": _OfficialCIFAR100}[cfg["name"]]
    root = Path(cfg["root"])
    folder = root / cls.base_folder
    if not cls.present(root) and not cfg["download"]:
        raise DataError(
            f"no {cfg['name']} python archives in {folder}; set dataset.download=true, extract "
            f"{cls.filename} into {root}, or use dataset.format=imagefolder"
        )
    try:
        ds = cls(str(root), train=train, download=bool(cfg["download"]))
    except (OSError, RuntimeError) as err:  # no network, a refused or partial download
        raise DataError(
            f"could not download {cfg['name']} into {root} ({err}); download {cls.url} and "
            f"extract it there, or set dataset.root"
        ) from None
    out = ArrayDataset(ds.data, ds.targets, ds.classes)
    out.verified = ds.verified
    return out


CUB_URL = "https://data.caltech.edu/records/65de6-vp158/files/CUB_200_2011.tgz"
CUB_MD5 = "97eceeb196236b17998738112f37df78"


def cub(cfg: Mapping[str, Any], train: bool) -> FileDataset:
    """CUB-200-2011 with its official split (images.txt, image_class_labels.txt, train_test_split.txt)."""
    root = Path(cfg["root"])
    if not (root / "images.txt").is_file() and cfg["download"]:
        from torchvision.datasets.utils import download_and_extract_archive

        try:
            download_and_extract_archive(CUB_URL, str(root.parent), md5=CUB_MD5)
        except (OSError, RuntimeError) as err:
            raise DataError(
                f"could not download CUB-200-2011 into {root.parent} ({err}); download {CUB_URL} "
                f"and extract it there, or set dataset.root"
            ) from None
    needed = ("images.txt", "image_class_labels.txt", "train_test_split.txt")
    missing = [name for name in needed if not (root / name).is_file()]
    if missing:
        raise DataError(
            f"{root} is not a CUB_200_2011 folder (missing {', '.join(missing)}); set dataset.root "
            f"or dataset.download=true"
        )

    def table(name: str) -> dict[str, str]:
        return dict(line.split(maxsplit=1) for line in (root / name).read_text().splitlines() if line.strip())

    paths, labels, is_train = table("images.txt"), table("image_class_labels.txt"), table("train_test_split.txt")
    samples = [(str(root / "images" / paths[i]), int(labels[i]) - 1) for i in paths if (is_train[i] == "1") == train]
    classes_file = root / "classes.txt"
    if classes_file.is_file():
        classes = [line.split(maxsplit=1)[1] for line in classes_file.read_text().splitlines() if line.strip()]
    else:
        classes = [str(i) for i in range(int(cfg["num_classes"]))]
    return FileDataset(samples, classes)


def digits(train: bool) -> ArrayDataset:
    """scikit-learn's bundled handwritten digits (8x8, 0-16) as 32x32 RGB; every fifth image is test."""
    from sklearn.datasets import load_digits

    bunch = load_digits()
    keep = (np.arange(len(bunch.target)) % 5 == 4) != train
    scans = (bunch.images[keep] * (255.0 / 16.0)).astype(np.float32)
    big = np.stack([cv2.resize(s, (32, 32), interpolation=cv2.INTER_LINEAR) for s in scans])
    gray = np.clip(np.rint(big), 0, 255).astype(np.uint8)
    return ArrayDataset(np.repeat(gray[..., None], 3, axis=-1), bunch.target[keep], [str(d) for d in range(10)])


def build_dataset(cfg: Mapping[str, Any], split: str) -> Dataset:
    """The `split` ("train" or "test") of the dataset config (conf/dataset/*.yaml)."""
    train = split == "train"
    fmt = cfg["format"]
    if fmt == "digits":
        return digits(train)
    if fmt == "pickle":
        return cifar(cfg, train)
    if fmt == "cub":
        return cub(cfg, train)
    if fmt == "imagefolder":
        return image_folder(Path(cfg["root"]) / cfg["train_split" if train else "test_split"])
    raise DataError(f"dataset.format={fmt} is not a format; allowed: pickle, imagefolder, cub, digits")
