"""Quantized weight formats: how a [out, in] fp32 matrix becomes a few bits per weight plus scales.

- int8: w ≈ q * scale, q in [-127, 127] (symmetric), one scale per output channel or per group of
  `group_size` input columns (group 32 is llama.cpp's Q8_0).
- int4: w ≈ q * scale + offset per group of `group_size` input columns, q in [0, 15], two weights per
  byte; asymmetric, by llama.cpp's Q4_1 rule: offset = the group's minimum, scale = (max - min) / 15,
  both rounded to float16 values as Q4_1 stores them (so group 32 is Q4_1 exactly, and re-quantizing
  Q4_1 weights gives them back).
- nf4 (QLoRA): w ≈ code[q] * absmax per block of 64 consecutive weights, where the 16 code values
  are quantiles of a normal distribution (weights are roughly normal, so each code is used about
  equally often), two weights per byte.

4-bit codes are packed as llama.cpp packs them: in each run of 32 weights, byte j holds weight j in
its low nibble and weight j + 16 in its high nibble. Unpacking a run then gives two contiguous
halves, which is what lets a CPU kernel vectorise the dot product, and GGUF's 4-bit blocks load as
they are.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from dataclasses import dataclass

import torch

from lmforge.errors import ConfigError, InputError


def _check_matrix(weight: torch.Tensor) -> torch.Tensor:
    if weight.dim() != 2 or not weight.is_floating_point():
        raise InputError(f"only floating-point [out, in] weight matrices can be quantized, got "
                         f"{weight.dtype} of shape {tuple(weight.shape)}.")
    return weight.detach().float()


NIBBLE_RUN = 32  # weights per packing run: byte j = weight j (low nibble) | weight j + 16 (high nibble)


def pack_nibbles(codes: torch.Tensor) -> torch.Tensor:
    """uint8 codes in [0, 15], last dim a multiple of 32 → [..., n/2] bytes in llama.cpp's 4-bit order."""
    if codes.shape[-1] % NIBBLE_RUN:
        raise InputError(f"4-bit packing works on runs of {NIBBLE_RUN} codes; got a last dimension of "
                         f"{codes.shape[-1]}.")
    runs = codes.to(torch.uint8).reshape(*codes.shape[:-1], -1, 2, NIBBLE_RUN // 2)
    return (runs[..., 0, :] | (runs[..., 1, :] << 4)).flatten(-2)


def unpack_nibbles(packed: torch.Tensor) -> torch.Tensor:
    """The inverse of `pack_nibbles`: [..., n/2] bytes → [..., n] uint8 codes."""
    runs = packed.reshape(*packed.shape[:-1], -1, NIBBLE_RUN // 2)
    return torch.stack([runs & 0x0F, runs >> 4], dim=-2).flatten(-3)


class QuantizedWeight(ABC):
    """A quantized [out, in] matrix: `dequantize()` gives back an fp32 approximation."""

    name: str
    row_wise = False
    """Whether each output row is quantized on its own (its tensors are all per row): rows can then be quantized,
    stacked or selected separately, exactly."""

    @property
    @abstractmethod
    def shape(self) -> tuple[int, int]:
        """(out, in) of the original matrix."""

    @abstractmethod
    def dequantize(self) -> torch.Tensor:
        """The fp32 [out, in] matrix these bits stand for."""

    def tensors(self) -> dict[str, torch.Tensor]:
        """The packed tensors to store (safetensors) besides the settings."""
        return {k: v for k, v in vars(self).items() if isinstance(v, torch.Tensor)}

    def settings(self) -> dict:
        """Everything else that defines the weight (group size, ...), as its constructor takes it."""
        return {k: v for k, v in vars(self).items() if not isinstance(v, torch.Tensor)}

    def nbytes(self) -> int:
        return sum(t.numel() * t.element_size() for t in self.tensors().values())

    def select_rows(self, index: torch.Tensor) -> QuantizedWeight:
        """The weight of rows `index` only (an embedding lookup); for formats whose tensors are all per row."""
        return type(self)(**{k: v.index_select(0, index) for k, v in self.tensors().items()}, **self.settings())


def _groups(weight: torch.Tensor, group_size: int, method: str, allowed: tuple[int, ...]) -> torch.Tensor:
    """[out, in] → [out, in / group_size, group_size], or a clear error when the size does not fit."""
    rows, cols = weight.shape
    if group_size not in allowed or cols % group_size:
        raise ConfigError(f"{method} group_size must be one of {', '.join(map(str, allowed))} and divide the "
                          f"input dimension {cols}; got {group_size}.")
    return weight.view(rows, cols // group_size, group_size)


@dataclass
class Int8Weight(QuantizedWeight):
    q: torch.Tensor  # int8 [out, in]
    scale: torch.Tensor  # float32 [out, in / group_size]
    group_size: int  # the input dimension itself for one scale per output channel
    name = "int8"
    row_wise = True

    @classmethod
    def quantize(cls, weight: torch.Tensor, group_size: int | None = None) -> Int8Weight:
        """One scale per output channel (group_size None) or per group of 32, 64 or 128 input columns."""
        w = _check_matrix(weight)
        group_size = group_size or w.shape[1]
        groups = _groups(w, group_size, "int8", (32, 64, 128, w.shape[1]))
        scale = groups.abs().amax(-1).clamp(min=torch.finfo(torch.float32).tiny) / 127
        q = torch.round(groups / scale[..., None]).clamp(-127, 127).to(torch.int8)
        return cls(q.view_as(w), scale, group_size)

    @property
    def shape(self) -> tuple[int, int]:
        return tuple(self.q.shape)

    def dequantize(self) -> torch.Tensor:
        rows, cols = self.shape
        q = self.q.view(rows, cols // self.group_size, self.group_size).float()
        return (q * self.scale[..., None]).view(rows, cols)


def _in_half_precision(values: torch.Tensor) -> torch.Tensor:
    """values rounded to float16 values (what Q4_1 stores), those beyond float16's range kept as they are."""
    rounded = values.half().float()
    return torch.where(rounded.isfinite(), rounded, values)


@dataclass
class Int4Weight(QuantizedWeight):
    packed: torch.Tensor  # uint8 [out, in / 2]
    scale: torch.Tensor  # float32 [out, in / group_size]
    offset: torch.Tensor  # float32 [out, in / group_size]: the value of code 0
    group_size: int
    name = "int4"
    row_wise = True

    @classmethod
    def quantize(cls, weight: torch.Tensor, group_size: int = 32) -> Int4Weight:
        w = _check_matrix(weight)
        groups = _groups(w, group_size, "int4", (32, 64, 128))
        low, high = groups.amin(-1), groups.amax(-1)
        scale, offset = _in_half_precision((high - low) / 15), _in_half_precision(low)
        inverse = torch.where(scale > 0, 1 / scale, torch.zeros_like(scale))
        q = torch.round((groups - offset[..., None]) * inverse[..., None]).clamp(0, 15).to(torch.uint8)
        return cls(pack_nibbles(q.view_as(w)), scale, offset, group_size)

    @property
    def shape(self) -> tuple[int, int]:
        return self.packed.shape[0], self.packed.shape[1] * 2

    def dequantize(self) -> torch.Tensor:
        rows, cols = self.shape
        q = unpack_nibbles(self.packed).view(rows, cols // self.group_size, self.group_size).float()
        return (q * self.scale[..., None] + self.offset[..., None]).view(rows, cols)


def nf4_code_book() -> torch.Tensor:
    """QLoRA's 16 NormalFloat4 values in [-1, 1], with an exact 0.

    8 positive values are the normal quantiles at evenly spaced probabilities from 0.9677 down to
    0.5 (excluded), 7 negative ones likewise from 0.9677 with one step less, so 0 is representable;
    all are scaled so the largest magnitude is 1 (Dettmers et al., 2023; bitsandbytes).
    """
    normal = torch.distributions.Normal(0.0, 1.0)
    offset = 0.9677083
    positive = normal.icdf(torch.linspace(offset, 0.5, 9, dtype=torch.float64)[:-1])
    negative = -normal.icdf(torch.linspace(offset, 0.5, 8, dtype=torch.float64)[:-1])
    values = torch.cat([positive, torch.zeros(1, dtype=torch.float64), negative]).sort().values
    return (values / values.abs().max()).float()


NF4_CODE = nf4_code_book()
NF4_BLOCK = 64


@dataclass
class NF4Weight(QuantizedWeight):
    packed: torch.Tensor  # uint8 [out * in / 2]: code indices of the flattened weight
    absmax: torch.Tensor | None  # float32 [out * in / 64]; None when double-quantized
    rows: int
    cols: int
    # Double quantization (QLoRA): the block absmaxes minus their mean, in int8 per group of 256 blocks.
    absmax_q: torch.Tensor | None = None
    absmax_scale: torch.Tensor | None = None
    absmax_offset: torch.Tensor | None = None
    name = "nf4"

    @classmethod
    def quantize(cls, weight: torch.Tensor, double_quant: bool = False) -> NF4Weight:
        w = _check_matrix(weight)
        if w.numel() % NF4_BLOCK:
            raise ConfigError(f"nf4 quantizes blocks of {NF4_BLOCK} weights; a {tuple(w.shape)} matrix has "
                              f"{w.numel()} weights, not a multiple of {NF4_BLOCK}.")
        blocks = w.reshape(-1, NF4_BLOCK)
        absmax = blocks.abs().amax(-1).clamp(min=torch.finfo(torch.float32).tiny)
        normalized = blocks / absmax[:, None]  # in [-1, 1]
        # Nearest code value: the codes are sorted, so compare with the midpoints between neighbours.
        midpoints = (NF4_CODE[1:] + NF4_CODE[:-1]) / 2
        codes = torch.bucketize(normalized, midpoints).to(torch.uint8)
        packed = pack_nibbles(codes.flatten())
        if not double_quant:
            return cls(packed, absmax, *w.shape)
        offset = absmax.mean()
        groups = _pad_to_groups(absmax - offset)
        scale = groups.abs().amax(-1).clamp(min=torch.finfo(torch.float32).tiny) / 127
        q = torch.round(groups / scale[:, None]).clamp(-127, 127).to(torch.int8).flatten()[:absmax.numel()]
        return cls(packed, None, *w.shape, absmax_q=q, absmax_scale=scale, absmax_offset=offset)

    @property
    def shape(self) -> tuple[int, int]:
        return self.rows, self.cols

    def block_absmax(self) -> torch.Tensor:
        """Each block's scale, dequantized first when double-quantized."""
        if self.absmax is not None:
            return self.absmax
        groups = _pad_to_groups(self.absmax_q.float()) * self.absmax_scale[:, None]
        return groups.flatten()[:self.absmax_q.numel()] + self.absmax_offset

    def dequantize(self) -> torch.Tensor:
        codes = unpack_nibbles(self.packed).view(-1, NF4_BLOCK).int()
        return (NF4_CODE[codes] * self.block_absmax()[:, None]).view(self.rows, self.cols)


def _pad_to_groups(values: torch.Tensor, group: int = 256) -> torch.Tensor:
    """[n] → [ceil(n / group), group], zero-padded at the end."""
    return torch.nn.functional.pad(values, (0, (-values.numel()) % group)).view(-1, group)


FORMATS = {"int8": Int8Weight, "int4": Int4Weight, "nf4": NF4Weight}
