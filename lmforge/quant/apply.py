"""Quantize a loaded model in place: every `nn.Linear` becomes a `QuantizedLinear`.

A head tied to the token embedding is one matrix serving two uses, so it is a choice of its own
(`tied_head`): kept in floating point, or stored as int8 with one scale per row — per token, the
natural grain of an embedding table — whatever the method of the other layers, since 4-bit rows
would blur every input token (llama.cpp also keeps this table at 8 bits). The token lookups then read
the head's rows (`QuantizedEmbedding`) and no float copy of the table is kept. The method, its options
and the quantized layers are recorded in the config (`config.extra["quantization"]`), so
`save_pretrained` writes a folder that `from_pretrained` loads back quantized (see
lmforge.quant.checkpoint).
"""

from __future__ import annotations

import ctypes
import gc
from collections.abc import Callable, Sequence

import torch
from torch import nn
from tqdm.auto import tqdm

from lmforge.errors import ConfigError
from lmforge.nn.fusion import unfuse_projections
from lmforge.nn.inject import replace_modules
from lmforge.quant.checkpoint import (
    TIED_HEAD_METHOD,
    format_options,
    quantization_block,
)
from lmforge.quant.embedding import tied_modules, use_quantized_head
from lmforge.quant.formats import FORMATS
from lmforge.quant.linear import QuantizedLinear


def quantize_model(model: nn.Module, method: str, progress: bool = False, keep_float: Sequence[str] = (),
                   tied_head: bool = False, float_weight: Callable[[str], torch.Tensor] | None = None,
                   **options) -> list[str]:
    """Quantize the model's Linear layers with `method` ("int8", "int4", "nf4"); returns their names.

    `options` go to the format (e.g. int4 `group_size`, nf4 `double_quant`); `progress` shows a bar per layer.
    Layers named in `keep_float` (a name, or its last part such as "score") stay in floating point, e.g.
    a new head that QLoRA trains fully. `tied_head=True` also stores a head tied to the token embedding as
    per-row int8 (inference: SmolLM2's tied head is a fifth of its weights); by default it stays float,
    which training through the head (QLoRA) wants. `float_weight(layer_name)`, when given, supplies each Linear's
    float weight just before it is quantized (a loader reading them one at a time; the layers' own weights are
    then never filled).
    """
    if any(isinstance(module, QuantizedLinear) for module in model.modules()):
        raise ConfigError("this model is already quantized; quantize the original floating-point model instead "
                          "(load it again, or the model a quantized folder was made from) to use another method.")
    options = format_options(method, options)
    unfuse_projections(model)  # a fused q/k/v (or gate/up) matmul would go on using the float weights
    tied = tied_modules(model)

    def kept_float(name: str) -> bool:
        return any(name == keep or name.endswith("." + keep) for keep in keep_float)

    def select(name: str, module: nn.Module) -> bool:
        return type(module) is nn.Linear and name not in tied and not kept_float(name)

    def build(name: str, module: nn.Module) -> QuantizedLinear:
        if float_weight is not None:
            module.weight = nn.Parameter(float_weight(name).to(module.weight.dtype), requires_grad=False)
        try:
            quantized = QuantizedLinear.from_linear(module, method, **options)
        except ConfigError as exc:
            raise ConfigError(f"layer {name}: {exc}") from None
        bar.update()
        return quantized

    with tqdm(total=sum(select(*named) for named in model.named_modules()), desc=f"quantizing ({method})",
              unit="layer", disable=not progress) as bar:
        names = replace_modules(model, select, build)
    head = next(iter(tied)) if tied_head and len(tied) == 1 else None  # one head, one table
    if head is not None and (type(model.get_submodule(head)) is not nn.Linear or kept_float(head)):
        head = None
    if head is not None:
        use_quantized_head(model, head, QuantizedLinear.from_linear(model.get_submodule(head), TIED_HEAD_METHOD))
    extra = getattr(model.config, "extra", None)
    if isinstance(extra, dict):  # a ModelConfig: save_pretrained writes the record into config.json
        extra["quantization"] = quantization_block(method, options, names, head)
    return names + ([head] if head else [])


def load_quantized(ref, dtype=None, quantization: str | None = None) -> nn.Module:
    """A causal LM loaded by name for inference (LLM, the engine, `lmforge serve`/`eval`), quantized as asked:
    None, a method ("int8", "int4", "nf4"), or "gguf" — built straight from a GGUF file's own Q8_0/Q4_1/Q4_0
    blocks, never holding the float weights (loading peaks near the memory the model keeps). A method quantizes
    each layer as it is read from a GGUF file or an HF folder (`lmforge.quant.streaming`); where that cannot apply,
    the model loads in float first."""
    from lmforge.quant.gguf_blocks import (
        load_with_gguf_blocks,
        quantize_while_loading_gguf,
    )
    from lmforge.quant.streaming import quantize_while_loading_hf
    from lmforge.registry import AutoModelForCausalLM
    from lmforge.sources import is_gguf, resolve

    dtype = dtype or torch.float32
    path = resolve(ref)
    if quantization == "gguf":
        return load_with_gguf_blocks(path, dtype)
    if quantization in FORMATS:
        streamed = quantize_while_loading_gguf if is_gguf(path) else quantize_while_loading_hf
        model = streamed(path, quantization, dtype)
        if model is not None:
            return model
    model = AutoModelForCausalLM.from_pretrained(path, dtype=dtype)
    quantize_loaded(model, quantization)
    return model


def quantize_loaded(model: nn.Module, quantization: str | None) -> None:
    """Apply a load-time `quantization` method to a model already loaded in floating point (None: nothing)."""
    if quantization is None:
        return
    if quantization == "gguf":
        raise ConfigError("quantization 'gguf' builds the model from a GGUF file's own blocks; pass the file by name "
                          "(e.g. LLM('model.gguf', quantization='gguf')) instead of a loaded model, or use 'int8', "
                          "'int4' or 'nf4'.")
    if quantization not in FORMATS:
        raise ConfigError(f"unknown quantization {quantization!r}; use one of: {', '.join(FORMATS)}, gguf.")
    quantize_model(model, quantization, tied_head=True)
    _return_freed_memory()


def _return_freed_memory(collect: bool = True) -> None:
    """Hand the freed float32 weights back to the OS. glibc keeps freed heap pages for reuse, so without this
    a model quantized at load would keep the resident memory of its float32 copy. `collect=False` skips the
    garbage collection (when nothing freed is in a reference cycle: cheap enough to call per layer)."""
    if collect:
        gc.collect()
    try:
        ctypes.CDLL("libc.so.6").malloc_trim(0)
    except (OSError, AttributeError):  # not glibc (macOS, Windows, musl): the allocator decides
        pass
