"""What this machine computes fast: choose dtypes by measuring, never by assuming.

bfloat16 halves the bytes of every weight and activation, but whether it is faster depends on
the hardware: CPUs with AMX or AVX512-BF16 (and most GPUs) multiply bf16 natively, several times
faster than fp32, while a CPU with only AVX2 emulates it and runs a bf16 matmul hundreds of times
slower. So "auto" times one batched matmul in each dtype and keeps bf16 only if it clearly wins.
Single-token decode is memory-bound and gains little either way; the win is in batched steps
(prefill, the engine's mixed batches).
"""

from __future__ import annotations

import functools
import time

import torch

from lmforge.errors import ValidationError

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


def resolve_dtype(dtype: str | torch.dtype, device: torch.device | str = "cpu") -> torch.dtype:
    """A torch dtype from a dtype, its name, or "auto" (the fastest for batched matmuls on `device`)."""
    if isinstance(dtype, torch.dtype):
        return dtype
    if dtype == "auto":
        return fast_batched_dtype(str(torch.device(device).type))
    if dtype not in DTYPES:
        raise ValidationError(f"dtype {dtype!r} is not supported; use auto, {', '.join(DTYPES)}.")
    return DTYPES[dtype]


@functools.lru_cache(maxsize=None)
def fast_batched_dtype(device_type: str = "cpu") -> torch.dtype:
    """bfloat16 where a [256 x 1024] @ [1024 x 1024] matmul runs at least 1.5x faster in bf16, else float32."""
    if device_type == "cuda":
        return torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float32
    return torch.bfloat16 if _seconds(torch.bfloat16) * 1.5 < _seconds(torch.float32) else torch.float32


def _seconds(dtype: torch.dtype, repeats: int = 5) -> float:
    """Best time of one batched matmul in `dtype` (a few milliseconds where the dtype is native)."""
    a = torch.randn(256, 1024).to(dtype)
    b = torch.randn(1024, 1024).to(dtype)
    torch.matmul(a, b)  # warm up (kernel selection, packing)
    best = float("inf")
    for _ in range(repeats):
        start = time.perf_counter()
        torch.matmul(a, b)
        best = min(best, time.perf_counter() - start)
        if best > 0.05:  # an emulated dtype: one slow run is answer enough
            break
    return best
