"""The CUDA path's CPU-testable parts (issue 15): RNG state per device, TF32, host syncs, MLflow on untracked ranks."""

from __future__ import annotations

import contextlib
import copy
import io
import itertools
import sys

import pytest
import torch
from torch import nn
from torch.utils._python_dispatch import TorchDispatchMode

from resnet_repro import batches, checkpoint
from resnet_repro.bn_groups import convert_bn_groups
from resnet_repro.losses import build_loss
from resnet_repro.optim import build_optimizer
from resnet_repro.precision import Precision, set_tf32

pytestmark = pytest.mark.usefixtures("one_thread")  # tests/conftest.py


# ---- RNG state: the rank's own GPU, not every visible one ------------------------------------------------------


class FakeCuda:
    """torch.cuda's per-device RNG functions for devices that do not exist here."""

    def __init__(self) -> None:
        self.states = {i: torch.full((8,), i, dtype=torch.uint8) for i in range(8)}
        self.set_calls: list[tuple[int, torch.Tensor]] = []

    def get(self, device: torch.device | int | str = "cuda") -> torch.Tensor:
        return self.states[torch.device(device).index].clone()

    def set(self, state: torch.Tensor, device: torch.device | int | str = "cuda") -> None:
        self.set_calls.append((torch.device(device).index, state.clone()))


@pytest.fixture
def fake_cuda(monkeypatch: pytest.MonkeyPatch) -> FakeCuda:
    fake = FakeCuda()
    monkeypatch.setattr(torch.cuda, "get_rng_state", fake.get)
    monkeypatch.setattr(torch.cuda, "set_rng_state", fake.set)
    monkeypatch.setattr(torch.cuda, "get_rng_state_all", lambda: pytest.fail("every GPU's state was read"))
    monkeypatch.setattr(torch.cuda, "set_rng_state_all", lambda states: pytest.fail("every GPU's state was set"))
    return fake


def roundtrip(state: dict) -> dict:
    buf = io.BytesIO()
    torch.save(state, buf)
    return torch.load(io.BytesIO(buf.getvalue()), weights_only=True)


def test_rng_state_saves_and_restores_the_ranks_own_gpu(fake_cuda: FakeCuda) -> None:
    state = roundtrip(checkpoint.rng_state(torch.device("cuda", 3)))  # rank 3 of an 8-GPU node
    assert torch.equal(state["cuda"], fake_cuda.states[3])
    # resumed where one GPU is visible (CUDA_VISIBLE_DEVICES=3): this rank's GPU is cuda:0 now
    checkpoint.set_rng_state(state, torch.device("cuda", 0))
    assert [(i, s.tolist()) for i, s in fake_cuda.set_calls] == [(0, [3] * 8)]
    assert "cuda" not in checkpoint.rng_state(torch.device("cpu"))
    checkpoint.set_rng_state(state, torch.device("cpu"))  # a CPU resume ignores the CUDA state
    assert len(fake_cuda.set_calls) == 1


def test_old_checkpoints_with_every_gpus_state_still_resume(fake_cuda: FakeCuda) -> None:
    old = {**checkpoint.rng_state(), "cuda": [fake_cuda.states[i] for i in range(8)]}  # get_rng_state_all()
    checkpoint.set_rng_state(roundtrip(old), torch.device("cuda", 5))
    assert [(i, s.tolist()) for i, s in fake_cuda.set_calls] == [(5, [5] * 8)]  # the rank's local GPU's entry
    fake_cuda.set_calls.clear()
    checkpoint.set_rng_state({**old, "cuda": old["cuda"][:1]}, torch.device("cuda", 5))  # saved seeing one GPU
    assert fake_cuda.set_calls == []  # nothing of this GPU's was saved: its generator keeps its seed


def test_cpu_rng_streams_resume_exactly() -> None:
    import random

    import numpy as np

    torch.manual_seed(1), np.random.seed(2), random.seed(3)
    state = roundtrip(checkpoint.rng_state(torch.device("cpu")))
    first = (torch.rand(3), np.random.rand(3), random.random())
    checkpoint.set_rng_state(state, torch.device("cpu"))
    again = (torch.rand(3), np.random.rand(3), random.random())
    assert torch.equal(first[0], again[0]) and np.array_equal(first[1], again[1]) and first[2] == again[2]


# ---- the fp16 row's static loss scale: skip non-finite steps on the device -----------------------------------


class OpLog(TorchDispatchMode):
    """The aten ops run inside; `syncs` counts those that read a tensor's value on the host (.item(), bool())."""

    def __init__(self) -> None:
        super().__init__()
        self.ops: list[str] = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        self.ops.append(str(func.overloadpacket.__name__))
        return func(*args, **(kwargs or {}))

    @property
    def syncs(self) -> int:
        return sum(op in HOST_READS for op in self.ops)


HOST_READS = {"_local_scalar_dense", "is_nonzero", "_unique2", "unique_dim", "nonzero", "masked_select", "bincount"}
SGD = {"name": "sgd", "lr": 0.1, "momentum": 0.9, "nesterov": False, "weight_decay": 1e-4, "decay_norm_and_bias": False}
STATIC_512 = {"loss_scale": 512.0, "autocast_dtype": None}


def small_net() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Conv2d(3, 4, 3, bias=False), nn.BatchNorm2d(4), nn.Flatten(), nn.Linear(64, 5))


def scaled_step(
    model: nn.Module, precision: Precision, optimizer: torch.optim.Optimizer, step: int, inf: bool
) -> OpLog:
    gen = torch.Generator().manual_seed(step)
    x, y = torch.randn(6, 3, 6, 6, generator=gen), torch.randint(0, 5, (6,), generator=gen)
    precision.backward(nn.functional.cross_entropy(model(x), y))
    if inf:
        model[3].weight.grad[1, 2] = float("inf")
    with OpLog() as log:
        precision.step(optimizer)
    return log


def test_static_loss_scale_skips_non_finite_steps_without_a_host_sync() -> None:
    """precision=amp-fp16-static512 against GradScaler(512) over torch's default SGD (mmengine's AmpOptimWrapper
    with loss_scale=512): a step with an inf gradient leaves the weights and the optimizer state as they were,
    the run's first step included; finite steps are equal; and no step reads a device value on the host."""
    ref_model, model = small_net(), small_net()
    ref_prec, prec = Precision(STATIC_512, torch.device("cpu")), Precision(STATIC_512, torch.device("cpu"))
    ref_opt, opt = build_optimizer(ref_model, SGD), build_optimizer(model, SGD, fused=True)
    for step, inf in enumerate([True, False, False, True, False]):
        before = copy.deepcopy(model.state_dict())
        ref_log = scaled_step(ref_model, ref_prec, ref_opt, step, inf)
        log = scaled_step(model, prec, opt, step, inf)
        assert ref_log.syncs >= 1 and log.syncs == 0, (ref_log.syncs, log.syncs)  # GradScaler's .item() is gone
        for (name, p_ref), p in zip(ref_model.named_parameters(), model.parameters(), strict=True):
            torch.testing.assert_close(p, p_ref, rtol=1e-6, atol=1e-7, msg=name)
            if inf:
                assert torch.equal(p, before[name]), name
            buf, ref_buf = opt.state[p]["momentum_buffer"], ref_opt.state[p_ref].get("momentum_buffer")
            if ref_buf is None:  # the reference skipped its first step: no buffer yet; here zeros, as good
                assert step == 0 and not buf.any()
            else:
                torch.testing.assert_close(buf, ref_buf, rtol=1e-6, atol=1e-7, msg=name)
        assert prec.scaler.get_scale() == ref_prec.scaler.get_scale() == 512.0


def test_an_unfused_optimizer_checkpoint_resumes_fused() -> None:
    saved = build_optimizer(small_net(), SGD)
    model = small_net()
    opt = build_optimizer(model, SGD, fused=True)
    opt.load_state_dict(copy.deepcopy(saved.state_dict()))
    assert all(group["fused"] for group in opt.param_groups)
    assert all(not opt.state[p]["momentum_buffer"].any() for p in model.parameters())
    scaled_step(model, Precision(STATIC_512, torch.device("cpu")), opt, 0, inf=False)  # GradScaler hands it found_inf


# ---- TF32 ----------------------------------------------------------------------------------------------------


@pytest.fixture
def tf32_flags():
    saved = torch.backends.cudnn.allow_tf32, torch.backends.cuda.matmul.allow_tf32
    yield
    torch.backends.cudnn.allow_tf32, torch.backends.cuda.matmul.allow_tf32 = saved


def test_tf32_setting_reaches_torch_and_the_tag(tf32_flags, monkeypatch: pytest.MonkeyPatch) -> None:
    cpu, gpu = torch.device("cpu"), torch.device("cuda", 0)
    assert set_tf32(True, cpu) is False  # no TF32 on a CPU
    assert torch.backends.cudnn.allow_tf32 and torch.backends.cuda.matmul.allow_tf32
    set_tf32(False, cpu)
    assert not torch.backends.cudnn.allow_tf32 and not torch.backends.cuda.matmul.allow_tf32
    torch.backends.cudnn.allow_tf32, torch.backends.cuda.matmul.allow_tf32 = True, False  # torch's defaults
    capability = {"value": (8, 0)}
    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda device=None: capability["value"])
    assert set_tf32("auto", gpu) is True  # an A100/H100 with torch's defaults: convs in TF32
    assert torch.backends.cudnn.allow_tf32 and not torch.backends.cuda.matmul.allow_tf32  # auto changes nothing
    assert set_tf32(False, gpu) is False
    capability["value"] = (7, 0)  # a V100, as the published runs used
    assert set_tf32(True, gpu) is False


# ---- MLflow only where something is tracked ------------------------------------------------------------------


def test_a_tracker_that_records_nothing_never_imports_mlflow(monkeypatch: pytest.MonkeyPatch, tmp_path) -> None:
    """Ranks other than 0 make every call rank 0 makes (Tracker(enabled=False)): none may need MLflow."""
    from resnet_repro.tracking import Tracker

    for name in [m for m in sys.modules if m == "mlflow" or m.startswith("mlflow.")]:
        monkeypatch.delitem(sys.modules, name)
    monkeypatch.setitem(sys.modules, "mlflow", None)  # any import of mlflow now raises ImportError
    with pytest.raises(ImportError):
        from mlflow.entities import Metric  # noqa: F401
    tracker = Tracker(f"sqlite:///{tmp_path}/mlflow.db", "experiment", enabled=False)
    assert tracker.open("run", adopt="abc", tags={}, params={"a": 1}, texts={"c.yaml": "x"}, resumed_tags={}) is False
    tracker.log_params({"a": 1})
    tracker.log_metrics({"loss": 1.0}, step=1)
    tracker.set_tags({"tf32": "false"})
    tracker.log_text("text", "a.txt")
    (tmp_path / "train.log").write_text("log")
    tracker.log_file(tmp_path / "train.log", "logs")
    tracker.backfill({1: {"val_top1": 1.0}})
    tracker.finish("FAILED")
    assert tracker.run_id is None and not (tmp_path / "mlflow.db").exists()


# ---- host syncs in evaluation and mixing ---------------------------------------------------------------------


def cuda_one_hot(labels: torch.Tensor, num_classes: int = -1) -> torch.Tensor:
    """F.one_hot as CUDA runs it with num_classes given: zeros + scatter, no host check of the label range (the
    CPU kernel reads min and max on the host; CUDA relies on scatter's device asserts)."""
    assert num_classes > 0
    return torch.zeros(*labels.shape, num_classes, dtype=torch.long, device=labels.device).scatter_(
        -1, labels.unsqueeze(-1), 1
    )


def test_evaluation_reads_no_device_value_until_the_end(monkeypatch: pytest.MonkeyPatch) -> None:
    """topk_accuracy accumulates on the device: the only host reads are the final top-1 and top-5, whatever the
    number of batches (torchmetrics' argument checks read the labels every batch); the counts stay exact."""
    from resnet_repro.data.preprocess import Preprocessor
    from resnet_repro.evaluation import topk_accuracy

    monkeypatch.setattr(nn.functional, "one_hot", cuda_one_hot)  # top-5's one-hot targets, as on a GPU

    torch.manual_seed(0)
    model = nn.Sequential(nn.Flatten(), nn.Linear(3 * 4 * 4, 10))
    images = torch.randint(0, 256, (3, 8, 3, 4, 4), dtype=torch.uint8)
    labels = torch.randint(0, 10, (3, 8))
    prep = Preprocessor([127.0] * 3, [64.0] * 3, torch.device("cpu"), channels_last=False)
    with OpLog() as log:
        top = topk_accuracy(model, list(zip(images, labels, strict=True)), prep, torch.device("cpu"), 10)
    assert log.syncs == 2, [op for op in log.ops if op in HOST_READS]  # float(top1), float(top5)
    with torch.no_grad():
        logits = model(prep(images.flatten(0, 1)))
    ranks = (logits > logits.gather(1, labels.flatten()[:, None])).sum(1)  # classes scored above the label
    assert top == {"top1": 100.0 * float((ranks < 1).float().mean()), "top5": 100.0 * float((ranks < 5).float().mean())}


def test_device_decoder_copies_to_a_gpu_from_pinned_memory(monkeypatch: pytest.MonkeyPatch) -> None:
    """trainer.decode=device on CUDA: the loader pins its batches and the per-batch host tensors (geometry, image
    sizes) go to the GPU as pinned, non-blocking copies; a blocking copy would make every loader next() wait for
    the previous step (a stream synchronisation). On the CPU: plain copies, no pinning."""
    from resnet_repro.data.device_decode import DecodeLoader, to_device_async

    gpu = torch.device("cuda", 1)
    assert DecodeLoader([], [0, 1], 2, 0, gpu).loader.pin_memory  # type: ignore[arg-type]
    assert not DecodeLoader([], [0, 1], 2, 0, torch.device("cpu")).loader.pin_memory  # type: ignore[arg-type]
    calls: list[tuple] = []
    monkeypatch.setattr(torch.Tensor, "is_pinned", lambda self: False)
    monkeypatch.setattr(torch.Tensor, "pin_memory", lambda self: calls.append(("pin",)) or self)
    monkeypatch.setattr(torch.Tensor, "to", lambda self, *args, **kw: calls.append(("to", args, kw)) or self)
    to_device_async(torch.zeros(2, 9, dtype=torch.int64), gpu)
    assert calls == [("pin",), ("to", (gpu,), {"non_blocking": True})]


def test_mixing_draws_the_partners_on_the_batchs_device() -> None:
    """The permutation is drawn where the batch is (no CPU draw copied to the GPU each step); the CPU's draws are
    mmpretrain's torch.randperm(n) stream, unchanged."""
    from resnet_repro.mixing import build_mixer

    mixer = build_mixer({"mixup_alpha": 0.2, "cutmix_alpha": 1.0}, 10, chunks=4)
    for n in (12, 10):  # per-GPU chunks, and a batch that does not split into them
        assert mixer.draw(n, 8, 8, torch.device("meta")).perm.device.type == "meta"
    torch.manual_seed(3)
    perm = build_mixer({"mixup_alpha": 0.2}, 10).draw(7, 8, 8, torch.device("cpu")).perm
    torch.manual_seed(3)
    assert torch.equal(perm, torch.randperm(7))


# ---- the engine's step: passes at group boundaries, no_sync under any wrapper, one graph for every batch size ----


class NoSyncSpy:
    """Stands for the DDP module: records in which passes the all-reduce was held back."""

    def __init__(self) -> None:
        self.held = 0

    @contextlib.contextmanager
    def no_sync(self):
        self.held += 1
        yield


def bare_trainer(model: nn.Module, groups: int, accum: int, *, compile_net: bool = False, ddp=None):
    """A Trainer holding only what train_step reads (the full one builds data and MLflow): `groups` per-GPU
    shares per device batch, in `accum` passes."""
    from resnet_repro.engine import Trainer

    convert_bn_groups(model, groups=groups // accum)
    trainer = Trainer.__new__(Trainer)
    trainer.device, trainer.rank, trainer.mixer, trainer._bn_update = torch.device("cpu"), 0, None, None
    trainer.preprocess = lambda images: images
    per_gpu = 4
    device_batch = groups * per_gpu
    trainer.plan = batches.BatchPlan(device_batch, 1, device_batch, device_batch // accum, per_gpu, False, per_gpu)
    trainer.model, trainer.ddp, trainer.compiled = model, ddp, compile_net
    trainer.net = torch.compile(model) if compile_net else model
    trainer.precision = Precision({"loss_scale": None, "autocast_dtype": None}, torch.device("cpu"))
    trainer.criterion = build_loss({"name": "softmax_ce"})
    trainer.optimizer = torch.optim.SGD(model.parameters(), lr=0.0)  # the step is what is compared, not the update
    return trainer


def grads_of(trainer, images: torch.Tensor, labels: torch.Tensor) -> tuple[torch.Tensor, list[torch.Tensor]]:
    """A train step's loss and gradients (before the optimizer's zero_grad)."""
    grads: list[torch.Tensor] = []
    step, trainer.optimizer.step = (
        trainer.optimizer.step,
        lambda: grads.extend(p.grad.clone() for p in trainer.model.parameters()),
    )
    try:
        loss = trainer.train_step(images, labels)
    finally:
        trainer.optimizer.step = step
    return loss, grads


def test_a_short_last_step_is_cut_into_its_per_gpu_shares() -> None:
    """4 per-GPU shares in one pass with 4 BN groups (a GPU's plan) or 2 accumulation passes: a full step (4 x 4)
    and the epoch's last (4 x 3) both equal one pass per share (8 passes of 16 in the recipe); the all-reduce is
    held back in every pass but the last."""
    from tests.test_bn_groups import micro_batch_step, tiny_net

    for accum, n in itertools.product((1, 2), (16, 12)):
        spy = NoSyncSpy()
        trainer = bare_trainer(tiny_net(), groups=4, accum=accum, ddp=spy)
        x = torch.randn(n, 3, 8, 8, generator=torch.Generator().manual_seed(n))
        y = torch.randint(0, 10, (n,), generator=torch.Generator().manual_seed(n))
        loss, grads = grads_of(trainer, x, y)
        reference = tiny_net()
        expected = micro_batch_step(reference, x, y, 4)
        torch.testing.assert_close(loss, expected, rtol=1e-6, atol=1e-7)
        for g, p in zip(grads, reference.parameters(), strict=True):
            torch.testing.assert_close(g, p.grad, rtol=1e-5, atol=1e-6)
        assert spy.held == accum - 1


def plan_of(gpus: int, per_gpu: int, device: str, world: int, sync_bn: bool = False) -> batches.BatchPlan:
    recipe = {"gpus": gpus, "batch_per_gpu": per_gpu, "model": {"sync_bn": sync_bn}}
    return batches.plan(
        {"recipe": recipe, "trainer": {"device": device, "micro_batch": None, "forward_batch": None}}, world
    )


def test_a_gpu_runs_the_device_batch_in_one_pass_with_bn_groups(monkeypatch: pytest.MonkeyPatch) -> None:
    """The plans a GPU runs (the CPU tests force them with trainer.forward_batch): resnet18_8xb16_cifar10 on 1 GPU
    is one pass of 128 in 8 BN groups (auto = cuda where one is visible), on 8 GPUs one pass of 16; the RSB
    rows' SyncBN passes stay the recipe's 256 (8 accumulation passes on 1 GPU); a CPU takes passes of one group."""
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)

    def shape(p: batches.BatchPlan) -> tuple:
        return p.device_batch, p.forward_batch, p.bn_groups_per_pass, p.accum_steps, p.sync_bn, p.bn_images

    assert shape(plan_of(8, 16, "cuda", 1)) == shape(plan_of(8, 16, "auto", 1)) == (128, 128, 8, 1, False, 16)
    assert shape(plan_of(8, 16, "cuda:0", 8)) == (16, 16, 1, 1, False, 16)
    assert shape(plan_of(8, 256, "cuda", 8, sync_bn=True)) == (256, 256, 1, 1, True, 2048)
    assert shape(plan_of(8, 256, "cuda", 1, sync_bn=True)) == (2048, 256, 1, 8, False, 256)
    assert shape(plan_of(8, 16, "cpu", 1)) == (128, 16, 1, 8, False, 16)


def test_ddp_is_found_inside_the_compiled_wrapper(tmp_path) -> None:
    import torch.distributed as dist

    from resnet_repro.distributed import ddp_of, wrap
    from tests.test_bn_groups import tiny_net

    if dist.is_initialized():
        pytest.skip("a process group is already initialised in this process")
    dist.init_process_group("gloo", init_method=f"file://{tmp_path / 'pg'}", rank=0, world_size=1)
    try:
        net = wrap(tiny_net(), 2, torch.device("cpu"), "reduce-overhead")  # DDP, then compile around it (lazily)
        assert isinstance(ddp_of(net), nn.parallel.DistributedDataParallel) and ddp_of(net) is not net
        assert ddp_of(wrap(tiny_net(), 1, torch.device("cpu"), True)) is None
    finally:
        dist.destroy_process_group()


@pytest.mark.slow
def test_the_compiled_step_takes_the_short_last_batch_without_recompiling() -> None:
    """The groups are a count, the batch dimension is dynamic: the last step's 4 x 6 runs the graph compiled for
    4 x 8 (torch._dynamo's error_on_recompile would raise), with the eager step's numbers. (Sizes a backend
    guards out still recompile once: inductor's CPU code guards 16 <= batch <= 259.)"""
    from tests.test_bn_groups import tiny_net

    torch._dynamo.reset()
    compiled = bare_trainer(tiny_net(), groups=4, accum=1, compile_net=True)
    for bn in compiled.model.modules():
        if isinstance(bn, nn.BatchNorm2d):
            bn.kernel = "one-kernel"  # the CUDA default, in its compiled form
    eager = bare_trainer(tiny_net(), groups=4, accum=1)
    for n in (32, 24):
        x = torch.randn(n, 3, 8, 8, generator=torch.Generator().manual_seed(n))
        y = torch.randint(0, 10, (n,), generator=torch.Generator().manual_seed(n))
        with torch._dynamo.config.patch(error_on_recompile=n != 32):
            loss, grads = grads_of(compiled, x, y)
        ref_loss, ref_grads = grads_of(eager, x, y)
        torch.testing.assert_close(loss, ref_loss, rtol=1e-5, atol=1e-6)
        for g, ref in zip(grads, ref_grads, strict=True):
            torch.testing.assert_close(g, ref, rtol=1e-4, atol=1e-5)
    torch._dynamo.reset()


def test_one_gpu_named_for_several_processes_is_refused_before_the_first_step() -> None:
    from resnet_repro.distributed import check_device
    from resnet_repro.errors import UserError

    with pytest.raises(UserError) as err:
        check_device("cuda:1", world=2)
    assert str(err.value) == (
        "trainer.device=cuda:1 would put all 2 processes on one GPU; allowed: cuda (each process takes its local "
        "rank's GPU; choose GPUs with CUDA_VISIBLE_DEVICES)"
    )
