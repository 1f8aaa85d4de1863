"""ResNet classifiers with mmpretrain's architecture and initialisation, built on timm's ResNet.

timm's blocks already match mmpretrain's "pytorch" style (stride on the 3x3 conv, deep stem of
three 3x3 convs 3->32->32->64, 2x2 avg-pool + 1x1 conv shortcuts for `avg_down`, DropPath after the
last BN). What differs is written here: the CIFAR stem, the initialisation of the head
(normal(0, 0.01), which timm leaves at PyTorch's default), the uniform drop-path rule of the
RSB release configs, and the global pool: timm's "fast" average (a mean over H, W) instead of
nn.AdaptiveAvgPool2d(1). Same numbers (torch itself computes a 1x1 adaptive average as that mean, through
a dispatch rule), but the model then never depends on the adaptive-pool kernel, whose CUDA backward has
no deterministic implementation (trainer.deterministic=true would raise there). No parameters: the state
dict and mmpretrain's checkpoints are unchanged.
"""

from __future__ import annotations

import copy
from collections.abc import Mapping
from typing import TYPE_CHECKING, Any

import torch
from timm.layers import DropPath
from timm.models.resnet import BasicBlock, Bottleneck
from timm.models.resnet import ResNet as _TimmResNet
from torch import nn

from resnet_repro.bn_groups import convert_bn_groups, convert_sync_bn, resolve_kernel

if TYPE_CHECKING:
    from resnet_repro.batches import BatchPlan

GLOBAL_POOL = "fast"  # timm's SelectAdaptivePool2d: x.mean((2, 3)), flattened (see the module docstring)
ARCH: dict[int, tuple[type[nn.Module], tuple[int, int, int, int]]] = {
    18: (BasicBlock, (2, 2, 2, 2)),
    34: (BasicBlock, (3, 4, 6, 3)),
    50: (Bottleneck, (3, 4, 6, 3)),
    101: (Bottleneck, (3, 4, 23, 3)),
    152: (Bottleneck, (3, 8, 36, 3)),
}


class ResNet(_TimmResNet):
    """timm's ResNet with the table API's `extract_feat` (pooled features before the classifier)."""

    def extract_feat(self, x: torch.Tensor) -> torch.Tensor:
        return self.forward_head(self.forward_features(x), pre_logits=True)

    def blocks(self) -> list[nn.Module]:
        return [block for stage in (self.layer1, self.layer2, self.layer3, self.layer4) for block in stage]


def build_model(
    depth: int,
    num_classes: int,
    *,
    deep_stem: bool = False,
    avg_down: bool = False,
    small_input: bool = False,
    drop_path_rate: float = 0.0,
    drop_path_rule: str = "linear",
    zero_init_residual: bool = True,
) -> ResNet:
    """A ResNet of `depth` with the stem flags of `conf/stem/*.yaml` and a `num_classes` head.

    drop_path_rule: "linear" (0 -> rate over the blocks, mmpretrain today) or "uniform" (rate on
    every block, the RSB release configs).
    """
    if depth not in ARCH:
        raise ValueError(f"depth={depth} is not a ResNet depth; allowed: {', '.join(map(str, ARCH))}")
    if drop_path_rule not in ("linear", "uniform"):
        raise ValueError(f"drop_path_rule={drop_path_rule!r}; allowed: linear, uniform")
    if small_input and deep_stem:
        raise ValueError("the CIFAR stem cannot be deep (mmpretrain forbids deep_stem in ResNet_CIFAR)")
    block, layers = ARCH[depth]
    model = ResNet(
        block,
        layers,
        num_classes=num_classes,
        stem_type="deep" if deep_stem else "",
        stem_width=32 if deep_stem else 64,
        avg_down=avg_down,
        drop_path_rate=drop_path_rate if drop_path_rule == "linear" else 0.0,
        global_pool=GLOBAL_POOL,
    )
    if small_input:  # ResNet_CIFAR: one 3x3 stride-1 conv, no max-pool
        model.conv1 = nn.Conv2d(3, 64, kernel_size=3, stride=1, padding=1, bias=False)
        model.maxpool = nn.Identity()
    if drop_path_rule == "uniform" and drop_path_rate > 0:
        for blk in model.blocks():
            blk.drop_path = DropPath(drop_path_rate)
    init_weights(model, zero_init_residual)
    return model


def init_weights(model: ResNet, zero_init_residual: bool = True) -> None:
    """mmpretrain's init: Kaiming-normal fan-out convs, BN (1, 0), last BN of each block 0, head N(0, 0.01)."""
    for m in model.modules():
        if isinstance(m, nn.Conv2d):
            nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")
            if m.bias is not None:
                nn.init.zeros_(m.bias)
        elif isinstance(m, nn.BatchNorm2d | nn.GroupNorm):
            nn.init.ones_(m.weight)
            nn.init.zeros_(m.bias)
    if zero_init_residual:
        for blk in model.blocks():
            blk.zero_init_last()  # norm2 of BasicBlock, norm3 of Bottleneck
    if isinstance(model.fc, nn.Linear):
        nn.init.normal_(model.fc.weight, mean=0.0, std=0.01)
        nn.init.zeros_(model.fc.bias)


def build_model_from_cfg(cfg: Mapping[str, Any]) -> ResNet:
    """The model of a composed config (groups model, stem, dataset, recipe)."""
    arch = cfg["recipe"].get("model", {}) or {}
    return build_model(
        int(cfg["model"]["depth"]),
        int(cfg["dataset"]["num_classes"]),
        deep_stem=bool(cfg["stem"]["deep"]),
        avg_down=bool(cfg["stem"]["avg_down"]),
        small_input=bool(cfg["stem"]["small_input"]),
        drop_path_rate=float(arch.get("drop_path_rate", 0.0)),
        drop_path_rule=str(arch.get("drop_path_rule", "linear")),
        zero_init_residual=bool(arch.get("zero_init_residual", True)),
    )


def count_params(model: nn.Module) -> int:
    """Trainable parameters of the whole classifier, head included (the table's "Params")."""
    return sum(p.numel() for p in model.parameters() if p.requires_grad)


def count_flops(model: ResNet, input_px: int) -> int:
    """MACs of backbone + global pooling at 1x3xPxP, counted as the table did (shared/spec/complexity.md):
    mmcv 1.x's convention, reproduced by ptflops 0.7.5 with functional counting off, classifier left out."""
    from ptflops import get_model_complexity_info  # imported on use: only rank 0 and the complexity command count

    features = copy.deepcopy(model).eval()
    # fc -> Identity (the table leaves the classifier out); the pool as nn.AdaptiveAvgPool2d, which ptflops counts
    features.reset_classifier(0, global_pool="avg")
    macs, _ = get_model_complexity_info(
        features,
        (3, input_px, input_px),
        as_strings=False,
        print_per_layer_stat=False,
        verbose=False,
        backend="pytorch",  # the library's documented default backend differs from its code: be explicit
        backend_specific_config={"count_functional": False},
    )
    return int(macs)


def build_train_model(
    cfg: Mapping[str, Any], plan: BatchPlan, device: torch.device, channels_last: bool, rank: int
) -> tuple[nn.Module, int, float]:
    """The model as a run trains it, on its device (recipe init, pretrained weights, SyncBN or BN groups as the
    batch plan says); its Params and FLOPs (G, rank 0).

    BN groups: each forward pass holds `plan.bn_groups_per_pass` groups (the recipe's per-GPU shares, of equal
    size in every step, the short last one too), in the `trainer.bn_group_kernel` form."""
    model = build_model_from_cfg(cfg)
    init = cfg["recipe"].get("init") or {}
    if init.get("pretrained"):
        from resnet_repro.convert import load_pretrained

        trusted = bool(cfg["trainer"]["trust_checkpoint"])
        load_pretrained(model, init["pretrained"], prefix=init.get("prefix"), trusted=trusted)
    params = count_params(model)  # ptflops knows plain BN layers: count before converting them
    flops = count_flops(model, int(cfg["dataset"]["input_size"])) / 1e9 if rank == 0 else 0.0
    if plan.sync_bn:  # running statistics from one pass per step, as the BN groups' (bn_groups.GatedSyncBatchNorm)
        model = convert_sync_bn(model)
    else:  # each group of the recipe's per-GPU batch normalised on its own, in one pass
        kernel = resolve_kernel(str(cfg["trainer"]["bn_group_kernel"]), device)
        convert_bn_groups(model, groups=plan.bn_groups_per_pass, kernel=kernel)
    model.to(device)
    return (model.to(memory_format=torch.channels_last) if channels_last else model), params, flops


def plain_model(cfg: Mapping[str, Any], trained: nn.Module) -> nn.Module:
    """The trained weights in the row's plain model (ordinary BatchNorm, on the CPU): what serving needs."""
    model = build_model_from_cfg(cfg)
    model.load_state_dict({k: v.detach().cpu() for k, v in trained.state_dict().items()})
    return model.eval()
