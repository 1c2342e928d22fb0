"""Data parallelism: N processes, one model, each process a different share of every batch.

Two strategies from PyTorch itself:

- **DDP** (`DistributedDataParallel`): every process holds the whole model and
  optimizer; after backward the gradients are all-reduced (averaged) in buckets
  that overlap with the rest of the backward pass. Memory per process is that of
  one-process training.
- **FSDP2** (`fully_shard`): each transformer block's parameters, gradients and
  optimizer state are split across the processes; a block's full weights are
  all-gathered just before it runs and freed after, gradients are reduce-scattered.
  Memory per process falls roughly N-fold for a few more collectives.

Both average gradients over processes, so a loss normalised by the *global* number
of target tokens and scaled by N gives exactly the one-process gradient.

Checkpoints stay ordinary one-file-per-model safetensors: the full state is
gathered on rank 0 to save, and a full state is loaded into every process to resume.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

import torch
from torch import nn
from torch.nn.parallel import DistributedDataParallel

from lmforge.distributed.process_group import DistributedContext

DATA_PARALLEL = ("ddp", "fsdp")


def is_sharded(module: nn.Module) -> bool:
    """Whether `fully_shard` turned this module's parameters into shards (DTensors)."""
    return any(hasattr(p, "full_tensor") for p in module.parameters())


def _fully_shard(model: nn.Module) -> nn.Module:
    from torch.distributed.fsdp import fully_shard  # PyTorch >= 2.6

    from lmforge.nn.block import TransformerBlock

    for module in model.modules():  # one unit per block: only one block's full weights live at a time
        if isinstance(module, TransformerBlock):
            fully_shard(module)
    fully_shard(model)  # embeddings, final norm and head (tied weights stay together in this unit)
    return model


def wrap_for_data_parallel(model: nn.Module, context: DistributedContext, strategy: str,
                           find_unused_parameters: bool = False) -> nn.Module:
    """The module to run training forwards through: `model` itself when alone, else DDP's wrapper
    around it, or `model` sharded in place by FSDP2."""
    if not context.is_distributed:
        return model
    if strategy == "fsdp":
        return _fully_shard(model)
    device_ids = [context.device.index] if context.device.type == "cuda" else None
    return DistributedDataParallel(model, device_ids=device_ids, find_unused_parameters=find_unused_parameters)


@contextmanager
def gradient_sync(trained: nn.Module, enabled: bool) -> Iterator[None]:
    """Run forward + backward with (enabled) or without the gradient exchange.

    Gradient accumulation exchanges gradients once per optimizer step: the micro-batches
    before the last one only add to the local gradients.
    """
    if enabled:
        yield
    elif isinstance(trained, DistributedDataParallel):
        with trained.no_sync():
            yield
    elif hasattr(trained, "set_requires_gradient_sync"):  # an FSDP2 module
        trained.set_requires_gradient_sync(False)
        try:
            yield
        finally:
            trained.set_requires_gradient_sync(True)
    else:
        yield


# ----- full states for checkpoints ---------------------------------------------------------


def _options(**kwargs):
    from torch.distributed.checkpoint.state_dict import StateDictOptions

    return StateDictOptions(full_state_dict=True, **kwargs)


def _parameter_names(model: nn.Module, optimizer: torch.optim.Optimizer) -> list[str]:
    """The names of the optimizer's parameters, in the order `optimizer.state_dict()` numbers them."""
    names = {id(p): name for name, p in model.named_parameters()}
    return [names[id(p)] for group in optimizer.param_groups for p in group["params"]]


def full_model_state(model: nn.Module) -> dict[str, torch.Tensor]:
    """The model's complete state dict on CPU; under FSDP a collective call that returns it on rank 0
    only (other ranks get {})."""
    if not is_sharded(model):
        return model.state_dict()
    from torch.distributed.checkpoint.state_dict import get_model_state_dict

    return get_model_state_dict(model, options=_options(cpu_offload=True))


def full_optimizer_state(model: nn.Module, optimizer: torch.optim.Optimizer) -> dict[str, Any]:
    """`optimizer.state_dict()` with whole (unsharded) tensors, numbered as in one-process training;
    under FSDP a collective call whose result is complete on rank 0 only."""
    if not is_sharded(model):
        return optimizer.state_dict()
    from torch.distributed.checkpoint.state_dict import get_optimizer_state_dict

    by_name = get_optimizer_state_dict(model, optimizer, options=_options(cpu_offload=True))
    if not by_name:
        return {}
    index = {name: i for i, name in enumerate(_parameter_names(model, optimizer))}
    return {"state": {index[name]: values for name, values in by_name["state"].items()},
            "param_groups": [{**group, "params": [index[name] for name in group["params"]]}
                             for group in by_name["param_groups"]]}


def load_full_model_state(model: nn.Module, state: dict[str, torch.Tensor]) -> None:
    """Load a complete state dict (as `full_model_state` returns) into every process's model or shards."""
    if not is_sharded(model):
        model.load_state_dict(state)
        return
    from torch.distributed.checkpoint.state_dict import set_model_state_dict

    # strict=False: a checkpoint stores a tied weight once (the embedding), not under the head's name too
    set_model_state_dict(model, state, options=_options(strict=False))


def load_full_optimizer_state(model: nn.Module, optimizer: torch.optim.Optimizer, state: dict[str, Any]) -> None:
    """Load a complete, index-numbered optimizer state into every process's optimizer or shards."""
    if not is_sharded(model):
        optimizer.load_state_dict(state)
        return
    from torch.distributed.checkpoint.state_dict import set_optimizer_state_dict

    names = _parameter_names(model, optimizer)
    by_name = {"state": {names[int(i)]: values for i, values in state["state"].items()},
               "param_groups": [{**group, "params": [names[int(i)] for i in group["params"]]}
                                for group in state["param_groups"]]}
    set_optimizer_state_dict(model, optimizer, by_name, options=_options())
