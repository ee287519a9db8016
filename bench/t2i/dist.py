"""Distributed helpers: torchrun (any world size, gloo on CPU, NCCL on CUDA) or a plain process.

Launched by ``torchrun`` (``WORLD_SIZE`` in the environment) the trainer initialises a
process group and wraps the policy in DDP, even for one process. Started as a plain
``python`` process, or called in-process by tests, it runs with world size 1 and no
process group; every helper here is then a no-op, so the training loop is the same code
(``--shard fsdp`` alone gives such a process a group of one: FSDP2 needs one).
"""

from __future__ import annotations

import contextlib
import ctypes
import datetime
import gc
import os
import signal
import sys
import threading
import time
from dataclasses import dataclass

import torch
import torch.distributed as dist

_PARENT = os.getppid()  # at import: the launcher of a torchrun rank (see die_with_launcher)
PR_SET_PDEATHSIG = 1  # <linux/prctl.h>


@dataclass(frozen=True)
class DistEnv:
    rank: int
    world: int
    local_rank: int
    device: torch.device

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @property
    def distributed(self) -> bool:
        return dist.is_available() and dist.is_initialized()


def die_with_launcher() -> None:
    """Under torchrun, make this rank end when its launcher ends, however that ends.

    torchrun starts every rank in a session of its own: a ``kill -9`` of torchrun would leave
    the ranks running, reparented, and writing into OUT. On Linux the kernel sends this
    process SIGKILL when its parent dies (``prctl(PR_SET_PDEATHSIG)``); elsewhere a daemon
    thread polls the parent pid once a second. A launcher already gone by now (killed while
    this rank started) ends the rank at once. A no-op outside torchrun.

    Linux sends the signal when the *thread* that started this process ends; torchrun's
    agent starts its ranks from its main thread (torch 2.x), so that is when torchrun ends."""
    if not dist.is_torchelastic_launched():
        return
    armed = False
    if sys.platform.startswith("linux"):
        with contextlib.suppress(OSError, AttributeError):
            libc = ctypes.CDLL(None, use_errno=True)
            armed = libc.prctl(PR_SET_PDEATHSIG, int(signal.SIGKILL), 0, 0, 0) == 0
    if not armed:
        threading.Thread(target=_watch_parent, name="die-with-launcher", daemon=True).start()
    if os.getppid() != _PARENT:
        _die()


def _watch_parent() -> None:
    while os.getppid() == _PARENT:
        time.sleep(1.0)
    _die()


def _die() -> None:
    """End now, as a SIGKILL would: no clean-up code runs, so nothing more is written."""
    os._exit(128 + 9)


def init_distributed(device: str = "auto", group: bool = False) -> DistEnv:
    """Set up the process group when launched by torchrun; pick this rank's device.
    ``group``: a plain process gets a process group of one too (FSDP2 needs one)."""
    die_with_launcher()  # before any work: a rank never outlives torchrun
    use_cuda = torch.cuda.is_available() if device == "auto" else device == "cuda"
    if use_cuda and not torch.cuda.is_available():
        raise RuntimeError("--device cuda requested but CUDA is not available")
    if "WORLD_SIZE" not in os.environ:
        dev = torch.device("cuda" if use_cuda else "cpu")
        if group and not dist.is_initialized():  # in-process: a store of its own, no port
            dist.init_process_group(
                backend="nccl" if use_cuda else "gloo", store=dist.HashStore(), rank=0,
                world_size=1, **({"device_id": torch.device("cuda", 0)} if use_cuda else {}),
            )  # fmt: skip
        return DistEnv(0, 1, 0, dev)
    rank, world = int(os.environ["RANK"]), int(os.environ["WORLD_SIZE"])
    local_rank = int(os.environ.get("LOCAL_RANK", 0))
    if use_cuda:
        torch.cuda.set_device(local_rank)
        dev = torch.device("cuda", local_rank)
    else:
        dev = torch.device("cpu")
    if not dist.is_initialized():
        dist.init_process_group(
            backend="nccl" if use_cuda else "gloo",
            timeout=datetime.timedelta(minutes=30),
            **({"device_id": dev} if use_cuda else {}),
        )
    return DistEnv(rank, world, local_rank, dev)


def cleanup(graceful: bool = True) -> None:
    """Destroy the process group after a ``gc.collect()``: a DDP model freed *after*
    ``destroy_process_group`` can hang in gloo's teardown (tests/README.md, "Traps"). The
    caller must have dropped its references to the DDP model. ``graceful=False`` (an error)
    skips the barrier, which other ranks might never reach."""
    gc.collect()
    if dist.is_available() and dist.is_initialized():
        if graceful:
            dist.barrier()
        dist.destroy_process_group()


def barrier() -> None:
    if dist.is_available() and dist.is_initialized():
        dist.barrier()


def all_reduce_mean(x: torch.Tensor) -> torch.Tensor:
    """Mean over ranks (in place); identity without a process group."""
    if dist.is_available() and dist.is_initialized():
        dist.all_reduce(x, op=dist.ReduceOp.SUM)
        x /= dist.get_world_size()
    return x


def broadcast_float(value: float, device: torch.device) -> float:
    """Rank 0's value on every rank, so data-dependent decisions agree everywhere."""
    if not (dist.is_available() and dist.is_initialized()):
        return value
    t = torch.tensor([value], dtype=torch.float64, device=device)
    dist.broadcast(t, src=0)
    return float(t.item())


def gather_objects(obj) -> list:
    """Every rank's ``obj`` on every rank (a list of one without a process group)."""
    if not (dist.is_available() and dist.is_initialized()):
        return [obj]
    out = [None] * dist.get_world_size()
    dist.all_gather_object(out, obj)
    return out


def no_sync(model, sync: bool):
    """DDP's ``no_sync()`` on micro-steps that must not all-reduce; a null context otherwise.
    An FSDP2 model is told whether to reduce-scatter this micro-step's gradients."""
    if hasattr(model, "set_requires_gradient_sync"):
        model.set_requires_gradient_sync(sync)
        return contextlib.nullcontext()
    if sync or not hasattr(model, "no_sync"):
        return contextlib.nullcontext()
    return model.no_sync()
