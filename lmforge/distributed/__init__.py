"""Many processes, one job, with torch.distributed: process groups (`process_group`) and
data-parallel training (`data_parallel`: DDP and FSDP2). Launch with `torchrun`."""

from lmforge.distributed.data_parallel import DATA_PARALLEL, wrap_for_data_parallel
from lmforge.distributed.process_group import (
    DistributedContext,
    all_reduce_sum,
    barrier,
    destroy_distributed,
    gather_objects,
    gather_tensors,
    init_distributed,
    launched_world_size,
)

__all__ = [
    "DATA_PARALLEL",
    "DistributedContext",
    "all_reduce_sum",
    "barrier",
    "destroy_distributed",
    "gather_objects",
    "gather_tensors",
    "init_distributed",
    "launched_world_size",
    "wrap_for_data_parallel",
]
