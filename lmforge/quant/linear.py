"""QuantizedLinear: a drop-in `nn.Linear` whose weight is stored in a quantized format.

On the CPU, a few rows at a time (decoding) go through a compiled kernel that reads the packed
bits directly (`kernels.py`): that is where quantization pays, since a decode step is bound by
the bytes of weight it reads. Many rows (a prompt) and other devices dequantize the weight and run
an ordinary matmul, which is also the reference the kernels are tested against. Like llama.cpp,
int8 and int4 layers round the activations to int8 (per 32 values) where the CPU multiplies bytes
fast, in the kernels and in the CPU's fp32 matmul, so a row's result does not depend on how many rows
share the call up to the kernels' row limits; beyond them, where the CPU multiplies bf16 much faster
than fp32 (AMX), the matmul takes bfloat16 activations and weights instead. `exact_activations = True`
on a layer (or on the class) keeps float32 throughout, as do gradients (training) and other devices.
The bias, when there is one, stays in floating point.

Where the CPU has AVX-512 VNNI, an int8 or int4 layer holds its weight as 16-row tiles (`tiles.TiledWeight`), the
layout its kernels read fastest, instead of the format's own tensors — not as a second copy: `state_dict()`
and `weight_format` convert the tiles back, and loading a checkpoint tiles its tensors.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from lmforge import hardware
from lmforge.errors import ConfigError
from lmforge.quant import kernels, tiles
from lmforge.quant.formats import FORMATS, QuantizedWeight

ROW_CHUNK = 4096
"""Rows quantized at a time by `QuantizedLinear.from_linear` (row-wise formats)."""


class QuantizedLinear(nn.Module):
    exact_activations = False
    """Whether the CPU kernels multiply float32 activations (exact to float rounding against the dequantized
    weight) instead of int8-rounded ones (llama.cpp's numerics, several times faster for 4-bit weights)."""

    def __init__(self, weight: QuantizedWeight, bias: torch.Tensor | None = None):
        super().__init__()
        self.method = weight.name
        self.out_features, self.in_features = weight.shape
        self._tensor_names = list(weight.tensors())
        self._settings = weight.settings()
        self.bias = nn.Parameter(bias.detach().clone(), requires_grad=False) if bias is not None else None
        self._kernel_weight: kernels.KernelWeight | None = None  # built on the first CPU decode step
        self._half_tiles = False  # whether the tiles (if any) hold float16 scales
        self._store(weight)

    def _store(self, weight: QuantizedWeight, allow_tiles: bool = True) -> None:
        """Hold `weight` as this module's buffers (so .to(device) moves them and state_dict() saves them): as the
        format's own tensors, or as 16-row tiles (`tiles.TiledWeight`, one non-persistent buffer `tiles`) for int8
        and int4 where the CPU multiplies tiles (VNNI). The tiles are the module's only copy: state_dict() and
        `weight_format` convert them back to the format's tensors."""
        for name in (*self._tensor_names, "tiles"):
            self._buffers.pop(name, None)
        if allow_tiles and tiles.TiledWeight.suits(weight):
            tiled = tiles.TiledWeight.from_weight(weight)
            self.register_buffer("tiles", tiled.tiles, persistent=False)
            self._half_tiles = tiled.half
        else:
            for name, tensor in weight.tensors().items():
                self.register_buffer(name, tensor)
        self._kernel_weight = None

    @property
    def tiled(self) -> bool:
        """Whether the weight is held as 16-row tiles (see `_store`)."""
        return "tiles" in self._buffers

    def _tiles(self) -> tiles.TiledWeight:
        return tiles.TiledWeight(self._buffers["tiles"], (self.out_features, self.in_features),
                                 tiles.BITS[FORMATS[self.method]], self._settings["group_size"], self._half_tiles)

    def select_rows(self, index: torch.Tensor) -> QuantizedWeight:
        """The weight of rows `index` only (token lookups in a tied head), read from the tiles when tiled."""
        return self._tiles().select_rows(index) if self.tiled else self.weight_format.select_rows(index)

    def replace_weight(self, weight: QuantizedWeight) -> None:
        """Hold `weight` (same format, settings and shape, e.g. re-quantized after merging an adapter) from now on."""
        settings = weight.settings()
        if weight.name != self.method or settings != self._settings or tuple(weight.shape) != (
                self.out_features, self.in_features):
            raise ConfigError(f"a {weight.name} weight of shape {tuple(weight.shape)} with {settings} cannot replace "
                              f"this {self.method} layer's ({self.out_features}, {self.in_features}) weight with "
                              f"{self._settings}; build a new QuantizedLinear instead.")
        self._store(weight)

    def _apply(self, fn, recurse=True):
        """Moves and casts apply to the bias; the format's scales stay float32 (their precision is part of
        the format: a bfloat16 scale would add error on top of the quantization's own). Tiles are a CPU layout:
        a move to another device converts them back to the format's tensors, a move from one (not from "meta",
        whose tensors hold nothing yet: loading a checkpoint tiles them) into tiles."""
        device = next(iter(self._buffers.values())).device
        super()._apply(fn, recurse)
        for name in self._tensor_names:
            if name in self._buffers and self._buffers[name].is_floating_point():
                self._buffers[name] = self._buffers[name].float()
        if self.tiled and self.tiles.device.type != "cpu" or not self.tiled and device.type != "meta":
            self._settle_layout()
        self._kernel_weight = None  # the buffers are new tensors now
        return self

    def _settle_layout(self) -> None:
        """Tile or untile the buffers where their device or values call for the other layout."""
        weight = self.weight_format
        if self.tiled != tiles.TiledWeight.suits(weight):
            self._store(weight)

    def _save_to_state_dict(self, destination, prefix, keep_vars):
        """Tiles are saved as the format's own tensors, so a checkpoint does not depend on the CPU that wrote it."""
        super()._save_to_state_dict(destination, prefix, keep_vars)
        if self.tiled:
            for name, tensor in self.weight_format.tensors().items():
                destination[prefix + name] = tensor

    def _load_from_state_dict(self, *args, **kwargs):
        if self.tiled:  # the checkpoint holds the format's tensors: load into them, then tile again
            self._store(self.weight_format, allow_tiles=False)
        super()._load_from_state_dict(*args, **kwargs)
        self._settle_layout()
        self._kernel_weight = None  # loading may assign new tensors

    @property
    def weight_format(self) -> QuantizedWeight:
        """The quantized weight, over the module's current buffers (converted from tiles, a copy, when tiled)."""
        if self.tiled:
            return self._tiles().to_weight()
        tensors = {name: getattr(self, name) for name in self._tensor_names}
        return FORMATS[self.method](**tensors, **self._settings)

    def nbytes(self) -> int:
        """The bytes the weight takes in memory (its buffers, the bias excepted)."""
        return sum(buffer.numel() * buffer.element_size() for buffer in self._buffers.values())

    @classmethod
    def concatenate(cls, layers: list[QuantizedLinear]) -> QuantizedLinear | None:
        """One layer computing `layers` side by side (q/k/v, gate/up), or None when they cannot share one.

        Rows are independent in the row-major formats (int8, int4), so stacking each packed tensor along
        the rows is exact; the children's buffers become views into the stacked ones (no second copy) — for
        tiles, whole tiles of the stacked layer's."""
        first = layers[0]
        if not FORMATS[first.method].row_wise or any(
                layer.method != first.method or layer._settings != first._settings
                or layer.in_features != first.in_features for layer in layers):
            return None
        if sum(layer.bias is not None for layer in layers) not in (0, len(layers)):
            return None
        weights = [layer.weight_format for layer in layers]
        tensors = {name: torch.cat([weight.tensors()[name] for weight in weights]) for name in first._tensor_names}
        bias = torch.cat([layer.bias for layer in layers]) if first.bias is not None else None
        fused = cls(FORMATS[first.method](**tensors, **first._settings), bias)
        if any(layer.tiled != fused.tiled for layer in layers):
            return None  # some layer's rows are not whole tiles: it could not share the fused layer's tiles
        start = 0
        for layer in layers:
            rows = slice(start, start + layer.out_features)
            if fused.tiled:
                layer._buffers["tiles"] = fused.tiles[rows.start // tiles.TILE_ROWS:rows.stop // tiles.TILE_ROWS]
                layer._half_tiles = fused._half_tiles
            else:
                for name in layer._tensor_names:
                    layer._buffers[name] = getattr(fused, name)[rows]
            if bias is not None:
                layer.bias = nn.Parameter(fused.bias[rows], requires_grad=False)
            layer._kernel_weight = None
            start += layer.out_features
        return fused

    @classmethod
    def from_linear(cls, linear: nn.Linear, method: str, **options) -> QuantizedLinear:
        """Quantize an `nn.Linear` with `method` ("int8", "int4" with group_size, "nf4").

        Formats whose rows are independent (int8, int4) quantize ROW_CHUNK rows at a time: their float
        temporaries stay a few MB instead of several copies of a large matrix (SmolLM2's tied head: 113 MB)."""
        if method not in FORMATS:
            raise ConfigError(f"unknown quantization method {method!r}; use one of: {', '.join(FORMATS)}.")
        fmt, weight = FORMATS[method], linear.weight
        if not fmt.row_wise or weight.dim() != 2 or weight.shape[0] <= ROW_CHUNK:
            return cls(fmt.quantize(weight, **options), linear.bias)
        first = fmt.quantize(weight[:ROW_CHUNK], **options)
        rows = weight.shape[0]  # the whole tensors first, each chunk written into them (no list of parts to join)
        tensors = {name: tensor.new_empty((rows, *tensor.shape[1:])) for name, tensor in first.tensors().items()}
        for start in range(0, rows, ROW_CHUNK):
            part = first if start == 0 else fmt.quantize(weight[start:start + ROW_CHUNK], **options)
            for name, tensor in part.tensors().items():
                tensors[name][start:start + tensor.shape[0]] = tensor
        return cls(fmt(**tensors, **first.settings()), linear.bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        bias = None if self.bias is None else self.bias.to(x.dtype)
        rows = x.numel() // self.in_features
        kernel = self.cpu_kernel() if x.device.type == "cpu" and not x.requires_grad else None
        if kernel is not None:
            if rows <= kernel.max_rows:
                out = kernel(x.reshape(rows, self.in_features).float())
                out = out.to(x.dtype).view(*x.shape[:-1], self.out_features)
                return out if bias is None else out + bias
            if self._bfloat16_matmul(x):
                out = F.linear(x.bfloat16(), self.weight_format.dequantize().bfloat16()).float()
                return out if bias is None else out + bias
            if kernel.inputs == "int8":  # many rows compute what the kernel would, in one matmul
                x = kernels.round_activations(x).to(x.dtype)
        return F.linear(x, self.weight_format.dequantize().to(device=x.device, dtype=x.dtype), bias)

    def _bfloat16_matmul(self, x: torch.Tensor) -> bool:
        """Whether many float32 rows (a prompt) multiply in bfloat16: where this CPU does bf16 matmuls much faster
        than fp32 (AMX: `hardware.fast_batched_dtype`), unless the layer keeps exact activations. bf16 keeps 8
        significant bits — about the rounding of the kernels' int8 activations — and the matmul sums in float32."""
        return (not self.exact_activations and x.dtype == torch.float32
                and hardware.fast_batched_dtype("cpu") == torch.bfloat16)

    def cpu_kernel(self) -> kernels.KernelWeight | None:
        """The compiled CPU kernel over this layer's buffers (built on first use, and again after a move, a load or
        a change of `exact_activations`), or None where no kernel reads the format. Tiles multiply int8-rounded
        activations only: with `exact_activations` the kernel reads a row-layout copy it keeps."""
        stale = self._kernel_weight is None or self._kernel_weight.exact_activations != self.exact_activations
        if stale:
            weight = self._tiles() if self.tiled and not self.exact_activations else self.weight_format
            self._kernel_weight = kernels.KernelWeight(weight, self.exact_activations) if kernels.supports(weight) \
                else None
        return self._kernel_weight

    def extra_repr(self) -> str:
        return (f"in_features={self.in_features}, out_features={self.out_features}, "
                f"format={self.method}{', tiled' if self.tiled else ''}, bytes={self.nbytes()}")


def parameter_count(model: nn.Module) -> int:
    """The model's parameters, counting the weights quantized layers hold packed (buffers, which
    `parameters()` does not list) as the parameters they stand for."""
    packed = sum(m.in_features * m.out_features for m in model.modules() if isinstance(m, QuantizedLinear))
    return sum(p.numel() for p in model.parameters()) + packed
