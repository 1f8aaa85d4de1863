"""GroupBatchNorm2d: one pass with per-group BN equals the recipe's per-GPU micro-batches, and stays a BatchNorm2d."""

from __future__ import annotations

import copy
import io

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from resnet_repro.bn_groups import (
    KERNELS,
    GatedSyncBatchNorm,
    GroupBatchNorm2d,
    convert_bn_groups,
    convert_sync_bn,
    resolve_kernel,
    revert_bn_groups,
    set_update_stats,
)
from resnet_repro.convert import mmpretrain_names
from resnet_repro.models import build_model

pytestmark = pytest.mark.usefixtures("one_thread")  # tests/conftest.py


STEMS = {
    "v1b": {},
    "v1d": {"deep_stem": True, "avg_down": True},
    "cifar": {"small_input": True},
}


def bns(model: nn.Module) -> list[nn.BatchNorm2d]:
    return [m for m in model.modules() if isinstance(m, nn.BatchNorm2d)]


def make_model(depth: int, stem: str, dtype: torch.dtype = torch.float64, seed: int = 0) -> nn.Module:
    """A model whose BN layers are not at their init (zero-init residual BNs would hide most gradients)."""
    torch.manual_seed(seed)
    model = build_model(depth, 10, **STEMS[stem]).to(dtype).train()
    with torch.no_grad():
        for bn in bns(model):
            bn.weight.uniform_(0.5, 1.5)
            bn.bias.normal_(0.0, 0.1)
            bn.running_mean.normal_(0.0, 0.1)
            bn.running_var.uniform_(0.5, 1.5)
    return model


def micro_batch_step(model: nn.Module, x: torch.Tensor, y: torch.Tensor, groups: int) -> torch.Tensor:
    """The engine's former step: one pass per group (x.tensor_split(groups)), each loss scaled by its share,
    gradients accumulated; BN momentum 0 for every pass but the first, so only it moves the running statistics."""
    norms = bns(model)
    momenta = [bn.momentum for bn in norms]
    total = torch.zeros((), dtype=x.dtype)
    for i, (xc, yc) in enumerate(zip(x.tensor_split(groups), y.tensor_split(groups), strict=True)):
        for bn, momentum in zip(norms, momenta, strict=True):
            bn.momentum = momentum if i == 0 else 0.0
        loss = F.cross_entropy(model(xc), yc) * (xc.shape[0] / x.shape[0])
        loss.backward()
        total += loss.detach()
    for bn, momentum in zip(norms, momenta, strict=True):
        bn.momentum = momentum
    return total


def one_pass_step(model: nn.Module, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    loss = F.cross_entropy(model(x), y)
    loss.backward()
    return loss.detach()


def assert_close_norm(actual: torch.Tensor, expected: torch.Tensor, rtol: float, what: str) -> None:
    err, ref = float((actual - expected).norm()), float(expected.norm())
    assert err <= rtol * ref + 1e-30, f"{what}: |diff| {err:.3g} vs |ref| {ref:.3g}"


def batch(n: int, px: int, dtype: torch.dtype, seed: int = 1) -> tuple[torch.Tensor, torch.Tensor]:
    gen = torch.Generator().manual_seed(seed)
    x = torch.randn(n, 3, px, px, generator=gen, dtype=dtype) * 1.5 + 0.3
    return x, torch.randint(0, 10, (n,), generator=gen)


# (stem, depth, batch, groups, px, dtype, rtol)
EQUIVALENCE = [
    pytest.param("v1b", 18, 16, 4, 32, torch.float64, 1e-9, id="v1b-r18-16x4"),
    pytest.param("v1d", 18, 12, 3, 32, torch.float64, 1e-9, id="v1d-r18-12x4"),
    pytest.param("cifar", 18, 16, 4, 32, torch.float64, 1e-9, id="cifar-r18-16x4"),
    pytest.param("cifar", 50, 8, 2, 16, torch.float64, 1e-9, id="cifar-r50-8x4"),
    pytest.param("v1b", 18, 10, 3, 32, torch.float64, 1e-9, id="v1b-r18-10=4+3+3"),
]


def assert_step_equal(
    reference: nn.Module, candidate: nn.Module, before: dict, loss: torch.Tensor, expected: torch.Tensor, rtol: float
) -> None:
    """Loss, every gradient and the running statistics of a one-pass step against the micro-batch step."""
    assert_close_norm(loss, expected, rtol, "loss")
    for (name, p_ref), (_, p) in zip(reference.named_parameters(), candidate.named_parameters(), strict=True):
        assert_close_norm(p.grad, p_ref.grad, rtol, f"grad of {name}")
    ref_state, state = reference.state_dict(), candidate.state_dict()
    for key, value in state.items():
        if key.endswith("num_batches_tracked"):
            assert int(value) == int(before[key]) + 1, key  # once per forward, not once per group
        elif key.endswith(("running_mean", "running_var")):
            assert_close_norm(value, ref_state[key], rtol, key)
            assert not torch.equal(value, before[key]), f"{key} did not move"


@pytest.mark.parametrize(("stem", "depth", "n", "groups", "px", "dtype", "rtol"), EQUIVALENCE)
def test_one_pass_equals_micro_batches(
    stem: str, depth: int, n: int, groups: int, px: int, dtype: torch.dtype, rtol: float
) -> None:
    reference = make_model(depth, stem, dtype)
    candidate = convert_bn_groups(copy.deepcopy(reference), groups=groups)
    before = copy.deepcopy(candidate.state_dict())
    x, y = batch(n, px, dtype)
    expected = micro_batch_step(reference, x, y, groups)
    assert_step_equal(reference, candidate, before, one_pass_step(candidate, x, y), expected, rtol)


@pytest.mark.parametrize(("stem", "px"), [("v1b", 16), ("v1d", 16), ("cifar", 8)])
def test_both_kernels_equal_8_passes_of_16(stem: str, px: int) -> None:
    """The recipe's 8 GPUs x 16 in fp32: per-group and one-kernel forms against 8 passes of 16 (loss, every
    gradient within 1e-5 relative, running statistics)."""
    reference = make_model(18, stem, torch.float32)
    models = {kernel: convert_bn_groups(copy.deepcopy(reference), groups=8, kernel=kernel) for kernel in KERNELS}
    before = copy.deepcopy(reference.state_dict())
    x, y = batch(128, px, torch.float32)
    expected = micro_batch_step(reference, x, y, 8)
    for kernel, model in models.items():
        assert all(bn.kernel == kernel for bn in bns(model))
        assert_step_equal(reference, model, before, one_pass_step(model, x, y), expected, 1e-5)


def test_update_stats_false_leaves_buffers() -> None:
    model = convert_bn_groups(make_model(18, "cifar"), groups=2)
    before = copy.deepcopy(model.state_dict())
    set_update_stats(model, False)
    x, y = batch(8, 16, torch.float64)
    one_pass_step(model, x, y)
    one_pass_step(model, x[:3], y[:3])  # a batch within one group: plain BN, still no update
    for key, value in model.state_dict().items():
        assert torch.equal(value, before[key]), key
    set_update_stats(model, True)
    model(x)
    assert all(int(bn.num_batches_tracked) == 1 for bn in bns(model))


# ---- the layer against the formula -------------------------------------------------------------


def group_formula(
    x: torch.Tensor, bn: nn.BatchNorm2d, groups: int, running: tuple[torch.Tensor, torch.Tensor], factor: float
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Output and new running statistics, written out: biased variance to normalise, unbiased to track."""
    outs = []
    parts = x.tensor_split(min(groups, x.shape[0]))
    for g in parts:
        var, mean = torch.var_mean(g, dim=(0, 2, 3), correction=0, keepdim=True)
        outs.append((g - mean) / torch.sqrt(var + bn.eps) * bn.weight.view(1, -1, 1, 1) + bn.bias.view(1, -1, 1, 1))
    first = parts[0]
    var, mean = torch.var_mean(first, dim=(0, 2, 3), correction=1)
    return (
        torch.cat(outs),
        (1 - factor) * running[0] + factor * mean,
        (1 - factor) * running[1] + factor * var,
    )


@pytest.mark.parametrize("kernel", KERNELS)
@pytest.mark.parametrize("momentum", [0.1, None])
@pytest.mark.parametrize(("n", "groups"), [(12, 3), (11, 3), (3, 4), (4, 1)])
def test_layer_matches_formula(n: int, groups: int, momentum: float | None, kernel: str) -> None:
    torch.manual_seed(0)
    bn = GroupBatchNorm2d(5, groups, kernel=kernel, momentum=momentum, dtype=torch.float64)
    with torch.no_grad():
        bn.weight.uniform_(0.5, 1.5)
        bn.bias.normal_()
    for step in range(1, 4):
        x = torch.randn(n, 5, 3, 2, dtype=torch.float64) * 2 + 1
        running = (bn.running_mean.clone(), bn.running_var.clone())
        factor = 1.0 / step if momentum is None else momentum  # torch's cumulative average for momentum=None
        out, mean, var = group_formula(x, bn, groups, running, factor)
        torch.testing.assert_close(bn(x), out)
        torch.testing.assert_close(bn.running_mean, mean)
        torch.testing.assert_close(bn.running_var, var)
        assert int(bn.num_batches_tracked) == step


def test_single_group_is_plain_bn() -> None:
    torch.manual_seed(0)
    plain = nn.BatchNorm2d(6)
    group = convert_bn_groups(copy.deepcopy(plain), groups=1)
    x = torch.randn(8, 6, 4, 4)
    torch.testing.assert_close(group(x), plain(x), rtol=0, atol=0)
    for a, b in zip(group.buffers(), plain.buffers(), strict=True):
        assert torch.equal(a, b)


def test_bad_groups_and_kernel() -> None:
    with pytest.raises(ValueError, match="groups"):
        convert_bn_groups(nn.BatchNorm2d(3), groups=0)
    with pytest.raises(ValueError, match="groups"):
        GroupBatchNorm2d(3, 2.5)
    with pytest.raises(ValueError, match="kernel"):
        convert_bn_groups(nn.BatchNorm2d(3), groups=2, kernel="fused")
    with pytest.raises(TypeError):
        convert_bn_groups(nn.BatchNorm2d(3), 16)  # a count, by name: the former positional argument was a size
    assert resolve_kernel("auto", torch.device("cuda", 0)) == "one-kernel"
    assert resolve_kernel("auto", torch.device("cpu")) == "per-group"
    assert resolve_kernel("one-kernel", torch.device("cpu")) == "one-kernel"


def test_group_of_one_value_raises_like_torch() -> None:
    bn = GroupBatchNorm2d(3, 3)
    with pytest.raises(ValueError, match="more than 1 value per channel"):
        bn(torch.randn(5, 3, 1, 1))  # groups of 2, 2, 1: the last, one image of 1x1


# ---- conversion: a BatchNorm2d that loads and saves as one ---------------------------------------


def test_conversion_shares_tensors_and_flags() -> None:
    model = build_model(18, 10, small_input=True)
    model.bn1.weight.requires_grad_(False)
    model.layer1.eval()
    params = dict(model.named_parameters())
    buffers = dict(model.named_buffers())
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)  # built before: must still train the model

    assert convert_bn_groups(model, groups=8) is model
    converted = bns(model)
    assert converted and all(type(bn) is GroupBatchNorm2d and bn.groups == 8 for bn in converted)
    assert all(p is params[name] for name, p in model.named_parameters())
    assert all(b is buffers[name] for name, b in model.named_buffers())
    assert not model.bn1.weight.requires_grad
    assert not model.layer1[0].bn1.training and model.layer2[0].bn1.training
    assert {id(p) for p in optimizer.param_groups[0]["params"]} == {id(p) for p in model.parameters()}

    convert_bn_groups(model, groups=4, kernel="one-kernel")  # re-set the count and form of converted layers
    assert all(bn.groups == 4 and bn.kernel == "one-kernel" for bn in bns(model))
    assert "groups=4, kernel=one-kernel" in repr(model.bn1)
    assert revert_bn_groups(model) is model
    assert all(type(bn) is nn.BatchNorm2d for bn in bns(model))
    assert all(p is params[name] for name, p in model.named_parameters())


def test_other_norms_untouched() -> None:
    class BNSubclass(nn.BatchNorm2d):
        pass

    model = nn.Sequential(nn.BatchNorm2d(3), nn.SyncBatchNorm(3), BNSubclass(3), nn.BatchNorm1d(3))
    convert_bn_groups(model, groups=4)
    assert [type(m) for m in model] == [GroupBatchNorm2d, nn.SyncBatchNorm, BNSubclass, nn.BatchNorm1d]
    assert type(convert_bn_groups(nn.BatchNorm2d(3), groups=4)) is GroupBatchNorm2d  # a bare BN is returned converted


def test_eval_and_state_dict_unchanged() -> None:
    plain = make_model(18, "v1d", torch.float32)
    grouped = convert_bn_groups(copy.deepcopy(plain), groups=2)
    x, _ = batch(6, 32, torch.float32)
    plain.eval(), grouped.eval()
    with torch.no_grad():
        torch.testing.assert_close(grouped(x), plain(x), rtol=0, atol=0)
    sd_plain, sd_grouped = plain.state_dict(), grouped.state_dict()
    assert list(sd_grouped) == list(sd_plain)
    assert all(torch.equal(sd_grouped[k], sd_plain[k]) for k in sd_plain)
    assert mmpretrain_names(grouped) == mmpretrain_names(plain)

    # a converted model's checkpoint loads strictly into a plain one, and the other way round
    grouped.train()(x)  # move its statistics first
    buf = io.BytesIO()
    torch.save(grouped.state_dict(), buf)
    fresh_plain = build_model(18, 10, deep_stem=True, avg_down=True)
    fresh_plain.load_state_dict(torch.load(io.BytesIO(buf.getvalue()), weights_only=True), strict=True)
    assert all(torch.equal(v, grouped.state_dict()[k]) for k, v in fresh_plain.state_dict().items())
    fresh_grouped = convert_bn_groups(build_model(18, 10, deep_stem=True, avg_down=True), groups=2)
    fresh_grouped.load_state_dict(fresh_plain.state_dict(), strict=True)
    assert all(torch.equal(v, fresh_plain.state_dict()[k]) for k, v in fresh_grouped.state_dict().items())


# ---- memory format, autocast, compile, DDP -----------------------------------------------------


def forward_backward(model: nn.Module, x: torch.Tensor, y: torch.Tensor) -> tuple[torch.Tensor, list[torch.Tensor]]:
    model.zero_grad(set_to_none=True)
    out = model(x)
    F.cross_entropy(out.float(), y).backward()
    return out.detach(), [p.grad.clone() for p in model.parameters()]


@pytest.mark.parametrize("kernel", KERNELS)
def test_channels_last_matches_contiguous(kernel: str) -> None:
    model = convert_bn_groups(make_model(18, "cifar", torch.float32), groups=2, kernel=kernel)
    last = copy.deepcopy(model).to(memory_format=torch.channels_last)
    x, y = batch(8, 16, torch.float32)
    out, grads = forward_backward(model, x, y)
    out_cl, grads_cl = forward_backward(last, x.contiguous(memory_format=torch.channels_last), y)
    torch.testing.assert_close(out_cl, out, rtol=1e-5, atol=1e-5)
    for g_cl, g in zip(grads_cl, grads, strict=True):
        assert_close_norm(g_cl, g, 1e-5, "grad")
    for b_cl, b in zip(last.buffers(), model.buffers(), strict=True):
        torch.testing.assert_close(b_cl, b, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("kernel", KERNELS)
def test_layer_keeps_channels_last(kernel: str) -> None:
    bn = GroupBatchNorm2d(8, 3, kernel=kernel)
    x = torch.randn(12, 8, 5, 5).contiguous(memory_format=torch.channels_last).requires_grad_()
    out = bn(x)
    assert out.is_contiguous(memory_format=torch.channels_last)
    out.sum().backward()
    assert x.grad.is_contiguous(memory_format=torch.channels_last)


def test_autocast_bfloat16_equals_8_passes_of_16() -> None:
    """Under bf16 autocast both forms equal 8 passes of 16 within bf16's precision, on groups whose statistics
    differ (a layer normalising the whole batch would be off by far more); BN outputs are bf16, buffers fp32."""
    reference = make_model(18, "cifar", torch.float32)
    models = {kernel: convert_bn_groups(copy.deepcopy(reference), groups=8, kernel=kernel) for kernel in KERNELS}
    before = copy.deepcopy(reference.state_dict())
    x, y = batch(128, 8, torch.float32)
    group_of = torch.arange(128) // 16  # each group its own mean and spread
    x = x * (0.5 + 0.25 * group_of)[:, None, None, None] + (group_of - 3.5)[:, None, None, None] * 0.4
    with torch.autocast("cpu", dtype=torch.bfloat16):
        expected = micro_batch_step(reference, x, y, 8)
    for kernel, model in models.items():
        dtypes = []
        model.bn1.register_forward_hook(lambda m, args, out, seen=dtypes: seen.append(out.dtype))
        with torch.autocast("cpu", dtype=torch.bfloat16):
            loss = one_pass_step(model, x, y)
        assert dtypes == [torch.bfloat16], kernel
        assert all(bn.running_mean.dtype == torch.float32 for bn in bns(model))
        assert_step_equal(reference, model, before, loss, expected, BF16_RTOL)


BF16_RTOL = 1e-2  # bf16 keeps 8 bits of mantissa; measured worst: 4e-3 (a grad), ignoring the groups: 1.5


def tiny_net() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(
        nn.Conv2d(3, 8, 3, padding=1, bias=False),
        nn.BatchNorm2d(8),
        nn.ReLU(inplace=True),
        nn.Conv2d(8, 8, 3, stride=2, padding=1, bias=False),
        nn.BatchNorm2d(8),
        nn.ReLU(inplace=True),
        nn.AdaptiveAvgPool2d(1),
        nn.Flatten(),
        nn.Linear(8, 10),
    )


@pytest.mark.parametrize("kernel", KERNELS)
def test_autocast_float16_equals_8_passes_of_16(kernel: str) -> None:
    """The fp16 row's autocast (what amp-fp16-static512 runs on a GPU): half inputs, float weights and buffers,
    channels_last; a small net, as CPU half convolutions are slow."""
    reference = tiny_net().to(memory_format=torch.channels_last)
    model = convert_bn_groups(copy.deepcopy(reference), groups=8, kernel=kernel)
    before = copy.deepcopy(reference.state_dict())
    x, y = batch(64, 8, torch.float32)
    x = (x + (torch.arange(64) // 8 - 3.5)[:, None, None, None] * 0.4).contiguous(memory_format=torch.channels_last)
    with torch.autocast("cpu", dtype=torch.float16):
        expected = micro_batch_step(reference, x, y, 8)
        loss = one_pass_step(model, x, y)
    assert all(bn.running_mean.dtype == torch.float32 for bn in bns(model))
    assert_step_equal(reference, model, before, loss, expected, BF16_RTOL)


@pytest.mark.slow
def test_torch_compile_matches_eager() -> None:
    eager = convert_bn_groups(tiny_net(), groups=3)
    compiled_model = copy.deepcopy(eager)
    compiled = torch.compile(compiled_model, fullgraph=True)  # fullgraph: a graph break is an error
    x, y = batch(12, 8, torch.float32)
    for update in (True, False, True):
        set_update_stats(eager, update)
        set_update_stats(compiled_model, update)
        out, grads = forward_backward(eager, x, y)
        out_c, grads_c = forward_backward(compiled, x, y)
        torch.testing.assert_close(out_c, out, rtol=1e-5, atol=1e-5)
        for g_c, g in zip(grads_c, grads, strict=True):
            assert_close_norm(g_c, g, 1e-5, "grad")
        for b_c, b in zip(compiled_model.buffers(), eager.buffers(), strict=True):
            torch.testing.assert_close(b_c, b, rtol=1e-5, atol=1e-6)
    assert int(compiled_model[1].num_batches_tracked) == 2


def test_ddp_single_process(tmp_path) -> None:
    import torch.distributed as dist
    from torch.nn.parallel import DistributedDataParallel

    if dist.is_initialized():
        pytest.skip("a process group is already initialised in this process")
    dist.init_process_group("gloo", init_method=f"file://{tmp_path / 'pg'}", rank=0, world_size=1)
    try:
        plain = convert_bn_groups(tiny_net(), groups=3)
        ddp = DistributedDataParallel(copy.deepcopy(plain))
        x, y = batch(12, 8, torch.float32)
        out, grads = forward_backward(plain, x, y)
        out_d, grads_d = forward_backward(ddp, x, y)
        torch.testing.assert_close(out_d, out, rtol=0, atol=0)
        for g_d, g in zip(grads_d, grads, strict=True):
            torch.testing.assert_close(g_d, g)
        for b_d, b in zip(ddp.module.buffers(), plain.buffers(), strict=True):
            torch.testing.assert_close(b_d, b, rtol=0, atol=0)
    finally:
        dist.destroy_process_group()


# ---- SyncBN recipes: the same running-statistics rule ----------------------------------------------------------


@pytest.mark.parametrize("momentum", [0.1, None])
def test_sync_bn_updates_running_statistics_only_where_told(momentum: float | None) -> None:
    """torch's SyncBatchNorm updates its running statistics on every training pass; GatedSyncBatchNorm only where
    set_update_stats says (one pass per step). Without a process group SyncBatchNorm computes plain BN: the
    CPU-testable part."""
    plain = tiny_net()
    for bn in bns(plain):
        bn.momentum = momentum
    synced = convert_sync_bn(copy.deepcopy(plain))
    gated = [m for m in synced.modules() if isinstance(m, GatedSyncBatchNorm)]
    assert len(gated) == 2 and not any(type(m) is nn.BatchNorm2d for m in synced.modules())
    assert list(synced.state_dict()) == list(plain.state_dict())
    x, y = batch(6, 8, torch.float32)
    before = copy.deepcopy(synced.state_dict())
    set_update_stats(synced, False)
    out, grads = forward_backward(synced, x, y)  # an accumulation pass: batch statistics, buffers untouched
    assert all(torch.equal(v, before[k]) for k, v in synced.state_dict().items())
    ref_out, ref_grads = forward_backward(plain, x, y)
    torch.testing.assert_close(out, ref_out, rtol=0, atol=0)
    assert all(torch.equal(a, b) for a, b in zip(grads, ref_grads, strict=True))
    set_update_stats(synced, True)
    forward_backward(synced, x, y)  # the pass that updates: as plain BN's single forward did
    assert all(torch.equal(v, plain.state_dict()[k]) for k, v in synced.state_dict().items())
    assert all(bn.track_running_stats for bn in gated)
