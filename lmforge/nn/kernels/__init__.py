"""Attention kernels: interchangeable ways to compute softmax(QK^T * scale + mask) V.

Every kernel takes q [B, H, Tq, d], k and v [B, H_kv, Tk, d] (H_kv divides H:
grouped-query attention) and an optional additive mask [B, 1, Tq, Tk], and returns
[B, H, Tq, d]. `eager` spells the maths out; `sdpa` calls PyTorch's fused
scaled_dot_product_attention; `flash` walks key/value tiles with an online
softmax in linear memory. All must agree to float rounding.

Beside them: `paged` (attention over the engine's block tables) and `cpu_decode`
(numba kernels fusing the small operations of a one-token CPU decode step).
"""

from lmforge.errors import UnsupportedError
from lmforge.nn.kernels.eager import eager_attention
from lmforge.nn.kernels.flash import flash_attention
from lmforge.nn.kernels.sdpa import sdpa_attention

ATTENTION_KERNELS = {"eager": eager_attention, "sdpa": sdpa_attention, "flash": flash_attention}


def get_attention_kernel(name: str):
    try:
        return ATTENTION_KERNELS[name]
    except KeyError:
        raise UnsupportedError(
            f"attention implementation {name!r} is not available; use one of: {', '.join(ATTENTION_KERNELS)}."
        ) from None
