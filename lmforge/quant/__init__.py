"""Weight quantization: store weights in 8 or 4 bits and read far fewer bytes per token.

`int8` is symmetric per output channel or group, `int4` asymmetric per group of input columns,
`nf4` is QLoRA's normal-float code book per block of 64 weights. Each format turns an fp32 weight
into packed tensors and back (`quantize` / `dequantize`); `QuantizedLinear` replaces `nn.Linear`
(compiled CPU kernels in `kernels.py` for decoding), `quantize_model` swaps every Linear of a loaded
model, `gguf_blocks` keeps a GGUF file's own Q8_0/Q4_1/Q4_0 blocks, and `checkpoint` saves and
loads quantized model folders.
"""

from lmforge.quant.apply import load_quantized, quantize_loaded, quantize_model
from lmforge.quant.formats import FORMATS, Int4Weight, Int8Weight, NF4Weight, QuantizedWeight
from lmforge.quant.linear import QuantizedLinear, parameter_count

__all__ = ["FORMATS", "Int4Weight", "Int8Weight", "NF4Weight", "QuantizedLinear", "QuantizedWeight", "load_quantized",
           "parameter_count", "quantize_loaded", "quantize_model"]
