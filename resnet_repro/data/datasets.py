"""Datasets as (uint8 HxWx3 RGB array, label) pairs: CIFAR archives, image folders, CUB, offline digits.

Each `dataset.format` is one source (SOURCES): whether its files are there, what dataset.download fetches,
how a split is read and what the data fingerprint hashes. Images are decoded with OpenCV, as mmpretrain does,
and handed to the recipe's pipeline untouched.
"""

from __future__ import annotations

import contextlib
import functools
import hashlib
import os
import pickle
from collections.abc import Iterator, Mapping, Sequence
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
    try:
        classes, class_to_idx = find_classes(str(folder))
        samples = make_dataset(str(folder), class_to_idx, extensions=IMG_EXTENSIONS)
    except (OSError, RuntimeError) as err:
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


@functools.cache
def _md5(path: str, size: int, mtime_ns: int) -> str:
    return calculate_md5(path)


def md5_of(path: Path) -> str:
    """A file's md5, computed once per process while its size and time stay: the data fingerprint (rank 0,
    before the run) and the `data_verified` tag (rank 0, as the run opens) read the same archives."""
    stat = path.stat()
    return _md5(str(path), stat.st_size, stat.st_mtime_ns)


# ---- checks of the data, before the first step -----------------------------------------
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


# ---- one source per dataset.format ------------------------------------------------------------------------
class Source:
    """The data of a dataset config (conf/dataset/*.yaml). A format says whether its files are there
    (`missing`), reads a split (`read`) and says what identifies the data (`identity`); one that
    dataset.download can fetch names its `archive`, extracted into `into`."""

    archive: tuple[str, str] | None = None  # (url, md5)

    def __init__(self, cfg: Mapping[str, Any]) -> None:
        self.cfg, self.root = cfg, Path(str(cfg["root"]))
        self.into = self.root

    def missing(self) -> str | None:
        """Why the data is not there, as the one line to stop on; None when it is."""
        return None

    def read(self, train: bool) -> Dataset:
        """The train or the test split (`load` checks that the data is there first)."""
        raise NotImplementedError

    def identity(self) -> Iterator[bytes]:
        """What the data fingerprint hashes."""
        raise NotImplementedError

    def verified(self) -> bool | None:
        """Whether the files are the official release's (by md5); None where there is none to check against."""
        return None

    def load(self, split: str) -> Dataset:
        """The `split` ("train" or "test"), there and not empty."""
        if why := self.missing():
            raise DataError(why)
        data = self.read(split == "train")
        if len(data) == 0:  # type: ignore[arg-type]
            raise DataError(f"the {split} split of dataset={self.cfg['name']} is empty (root: {self.root})")
        return data

    def download(self, url: str, md5: str) -> None:
        """Fetch and extract the archive with our downloader (torchvision's has no timeout: resnet_repro.download
        says why). A failed download removes the folders it created: a failed run leaves no empty data/ behind."""
        created = [p for p in (self.root, *self.root.parents) if not p.exists()]
        try:
            extract_archive(str(fetch(url, self.into / Path(url).name, checksum=("md5", md5))), str(self.into))
        except (DownloadError, OSError, RuntimeError) as err:  # no network, a refused, partial or corrupt download
            for folder in created:  # deepest first
                with contextlib.suppress(OSError):
                    folder.rmdir()
            why = err.reason if isinstance(err, DownloadError) else err
            raise DataError(
                f"could not download {self.cfg['name']} into {self.root} ({why}); download {url}, extract it "
                f"there, or set dataset.root"
            ) from None


CIFAR_RELEASES = {"cifar10": torchvision.datasets.CIFAR10, "cifar100": torchvision.datasets.CIFAR100}


class CifarArchives(Source):
    """The official python-format archives, by torchvision's file list and address, read as plain data.

    Any copy in that format loads (torchvision refuses files whose md5 differs from the release, so a
    hand-made set could not); the md5s only decide `verified`, recorded with each run.
    """

    def __init__(self, cfg: Mapping[str, Any]) -> None:
        super().__init__(cfg)
        if cfg["name"] not in CIFAR_RELEASES:
            raise DataError(f"dataset.format=pickle is CIFAR's; allowed dataset.name: {', '.join(CIFAR_RELEASES)}")
        self.release = release = CIFAR_RELEASES[cfg["name"]]
        self.archive, self.folder = (release.url, release.tgz_md5), self.root / release.base_folder
        self.files = [*release.train_list, *release.test_list, (release.meta["filename"], release.meta["md5"])]

    def missing(self) -> str | None:
        if all((self.folder / name).is_file() for name, _ in self.files):
            return None
        return (
            f"no {self.cfg['name']} python archives in {self.folder}; set dataset.download=true, extract "
            f"{self.release.filename} into {self.root}, set dataset.root, or use dataset.format=imagefolder"
        )

    def read(self, train: bool) -> ArrayDataset:
        names = self.release.train_list if train else self.release.test_list
        entries = [_unpickle(self.folder / name) for name, _ in names]
        images = np.vstack([e["data"] for e in entries]).reshape(-1, 3, 32, 32).transpose(0, 2, 3, 1)
        labels = [label for e in entries for label in (e["labels"] if "labels" in e else e["fine_labels"])]
        meta = self.release.meta
        return ArrayDataset(images, labels, _unpickle(self.folder / meta["filename"])[meta["key"]])

    def identity(self) -> Iterator[bytes]:
        return (f"{name}:{md5_of(self.folder / name)};".encode() for name in sorted(n for n, _ in self.files))

    def verified(self) -> bool:
        return all(md5_of(self.folder / name) == official for name, official in self.files)


class ImageFolders(Source):
    """`<root>/<train_split>/<class>/<image>` and the same for the test split: torchvision's ImageFolder layout."""

    def folder(self, train: bool) -> Path:
        return self.root / self.cfg["train_split" if train else "test_split"]

    def missing(self) -> str | None:
        absent = [folder for folder in (self.folder(True), self.folder(False)) if not folder.is_dir()]
        return (
            f"no folder {absent[0]}; expected {absent[0]}/<class>/<image> (an ImageFolder layout)" if absent else None
        )

    def read(self, train: bool) -> FileDataset:
        return image_folder(self.folder(train))

    def identity(self) -> Iterator[bytes]:
        return _paths_and_sizes(self.root, [self.folder(True), self.folder(False)])


class CubFolder(Source):
    """CUB-200-2011 with its official split (images.txt, image_class_labels.txt, train_test_split.txt)."""

    archive = (
        "https://data.caltech.edu/records/65de6-vp158/files/CUB_200_2011.tgz",
        "97eceeb196236b17998738112f37df78",
    )
    TABLES = ("images.txt", "image_class_labels.txt", "train_test_split.txt")

    def __init__(self, cfg: Mapping[str, Any]) -> None:
        super().__init__(cfg)
        self.into = self.root.parent  # the archive holds CUB_200_2011/

    def missing(self) -> str | None:
        absent = [name for name in self.TABLES if not (self.root / name).is_file()]
        why = f"{self.root} is not a CUB_200_2011 folder (missing {', '.join(absent)}); set dataset.root"
        return f"{why} or dataset.download=true" if absent else None

    def read(self, train: bool) -> FileDataset:
        paths, labels, is_train = map(self._table, self.TABLES)
        samples = [
            (str(self.root / "images" / paths[i]), int(labels[i]) - 1) for i in paths if (is_train[i] == "1") == train
        ]
        if (self.root / "classes.txt").is_file():
            return FileDataset(samples, list(self._table("classes.txt").values()))
        return FileDataset(samples, [str(i) for i in range(int(self.cfg["num_classes"]))])

    def _table(self, name: str) -> dict[str, str]:
        return dict(line.split(maxsplit=1) for line in (self.root / name).read_text().splitlines() if line.strip())

    def identity(self) -> Iterator[bytes]:
        yield from _paths_and_sizes(self.root, [self.root / "images"])
        yield from ((self.root / name).read_bytes() for name in self.TABLES)


class Digits(Source):
    """scikit-learn's bundled handwritten digits (8x8, 0-16) as input_size x input_size RGB, every fifth image
    for test: the offline demo, always there."""

    def read(self, train: bool) -> ArrayDataset:
        from sklearn.datasets import load_digits

        bunch, size = load_digits(), int(self.cfg["input_size"])
        keep = (np.arange(len(bunch.target)) % 5 == 4) != train
        scans = (bunch.images[keep] * (255.0 / 16.0)).astype(np.float32)
        big = np.stack([cv2.resize(s, (size, size), interpolation=cv2.INTER_LINEAR) for s in scans])
        gray = np.clip(np.rint(big), 0, 255).astype(np.uint8)
        return ArrayDataset(np.repeat(gray[..., None], 3, axis=-1), bunch.target[keep], [str(d) for d in range(10)])

    def identity(self) -> Iterator[bytes]:
        return (self.read(train).images.tobytes() for train in (True, False))


def _paths_and_sizes(root: Path, folders: Sequence[Path]) -> Iterator[bytes]:
    for folder in folders:
        for path in sorted(p for p in folder.rglob("*") if p.is_file()):
            yield f"{path.relative_to(root)}:{path.stat().st_size};".encode()


SOURCES = {"pickle": CifarArchives, "imagefolder": ImageFolders, "cub": CubFolder, "digits": Digits}


def data_source(cfg: Mapping[str, Any]) -> Source:
    if cfg["format"] not in SOURCES:
        raise DataError(f"dataset.format={cfg['format']} is not a format; allowed: {', '.join(SOURCES)}")
    return SOURCES[cfg["format"]](cfg)


def ensure_present(cfg: Mapping[str, Any]) -> None:
    """Download what dataset.download allows and is missing; a DataError naming what to do otherwise."""
    source = data_source(cfg)
    if why := source.missing():
        if source.archive is None or not cfg["download"]:
            raise DataError(why)
        source.download(*source.archive)


def fingerprint(cfg: Mapping[str, Any]) -> str:
    """What was read, as a short hash: the archives' md5s, the digits' pixels, or the sorted relative paths and
    sizes of the files (and CUB's tables)."""
    digest = hashlib.sha256(f"{cfg['name']}:{cfg['format']}".encode())
    for part in data_source(cfg).identity():
        digest.update(part)
    return digest.hexdigest()[:16]
