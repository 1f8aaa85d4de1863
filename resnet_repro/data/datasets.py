"""Datasets as (uint8 HxWx3 RGB array, label) pairs: CIFAR archives, image folders, CUB, offline digits.

Images are decoded with OpenCV, as mmpretrain does, and handed to the recipe's pipeline untouched.
"""

from __future__ import annotations

import contextlib
import os
import pickle
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import cv2
import numpy as np
import torchvision
from torch.utils.data import Dataset
from torchvision.datasets.folder import IMG_EXTENSIONS, find_classes, make_dataset
from torchvision.datasets.utils import calculate_md5, extract_archive

from resnet_repro.download import DownloadError, fetch
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
    return decode_bytes(np.fromfile(path, dtype=np.uint8), path)


def decode_bytes(data: np.ndarray, path: str | os.PathLike) -> np.ndarray:
    """read_image on a file's bytes already read (uint8 array)."""
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


class _PlainUnpickler(pickle.Unpickler):
    """The CIFAR archives are pickles of dicts, lists, strings and NumPy arrays: only those are rebuilt, so a
    file in that format cannot run code when it is read (torchvision's reader unpickles anything)."""

    def find_class(self, module: str, name: str) -> Any:
        if module.split(".")[0] == "numpy" and name in ("_reconstruct", "ndarray", "dtype", "scalar"):
            return super().find_class(module, name)
        raise pickle.UnpicklingError(f"it holds {module}.{name}, not plain data")


def _unpickle(path: Path) -> dict[str, Any]:
    try:
        with open(path, "rb") as f:
            return _PlainUnpickler(f, encoding="latin1").load()
    except (pickle.UnpicklingError, EOFError, ValueError, TypeError) as err:
        raise DataError(f"{path} is not a CIFAR python archive file ({err}); refused") from None


class _OfficialCIFAR10(torchvision.datasets.CIFAR10):
    """The official python-format archives, by torchvision's file list, read as plain data.

    Any copy in that format loads (torchvision refuses files whose md5 differs from the release, so a
    hand-made set could not); the md5 only decides `verified`, recorded with each run.
    """

    @classmethod
    def present(cls, root: str | Path) -> bool:
        return all((Path(root) / cls.base_folder / name).is_file() for name, _ in cls.train_list + cls.test_list)

    @classmethod
    def read(cls, root: str | Path, train: bool) -> ArrayDataset:
        folder = Path(root) / cls.base_folder
        entries = [_unpickle(folder / name) for name, _ in (cls.train_list if train else cls.test_list)]
        images = np.vstack([e["data"] for e in entries]).reshape(-1, 3, 32, 32).transpose(0, 2, 3, 1)
        labels = [label for e in entries for label in (e["labels"] if "labels" in e else e["fine_labels"])]
        out = ArrayDataset(images, labels, _unpickle(folder / cls.meta["filename"])[cls.meta["key"]])
        out.verified = all(ours == official for ours, official in cls.md5s(root).values())
        return out

    @classmethod
    def md5s(cls, root: str | Path) -> dict[str, tuple[str, str]]:
        """Each archive member: (its md5, the official release's md5)."""
        files = cls.train_list + cls.test_list + [(cls.meta["filename"], cls.meta["md5"])]
        return {name: (calculate_md5(str(Path(root) / cls.base_folder / name)), md5) for name, md5 in files}


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
    # torchvision's address and md5 of the release (read later as plain data); our downloader, as torchvision's
    # has no timeout (resnet_repro.download says why)
    archive, into, md5 = (
        (root / CIFAR[cfg["name"]].filename, root, CIFAR[cfg["name"]].tgz_md5)
        if fmt == "pickle"
        else (root.parent / Path(CUB_URL).name, root.parent, CUB_MD5)
    )
    try:
        fetch(url, archive, checksum=("md5", md5))
        extract_archive(str(archive), str(into))
    except (DownloadError, OSError, RuntimeError) as err:  # no network, a refused, partial or corrupt download
        for folder in created:  # deepest first
            with contextlib.suppress(OSError):
                folder.rmdir()
        why = err.reason if isinstance(err, DownloadError) else err
        raise DataError(
            f"could not download {cfg['name']} into {root} ({why}); download {url}, extract it there, "
            f"or set dataset.root"
        ) from None


def cifar(cfg: Mapping[str, Any], train: bool) -> ArrayDataset:
    cls, root = CIFAR[cfg["name"]], Path(str(cfg["root"]))
    if not cls.present(root):
        raise DataError(
            f"no {cfg['name']} python archives in {root / cls.base_folder}; set dataset.download=true, extract "
            f"{cls.filename} into {root}, or use dataset.format=imagefolder"
        )
    return cls.read(root, train)


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
