"""Process groups: how the processes of one job find each other, with PyTorch's own machinery.

`torchrun --nproc_per_node N script.py` starts N copies of a script and gives each
its place in environment variables: RANK (0..WORLD_SIZE-1 over all machines),
LOCAL_RANK (its index on this machine, which picks its GPU) and WORLD_SIZE, plus
MASTER_ADDR/MASTER_PORT where rank 0 listens. `init_distributed()` reads them and
joins the default process group: NCCL between GPUs, gloo between CPU processes.
A script run without torchrun gets a one-process context and never touches
torch.distributed, so the same code runs alone or in a group. A program can also start its
own processes (torch.multiprocessing) and join them with `init_spawned`, rendezvousing on a
free local port.
"""

from __future__ import annotations

import os
import socket
from dataclasses import dataclass
from datetime import timedelta
from typing import Any

import torch
import torch.distributed as dist

from lmforge.errors import ValidationError

BACKENDS = ("gloo", "nccl")


@dataclass(frozen=True)
class DistributedContext:
    """This process's place in the job; `world_size` 1 means it runs alone."""

    rank: int = 0
    world_size: int = 1
    local_rank: int = 0
    device: torch.device = torch.device("cpu")

    @property
    def is_distributed(self) -> bool:
        return self.world_size > 1

    @property
    def is_main(self) -> bool:
        """Rank 0 alone writes files, logs and progress bars."""
        return self.rank == 0


def _env_int(name: str, default: int) -> int:
    value = os.environ.get(name, str(default))
    try:
        return int(value)
    except ValueError:
        raise ValidationError(f"environment variable {name}={value!r} is not an integer; unset it or launch "
                              "with torchrun, which sets it.") from None


def launched_world_size() -> int:
    """How many processes the launcher (torchrun) started for this job; 1 without one."""
    return _env_int("WORLD_SIZE", 1)


def launched_local_world_size() -> int:
    """How many of the job's processes run on this machine (torchrun's LOCAL_WORLD_SIZE); 1 without one."""
    return _env_int("LOCAL_WORLD_SIZE", launched_world_size())


def init_distributed(backend: str | None = None) -> DistributedContext:
    """Join the job's process group (once; later calls return the same context).

    The backend defaults to NCCL when CUDA is available and gloo otherwise. On CUDA
    each process uses the GPU of its LOCAL_RANK.
    """
    world_size = launched_world_size()
    if world_size == 1:
        return DistributedContext()
    rank, local_rank = _env_int("RANK", 0), _env_int("LOCAL_RANK", 0)
    use_cuda = torch.cuda.is_available() and backend != "gloo"
    backend = backend or ("nccl" if use_cuda else "gloo")
    if backend not in BACKENDS:
        raise ValidationError(f"distributed backend must be one of {', '.join(BACKENDS)}; got {backend!r}.")
    device = torch.device("cpu")
    if use_cuda:
        if local_rank >= torch.cuda.device_count():
            raise ValidationError(f"LOCAL_RANK {local_rank} has no GPU: this machine has "
                                  f"{torch.cuda.device_count()}; start at most that many processes per node.")
        device = torch.device("cuda", local_rank)
        torch.cuda.set_device(device)
    if not dist.is_initialized():
        for name in ("MASTER_ADDR", "MASTER_PORT"):
            if name not in os.environ:
                raise ValidationError(f"WORLD_SIZE={world_size} but {name} is not set; launch with "
                                      "`torchrun --nproc_per_node N ...`, which sets it.")
        dist.init_process_group(backend, rank=rank, world_size=world_size)
    return DistributedContext(rank=rank, world_size=world_size, local_rank=local_rank, device=device)


def free_port() -> int:
    """A TCP port on this machine that nothing listens on now (for a spawned group's rendezvous)."""
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


# A process of a serving group waits for the next step as long as the server is idle; a process
# that dies is noticed by its closed connections (or by torchrun's agent), not by this timeout.
SERVING_GROUP_TIMEOUT = timedelta(days=365)


def init_spawned(rank: int, world_size: int, port: int, device_type: str = "cpu") -> DistributedContext:
    """Join a group of processes started by this program on this machine, meeting at 127.0.0.1:`port`.

    On "cuda" each process uses the GPU of its rank and NCCL; on "cpu", gloo.
    """
    device = torch.device("cpu")
    if device_type == "cuda":
        device = torch.device("cuda", rank)
        torch.cuda.set_device(device)
    dist.init_process_group("nccl" if device_type == "cuda" else "gloo", init_method=f"tcp://127.0.0.1:{port}",
                            rank=rank, world_size=world_size, timeout=SERVING_GROUP_TIMEOUT)
    return DistributedContext(rank=rank, world_size=world_size, local_rank=rank, device=device)


def serving_group(context: DistributedContext) -> dist.ProcessGroup:
    """All of a launched job's processes again, in a group whose collectives wait as long as a server idles
    (the default group gives up after 30 minutes). Every process must call it, in the same order."""
    return dist.new_group(list(range(context.world_size)), timeout=SERVING_GROUP_TIMEOUT)


def destroy_distributed() -> None:
    """Leave the process group (call once at the end of a distributed script)."""
    if dist.is_initialized():
        dist.destroy_process_group()


def all_reduce_sum(value: float | int, context: DistributedContext) -> float:
    """The sum of `value` over all processes (the value itself when running alone)."""
    if not context.is_distributed:
        return value
    tensor = torch.tensor(float(value), dtype=torch.float64, device=context.device)
    dist.all_reduce(tensor)
    return tensor.item()


def barrier(context: DistributedContext) -> None:
    """Wait until every process gets here (e.g. until rank 0 has written a checkpoint)."""
    if context.is_distributed:
        dist.barrier()


def gather_objects(value: Any, context: DistributedContext) -> list[Any]:
    """The `value` of every process, in rank order (JSON-like values: they travel pickled between processes)."""
    if not context.is_distributed:
        return [value]
    gathered: list[Any] = [None] * context.world_size
    dist.all_gather_object(gathered, value)
    return gathered


def broadcast_object(value: Any, context: DistributedContext, src: int = 0,
                     group: dist.ProcessGroup | None = None) -> Any:
    """Process `src`'s `value` on every process of `group` (default: all; plain data: it travels pickled)."""
    box = [value]
    dist.broadcast_object_list(box, src=src, group=group,
                               device=context.device if context.device.type == "cuda" else None)
    return box[0]


def gather_tensors(tensor: torch.Tensor, context: DistributedContext) -> torch.Tensor:
    """The 1-D tensors of all processes concatenated in rank order (the tensor itself when alone)."""
    return torch.cat(gather_objects(tensor.cpu(), context))
