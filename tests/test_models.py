"""Every row's model: exact parameter count, forward at its input size, mmpretrain's architecture and init."""

from __future__ import annotations

import math

import pytest
import torch
from torch import nn

from resnet_repro.config import compose_row
from resnet_repro.models import build_model, build_model_from_cfg, count_params
from resnet_repro.rows import all_rows

ROWS = list(all_rows())


@pytest.mark.parametrize("row", ROWS, ids=[r.name for r in ROWS])
def test_row_model_has_the_exact_param_count_and_runs(row) -> None:
    model = build_model_from_cfg(compose_row(row.name)).eval()
    assert count_params(model) == row.params_exact
    x = torch.randn(1, 3, row.flops_input_px, row.flops_input_px)
    with torch.no_grad():
        logits, feats = model(x), model.extract_feat(x)
    assert logits.shape == (1, row.num_classes)
    assert feats.shape == (1, 512 if row.depth < 50 else 2048)
    assert torch.allclose(model.fc(feats), logits, atol=1e-5)  # extract_feat = everything before the classifier


def test_bottleneck_strides_on_the_3x3_conv() -> None:
    m = build_model(50, 10)
    block = m.layer2[0]
    assert block.conv1.stride == (1, 1) and block.conv2.stride == (2, 2) and block.conv2.kernel_size == (3, 3)
    assert isinstance(block.downsample[0], nn.Conv2d) and block.downsample[0].stride == (2, 2)


def test_v1c_deep_stem_and_v1d_average_pool_shortcut() -> None:
    v1c, v1d = build_model(50, 10, deep_stem=True), build_model(50, 10, deep_stem=True, avg_down=True)
    convs = [m for m in v1c.conv1 if isinstance(m, nn.Conv2d)]
    assert [(c.in_channels, c.out_channels, c.kernel_size[0], c.stride[0]) for c in convs] == [
        (3, 32, 3, 2),
        (32, 32, 3, 1),
        (32, 64, 3, 1),
    ]
    assert isinstance(v1c.maxpool, nn.MaxPool2d)
    pool, conv = v1d.layer2[0].downsample[0], v1d.layer2[0].downsample[1]
    assert isinstance(pool, nn.AvgPool2d) and pool.kernel_size == 2 and pool.stride == 2
    assert pool.ceil_mode and not pool.count_include_pad
    assert conv.stride == (1, 1) and conv.kernel_size == (1, 1)
    assert isinstance(v1c.layer2[0].downsample[0], nn.Conv2d)  # v1c keeps strided-conv shortcuts


def test_cifar_stem_is_a_3x3_stride_1_conv_without_max_pool() -> None:
    m = build_model(18, 10, small_input=True)
    assert m.conv1.kernel_size == (3, 3) and m.conv1.stride == (1, 1) and m.conv1.padding == (1, 1)
    assert isinstance(m.maxpool, nn.Identity)
    assert m.forward_features(torch.randn(1, 3, 32, 32)).shape[-1] == 4  # stages at 32/16/8/4 px
    with pytest.raises(ValueError):
        build_model(18, 10, small_input=True, deep_stem=True)


@pytest.mark.parametrize("depth", [18, 50])
def test_mmpretrain_init(depth: int) -> None:
    torch.manual_seed(0)
    m = build_model(depth, 1000)
    for blk in m.blocks():
        last = blk.bn3 if depth >= 50 else blk.bn2
        assert torch.count_nonzero(last.weight) == 0  # zero-init residual
        if blk.downsample is not None:
            assert torch.all(blk.downsample[-1].weight == 1)  # projection BNs are not zeroed
    assert torch.all(m.bn1.weight == 1) and torch.all(m.bn1.bias == 0)
    assert abs(m.fc.weight.std().item() - 0.01) < 0.001 and torch.all(m.fc.bias == 0)
    conv = m.layer3[0].conv1 if depth >= 50 else m.layer3[0].conv2
    fan_out = conv.out_channels * conv.kernel_size[0] * conv.kernel_size[1]
    assert abs(conv.weight.std().item() / math.sqrt(2.0 / fan_out) - 1) < 0.05  # Kaiming normal, fan-out


def test_zero_init_residual_can_be_skipped() -> None:
    m = build_model(50, 200, zero_init_residual=False)
    assert all(torch.all(blk.bn3.weight == 1) for blk in m.blocks())


def test_drop_path_rules() -> None:
    linear = [b.drop_path for b in build_model(50, 10, drop_path_rate=0.05).blocks()]
    rates = [getattr(d, "drop_prob", 0.0) for d in linear]
    assert rates[0] == 0.0 and rates[-1] == pytest.approx(0.05) and len(rates) == 16
    assert rates == pytest.approx([0.05 * i / 15 for i in range(16)])
    uniform = build_model(50, 10, drop_path_rate=0.05, drop_path_rule="uniform").blocks()
    assert [b.drop_path.drop_prob for b in uniform] == [0.05] * 16


def test_global_pool_is_the_adaptive_average_as_a_deterministic_mean() -> None:
    """The pool is a mean over H, W (no nn.AdaptiveAvgPool2d, whose CUDA backward has no deterministic kernel):
    outputs and gradients equal the adaptive pool's, in both memory formats, and a deterministic backward runs."""
    from timm.layers import SelectAdaptivePool2d

    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # tiny tensors: one thread is as fast, and far faster on a shared machine
    torch.manual_seed(0)
    model = build_model(18, 10, small_input=True)
    assert not any(isinstance(m, nn.AdaptiveAvgPool2d) for m in model.modules())
    adaptive = build_model(18, 10, small_input=True)
    adaptive.load_state_dict(model.state_dict(), strict=True)  # no parameter or buffer in either pool
    adaptive.global_pool = SelectAdaptivePool2d(pool_type="avg", flatten=True)
    assert isinstance(adaptive.global_pool.pool, nn.AdaptiveAvgPool2d)
    x, y = torch.randn(3, 3, 8, 8), torch.tensor([0, 3, 9])
    for fmt in (torch.contiguous_format, torch.channels_last):
        grads = []
        for net in (model, adaptive):
            net.zero_grad(set_to_none=True)
            net = net.to(memory_format=fmt)
            out = net(x.contiguous(memory_format=fmt))
            nn.functional.cross_entropy(out, y).backward()
            grads.append((out.detach(), [p.grad.clone() for p in net.parameters()]))
        (out, g), (out_ref, g_ref) = grads
        torch.testing.assert_close(out, out_ref, rtol=0, atol=0)
        for a, b in zip(g, g_ref, strict=True):
            torch.testing.assert_close(a, b, rtol=0, atol=0)
    previous = torch.are_deterministic_algorithms_enabled()
    torch.use_deterministic_algorithms(True)
    try:
        nn.functional.cross_entropy(model(x), y).backward()
    finally:
        torch.use_deterministic_algorithms(previous)
        torch.set_num_threads(threads)
