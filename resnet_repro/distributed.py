"""Process-group plumbing: torchrun's environment, N local workers through torch's elastic launcher."""

from __future__ import annotations

import logging
import os
import signal
import sys
import uuid
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, TypeVar

import torch
import torch.distributed as dist
from torch import nn
from torch.nn.parallel import DistributedDataParallel

from resnet_repro.errors import UserError

T = TypeVar("T")


def under_torchrun() -> bool:
    return "TORCHELASTIC_RUN_ID" in os.environ or ("LOCAL_RANK" in os.environ and "WORLD_SIZE" in os.environ)


def env_world_size() -> int:
    return int(os.environ.get("WORLD_SIZE", "1"))


def job_world_size(nproc_per_node: int) -> int:
    """The processes of one job: torchrun's world, else `trainer.nproc_per_node` local workers (1: this process)."""
    return env_world_size() if under_torchrun() else int(nproc_per_node)


def is_initialized() -> bool:
    return dist.is_available() and dist.is_initialized()


def rank() -> int:
    return dist.get_rank() if is_initialized() else 0


def world_size() -> int:
    return dist.get_world_size() if is_initialized() else 1


def env_rank() -> int:
    """The global rank the launcher gave this process (before the process group exists; 0 alone)."""
    return int(os.environ.get("RANK", "0"))


def local_rank() -> int:
    return int(os.environ.get("LOCAL_RANK", "0"))


def local_world_size() -> int:
    return int(os.environ.get("LOCAL_WORLD_SIZE", "1"))


def check_device(name: str, world: int = 1) -> None:
    """`trainer.device`: auto, cpu, cuda or cuda:N naming a visible GPU (one process only: several on one GPU
    would share it, and NCCL refuses two ranks on one device); a UserError otherwise."""
    kind, _, index = name.partition(":")
    if name in ("auto", "cpu"):
        return
    if kind != "cuda" or (index and not index.isdigit()):
        raise UserError(f"trainer.device={name} is not a device; allowed: auto, cpu, cuda, cuda:N")
    if index and world > 1:
        raise UserError(
            f"trainer.device={name} would put all {world} processes on one GPU; allowed: cuda (each process takes "
            f"its local rank's GPU; choose GPUs with CUDA_VISIBLE_DEVICES)"
        )
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


@dataclass(frozen=True)
class WorkerFailure:
    """A worker that ended badly: its global rank, exit code (negative: killed by that signal), own message and
    traceback (what torch elastic's error file holds, empty when it died without a word)."""

    rank: int
    exitcode: int
    message: str
    traceback: str = ""

    @property
    def died_by_signal(self) -> bool:
        return self.exitcode < 0


class WorkersFailed(Exception):
    """A local worker group ended with failures (`trainer.nproc_per_node`)."""

    def __init__(self, failures: list[WorkerFailure]) -> None:
        super().__init__(", ".join(f"rank {f.rank}: {f.message}" for f in failures))
        self.failures = failures

    @property
    def root(self) -> WorkerFailure:
        """The failure that caused the others: a worker killed by a signal, else one that did not just lose a
        peer (its collective then fails too), else the lowest rank."""
        return min(self.failures, key=lambda f: (not f.died_by_signal, _lost_a_peer(f.message), f.rank))


def _lost_a_peer(message: str) -> bool:
    return any(text in message for text in PEER_LOST)


# what a collective raises when another process of the group is gone (gloo, NCCL, the TCP store)
PEER_LOST = ("Connection closed by peer", "Connection reset by peer", "Broken pipe", "DistNetworkError", "NCCL")


class LauncherSignalled(Exception):
    """The launching process got a signal; the elastic agent handed it to the workers and waited for them."""

    def __init__(self, signal_name: str) -> None:
        super().__init__(signal_name)
        self.signal_name = signal_name


# the signals the launching process hands to its workers (the agent's default set + SLURM's warning signals)
HANDED_SIGNALS = "SIGTERM,SIGINT,SIGHUP,SIGQUIT,SIGUSR1,SIGUSR2"
SHUTDOWN_TIMEOUT_S = 120  # a signalled worker's time to finish its step and write a checkpoint before SIGKILL


def launch_local(nproc: int, entrypoint: Callable[..., Any], *args: Any) -> Any:
    """Run `entrypoint(*args)` in `nproc` fresh local workers (what torchrun --standalone does); rank 0's result.

    WorkersFailed when a worker fails (the group is stopped, not restarted: the caller decides); LauncherSignalled
    when this process got a signal (the workers got it too and had SHUTDOWN_TIMEOUT_S to stop)."""
    from torch.distributed.elastic.multiprocessing.api import SignalException
    from torch.distributed.elastic.multiprocessing.errors import ChildFailedError
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
        signals_to_handle=HANDED_SIGNALS,
        shutdown_timeout=SHUTDOWN_TIMEOUT_S,
    )
    # the launcher's own reports of a failure (the caller says what failed in one line), and the resource
    # tracker's note about the semaphores of a worker killed by a signal (it inherits these warning options)
    quiet = [logging.getLogger(name) for name in ("torch.distributed.elastic", "torch.multiprocessing")]
    levels = [logger.level for logger in quiet]
    for logger in quiet:
        logger.setLevel(logging.CRITICAL)
    if LEAKED_SEMAPHORES not in sys.warnoptions:
        sys.warnoptions.append(LEAKED_SEMAPHORES)
    try:
        results = elastic_launch(config, entrypoint)(*args)
    except ChildFailedError as err:
        raise WorkersFailed([_failure(rank, f) for rank, f in sorted(err.failures.items())]) from None
    except SignalException as err:
        raise LauncherSignalled(signal.Signals(err.sigval).name) from None
    finally:
        for logger, level in zip(quiet, levels, strict=True):
            logger.setLevel(level)
    return results[0]


LEAKED_SEMAPHORES = "ignore:resource_tracker:UserWarning"


def _failure(rank: int, failure: Any) -> WorkerFailure:
    data = (getattr(failure, "error_file_data", None) or {}).get("message", {})
    trace = data.get("extraInfo", {}).get("py_callstack", "") if isinstance(data, dict) else ""
    message = str(failure.message or "").strip()
    if failure.exitcode < 0:
        message = f"killed by {failure.signal_name()}"
    elif message.startswith("To enable traceback"):  # no error file: it said nothing
        message = f"exit status {failure.exitcode}"
    return WorkerFailure(rank, int(failure.exitcode), message.splitlines()[0] if message else "", trace)


def wrap(model: nn.Module, world: int, device: torch.device, compile_mode: Any) -> nn.Module:
    """DDP across processes, then torch.compile around it when asked (mode: CUDA graphs etc.)."""
    net: nn.Module = model
    if world > 1:
        net = DistributedDataParallel(model, device_ids=[device.index] if device.type == "cuda" else None)
    if compile_mode is False:
        return net
    return torch.compile(net, mode=None if compile_mode is True else str(compile_mode))


def ddp_of(net: nn.Module) -> DistributedDataParallel | None:
    """The DDP module inside what `wrap` returned (torch.compile hides it), for `no_sync`; None without DDP."""
    inner = getattr(net, "_orig_mod", net)
    return inner if isinstance(inner, DistributedDataParallel) else None
