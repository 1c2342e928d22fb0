"""Many processes, one job, with torch.distributed: process groups (`process_group`),
data-parallel training (`data_parallel`: DDP and FSDP2) and tensor-parallel inference
(`parallel_layers`, `tensor_parallel`, `sharded_loading`). Launch with `torchrun`."""

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
from lmforge.distributed.sharded_loading import load_tensor_parallel
from lmforge.distributed.tensor_parallel import TensorParallelPlan, shard_model

__all__ = [
    "DATA_PARALLEL",
    "DistributedContext",
    "TensorParallelPlan",
    "all_reduce_sum",
    "barrier",
    "destroy_distributed",
    "gather_objects",
    "gather_tensors",
    "init_distributed",
    "launched_world_size",
    "load_tensor_parallel",
    "shard_model",
    "wrap_for_data_parallel",
]
