"""Composition contract: row presets, the model/dataset route, recipes against the spec, one-line errors."""

from __future__ import annotations

import pytest
from omegaconf import OmegaConf

from resnet_repro.config import ConfigError, compose, compose_row, config_hash, validate
from resnet_repro.identity import Deviation
from resnet_repro.provenance import deviations
from resnet_repro.rows import all_rows
from tests.conftest import REPO, run_cli

ROWS = [row.name for row in all_rows()]
# what choosing a dataset picks (the issue's composition contract)
DATASET_DEFAULTS = {
    "cifar10": ("cifar", "cifar-200e"),
    "cifar100": ("cifar", "cifar100-200e"),
    "cub200": ("v1b", "cub-ft-100e"),
    "imagenet1k": ("v1b", "imagenet-basic-100e"),
}


def choices(cfg) -> dict[str, str]:
    return {
        "model": f"resnet{cfg.model.depth}",
        "stem": cfg.stem.name,
        "dataset": cfg.dataset.name,
        "recipe": cfg.recipe.name,
        "precision": cfg.precision.name,
    }


@pytest.mark.parametrize("name", ROWS)
def test_row_preset_composes_its_row(name: str) -> None:
    row = next(r for r in all_rows() if r.name == name)
    cfg = compose_row(name)
    validate(cfg)
    assert choices(cfg) == row.choices
    assert cfg.row_name == name
    assert cfg.dataset.num_classes == row.num_classes
    assert cfg.dataset.input_size == row.flops_input_px


def route(row) -> list[str]:
    """The shortest `model=… dataset=…` command line for a row: only groups differing from the dataset's defaults."""
    stem, recipe = DATASET_DEFAULTS[row.dataset]
    args = [f"model=resnet{row.depth}", f"dataset={row.dataset}"]
    args += [f"stem={row.stem}"] if row.stem != stem else []
    args += [f"recipe={row.recipe}"] if row.recipe != recipe else []
    args += [f"precision={row.precision}"] if row.precision != "fp32" else []
    return args


@pytest.mark.parametrize("name", ROWS)
def test_model_dataset_route_equals_row_preset(name: str) -> None:
    row = next(r for r in all_rows() if r.name == name)
    via_route, via_row = compose(route(row)), compose_row(name)
    assert OmegaConf.to_container(via_route, resolve=True) == OmegaConf.to_container(via_row, resolve=True)
    assert config_hash(via_route) == config_hash(via_row)


def test_issue_example_resnet101_cifar10() -> None:
    cfg = compose(["model=resnet101", "dataset=cifar10"])
    assert cfg.row_name == "resnet101_8xb16_cifar10"
    assert (cfg.stem.name, cfg.recipe.name) == ("cifar", "cifar-200e")
    assert deviations(cfg, validate(cfg)) == []


@pytest.mark.parametrize("dataset", sorted(DATASET_DEFAULTS))
def test_dataset_picks_stem_and_recipe_and_they_stay_overridable(dataset: str) -> None:
    cfg = compose([f"dataset={dataset}"])
    assert (cfg.stem.name, cfg.recipe.name) == DATASET_DEFAULTS[dataset]
    assert compose([f"dataset={dataset}", "stem=v1d"]).stem.name == "v1d"


def test_off_table_composition_is_named_custom_and_says_how_it_deviates() -> None:
    cfg = compose(["model=resnet50", "stem=v1d"])  # the v1d row uses the Pillow recipe
    assert cfg.row_name == "custom:resnet50-v1d-imagenet1k-imagenet-basic-100e-fp32"
    (custom,) = deviations(cfg, validate(cfg))
    assert str(custom) == "custom composition custom:resnet50-v1d-imagenet1k-imagenet-basic-100e-fp32"


def test_value_overrides_keep_the_row_but_are_recorded() -> None:
    cfg = compose(["row=resnet18_8xb16_cifar10", "recipe.epochs=1", "dataset.root=/elsewhere", "trainer.device=cpu"])
    assert cfg.row_name == "resnet18_8xb16_cifar10"
    # where the data lies and how it runs are not deviations; each is a record: key, recipe value, run value, reason
    assert deviations(cfg, validate(cfg)) == [Deviation("recipe.epochs", 200, 1, "smoke")]
    assert config_hash(cfg) != config_hash(compose_row("resnet18_8xb16_cifar10"))
    copy = compose(["row=resnet18_8xb16_cifar10", "dataset.format=imagefolder"])  # other data than the archives
    assert deviations(copy, validate(copy)) == [Deviation("dataset.format", "pickle", "imagefolder", "data")]
    groups = compose(["row=resnet18_8xb16_cifar10", "trainer.micro_batch=8", "recipe.optimizer.lr=0.2"])
    assert [str(d) for d in deviations(groups, validate(groups))] == [
        "recipe.optimizer.lr=0.2",
        "BatchNorm statistics over 8 images (recipe: 16)",
    ]
    assert config_hash(compose(["row=resnet18_8xb16_cifar10", "dataset.root=/x"])) == config_hash(
        compose_row("resnet18_8xb16_cifar10")
    )


def test_release_recipes_still_name_their_row() -> None:
    cfg = compose(["row=resnet50_8xb256-rsb-a3-100e_in1k", "recipe=rsb-a3-release"])
    assert cfg.row_name == "resnet50_8xb256-rsb-a3-100e_in1k"
    assert cfg.recipe.train_pipeline[0].size == 160  # A3 trained at 160 px at release


# recipes.md §2-§5, written out by hand ("-" = not applicable; milestones separated by "/")
OPTIM_TABLE = """
recipe                  epochs gpus batch opt  lr    wd    momentum nesterov decay_all
imagenet-basic-100e     100    8    32    sgd  0.1   1e-4  0.9      False    True
imagenet-basic-100e-pil 100    8    32    sgd  0.1   1e-4  0.9      False    True
cifar-200e              200    8    16    sgd  0.1   1e-4  0.9      False    True
cifar100-200e           200    8    16    sgd  0.1   5e-4  0.9      False    True
cub-ft-100e             100    8    8     sgd  0.01  5e-4  0.9      True     True
rsb-a1                  600    8    256   lamb 5e-3  0.01  -        -        False
rsb-a2                  300    8    256   lamb 5e-3  0.02  -        -        False
rsb-a3                  100    8    256   lamb 8e-3  0.02  -        -        False
"""
SCHEDULE_TABLE = """
recipe                  decay  milestones gamma warmup warmup_from min_lr loss       ls  backend
imagenet-basic-100e     step   30/60/90   0.1   0      -           -      softmax_ce 0.0 cv2
imagenet-basic-100e-pil step   30/60/90   0.1   0      -           -      softmax_ce 0.0 pillow
cifar-200e              step   100/150    0.1   0      -           -      softmax_ce 0.0 -
cifar100-200e           step   60/120/160 0.2   0      -           -      softmax_ce 0.0 -
cub-ft-100e             cosine -          -     5      0.01        0.0    softmax_ce 0.0 cv2
rsb-a1                  cosine -          -     5      1e-4        1e-6   bce        0.1 pillow
rsb-a2                  cosine -          -     5      1e-4        1e-6   bce        0.0 pillow
rsb-a3                  cosine -          -     5      1e-4        1e-6   bce        0.0 pillow
"""
# recipes.md §3: the RSB knobs
RSB_TABLE = """
recipe mixup cutmix magnitude drop_path repeats
rsb-a1 0.2   1.0    7         0.05      3
rsb-a2 0.1   1.0    7         0.05      3
rsb-a3 0.1   1.0    6         0.0       1
"""


def _table(text: str) -> dict[str, dict[str, str]]:
    header, *lines = [line.split() for line in text.strip().splitlines()]
    return {cells[0]: dict(zip(header[1:], cells[1:], strict=True)) for cells in lines}


SCHEDULES, RSB = _table(SCHEDULE_TABLE), _table(RSB_TABLE)
SPEC = {name: {**row, **SCHEDULES[name]} for name, row in _table(OPTIM_TABLE).items()}


def _ints(cell: str) -> list[int]:
    return [int(v) for v in cell.split("/")]


@pytest.mark.parametrize("recipe", sorted(SPEC))
def test_recipe_numbers_match_the_spec(recipe: str) -> None:
    spec = SPEC[recipe]
    dataset = {
        "imagenet": "imagenet1k",
        "rsb": "imagenet1k",
        "cub": "cub200",
        "cifar": "cifar10",
        "cifar100": "cifar100",
    }[recipe.split("-")[0]]
    r = compose([f"dataset={dataset}", f"recipe={recipe}"]).recipe
    opt, sched = r.optimizer, r.schedule
    assert (r.epochs, r.gpus, r.batch_per_gpu) == (int(spec["epochs"]), int(spec["gpus"]), int(spec["batch"]))
    assert (opt.name, opt.lr, opt.weight_decay) == (spec["opt"], float(spec["lr"]), float(spec["wd"]))
    assert str(opt.decay_norm_and_bias) == spec["decay_all"]
    if spec["opt"] == "sgd":
        assert (opt.momentum, str(opt.nesterov)) == (float(spec["momentum"]), spec["nesterov"])
    else:
        assert (list(opt.betas), opt.eps, opt.max_grad_norm) == ([0.9, 0.999], 1e-6, 1.0)
    assert (sched.decay, sched.warmup_epochs) == (spec["decay"], int(spec["warmup"]))
    if spec["decay"] == "step":
        assert (list(sched.milestones), sched.gamma) == (_ints(spec["milestones"]), float(spec["gamma"]))
    else:
        assert (sched.warmup_start_factor, sched.min_lr) == (float(spec["warmup_from"]), float(spec["min_lr"]))
        assert sched.cosine_span == "after_warmup"
    assert (r.loss.name, r.loss.label_smoothing) == (spec["loss"], float(spec["ls"]))
    if spec["backend"] != "-":
        assert {step.get("backend") for step in r.train_pipeline + r.test_pipeline} - {None} == {spec["backend"]}
    if recipe in RSB:
        rsb = RSB[recipe]
        assert (r.mixing.mixup_alpha, r.mixing.cutmix_alpha) == (float(rsb["mixup"]), float(rsb["cutmix"]))
        assert r.train_pipeline[2].magnitude == int(rsb["magnitude"])
        assert (r.model.drop_path_rate, r.sampler.repeats) == (float(rsb["drop_path"]), int(rsb["repeats"]))
        assert r.model.sync_bn and [s.size for s in r.test_pipeline] == [236, 224]


def test_fp16_row_uses_a_static_loss_scale_of_512() -> None:
    cfg = compose_row("resnet50_8xb32-fp16_in1k")
    assert (cfg.precision.autocast_dtype, cfg.precision.loss_scale) == ("float16", 512)
    assert cfg.recipe.name == "imagenet-basic-100e"


@pytest.mark.parametrize(
    ("overrides", "words"),
    [
        (["model=resnet99"], ["model=resnet99", "resnet18, resnet34, resnet50, resnet101, resnet152"]),
        (["dataset=imagenet1k", "stem=cifar"], ["stem=cifar", "v1b, v1c, v1d"]),
        (["dataset=imagenet1k", "recipe=cifar-200e"], ["recipe=cifar-200e", "imagenet-basic-100e"]),
        (["recipe.epoch=3"], ["recipe.epoch", "epochs"]),
        (["trainer.device=tpu"], ["trainer.device=tpu", "cpu"]),
        (["precision=fp8"], ["precision=fp8", "amp-fp16-static512"]),
    ],
)
def test_bad_compositions_raise_a_config_error(overrides: list[str], words: list[str]) -> None:
    with pytest.raises(ConfigError) as err:
        validate(compose(overrides))
    message = str(err.value)
    assert "\n" not in message and all(w in message for w in words), message


@pytest.mark.parametrize(
    "args",
    [
        ["model=resnet99"],
        ["dataset=imagenet1k", "stem=cifar"],
        ["recipe.epoch=3"],
        ["--multirun", "model=resnet18,resnet99"],
    ],
)
def test_cli_bad_input_is_one_line_and_exit_2(args: list[str], tmp_path) -> None:
    proc = run_cli(args, cwd=tmp_path)
    assert proc.returncode == 2, proc.stderr
    lines = [line for line in proc.stderr.splitlines() if line.strip()]
    assert len(lines) == 1 and lines[0].startswith("resnet_repro: error:"), proc.stderr
    assert "Traceback" not in proc.stderr + proc.stdout
    assert not (tmp_path / "outputs").exists() and not (tmp_path / "multirun").exists()  # stopped before any work


def test_cli_prints_composed_config(tmp_path) -> None:
    """(The help: tests/test_second_hour.py.)"""
    proc = run_cli(["model=resnet101", "dataset=cifar10", "--cfg", "job", "--resolve"], cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr
    cfg = OmegaConf.create(proc.stdout)
    assert cfg.row_name == "resnet101_8xb16_cifar10" and cfg.model.depth == 101
    proc = run_cli(["row=resnetv1d50_8xb32_in1k", "--cfg", "job", "--resolve"], cwd=tmp_path)
    assert OmegaConf.create(proc.stdout).recipe.name == "imagenet-basic-100e-pil"


def test_conf_dir_is_the_repo_conf() -> None:
    from resnet_repro.config import CONF_DIR

    assert CONF_DIR == REPO / "conf"
