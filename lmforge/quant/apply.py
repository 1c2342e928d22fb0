"""Quantize a loaded model in place: every `nn.Linear` becomes a `QuantizedLinear`.

Weights shared with another module (a head tied to the token embedding) stay in floating point:
the embedding lookup needs them as they are. The method, its options and the quantized layers are
recorded in the config (`config.extra["quantization"]`), so `save_pretrained` writes a folder that
`from_pretrained` loads back quantized (see lmforge.quant.checkpoint).
"""

from __future__ import annotations

from torch import nn
from tqdm.auto import tqdm

from lmforge.errors import ConfigError
from lmforge.nn.fusion import unfuse_projections
from lmforge.nn.inject import replace_modules
from lmforge.quant.checkpoint import format_options, quantization_block
from lmforge.quant.linear import QuantizedLinear


def quantize_model(model: nn.Module, method: str, progress: bool = False, **options) -> list[str]:
    """Quantize the model's Linear layers with `method` ("int8", "int4", "nf4"); returns their names.

    `options` go to the format (e.g. int4 `group_size`, nf4 `double_quant`); `progress` shows a bar per layer.
    """
    if any(isinstance(module, QuantizedLinear) for module in model.modules()):
        raise ConfigError("this model is already quantized; quantize the original floating-point model instead "
                          "(load it again, or the model a quantized folder was made from) to use another method.")
    options = format_options(method, options)
    unfuse_projections(model)  # a fused q/k/v (or gate/up) matmul would go on using the float weights
    tied = set(getattr(model, "tied_weights", {})) if getattr(model.config, "tie_word_embeddings", False) else set()
    tied_modules = {name.rsplit(".", 1)[0] for name in tied}

    def select(name: str, module: nn.Module) -> bool:
        return type(module) is nn.Linear and name not in tied_modules

    def build(name: str, module: nn.Module) -> QuantizedLinear:
        try:
            quantized = QuantizedLinear.from_linear(module, method, **options)
        except ConfigError as exc:
            raise ConfigError(f"layer {name}: {exc}") from None
        bar.update()
        return quantized

    with tqdm(total=sum(select(*named) for named in model.named_modules()), desc=f"quantizing ({method})",
              unit="layer", disable=not progress) as bar:
        names = replace_modules(model, select, build)
    extra = getattr(model.config, "extra", None)
    if isinstance(extra, dict):  # a ModelConfig: save_pretrained writes the record into config.json
        extra["quantization"] = quantization_block(method, options, names)
    return names
