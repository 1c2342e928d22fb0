"""How lmforge compiles its CPU kernels: numba, one policy for all of them.

Every kernel is serial and releases the GIL (`nogil`: the server's event loop and other threads keep
running while one computes), may reorder float sums (`fastmath`: what lets LLVM vectorise a
reduction), and keeps its machine code on disk (`cache`: compiled once per machine, not per process).
Without numba the functions stay plain Python and callers take their torch paths (`available()`).

numba keys a cached kernel on its own source file only: a compiled caller keeps the machine code of
the kernels it calls from other files. After editing such a kernel, touch the callers' files (or
clear `__pycache__`) so they compile again.
"""

from __future__ import annotations

import torch

try:
    import numba
except ImportError:  # numba is a dependency; without it the torch reference paths still work
    numba = None


def available() -> bool:
    """Whether the compiled CPU kernels can run here."""
    return numba is not None


def jit(function=None, *, inline: bool = False):
    """Compile `function` with the kernels' options; `inline=True` for small helpers inlined into their callers.
    Usable as `@jit` or `@jit(inline=True)`."""
    if function is None:
        return lambda f: jit(f, inline=inline)
    if numba is None:
        return function
    return numba.njit(nogil=True, fastmath=True, cache=True, inline="always" if inline else "never")(function)


def as_array(tensor: torch.Tensor):
    """The numpy array a kernel reads for a CPU tensor: a view (parameters detached), strided tensors copied first."""
    return tensor.detach().contiguous().numpy()
