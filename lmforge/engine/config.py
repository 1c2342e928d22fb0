"""EngineConfig: the serving engine's knobs (vLLM's names), and how big the paged KV cache is.

The KV cache is one preallocated pool of blocks. Its size comes from `kv_cache_tokens` when
given, else from a fraction of the memory available on the model's device when the engine
starts (free RAM on a CPU, free GPU memory on CUDA), and never exceeds what `max_num_seqs`
sequences of `max_model_len` tokens could use.
"""

from __future__ import annotations

import os
from dataclasses import dataclass

import torch

from lmforge.engine.scheduler import SchedulerConfig
from lmforge.errors import ConfigError, ValidationError, require_counts


@dataclass
class EngineConfig:
    block_size: int = 16  # tokens per KV block
    kv_cache_tokens: int | None = None  # token slots in the KV pool; None = sized by kv_cache_memory_fraction
    kv_cache_memory_fraction: float = 0.1  # of the device memory available at startup
    max_num_seqs: int = 64  # sequences running at once
    max_num_batched_tokens: int = 512  # tokens per forward pass (decodes + prompt chunks)
    max_model_len: int | None = None  # prompt + output of one sequence; None = the model's context window
    enable_prefix_caching: bool = True
    enable_chunked_prefill: bool = True

    def __post_init__(self) -> None:
        counts = ("block_size", "kv_cache_tokens", "max_num_seqs", "max_num_batched_tokens", "max_model_len")
        optional = ("kv_cache_tokens", "max_model_len")  # None: sized from memory / the model's context
        require_counts("EngineConfig", {name: getattr(self, name) for name in counts
                                        if name not in optional or getattr(self, name) is not None})
        if not 0 < self.kv_cache_memory_fraction <= 1:
            raise ValidationError(f"EngineConfig.kv_cache_memory_fraction must be in (0, 1], "
                                  f"got {self.kv_cache_memory_fraction!r}.")

    def scheduler_config(self, max_model_len: int) -> SchedulerConfig:
        return SchedulerConfig(max_num_seqs=self.max_num_seqs, max_num_batched_tokens=self.max_num_batched_tokens,
                               max_model_len=max_model_len, enable_chunked_prefill=self.enable_chunked_prefill)

    def num_kv_blocks(self, bytes_per_block: int, max_model_len: int, device: torch.device) -> int:
        """Blocks in the KV pool; refuses a pool that cannot hold one sequence of max_model_len tokens."""
        needed = -(-max_model_len // self.block_size)
        if self.kv_cache_tokens is not None:
            num_blocks, source = -(-self.kv_cache_tokens // self.block_size), f"kv_cache_tokens={self.kv_cache_tokens}"
        else:
            budget = int(available_memory(device) * self.kv_cache_memory_fraction)
            useful = self.max_num_seqs * needed  # more could never be used at once
            num_blocks = min(budget // bytes_per_block, useful)
            source = (f"kv_cache_memory_fraction={self.kv_cache_memory_fraction} of "
                      f"{available_memory(device) / 2**30:.1f} GiB available")
        if num_blocks < needed:
            raise ConfigError(
                f"The KV cache ({source}) holds {num_blocks * self.block_size} tokens, less than one sequence of "
                f"max_model_len={max_model_len} tokens; raise kv_cache_tokens (--kv-cache-tokens) or "
                "kv_cache_memory_fraction, or lower max_model_len (--max-model-len).")
        return num_blocks


def available_memory(device: torch.device) -> int:
    """Bytes free for new tensors on `device`: free GPU memory, or the RAM the OS reports available."""
    if device.type == "cuda":
        return torch.cuda.mem_get_info(device)[0]
    try:
        with open("/proc/meminfo") as meminfo:
            for line in meminfo:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    return os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")
