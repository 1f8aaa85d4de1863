"""Datasets as (uint8 HxWx3 RGB array, label) pairs: CIFAR archives, image folders, CUB, offline digits.

Images are decoded with OpenCV, as mmpretrain does, and handed to the recipe's pipeline untouched.
"""

from __future__ import annotations

import contextlib
import os
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import cv2
import numpy as np
import torchvision
from torch.utils.data import Dataset
from torchvision.datasets.folder import IMG_EXTENSIONS, find_classes, make_dataset
from torchvision.datasets.utils import calculate_md5

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

    @classmethod
    def md5s(cls, root: str | Path) -> dict[str, tuple[str, str]]:
        """Each archive member: (its md5, the official release's md5)."""
        files = cls.train_list + cls.test_list + [(cls.meta["filename"], cls.meta["md5"])]
        return {name: (calculate_md5(str(Path(root) / cls.base_folder / name)), md5) for name, md5 in files}

    @property
    def verified(self) -> bool:
        return all(ours == official for ours, official in self.md5s(self.root).values())


class _OfficialCIFAR100(_OfficialCIFAR10, torchvision.datasets.CIFAR100):
    pass


CIFAR = {"cifar10": _OfficialCIFAR10, "cifar100": _OfficialCIFAR100}
CUB_URL = "https://data.caltech.edu/records/65de6-vp158/files/CUB_200_2011.tgz"
CUB_MD5 = "97eceeb196236b17998738112f37df78"
CUB_FILES = ("images.txt", "image_class_labels.txt", "train_test_split.txt")


def ensure_present(cfg: Mapping[str, Any]) -> None:
    """Download what dataset.download allows and is missing; a DataError naming what to do otherwise.

    A failed download removes the folders it created, so a failed run leaves no empty data/ behind.
    """
    fmt, root = cfg["format"], Path(str(cfg["root"]))
    if fmt == "imagefolder":
        for split in (cfg["train_split"], cfg["test_split"]):
            if not (root / split).is_dir():
                raise DataError(
                    f"no folder {root / split}; expected {root / split}/<class>/<image> (an ImageFolder layout)"
                )
    if fmt not in ("pickle", "cub"):
        return
    present = CIFAR[cfg["name"]].present(root) if fmt == "pickle" else all((root / n).is_file() for n in CUB_FILES)
    if present:
        return
    if not cfg["download"]:
        raise DataError(f"no {cfg['name']} data in {root}; set dataset.download=true, or set dataset.root")
    url = CIFAR[cfg["name"]].url if fmt == "pickle" else CUB_URL
    created = [p for p in (root, *root.parents) if not p.exists()]
    try:
        if fmt == "pickle":
            CIFAR[cfg["name"]](str(root), train=True, download=True)
        else:
            from torchvision.datasets.utils import download_and_extract_archive

            download_and_extract_archive(CUB_URL, str(root.parent), md5=CUB_MD5)
    except (OSError, RuntimeError) as err:  # no network, a refused or partial download
        for folder in created:  # deepest first
            with contextlib.suppress(OSError):
                folder.rmdir()
        raise DataError(
            f"could not download {cfg['name']} into {root} ({err}); download {url}, extract it there, "
            f"or set dataset.root"
        ) from None


def cifar(cfg: Mapping[str, Any], train: bool) -> ArrayDataset:
    cls, root = CIFAR[cfg["name"]], Path(str(cfg["root"]))
    if not cls.present(root):
        raise DataError(
            f"no {cfg['name']} python archives in {root / cls.base_folder}; set dataset.download=true, extract "
            f"{cls.filename} into {root}, or use dataset.format=imagefolder"
        )
    ds = cls(str(root), train=train, download=False)
    out = ArrayDataset(ds.data, ds.targets, ds.classes)
    out.verified = ds.verified
    return out


def cub(cfg: Mapping[str, Any], train: bool) -> FileDataset:
    """CUB-200-2011 with its official split (images.txt, image_class_labels.txt, train_test_split.txt)."""
    root = Path(cfg["root"])
    missing = [name for name in CUB_FILES if not (root / name).is_file()]
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


def digits(train: bool, size: int = 32) -> ArrayDataset:
    """scikit-learn's bundled handwritten digits (8x8, 0-16) as size x size RGB; every fifth image is test."""
    from sklearn.datasets import load_digits

    bunch = load_digits()
    keep = (np.arange(len(bunch.target)) % 5 == 4) != train
    scans = (bunch.images[keep] * (255.0 / 16.0)).astype(np.float32)
    big = np.stack([cv2.resize(s, (size, size), interpolation=cv2.INTER_LINEAR) for s in scans])
    gray = np.clip(np.rint(big), 0, 255).astype(np.uint8)
    return ArrayDataset(np.repeat(gray[..., None], 3, axis=-1), bunch.target[keep], [str(d) for d in range(10)])


def build_dataset(cfg: Mapping[str, Any], split: str) -> Dataset:
    """The `split` ("train" or "test") of the dataset config (conf/dataset/*.yaml)."""
    train = split == "train"
    fmt = cfg["format"]
    if fmt == "digits":
        return digits(train, int(cfg["input_size"]))
    if fmt == "pickle":
        return cifar(cfg, train)
    if fmt == "cub":
        return cub(cfg, train)
    if fmt == "imagefolder":
        return image_folder(Path(cfg["root"]) / cfg["train_split" if train else "test_split"])
    raise DataError(f"dataset.format={fmt} is not a format; allowed: pickle, imagefolder, cub, digits")


# ---- checks and identity of the data, before the first step -----------------------------------------
def check_classes(train: Dataset, test: Dataset, cfg: Mapping[str, Any]) -> list[str]:
    """The class list, when train and test agree with each other and with dataset.num_classes."""
    ours, theirs, wanted = list(getattr(train, "classes", [])), list(getattr(test, "classes", [])), cfg["num_classes"]
    if ours != theirs:
        only = sorted(set(ours) ^ set(theirs))
        where = f" ({', '.join(only[:4])} only in one split)" if only else " (another order)"
        raise DataError(f"the train and test splits of {cfg['root']} have different classes{where}; labels would shift")
    if ours and len(ours) != int(wanted):
        raise DataError(
            f"{cfg['root']} has {len(ours)} classes but dataset.num_classes={wanted}; "
            f"fix the folders or set dataset.num_classes={len(ours)}"
        )
    return ours


def check_readable(dataset: Dataset, workers: int = 8) -> None:
    """Every image file of `dataset` parses as an image (headers only: seconds for ImageNet's 50,000 val images)."""
    from concurrent.futures import ThreadPoolExecutor

    from PIL import Image, UnidentifiedImageError

    samples = getattr(dataset, "samples", None)
    if not samples:
        return

    def bad(path: str) -> str | None:
        try:
            with Image.open(path) as img:
                img.size  # noqa: B018 - parsing the header is the check
        except (OSError, UnidentifiedImageError, ValueError):
            return path
        return None

    with ThreadPoolExecutor(max_workers=workers) as pool:
        broken = next((p for p in pool.map(bad, (path for path, _ in samples)) if p), None)
    if broken:
        raise DataError(f"cannot decode image {broken} (corrupt or not an image); remove or replace it")


def fingerprint(cfg: Mapping[str, Any]) -> str:
    """What was read, as a short hash: the archives' md5s, or the sorted relative paths and sizes of the files."""
    import hashlib

    fmt, root = cfg["format"], Path(str(cfg["root"]))
    digest = hashlib.sha256(f"{cfg['name']}:{fmt}".encode())
    if fmt == "digits":
        for split in (True, False):
            digest.update(digits(split, int(cfg["input_size"])).images.tobytes())
    elif fmt == "pickle":
        for name, (md5, _) in sorted(CIFAR[cfg["name"]].md5s(root).items()):
            digest.update(f"{name}:{md5};".encode())
    else:
        folders = [root / "images"] if fmt == "cub" else [root / cfg["train_split"], root / cfg["test_split"]]
        for folder in folders:
            for path in sorted(p for p in folder.rglob("*") if p.is_file()):
                digest.update(f"{path.relative_to(root)}:{path.stat().st_size};".encode())
        for name in ("images.txt", "image_class_labels.txt", "train_test_split.txt") if fmt == "cub" else ():
            digest.update((root / name).read_bytes())
    return digest.hexdigest()[:16]
