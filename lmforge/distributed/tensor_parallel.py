"""Tensor parallelism: split every layer of one model across processes (or GPUs) that run it together.

`shard_model` turns a decoder LM into one process's shard, through the same module-injection
walker as quantization and adapters. By canonical module name:

- `q_proj`, `k_proj`, `v_proj`, `gate_proj`, `up_proj`: column-parallel (a slice of the output rows);
- `o_proj`, `down_proj`: row-parallel (a slice of the input columns, then one all-reduce);
- `embed_tokens`, `lm_head`: vocabulary-parallel (a slice of the vocabulary rows).

Attention heads are split by key/value group: process r computes query heads
[r H/N, (r+1) H/N) and holds the key/value heads those queries read. With fewer key/value
heads than processes, each KV head is replicated on the N/KV processes that share it. Fused
q/k/v and gate/up projections are split as their unfused parts and fused again afterwards,
so each process fuses its own slices. There is no padding: the head counts, the FFN width and
the vocabulary must be divisible by the number of processes.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Protocol

import torch
import torch.distributed as dist
from torch import nn

from lmforge.distributed.parallel_layers import (
    RowParallelLinear,
    VocabParallelEmbedding,
    VocabParallelHead,
)
from lmforge.errors import ConfigError, UnsupportedError, ValidationError
from lmforge.nn.embedding import TokenEmbedding
from lmforge.nn.fusion import unfuse_projections
from lmforge.nn.inject import replace_modules

COLUMN_PARALLEL = {"q_proj": "query", "k_proj": "kv", "v_proj": "kv", "gate_proj": "ffn", "up_proj": "ffn"}
ROW_PARALLEL = {"o_proj": "query", "down_proj": "ffn"}
VOCAB_PARALLEL = ("embed_tokens", "lm_head")


class TensorSource(Protocol):
    """Where a shard's weights come from: the loaded model itself, or a checkpoint read slice by slice."""

    def read(self, name: str, dim: int | None = None, start: int = 0, stop: int | None = None) -> torch.Tensor:
        """Tensor `name` of the model's state dict, or its slice [start, stop) along `dim`."""


class ModelTensors:
    """Read shards out of a model that holds its full weights (each slice copied, so the full one can go)."""

    def __init__(self, model: nn.Module):
        self.tensors = {name: p.detach() for name, p in model.named_parameters(remove_duplicate=False)}

    def read(self, name: str, dim: int | None = None, start: int = 0, stop: int | None = None) -> torch.Tensor:
        tensor = self.tensors[name]
        if dim is None:
            return tensor
        return tensor.narrow(dim, start, stop - start).clone()


@dataclass(frozen=True)
class TensorParallelPlan:
    """Which slice of each split dimension process `rank` of `world_size` holds."""

    rank: int
    world_size: int
    num_heads: int
    num_kv_heads: int
    head_dim: int
    intermediate_size: int
    vocab_size: int

    @classmethod
    def for_model(cls, model: nn.Module, world_size: int, rank: int = 0) -> TensorParallelPlan:
        """Read the split dimensions off `model` (a decoder LM) and check that `world_size` divides them."""
        _check_decoder(model)
        attention = model.decoder_attention_layers()[0]
        mlp = model.model.layers[0].mlp
        plan = cls(rank, world_size, attention.num_heads, attention.num_kv_heads, attention.head_dim,
                   mlp.down_proj.in_features, model.lm_head.out_features)
        plan.check()
        return plan

    def problems(self) -> list[str]:
        """What keeps `world_size` processes from splitting this model (empty when nothing does)."""
        n, found = self.world_size, []
        if self.num_heads % n:
            found.append(f"{self.num_heads} attention heads")
        kv = self.num_kv_heads
        if kv % n if kv >= n else n % kv:  # split the KV heads, or replicate each on n / kv processes
            found.append(f"{kv} key/value heads (it must divide them or be a multiple of them)")
        if self.intermediate_size % n:
            found.append(f"feed-forward width {self.intermediate_size}")
        if self.vocab_size % n:
            found.append(f"vocabulary size {self.vocab_size}")
        return found

    def check(self) -> None:
        if not isinstance(self.world_size, int) or self.world_size < 1:
            raise ValidationError(f"the tensor-parallel size must be an integer >= 1, got {self.world_size!r}.")
        if not 0 <= self.rank < self.world_size:
            raise ValidationError(f"rank {self.rank} is outside [0, {self.world_size}).")
        found = self.problems()
        if found:
            valid = [n for n in range(1, self.num_heads + 1)
                     if not TensorParallelPlan(0, n, *self._sizes()).problems()]
            raise ConfigError(f"tensor_parallel_size={self.world_size} does not divide this model's "
                              f"{'; '.join(found)}, and lmforge does not pad; use one of: "
                              f"{', '.join(map(str, valid))}.")

    def _sizes(self) -> tuple[int, ...]:
        return self.num_heads, self.num_kv_heads, self.head_dim, self.intermediate_size, self.vocab_size

    @property
    def query_heads(self) -> range:
        per = self.num_heads // self.world_size
        return range(self.rank * per, (self.rank + 1) * per)

    @property
    def kv_heads(self) -> range:
        """This process's key/value heads: its own share, or the one its query heads read (replicated)."""
        if self.num_kv_heads >= self.world_size:
            per = self.num_kv_heads // self.world_size
            return range(self.rank * per, (self.rank + 1) * per)
        head = self.rank // (self.world_size // self.num_kv_heads)
        return range(head, head + 1)

    def features(self, part: str) -> tuple[int, int]:
        """[start, stop) of the features of `part` ("query", "kv", "ffn" or "vocab") this process holds."""
        if part == "query":
            heads = self.query_heads
        elif part == "kv":
            heads = self.kv_heads
        else:
            size = self.intermediate_size if part == "ffn" else self.vocab_size
            per = size // self.world_size
            return self.rank * per, (self.rank + 1) * per
        return heads.start * self.head_dim, heads.stop * self.head_dim


def _check_decoder(model: nn.Module) -> None:
    if not (hasattr(model, "decoder_attention_layers") and hasattr(model, "lm_head") and hasattr(model, "model")):
        raise UnsupportedError(f"tensor parallelism splits decoder-only language models; {type(model).__name__} "
                               "is not one.")
    if any(getattr(layer, "cross_attn", None) is not None for layer in model.model.layers):
        raise UnsupportedError("tensor parallelism does not split cross-attention (encoder-decoder models) yet.")


def check_devices(world_size: int, device: torch.device | str) -> None:
    """A GPU per process: refuse more processes than this machine has GPUs. CPU processes share cores."""
    if torch.device(device).type == "cuda" and world_size > torch.cuda.device_count():
        raise ValidationError(f"tensor_parallel_size={world_size} needs {world_size} GPUs but this machine has "
                              f"{torch.cuda.device_count()}; lower it, or run on CPU.")


def _is_split(name: str, module: nn.Module) -> bool:
    leaf = name.rpartition(".")[2]
    if leaf not in COLUMN_PARALLEL and leaf not in ROW_PARALLEL and leaf not in VOCAB_PARALLEL:
        return False
    if type(module) not in (nn.Linear, nn.Embedding, TokenEmbedding):
        raise UnsupportedError(f"{name} is a {type(module).__name__}; tensor parallelism splits plain Linear and "
                               "Embedding layers, so load the model without quantization or adapters.")
    return True


def shard_model(model: nn.Module, rank: int, world_size: int, group: dist.ProcessGroup | None = None,
                source: TensorSource | None = None) -> list[str]:
    """Make `model` process `rank`'s shard of a `world_size`-way split, in place; returns the split modules' names.

    The shards' weights come from `source` (default: the model's own full weights, which are
    then released). Every process of `group` (default: all) must call it with its own rank.
    """
    plan = TensorParallelPlan.for_model(model, world_size, rank)
    if world_size == 1:
        return []
    unfuse_projections(model)
    source = source or ModelTensors(model)
    tied = getattr(model.config, "tie_word_embeddings", False)
    aliases = model.tied_weights if tied else {}

    def read(name: str, like: torch.Tensor, dim: int | None = None, span: tuple[int, int] = (0, 0)) -> torch.Tensor:
        return source.read(aliases.get(name, name), dim, *span).to(like.dtype)

    def build(name: str, module: nn.Module) -> nn.Module:
        leaf, weight, bias = name.rpartition(".")[2], module.weight, getattr(module, "bias", None)
        if leaf in COLUMN_PARALLEL:  # output rows: a plain Linear on them, nothing to communicate
            span = plan.features(COLUMN_PARALLEL[leaf])
            shard = nn.Linear(weight.shape[1], span[1] - span[0], bias=bias is not None, device="meta")
            shard.weight = nn.Parameter(read(f"{name}.weight", weight, 0, span), requires_grad=False)
            if bias is not None:
                shard.bias = nn.Parameter(read(f"{name}.bias", bias, 0, span), requires_grad=False)
            return shard
        if leaf in ROW_PARALLEL:
            span = plan.features(ROW_PARALLEL[leaf])
            return RowParallelLinear(read(f"{name}.weight", weight, 1, span),
                                     None if bias is None else read(f"{name}.bias", bias), group)
        span = plan.features("vocab")
        if leaf == "embed_tokens":
            return VocabParallelEmbedding(read(f"{name}.weight", weight, 0, span), span[0], plan.vocab_size,
                                          getattr(module, "scale", 1.0), group)
        head_bias = None if bias is None else read(f"{name}.bias", bias, 0, span)
        return VocabParallelHead(read(f"{name}.weight", weight, 0, span), head_bias, world_size, group)

    names = replace_modules(model, _is_split, build)
    for attention in model.decoder_attention_layers():
        attention.num_heads, attention.num_kv_heads = len(plan.query_heads), len(plan.kv_heads)
    model.tie_weights()  # a tied head and embedding hold the same vocabulary rows
    return names
