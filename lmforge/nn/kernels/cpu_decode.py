"""Fused CPU kernels for decoding one token: the small operations between the weight matmuls.

Decoding one token is ~4 weight matmuls per layer and ~25 small operations around them (norms,
residual adds, rotary, KV-cache writes, attention over one query, the gated activation). Each small
torch operation costs 10-60 µs on a CPU however little data it touches: the dispatcher's code and
data fall out of the caches while a matmul streams megabytes of weights through them. On a
135M-parameter model that overhead was a third of a decode step. These kernels, JIT-compiled with
numba, do each run of small operations in one call:

- `add_rms_norm`: residual += delta, then normed = RMSNorm(residual) — the end of one sublayer and
  the start of the next;
- `rotary_attention_step`: rotate the new query and key (rotate-half RoPE), store the key and value
  in a preallocated KV cache, and attend each query head over every cached position (grouped-query:
  each key/value head serves `num_heads / kv_heads` query heads); `paged_rotary_attention_heads` does the
  same over the serving engine's paged cache, each row reading its own context's slots;
- `silu_and_mul`: SwiGLU's silu(gate) * up.

Each mirrors a torch reference the tests compare it with (`F.rms_norm`, `apply_rotary` + SDPA,
`F.silu(gate) * up`). They are compiled like every lmforge kernel (lmforge.nn.kernels.jit: serial,
GIL released, machine code cached on disk); arrays are float32 numpy views of torch tensors (no copies).
"""

from __future__ import annotations

import numpy as np

from lmforge.nn.kernels.jit import available, jit

__all__ = ["NO_ROWS", "add_rms_norm", "available", "paged_rotary_attention_heads", "rotary_attention_heads",
           "rotary_attention_step", "silu_and_mul"]

NO_ROWS = np.zeros((0, 0), dtype=np.float32)
"""Stands for an absent 2-D argument (no residual delta yet, no attention mask)."""


@jit
def add_rms_norm(residual, delta, weight, eps, normed):
    """residual [B, D] += delta [B, D] (skipped when delta has no rows); normed [B, D] = RMSNorm(residual)."""
    dim = residual.shape[1]
    for row in range(residual.shape[0]):
        squares = np.float32(0)
        for i in range(dim):
            if delta.shape[0]:
                residual[row, i] += delta[row, i]
            squares += residual[row, i] * residual[row, i]
        inverse = np.float32(1) / np.sqrt(squares / dim + eps)
        for i in range(dim):
            normed[row, i] = residual[row, i] * inverse * weight[i]


@jit
def silu_and_mul(gate_up, out):
    """out [B, F] = silu(gate) * up, where gate_up [B, 2F] holds gate then up side by side."""
    width = out.shape[1]
    for row in range(out.shape[0]):
        for i in range(width):
            gate = gate_up[row, i]
            out[row, i] = gate / (np.float32(1) + np.exp(-gate)) * gate_up[row, width + i]


@jit
def rotary_attention_step(qkv, cos, signed_sin, keys, values, position, mask, scale, num_heads, out):
    """One new position per row: rotate, cache, attend (every key/value head; see `rotary_attention_heads`)."""
    rotary_attention_heads(qkv, cos, signed_sin, keys, values, position, mask, scale, num_heads, 0, keys.shape[1], out)


@jit(inline=True)
def _rotate(row, at, c, s, scale, out):
    """out[:d] = row[at : at+d] rotated (rotate-half RoPE with cos c and signed sine s), times scale."""
    half = out.shape[0] // 2
    for i in range(half):
        x1, x2 = row[at + i], row[at + half + i]
        out[i] = (x1 * c[i] + x2 * s[i]) * scale
        out[half + i] = (x2 * c[half + i] + x1 * s[half + i]) * scale


@jit(inline=True)
def _softmax_rows(scores, group, length):
    """Each of the first `group` rows of scores, over its first `length` columns, turned into probabilities."""
    for g in range(group):
        top = scores[g, 0]
        for t in range(1, length):
            top = max(top, scores[g, t])
        total = np.float32(0)
        for t in range(length):
            scores[g, t] = np.exp(scores[g, t] - top)
            total += scores[g, t]
        for t in range(length):
            scores[g, t] /= total


@jit(inline=True)
def _group_output(sums, group, kv, out_row):
    """The group's weighted sums into the output row, query head by query head."""
    dim = sums.shape[1]
    for g in range(group):
        out_at = (kv * group + g) * dim
        for i in range(dim):
            out_row[out_at + i] = sums[g, i]


@jit
def rotary_attention_heads(qkv, cos, signed_sin, keys, values, position, mask, scale, num_heads, kv_start, kv_stop,
                           out):
    """One new position per row: rotate, cache, attend, for key/value heads kv_start <= h < kv_stop and the
    query heads they serve (threads sharing a step take disjoint head ranges).

    qkv [B, (H + 2 H_kv) d]: the fused projection's output (query heads, key heads, value heads).
    cos, signed_sin [B, d]: RotaryEmbedding's tables at each row's position (sine's first half negated).
    keys, values [B, H_kv, max_length, d]: the cache; the new key/value go to `position`, and the
    queries attend over positions 0..position. mask [B, position + 1] is added to the scores (or has
    no rows). out [B, H d] receives the heads' outputs side by side.
    """
    batch, kv_heads, _, dim = keys.shape
    group, length = num_heads // kv_heads, position + 1
    queries = np.empty((group, dim), np.float32)
    scores = np.empty((group, length), np.float32)
    sums = np.empty((group, dim), np.float32)
    for b in range(batch):
        row, c, s = qkv[b], cos[b], signed_sin[b]
        for kv in range(kv_start, kv_stop):
            _rotate(row, (num_heads + kv) * dim, c, s, np.float32(1), keys[b, kv, position])
            values[b, kv, position, :] = row[(num_heads + kv_heads + kv) * dim:(num_heads + kv_heads + kv + 1) * dim]
            cached_keys, cached_values = keys[b, kv], values[b, kv]
            for g in range(group):  # the query heads this key/value head serves, rotated and scaled
                _rotate(row, (kv * group + g) * dim, c, s, scale, queries[g])
            for t in range(length):  # each cached key is read once for the whole group
                for g in range(group):
                    score = np.float32(0)
                    for i in range(dim):
                        score += queries[g, i] * cached_keys[t, i]
                    scores[g, t] = score + (mask[b, t] if mask.shape[0] else np.float32(0))
            _softmax_rows(scores, group, length)
            sums[:, :] = 0
            for t in range(length):  # probability-weighted sum of the values
                for g in range(group):
                    weight = scores[g, t]
                    for i in range(dim):
                        sums[g, i] += weight * cached_values[t, i]
            _group_output(sums, group, kv, out[b])


@jit
def paged_rotary_attention_heads(qkv, cos, signed_sin, key_pool, value_pool, context, lengths, scale, num_heads,
                                 kv_start, kv_stop, out):
    """`rotary_attention_heads` over a paged cache (`nn.kernels.paged`): row b's context is the token slots
    context[b, :lengths[b]] of the pools [num_blocks, block_size, H_kv, d], its new key/value going to the last of
    them. Rows may have different context lengths; no mask."""
    kv_heads, dim = key_pool.shape[2], key_pool.shape[3]
    keys, values = key_pool.reshape(-1, kv_heads, dim), value_pool.reshape(-1, kv_heads, dim)  # [slots, H_kv, d]
    group = num_heads // kv_heads
    queries = np.empty((group, dim), np.float32)
    scores = np.empty((group, context.shape[1]), np.float32)
    sums = np.empty((group, dim), np.float32)
    for b in range(qkv.shape[0]):
        row, c, s, length = qkv[b], cos[b], signed_sin[b], lengths[b]
        new = context[b, length - 1]
        for kv in range(kv_start, kv_stop):
            _rotate(row, (num_heads + kv) * dim, c, s, np.float32(1), keys[new, kv])
            values[new, kv, :] = row[(num_heads + kv_heads + kv) * dim:(num_heads + kv_heads + kv + 1) * dim]
            for g in range(group):
                _rotate(row, (kv * group + g) * dim, c, s, scale, queries[g])
            for t in range(length):
                cached_key = keys[context[b, t], kv]
                for g in range(group):
                    score = np.float32(0)
                    for i in range(dim):
                        score += queries[g, i] * cached_key[i]
                    scores[g, t] = score
            _softmax_rows(scores, group, length)
            sums[:, :] = 0
            for t in range(length):
                cached_value = values[context[b, t], kv]
                for g in range(group):
                    weight = scores[g, t]
                    for i in range(dim):
                        sums[g, i] += weight * cached_value[i]
            _group_output(sums, group, kv, out[b])
