"""Quantize a loaded model in place: every `nn.Linear` becomes a `QuantizedLinear`.

Weights shared with another module (a head tied to the token embedding) stay in floating point:
the embedding lookup needs them as they are.
"""

from __future__ import annotations

from torch import nn

from lmforge.errors import ConfigError
from lmforge.nn.inject import replace_modules
from lmforge.quant.linear import QuantizedLinear


def quantize_model(model: nn.Module, method: str, **options) -> list[str]:
    """Quantize the model's Linear layers with `method` ("int8", "int4", "nf4"); returns their names."""
    if any(isinstance(module, QuantizedLinear) for module in model.modules()):
        raise ConfigError("this model is already quantized; load it again in floating point to quantize it "
                          "with another method.")
    tied = set(getattr(model, "tied_weights", {})) if getattr(model.config, "tie_word_embeddings", False) else set()
    tied_modules = {name.rsplit(".", 1)[0] for name in tied}
    return replace_modules(
        model,
        lambda name, module: type(module) is nn.Linear and name not in tied_modules,
        lambda name, module: QuantizedLinear.from_linear(module, method, **options))
