"""trainer.decode=device: JPEGs decoded and augmented on the device (CPU tensors here) with the CPU pipeline's
draws and pixels; decoder fidelity on real photos; decode errors; an end-to-end run that resumes exactly."""

from __future__ import annotations

import contextlib
import io
import itertools
import tarfile
from pathlib import Path

import cv2
import numpy as np
import pytest
import torch
from omegaconf import OmegaConf
from PIL import Image

from resnet_repro.data import TransformedDataset, device_decode
from resnet_repro.data.datasets import DataError, image_folder
from resnet_repro.data.device_decode import (
    BAD,
    DECODED,
    ENCODED,
    DecodeLoader,
    EncodedDataset,
    cv2_linear_tables,
    resample,
)
from resnet_repro.data.samplers import sample_seed
from resnet_repro.data.transforms import build_pipeline
from resnet_repro.data.wait import WaitClock, input_bound_message
from tests.conftest import REPO, train_args

CIFAR_JPEGS = Path("/work/shared/data/cifar10-jpeg.tar.gz")


def recipe(name: str) -> dict:
    return OmegaConf.to_container(OmegaConf.load(REPO / "conf" / "recipe" / f"{name}.yaml"))  # type: ignore[return-value]


IMAGENET, CUB = recipe("imagenet-basic-100e"), recipe("cub-ft-100e")


def photos() -> list[np.ndarray]:
    """scikit-learn's two bundled photos (JPEG files, 427 x 640), RGB."""
    import sklearn.datasets

    folder = Path(sklearn.datasets.__file__).parent / "images"
    return [cv2.cvtColor(cv2.imread(str(folder / name)), cv2.COLOR_BGR2RGB) for name in ("china.jpg", "flower.jpg")]


def jpeg(rgb: np.ndarray, quality: int = 90, *flags: int) -> bytes:
    ok, buf = cv2.imencode(".jpg", cv2.cvtColor(rgb, cv2.COLOR_RGB2BGR), [cv2.IMWRITE_JPEG_QUALITY, quality, *flags])
    assert ok
    return buf.tobytes()


def photo_crops(n: int, seed: int = 0, sizes: tuple[int, int] = (120, 500)) -> list[np.ndarray]:
    """n crops of the photos at random places and sizes, resized to random sizes (each a different image)."""
    rng, sources = np.random.default_rng(seed), photos()
    out = []
    for i in range(n):
        src = sources[i % 2]
        h, w = (int(v) for v in rng.integers(100, 420, 2))
        top, left = int(rng.integers(0, src.shape[0] - h + 1)), int(rng.integers(0, src.shape[1] - w + 1))
        size = tuple(int(v) for v in rng.integers(*sizes, 2))
        out.append(cv2.resize(src[top : top + h, left : left + w], size, interpolation=cv2.INTER_AREA))
    return out


def write_folder(root: Path, classes: int, per_class: int, seed: int = 0, sizes: tuple[int, int] = (120, 500)) -> Path:
    """An ImageNet-layout folder <root>/<wnid>/<n>.JPEG of photo crops (quality 90)."""
    images = photo_crops(classes * per_class, seed, sizes)
    for i, image in enumerate(images):
        folder = root / f"n{i % classes:08d}"
        folder.mkdir(parents=True, exist_ok=True)
        (folder / f"{i}.JPEG").write_bytes(jpeg(image))
    return root


def odd_files(folder: Path) -> list[Path]:
    """Files the device decoder leaves to OpenCV on the worker: greyscale, CMYK, EXIF-rotated, a PNG named .JPEG."""
    a, b = photo_crops(2, seed=7)
    folder.mkdir(parents=True, exist_ok=True)
    grey = cv2.imencode(".jpg", cv2.cvtColor(a, cv2.COLOR_RGB2GRAY))[1].tobytes()
    cmyk, rotated = io.BytesIO(), io.BytesIO()
    Image.fromarray(b).convert("CMYK").save(cmyk, "JPEG", quality=90)
    exif = Image.Exif()
    exif[0x0112] = 6  # rotate 90 degrees clockwise
    Image.fromarray(a).save(rotated, "JPEG", quality=90, exif=exif.tobytes())
    files = {"grey.JPEG": grey, "cmyk.JPEG": cmyk.getvalue(), "rotated.JPEG": rotated.getvalue()}
    files["png.JPEG"] = cv2.imencode(".png", b)[1].tobytes()
    for name, data in files.items():
        (folder / name).write_bytes(data)
    return [folder / name for name in files]


# ---- OpenCV's INTER_LINEAR, batched ----------------------------------------------------------------------------


def test_resample_equals_cv2_resize_pixel_for_pixel() -> None:
    """Up- and downscaling, exact halving (OpenCV's INTER_AREA shortcut), same size, 1-px sources, crops that
    touch the borders: 0 pixels differ from cv2.resize of the crop."""
    rng = np.random.default_rng(0)
    cases = [((48, 48), (24, 24)), ((30, 30), (30, 30)), ((1, 1), (5, 7)), ((2, 3), (60, 41)), ((250, 190), (17, 64))]
    cases += [(tuple(rng.integers(1, 160, 2).tolist()), tuple(rng.integers(1, 160, 2).tolist())) for _ in range(30)]
    for (h, w), (oh, ow) in cases:
        big = rng.integers(0, 256, (h + 9, w + 5, 3), dtype=np.uint8)
        top, left = int(rng.integers(0, 10)), int(rng.integers(0, 6))
        ref = cv2.resize(big[top : top + h, left : left + w], (ow, oh), interpolation=cv2.INTER_LINEAR)
        geometry = torch.tensor([[top, left, h, w, oh, ow, 0, 0, 0]])
        out = resample([torch.from_numpy(big).permute(2, 0, 1)], geometry, (oh, ow))
        assert torch.equal(out[0], torch.from_numpy(ref).permute(2, 0, 1)), ((h, w), (oh, ow))


def test_a_batch_of_boxes_windows_and_flips_resamples_in_one_call() -> None:
    """Images of different sizes, each box resized to its own size, then a 9 x 7 window, flipped or not: the
    pixels of cv2.resize, the window and the flip, for every image of the batch."""
    rng = np.random.default_rng(1)
    images, geometry, expected = [], [], []
    for _ in range(12):
        height, width = rng.integers(20, 120, 2).tolist()
        h, w = int(rng.integers(1, height + 1)), int(rng.integers(1, width + 1))
        top, left = int(rng.integers(0, height - h + 1)), int(rng.integers(0, width - w + 1))
        rh, rw = int(rng.integers(9, 60)), int(rng.integers(7, 60))
        oy, ox, flip = int(rng.integers(0, rh - 8)), int(rng.integers(0, rw - 6)), int(rng.integers(0, 2))
        image = rng.integers(0, 256, (height, width, 3), dtype=np.uint8)
        ref = cv2.resize(image[top : top + h, left : left + w], (rw, rh), interpolation=cv2.INTER_LINEAR)
        ref = ref[oy : oy + 9, ox : ox + 7][:, ::-1] if flip else ref[oy : oy + 9, ox : ox + 7]
        images.append(torch.from_numpy(image).permute(2, 0, 1))
        geometry.append([top, left, h, w, rh, rw, oy, ox, flip])
        expected.append(torch.from_numpy(np.ascontiguousarray(ref)).permute(2, 0, 1))
    out = resample(images, torch.tensor(geometry), (9, 7), chunk=5)
    assert torch.equal(out, torch.stack(expected))


def test_linear_tables_are_opencvs_coefficients() -> None:
    """Downscaling 5 -> 2: x = (d + 0.5) * 2.5 - 0.5 = 0.75, 3.25; weights of 2048 at the borders."""
    i0, i1, w0, w1 = cv2_linear_tables(torch.tensor([5]), torch.tensor([2]), torch.tensor([0]), 2, True)
    assert (
        i0.tolist() == [[0, 3]]
        and i1.tolist() == [[1, 4]]
        and w0.tolist() == [[512, 1536]]
        and w1.tolist() == [[1536, 512]]
    )
    i0, i1, w0, w1 = cv2_linear_tables(torch.tensor([2]), torch.tensor([4]), torch.tensor([0]), 4, True)
    assert i0.tolist() == [[0, 0, 0, 1]] and w0.tolist() == [[2048, 1536, 512, 2048]]


# ---- decoders on real photos ---------------------------------------------------------------------------------


def assert_decoders_agree(files: list[bytes]) -> tuple[int, float]:
    from torchvision.io import ImageReadMode, decode_jpeg

    tensors = [torch.frombuffer(bytearray(data), dtype=torch.uint8) for data in files]
    worst, total, count = 0, 0.0, 0
    for data, ours in zip(files, decode_jpeg(tensors, mode=ImageReadMode.RGB), strict=True):
        ref = cv2.cvtColor(cv2.imdecode(np.frombuffer(data, np.uint8), cv2.IMREAD_COLOR), cv2.COLOR_BGR2RGB)
        diff = (ours.permute(1, 2, 0).int() - torch.from_numpy(ref).int()).abs()
        worst, total, count = max(worst, int(diff.max())), total + float(diff.sum()), count + diff.numel()
    return worst, total / count


def test_decode_jpeg_equals_cv2_imdecode_on_real_photos(tmp_path: Path) -> None:
    """torchvision's batched CPU decode (libjpeg-turbo) vs OpenCV's on the shipped photos, their crops at
    quality 90 (4:2:0, progressive, 4:4:4) and CIFAR-10 JPEGs upscaled to 500 x 375: max and mean difference 0."""
    import sklearn.datasets

    folder = Path(sklearn.datasets.__file__).parent / "images"
    files = [(folder / name).read_bytes() for name in ("china.jpg", "flower.jpg")]
    crops = photo_crops(4, seed=3)
    files += [jpeg(c) for c in crops] + [jpeg(crops[0], 90, cv2.IMWRITE_JPEG_PROGRESSIVE, 1)]
    files.append(jpeg(crops[1], 90, cv2.IMWRITE_JPEG_SAMPLING_FACTOR, cv2.IMWRITE_JPEG_SAMPLING_FACTOR_444))
    if CIFAR_JPEGS.is_file():
        with tarfile.open(CIFAR_JPEGS) as tar:
            members = [m for m in itertools.islice((m for m in tar if m.name.endswith(".jpg")), 6)]
            for m in members:
                small = cv2.imdecode(np.frombuffer(tar.extractfile(m).read(), np.uint8), cv2.IMREAD_COLOR)
                files.append(jpeg(cv2.resize(small[..., ::-1], (500, 375), interpolation=cv2.INTER_CUBIC)))
    assert assert_decoders_agree(files) == (0, 0.0)


def test_decode_jpeg_equals_cv2_imdecode_on_scikit_image_photos() -> None:
    data = pytest.importorskip("skimage.data", reason="scikit-image is not installed (pip install scikit-image)")
    images = [getattr(data, name)() for name in ("astronaut", "coffee", "chelsea", "rocket", "hubble_deep_field")]
    assert assert_decoders_agree([jpeg(image) for image in images]) == (0, 0.0)


# ---- the device pipeline vs the CPU pipeline ------------------------------------------------------------------


def small(pipeline: list[dict], factor: int = 4) -> list[dict]:
    """The recipe's pipeline with its sizes divided by `factor` (the same steps, cheaper on a CPU)."""
    out = []
    for spec in pipeline:
        spec = dict(spec)
        if "size" in spec:
            spec["size"] = (
                [s // factor for s in spec["size"]] if isinstance(spec["size"], list) else spec["size"] // factor
            )
        out.append(spec)
    return out


@pytest.mark.parametrize(
    "pipeline",
    ["imagenet train", "imagenet test", "cub train", "cub test", "imagenet test on CUDA (decoded by the workers)"],
)
def test_device_pipeline_equals_cpu_pipeline(pipeline: str, tmp_path: Path) -> None:
    """Same samples, same seeds: the CPU pipeline (OpenCV decode + transforms) and the device one give the same
    crop boxes, flips and pixels (max difference 0), odd files (grey, CMYK, EXIF-rotated, PNG) included."""
    spec = {"imagenet": IMAGENET, "cub": CUB}[pipeline.split()[0]][
        "train_pipeline" if "train" in pipeline else "test_pipeline"
    ]
    spec = small(spec, 2 if "imagenet" in pipeline else 4)
    root = write_folder(tmp_path / "train", classes=2, per_class=5, sizes=(90, 300))
    odd_files(root / "n00000000")
    base = image_folder(root)
    encoded = EncodedDataset(base, spec, decode_here="CUDA" in pipeline)
    keys = [(i, sample_seed(0, 3, i)) for i in range(len(base))] if "train" in pipeline else list(range(len(base)))
    items = [encoded[k] for k in keys]
    kinds = [item.kind for item in items]
    assert kinds.count(DECODED) == (len(base) if "CUDA" in pipeline else 4) and all(
        k in (ENCODED, DECODED) for k in kinds
    )
    loader = DecodeLoader(encoded, keys, batch=len(keys), workers=0, device=torch.device("cpu"))
    ours, labels = next(iter(loader))
    cpu = TransformedDataset(base, build_pipeline(spec))
    reference = torch.stack([cpu[k][0] for k in keys])
    assert ours.shape == reference.shape and labels.tolist() == [base.samples[i][1] for i in range(len(base))]
    assert int((ours.int() - reference.int()).abs().max()) == 0
    if "train" in pipeline:  # the draws vary from sample to sample (a real test of the seeds)
        geometry = torch.stack([torch.tensor(item.geometry) for item in items])
        assert len({tuple(g[:4]) for g in geometry.tolist()}) > len(keys) // 2 and 0 < int(geometry[:, 8].sum()) < len(
            keys
        )


# ---- bad files -------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("damage", ["garbled scan", "not an image"])
def test_a_corrupt_jpeg_in_a_batch_fails_naming_the_file(damage: str, tmp_path: Path) -> None:
    root = write_folder(tmp_path / "train", classes=2, per_class=3, sizes=(60, 90))
    bad = root / "n00000001" / "3.JPEG"
    data = bad.read_bytes()
    noise = bytes(np.random.default_rng(0).integers(0, 256, 3000, dtype=np.uint8))
    bad.write_bytes(data[:700] + noise + data[3700:] if damage == "garbled scan" else b"not a jpeg")
    encoded = EncodedDataset(image_folder(root), small(IMAGENET["train_pipeline"], 7))
    where = [path for path, _ in encoded.samples].index(str(bad))  # the device's decoder / the worker finds it
    assert encoded[(where, 0)].kind == (ENCODED if damage == "garbled scan" else BAD)
    loader = DecodeLoader(encoded, [(i, i) for i in range(6)], batch=6, workers=0, device=torch.device("cpu"))
    with pytest.raises(DataError) as err:
        next(iter(loader))
    assert str(bad) in str(err.value) and len(str(err.value).splitlines()) == 1


# ---- settings ----------------------------------------------------------------------------------------------------


def test_decode_setting_resolves_by_recipe_and_device() -> None:
    """auto: device on CUDA for the v1b ImageNet and CUB recipes, cpu for Pillow, RandAugment, CIFAR or a CPU;
    device where the recipe cannot run there: a one-line error naming why."""
    from resnet_repro.config import ConfigError, compose, to_plain, validate

    cuda, cpu = torch.device("cuda"), torch.device("cpu")
    cases = {"row=resnet50_8xb32_in1k": True, "row=resnet50_8xb8_cub": True, "row=resnetv1d50_8xb32_in1k": False}
    cases |= {"row=resnet50_8xb256-rsb-a3-100e_in1k": False, "row=resnet18_8xb16_cifar10": False}
    for row, on_cuda in cases.items():
        cfg = to_plain(compose([row, "trainer.device=cpu"]))
        assert device_decode.resolve(cfg, cuda) is on_cuda and device_decode.resolve(cfg, cpu) is False, row
        with pytest.raises(ConfigError) if not on_cuda else contextlib.nullcontext():
            validate(compose([row, "trainer.device=cpu", "trainer.decode=device"]))


def test_wait_clock_leaves_out_the_first_batch_and_advises_once_above_10_percent() -> None:
    now = [0.0]

    def clock() -> float:
        return now[0]

    def batches():
        for wait in (5.0, 1.0, 1.0):  # start-up, then 1 s per batch
            now[0] += wait
            yield wait

    timed = WaitClock(batches(), clock=clock)
    for _ in timed:
        now[0] += 4.0  # the step
    assert timed.waited == 2.0 and timed.fraction() == pytest.approx(2.0 / 14.0)
    cfg = {"dataset": {"format": "imagefolder"}, "recipe": {**IMAGENET, "sampler": {"repeats": 1}}}
    advice = input_bound_message(timed.fraction(), 3, cfg, 4, "cpu")
    assert "trainer.num_workers (now 4)" in advice and "trainer.decode=device" in advice and "14%" in advice
    on_device = input_bound_message(0.5, 1, cfg, 4, "device")
    assert "use trainer.decode" not in on_device and "decode and resample included" in on_device
    assert input_bound_message(0.1, 1, cfg, 4, "cpu") is None


# ---- end to end ------------------------------------------------------------------------------------------------


@pytest.mark.slow
def test_decode_device_trains_an_imagenet_folder_and_resumes_exactly(tmp_path: Path) -> None:
    """ResNet-18 on a tiny ImageNet-layout folder (the recipe at 32 px) with trainer.decode=device on CPU tensors:
    2 epochs straight vs 1 epoch, a stop, and a resume from last.pt end with equal weights and metrics."""
    from resnet_repro.checkpoint import RunFolder, load
    from resnet_repro.config import compose, config_hash, to_plain, validate
    from resnet_repro.engine import RunInfo, Trainer
    from resnet_repro.run_books import train_tags

    data = tmp_path / "imagenet"
    write_folder(data / "train", classes=2, per_class=2, sizes=(40, 90))  # one step of 4 an epoch
    write_folder(data / "val", classes=2, per_class=1, seed=1, sizes=(40, 90))
    overrides = [
        "model=resnet18",
        *[f"recipe.{k}" for k in ("train_pipeline.0.size=32", "test_pipeline.0.size=36", "test_pipeline.1.size=32")],
        *["dataset.input_size=32", "dataset.num_classes=2", "recipe.gpus=1"],
        "recipe.batch_per_gpu=4",
        *["recipe.epochs=2", "trainer.decode=device", "trainer.checkpoints=last"],
        *train_args(tmp_path, data),
    ]
    cfg = compose(overrides)
    info = RunInfo(row_name=cfg.row_name, config_hash=config_hash(cfg), plan=validate(cfg))

    def trainer(folder: Path) -> Trainer:
        folder.mkdir(exist_ok=True)  # (job.py's RunFolder.acquire makes and locks it)
        return Trainer(to_plain(cfg), info, RunFolder(folder))

    whole = trainer(tmp_path / "whole")
    assert whole.data.decode == "device" and train_tags(whole)["decode"] == "device"
    whole.fit()
    stopped = trainer(tmp_path / "broken")
    first_epoch_only = stopped._epoch

    def stop_after(epoch: int) -> None:
        first_epoch_only(epoch)
        raise KeyboardInterrupt

    stopped._epoch = stop_after  # type: ignore[method-assign]
    with pytest.raises(KeyboardInterrupt):
        stopped.fit()
    resumed = trainer(tmp_path / "broken")
    resumed.fit()
    a, b = load(tmp_path / "whole" / "last.pt"), load(tmp_path / "broken" / "last.pt")
    assert a["epoch"] == b["epoch"] == 2 and all(torch.equal(a["model"][k], b["model"][k]) for k in a["model"])
    for epoch in (1, 2):
        for key in ("train_loss", "val_top1"):
            assert a["history"][epoch][key] == b["history"][epoch][key], (epoch, key)
        assert 0.0 <= a["history"][epoch]["data_wait_frac"] <= 1.0
