"""GroupBatchNorm2d: one pass with per-group BN equals the recipe's per-GPU micro-batches, and stays a BatchNorm2d."""

from __future__ import annotations

import copy
import io

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from resnet_repro.bn_groups import GroupBatchNorm2d, convert_bn_groups, revert_bn_groups, set_update_stats
from resnet_repro.convert import mmpretrain_names
from resnet_repro.models import build_model


@pytest.fixture(autouse=True)
def one_thread():
    """These tensors are tiny: one intra-op thread is as fast alone and far faster on a shared machine."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


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


def micro_batch_step(model: nn.Module, x: torch.Tensor, y: torch.Tensor, group: int) -> torch.Tensor:
    """The engine's former step: passes of `group` images, each loss scaled by its share, gradients
    accumulated; BN momentum 0 for every pass but the first, so only it moves the running statistics."""
    norms = bns(model)
    momenta = [bn.momentum for bn in norms]
    total = torch.zeros((), dtype=x.dtype)
    for i, (xc, yc) in enumerate(zip(x.split(group), y.split(group), strict=True)):
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


# (stem, depth, batch, group, px, dtype, rtol)
EQUIVALENCE = [
    pytest.param("v1b", 18, 16, 4, 32, torch.float64, 1e-9, id="v1b-r18-16x4"),
    pytest.param("v1d", 18, 12, 4, 32, torch.float64, 1e-9, id="v1d-r18-12x4"),
    pytest.param("cifar", 18, 16, 4, 32, torch.float64, 1e-9, id="cifar-r18-16x4"),
    pytest.param("cifar", 18, 16, 4, 32, torch.float32, 1e-5, id="cifar-r18-16x4-fp32"),
    pytest.param("cifar", 50, 8, 4, 16, torch.float64, 1e-9, id="cifar-r50-8x4"),
    pytest.param("v1b", 18, 10, 4, 32, torch.float64, 1e-9, id="v1b-r18-10=4+4+2"),
]


@pytest.mark.parametrize(("stem", "depth", "n", "group", "px", "dtype", "rtol"), EQUIVALENCE)
def test_one_pass_equals_micro_batches(
    stem: str, depth: int, n: int, group: int, px: int, dtype: torch.dtype, rtol: float
) -> None:
    reference = make_model(depth, stem, dtype)
    candidate = convert_bn_groups(copy.deepcopy(reference), group)
    before = copy.deepcopy(candidate.state_dict())
    x, y = batch(n, px, dtype)

    expected = micro_batch_step(reference, x, y, group)
    loss = one_pass_step(candidate, x, y)

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


def test_update_stats_false_leaves_buffers() -> None:
    model = convert_bn_groups(make_model(18, "cifar"), 4)
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
    x: torch.Tensor, bn: nn.BatchNorm2d, group: int, running: tuple[torch.Tensor, torch.Tensor], factor: float
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Output and new running statistics, written out: biased variance to normalise, unbiased to track."""
    outs = []
    for g in x.split(group):
        var, mean = torch.var_mean(g, dim=(0, 2, 3), correction=0, keepdim=True)
        outs.append((g - mean) / torch.sqrt(var + bn.eps) * bn.weight.view(1, -1, 1, 1) + bn.bias.view(1, -1, 1, 1))
    first = x[:group]
    var, mean = torch.var_mean(first, dim=(0, 2, 3), correction=1)
    return (
        torch.cat(outs),
        (1 - factor) * running[0] + factor * mean,
        (1 - factor) * running[1] + factor * var,
    )


@pytest.mark.parametrize("momentum", [0.1, None])
@pytest.mark.parametrize(("n", "group"), [(12, 4), (11, 4), (3, 4), (4, 4)])
def test_layer_matches_formula(n: int, group: int, momentum: float | None) -> None:
    torch.manual_seed(0)
    bn = GroupBatchNorm2d(5, group, momentum=momentum, dtype=torch.float64)
    with torch.no_grad():
        bn.weight.uniform_(0.5, 1.5)
        bn.bias.normal_()
    for step in range(1, 4):
        x = torch.randn(n, 5, 3, 2, dtype=torch.float64) * 2 + 1
        running = (bn.running_mean.clone(), bn.running_var.clone())
        factor = 1.0 / step if momentum is None else momentum  # torch's cumulative average for momentum=None
        out, mean, var = group_formula(x, bn, group, running, factor)
        torch.testing.assert_close(bn(x), out)
        torch.testing.assert_close(bn.running_mean, mean)
        torch.testing.assert_close(bn.running_var, var)
        assert int(bn.num_batches_tracked) == step


def test_single_group_is_plain_bn() -> None:
    torch.manual_seed(0)
    plain = nn.BatchNorm2d(6)
    group = convert_bn_groups(copy.deepcopy(plain), 8)
    x = torch.randn(8, 6, 4, 4)
    torch.testing.assert_close(group(x), plain(x), rtol=0, atol=0)
    for a, b in zip(group.buffers(), plain.buffers(), strict=True):
        assert torch.equal(a, b)


def test_bad_group_size() -> None:
    with pytest.raises(ValueError, match="group_size"):
        convert_bn_groups(nn.BatchNorm2d(3), 0)
    with pytest.raises(ValueError, match="group_size"):
        GroupBatchNorm2d(3, 2.5)


def test_group_of_one_value_raises_like_torch() -> None:
    bn = GroupBatchNorm2d(3, 2)
    with pytest.raises(ValueError, match="more than 1 value per channel"):
        bn(torch.randn(5, 3, 1, 1))  # last group: one image of 1x1


# ---- conversion: a BatchNorm2d that loads and saves as one ---------------------------------------


def test_conversion_shares_tensors_and_flags() -> None:
    model = build_model(18, 10, small_input=True)
    model.bn1.weight.requires_grad_(False)
    model.layer1.eval()
    params = dict(model.named_parameters())
    buffers = dict(model.named_buffers())
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)  # built before: must still train the model

    assert convert_bn_groups(model, 16) is model
    converted = bns(model)
    assert converted and all(type(bn) is GroupBatchNorm2d and bn.group_size == 16 for bn in converted)
    assert all(p is params[name] for name, p in model.named_parameters())
    assert all(b is buffers[name] for name, b in model.named_buffers())
    assert not model.bn1.weight.requires_grad
    assert not model.layer1[0].bn1.training and model.layer2[0].bn1.training
    assert {id(p) for p in optimizer.param_groups[0]["params"]} == {id(p) for p in model.parameters()}

    convert_bn_groups(model, 8)  # re-set the size of converted layers
    assert all(bn.group_size == 8 for bn in bns(model))
    assert "group_size=8" in repr(model.bn1)
    assert revert_bn_groups(model) is model
    assert all(type(bn) is nn.BatchNorm2d for bn in bns(model))
    assert all(p is params[name] for name, p in model.named_parameters())


def test_other_norms_untouched() -> None:
    class BNSubclass(nn.BatchNorm2d):
        pass

    model = nn.Sequential(nn.BatchNorm2d(3), nn.SyncBatchNorm(3), BNSubclass(3), nn.BatchNorm1d(3))
    convert_bn_groups(model, 4)
    assert [type(m) for m in model] == [GroupBatchNorm2d, nn.SyncBatchNorm, BNSubclass, nn.BatchNorm1d]
    assert type(convert_bn_groups(nn.BatchNorm2d(3), 4)) is GroupBatchNorm2d  # a bare BN is returned converted


def test_eval_and_state_dict_unchanged() -> None:
    plain = make_model(18, "v1d", torch.float32)
    grouped = convert_bn_groups(copy.deepcopy(plain), 4)
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
    fresh_grouped = convert_bn_groups(build_model(18, 10, deep_stem=True, avg_down=True), 4)
    fresh_grouped.load_state_dict(fresh_plain.state_dict(), strict=True)
    assert all(torch.equal(v, fresh_plain.state_dict()[k]) for k, v in fresh_grouped.state_dict().items())


# ---- memory format, autocast, compile, DDP -----------------------------------------------------


def forward_backward(model: nn.Module, x: torch.Tensor, y: torch.Tensor) -> tuple[torch.Tensor, list[torch.Tensor]]:
    model.zero_grad(set_to_none=True)
    out = model(x)
    F.cross_entropy(out.float(), y).backward()
    return out.detach(), [p.grad.clone() for p in model.parameters()]


def test_channels_last_matches_contiguous() -> None:
    model = convert_bn_groups(make_model(18, "cifar", torch.float32), 4)
    last = copy.deepcopy(model).to(memory_format=torch.channels_last)
    x, y = batch(8, 16, torch.float32)
    out, grads = forward_backward(model, x, y)
    out_cl, grads_cl = forward_backward(last, x.contiguous(memory_format=torch.channels_last), y)
    torch.testing.assert_close(out_cl, out, rtol=1e-5, atol=1e-5)
    for g_cl, g in zip(grads_cl, grads, strict=True):
        assert_close_norm(g_cl, g, 1e-5, "grad")
    for b_cl, b in zip(last.buffers(), model.buffers(), strict=True):
        torch.testing.assert_close(b_cl, b, rtol=1e-5, atol=1e-6)


def test_layer_keeps_channels_last() -> None:
    bn = GroupBatchNorm2d(8, 4)
    x = torch.randn(12, 8, 5, 5).contiguous(memory_format=torch.channels_last).requires_grad_()
    out = bn(x)
    assert out.is_contiguous(memory_format=torch.channels_last)
    out.sum().backward()
    assert x.grad.is_contiguous(memory_format=torch.channels_last)


def test_autocast_bfloat16() -> None:
    model = convert_bn_groups(make_model(18, "cifar", torch.float32), 4)
    x, y = batch(8, 16, torch.float32)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        bn_out = model.bn1(model.conv1(x))
        out, grads = forward_backward(model, x, y)
    assert bn_out.dtype == torch.bfloat16 and out.dtype == torch.bfloat16
    assert torch.isfinite(out).all() and all(torch.isfinite(g).all() for g in grads)
    assert all(bn.running_mean.dtype == torch.float32 and torch.isfinite(bn.running_var).all() for bn in bns(model))


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


@pytest.mark.slow
def test_torch_compile_matches_eager() -> None:
    eager = convert_bn_groups(tiny_net(), 4)
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
        plain = convert_bn_groups(tiny_net(), 4)
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
