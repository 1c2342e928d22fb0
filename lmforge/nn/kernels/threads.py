"""Several threads inside one compiled kernel, meeting at spin barriers.

A decode step of a small model is a few hundred matrix–vector products of 10-300 µs each. Handing
each one to a thread pool costs tens of microseconds (a thread wakes from the OS), which is why
running every product in its own call spent a third of the step waiting. Instead, every thread
runs the whole step: each computes its share of a product's rows, then waits at a barrier until all
threads have finished theirs (the next operation reads every row). A barrier here is a shared
counter: a thread adds one and spins until the count reaches threads x barriers passed — well under
a microsecond when the threads arrive together, and no OS call.

- `barrier(sync, threads, passed)`: wait for all `threads` threads at barrier number `passed` (each
  thread counts the barriers it has passed; `sync[0]` starts at 0 for each run);
- `run_on_threads(kernel, threads, *args)`: call `kernel(rank, threads, sync, *args)` on the calling
  thread (rank 0) and `threads - 1` pool threads at once, and wait for all of them;
- `torch_on_one_thread()`: torch operations inside run on the calling thread alone. torch's
  intra-op pool (OpenMP) keeps its threads spinning for a while after every parallel operation, on
  the very cores such a step then needs: sampling one token from 49k logits (large enough for torch
  to go parallel) before each step made a SmolLM2 int4 step 50% slower (15.3 vs 9.9 ms).

The kernel must release the GIL (`nogil`), or the threads would take turns instead of running
together, and every thread must pass the same barriers, or the others wait forever.
"""

from __future__ import annotations

import platform
import threading
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager

import numpy as np
import torch

from lmforge.nn.kernels.jit import jit, numba

if numba is not None:
    from llvmlite import ir
    from numba import types
    from numba.core import cgutils
    from numba.extending import intrinsic

__all__ = ["barrier", "run_on_threads", "torch_on_one_thread"]

_X86 = platform.machine().lower() in ("x86_64", "amd64")


def _address(context, builder, array_type, array, index):
    return builder.gep(context.make_array(array_type)(context, builder, array).data, [index])


if numba is not None:
    @intrinsic
    def _atomic_add(typingctx, array, index, value):
        """array[index] += value as one atomic step (int64); returns the value before."""

        def codegen(context, builder, signature, args):
            address = _address(context, builder, signature.args[0], args[0], args[1])
            return builder.atomic_rmw("add", address, args[2], "seq_cst")

        return types.int64(array, types.intp, types.int64), codegen

    @intrinsic
    def _atomic_read(typingctx, array, index):
        """array[index] read from memory each time (another thread writes it), int64."""

        def codegen(context, builder, signature, args):
            return builder.load_atomic(_address(context, builder, signature.args[0], args[0], args[1]), "acquire", 8)

        return types.int64(array, types.intp), codegen

    @intrinsic
    def _spin_pause(typingctx):
        """A hint to the CPU that this is a spin-wait loop (x86 `pause`; nothing elsewhere)."""

        def codegen(context, builder, signature, args):
            if _X86:
                pause = cgutils.get_or_insert_function(builder.module, ir.FunctionType(ir.VoidType(), []),
                                                       "llvm.x86.sse2.pause")
                builder.call(pause, [])
            return context.get_dummy_value()

        return types.none(), codegen


@jit(inline=True)
def barrier(sync, threads, passed):
    """Wait until all `threads` threads have reached barrier number `passed` (0, 1, 2, ... per run)."""
    if threads > 1:
        _atomic_add(sync, 0, 1)
        target = threads * (passed + 1)
        while _atomic_read(sync, 0) < target:
            _spin_pause()
    return passed + 1


_pool: ThreadPoolExecutor | None = None


def run_on_threads(kernel, threads: int, *args) -> None:
    """Run `kernel(rank, threads, sync, *args)` for ranks 0..threads-1 at once; rank 0 on this thread."""
    global _pool
    sync = np.zeros(8, np.int64)  # the barrier counter (one cache line)
    if threads < 2:
        kernel(0, 1, sync, *args)
        return
    if _pool is None or _pool._max_workers < threads - 1:
        _pool = ThreadPoolExecutor(threads - 1, thread_name_prefix="lmforge-step")
    helpers = [_pool.submit(kernel, rank, threads, sync, *args) for rank in range(1, threads)]
    kernel(0, threads, sync, *args)
    for helper in helpers:
        helper.result()


_one_thread_lock = threading.Lock()
_one_thread_users = 0
_threads_before = 1


@contextmanager
def torch_on_one_thread() -> Iterator[None]:
    """Run the torch operations inside on one thread (nests, and is safe from several threads at once: the
    thread count comes back when the last user leaves)."""
    global _one_thread_users, _threads_before
    with _one_thread_lock:
        if _one_thread_users == 0:
            _threads_before = torch.get_num_threads()
            torch.set_num_threads(1)
        _one_thread_users += 1
    try:
        yield
    finally:
        with _one_thread_lock:
            _one_thread_users -= 1
            if _one_thread_users == 0:
                torch.set_num_threads(_threads_before)
