"""Process-group plumbing: torchrun's environment, N local workers through torch's elastic launcher."""

from __future__ import annotations

import os
import uuid
from collections.abc import Callable
from typing import Any, TypeVar

import torch
import torch.distributed as dist

from resnet_repro.errors import UserError

T = TypeVar("T")


def under_torchrun() -> bool:
    return "TORCHELASTIC_RUN_ID" in os.environ or ("LOCAL_RANK" in os.environ and "WORLD_SIZE" in os.environ)


def env_world_size() -> int:
    return int(os.environ.get("WORLD_SIZE", "1"))


def is_initialized() -> bool:
    return dist.is_available() and dist.is_initialized()


def rank() -> int:
    return dist.get_rank() if is_initialized() else 0


def world_size() -> int:
    return dist.get_world_size() if is_initialized() else 1


def local_rank() -> int:
    return int(os.environ.get("LOCAL_RANK", "0"))


def local_world_size() -> int:
    return int(os.environ.get("LOCAL_WORLD_SIZE", "1"))


def check_device(name: str) -> None:
    """`trainer.device`: auto, cpu, cuda or cuda:N naming a visible GPU; a UserError otherwise."""
    kind, _, index = name.partition(":")
    if name in ("auto", "cpu"):
        return
    if kind != "cuda" or (index and not index.isdigit()):
        raise UserError(f"trainer.device={name} is not a device; allowed: auto, cpu, cuda, cuda:N")
    count = torch.cuda.device_count() if torch.cuda.is_available() else 0
    if count == 0:
        raise UserError(f"trainer.device={name} but no CUDA device is visible; allowed here: cpu, auto")
    if index and int(index) >= count:
        raise UserError(
            f"trainer.device={name} but only {count} CUDA device(s) are visible (cuda:0..cuda:{count - 1}); "
            f"choose GPUs with CUDA_VISIBLE_DEVICES"
        )


def select_device(name: str) -> torch.device:
    """The device of this process: `cuda` means the local rank's GPU, `cuda:N` that GPU."""
    check_device(name)
    if name.startswith("cuda:"):
        return torch.device(name)
    if name == "cuda" or (name == "auto" and torch.cuda.is_available()):
        return torch.device("cuda", local_rank() % torch.cuda.device_count())
    return torch.device("cpu")


def uses_cuda(name: str) -> bool:
    return name.startswith("cuda") or (name == "auto" and torch.cuda.is_available())


def device_name(device: torch.device) -> str:
    """A readable name of the hardware (the GPU model, or the CPU model and its cores)."""
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    import platform

    cpu = platform.processor() or platform.machine()
    try:
        with open("/proc/cpuinfo") as f:
            cpu = next((line.split(":", 1)[1].strip() for line in f if line.startswith("model name")), cpu)
    except OSError:
        pass
    return f"{cpu} ({os.cpu_count()} cores)"


def set_threads(setting: int | str, local_processes: int) -> int:
    """`trainer.threads`: torch's intra-op threads in this process. auto = OMP_NUM_THREADS when set (torchrun
    sets 1), else the usable cores shared by the local processes: N processes of all-core threads on the same
    cores run many times slower than N processes of cores / N."""
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)
    omp = os.environ.get("OMP_NUM_THREADS", "")
    if setting != "auto":
        threads = int(setting)
    else:
        threads = int(omp) if omp.isdigit() and int(omp) > 0 else max(1, cores // max(1, local_processes))
    torch.set_num_threads(threads)
    return threads


def init_from_env() -> None:
    """Join the process group torchrun (or our launcher) describes in the environment.

    gloo serves CPU tensors (and objects), NCCL CUDA tensors, in one group.
    """
    if is_initialized() or env_world_size() <= 1:
        return
    if torch.cuda.is_available():
        torch.cuda.set_device(local_rank() % torch.cuda.device_count())
        dist.init_process_group(backend="cpu:gloo,cuda:nccl")
    else:
        dist.init_process_group(backend="gloo")


def broadcast_object(obj: Any, src: int = 0) -> Any:
    if not is_initialized():
        return obj
    box = [obj]
    dist.broadcast_object_list(box, src=src)
    return box[0]


def on_rank0(fn: Callable[[], T]) -> T:
    """Run `fn` on rank 0 only and share its result; a UserError there stops every rank with the same line."""
    result, error = None, None
    if rank() == 0:
        try:
            result = fn()
        except UserError as err:
            error = str(err)
    result, error = broadcast_object((result, error))
    if error is not None:
        raise UserError(error)
    return result  # type: ignore[return-value]


def all_gather_object(obj: Any) -> list[Any]:
    if not is_initialized():
        return [obj]
    out: list[Any] = [None] * world_size()
    dist.all_gather_object(out, obj)
    return out


def destroy() -> None:
    if is_initialized():
        dist.destroy_process_group()


def launch_local(nproc: int, entrypoint: Callable[..., Any], *args: Any) -> Any:
    """Run `entrypoint(*args)` in `nproc` fresh local workers (what torchrun --standalone does); rank 0's result."""
    from torch.distributed.launcher.api import LaunchConfig, elastic_launch

    config = LaunchConfig(
        min_nodes=1,
        max_nodes=1,
        nproc_per_node=nproc,
        run_id=f"resnet_repro-{uuid.uuid4().hex[:8]}",
        rdzv_backend="c10d",
        rdzv_endpoint="localhost:0",
        max_restarts=0,
        monitor_interval=0.5,
        start_method="spawn",
    )
    results = elastic_launch(config, entrypoint)(*args)
    return results[0]
