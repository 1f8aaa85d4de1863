"""The CUDA path's CPU-testable parts (issue 15): RNG state per device, TF32, host syncs, MLflow on untracked ranks."""

from __future__ import annotations

import io

import pytest
import torch

from resnet_repro import checkpoint


@pytest.fixture(autouse=True)
def one_thread():
    """Tiny tensors: one intra-op thread is as fast alone and far faster on a shared machine."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


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
