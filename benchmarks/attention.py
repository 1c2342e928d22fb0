"""Peak memory and time of causal attention: explicit (eager) vs lmforge flash vs PyTorch SDPA (fp32, CPU).

One layer's attention with SmolLM2's head layout (B=1, 9 query heads sharing 3 KV heads, d=64).
Eager builds the additive causal mask and the full score matrix, as the model does; flash and
SDPA derive causality from positions. Peak memory is the high-water mark of bytes live in
torch's CPU allocator during one call, replayed from torch.profiler(profile_memory=True)
allocation/free events (inputs excluded, output included). Times are medians of interleaved runs.
Usage: python benchmarks/attention.py [--repeats 3] [--lengths 1024 2048 4096 8192] [--block-size 128]
"""

from __future__ import annotations

import argparse
import statistics
import time
from collections.abc import Callable

import torch
import torch.nn.functional as F
from torch.profiler import ProfilerActivity, profile

from benchmarks.report import machine_line, markdown_table, write_section
from lmforge.nn import build_attention_mask
from lmforge.nn.kernels.eager import eager_attention
from lmforge.nn.kernels.flash import flash_attention

HEADS, KV_HEADS, HEAD_DIM = 9, 3, 64


def peak_bytes(fn: Callable[[], torch.Tensor]) -> int:
    """Largest number of bytes torch's CPU allocator held at once while `fn` ran (profiler replay)."""
    with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
        fn()
    live = peak = 0
    for event in sorted(prof.events(), key=lambda e: e.time_range.start):
        live += event.self_cpu_memory_usage  # + allocations, - frees, attributed to the innermost op
        peak = max(peak, live)
    return peak


def seconds(fn: Callable[[], torch.Tensor]) -> float:
    start = time.perf_counter()
    fn()
    return time.perf_counter() - start


def kernels(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, block_size: int) -> dict[str, Callable]:
    length, scale = q.shape[2], HEAD_DIM ** -0.5

    def eager() -> torch.Tensor:
        mask = build_attention_mask(None, length, length, causal=True, dtype=q.dtype, device=q.device)
        return eager_attention(q, k, v, mask, scale)

    return {
        "eager (explicit)": eager,
        "flash (lmforge)": lambda: flash_attention(q, k, v, None, scale, block_size=block_size, causal=True),
        "SDPA (PyTorch)": lambda: F.scaled_dot_product_attention(q, k, v, is_causal=True, scale=scale,
                                                                  enable_gqa=True),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--lengths", type=int, nargs="+", default=[1024, 2048, 4096, 8192])
    parser.add_argument("--block-size", type=int, default=128)
    parser.add_argument("--no-write", action="store_true", help="print the table without updating docs/benchmarks.md")
    args = parser.parse_args()

    generator = torch.Generator().manual_seed(0)
    rows = []
    with torch.inference_mode():
        for length in args.lengths:
            q = torch.randn(1, HEADS, length, HEAD_DIM, generator=generator)
            k, v = (torch.randn(1, KV_HEADS, length, HEAD_DIM, generator=generator) for _ in range(2))
            systems = kernels(q, k, v, args.block_size)
            reference = systems["eager (explicit)"]()
            for name, fn in systems.items():  # warm-up, and every kernel must agree with the reference
                assert (fn() - reference).abs().max().item() < 1e-4, f"{name} disagrees with eager at {length}"
            del reference
            times = {name: [] for name in systems}
            for _ in range(args.repeats):  # interleave the systems
                for name, fn in systems.items():
                    times[name].append(seconds(fn))
            eager_time = statistics.median(times["eager (explicit)"])
            for name, fn in systems.items():
                t = statistics.median(times[name])
                rows.append([str(length), name, f"{peak_bytes(fn) / 2**20:.1f} MiB", f"{t * 1e3:.1f} ms",
                             f"{eager_time / t:.2f}x"])
                print(rows[-1], flush=True)
    scores = ", ".join(f"{n}: {HEADS * n * n * 4 / 2**20:.0f} MiB" for n in args.lengths)
    body = (f"## Attention kernels: memory and time, causal fp32 (`benchmarks/attention.py`)\n\n"
            f"Machine: {machine_line()}. B=1, {HEADS} query heads / {KV_HEADS} KV heads, head_dim {HEAD_DIM}; "
            f"flash block size {args.block_size}. Peak = most bytes live in torch's CPU allocator during one "
            "call, replayed from torch.profiler(profile_memory=True) events (inputs excluded, output included). "
            f"For scale, one fp32 score matrix is {scores}. Time: median of {args.repeats} interleaved runs; "
            "speed-up is relative to eager.\n\n"
            + markdown_table(["length", "kernel", "peak memory", "time", "speed-up vs eager"], rows))
    if not args.no_write:
        write_section("attention", body)
    print(body)


if __name__ == "__main__":
    main()
