"""Export a Llama-family model and its tokenizer to one GGUF file, as llama.cpp's converter does.

The inverse of `gguf_convert` and `gguf_tokenizer`: HF tensor names become llama.cpp's
(`model.layers.0.self_attn.q_proj.weight` -> `blk.0.attn_q.weight`), q/k rows are re-ordered
for ggml's rotary kernel, the config becomes `llama.*` metadata and the tokenizer becomes
`tokenizer.ggml.*` arrays (tokens, their kinds, BPE merges) plus the chat template.
Matrices are stored in the chosen type; 1-D tensors (norms, biases) always stay F32.
"""

from __future__ import annotations

import json
import re
import time
from collections import Counter
from dataclasses import dataclass
from functools import partial
from pathlib import Path
from typing import Any

import torch

from lmforge.checkpoint.gguf_convert import LLAMA_TENSOR_NAMES, permute_qk
from lmforge.checkpoint.gguf_quant import BLOCK, quantize
from lmforge.checkpoint.gguf_tokenizer import (
    BYTE_LEVEL_PRE_TOKENIZERS,
    CONTROL,
    NORMAL,
    USER_DEFINED,
)
from lmforge.checkpoint.gguf_writer import GGUFWriter, ValueType
from lmforge.errors import CheckpointError, UnsupportedError, ValidationError

UNUSED = 5  # llama.cpp token type of the filler entries that pad a vocabulary to the embedding's rows

# --type -> (storage type of the matrices, general.file_type: llama.cpp's llama_ftype id).
FILE_TYPES: dict[str, tuple[str, int]] = {
    "f32": ("F32", 0),
    "f16": ("F16", 1),
    "q8_0": ("Q8_0", 7),
    "q4_0": ("Q4_0", 2),
}
QUANTIZATION_VERSION = 2  # ggml's block layout revision, written by llama.cpp whenever blocks are quantized

_GGUF_NAMES = {hf: gguf for gguf, hf in LLAMA_TENSOR_NAMES.items()}
_HF_LAYER = re.compile(r"model\.layers\.(\d+)\.")


@dataclass(frozen=True)
class ExportResult:
    """What `export_gguf` wrote."""

    path: Path
    file_type: str
    size: int  # bytes
    tensor_types: dict[str, int]  # storage type -> number of tensors
    seconds: float


def check_exportable(config: dict[str, Any], source: str) -> None:
    """Fail early, from the config alone, for models this exporter cannot write."""
    model_type = config.get("model_type")
    if model_type != "llama":
        raise UnsupportedError(
            f"{source} is a {model_type!r} model; lmforge exports Llama-family decoders (model_type 'llama', "
            "e.g. SmolLM2) to GGUF. Pick such a model, or convert this one with llama.cpp's "
            "convert_hf_to_gguf.py."
        )
    # "quantization": a folder written by lmforge's quantizer; "quantization_config": HF's (GPTQ, AWQ, ...).
    quantization = config.get("quantization") or config.get("quantization_config")
    if quantization:
        method = quantization if not isinstance(quantization, dict) else (
            quantization.get("method") or quantization.get("quant_method") or "unknown")
        raise UnsupportedError(
            f"{source} holds weights quantized with {method!r}; GGUF export needs float weights. Export the "
            "original unquantized checkpoint and choose --type q8_0 or q4_0 to quantize into GGUF's own blocks."
        )


def output_path(path: str | Path) -> Path:
    """`path` as a Path, checked to be a usable name for the GGUF file to write."""
    path = Path(path)
    if path.suffix != ".gguf":
        raise ValidationError(f"{path}: a GGUF file name must end in .gguf (loaders recognise the format by it); "
                              f"use {path.with_suffix('.gguf')}.")
    if path.is_dir():
        raise ValidationError(f"{path} is a folder; pass a file name such as {path / 'model.gguf'}.")
    return path


def gguf_tensor_name(hf_name: str) -> str | None:
    """llama.cpp's name for an HF Llama tensor (e.g. "blk.3.ffn_up.weight"), or None if it has none."""
    match = _HF_LAYER.match(hf_name)
    if match is None:
        return _GGUF_NAMES.get(hf_name)
    template = _GGUF_NAMES.get("model.layers.{i}." + hf_name[match.end():])
    return None if template is None else template.format(i=match.group(1))


def storage_type(name: str, shape: tuple[int, ...], wanted: str, head: str) -> str:
    """The type one tensor is stored as, following llama.cpp's choices.

    1-D tensors (norms, biases) stay F32: they are tiny and sensitive. A matrix whose rows
    do not split into 32-weight blocks falls back to F16. With Q4_0, the tensor that makes
    the logits (`head`: output.weight, or token_embd.weight when they are tied) is kept in
    Q8_0, because 4-bit rounding there hurts every prediction (llama.cpp keeps it at 6 bits).
    """
    if len(shape) < 2:
        return "F32"
    if wanted in ("Q8_0", "Q4_0") and shape[-1] % BLOCK:
        return "F16"
    if wanted == "Q4_0" and name == head:
        return "Q8_0"
    return wanted


def _llama_cpp_layout(name: str, weight: torch.Tensor, n_heads: int, n_kv_heads: int) -> torch.Tensor:
    """Interleave each head's rotary halves in q and k, as ggml's rotary kernel expects."""
    if ".attn_q." in name:
        return permute_qk(weight, n_heads)
    if ".attn_k." in name:
        return permute_qk(weight, n_kv_heads)
    return weight


def _encode(name: str, weight: torch.Tensor, type_name: str, n_heads: int, n_kv_heads: int) -> torch.Tensor:
    weight = weight.detach().to("cpu", torch.float32)
    return quantize(_llama_cpp_layout(name, weight, n_heads, n_kv_heads), type_name)


def _add_model_metadata(writer: GGUFWriter, config, name: str, file_type: int, quantized: bool) -> None:
    """general.* and llama.* keys: what llama.cpp needs to rebuild the network."""
    if config.hidden_act != "silu":
        raise UnsupportedError(f"llama.cpp's llama architecture uses SiLU in the MLP, but this model uses "
                               f"{config.hidden_act!r}; it cannot be exported as a GGUF llama model.")
    u32, f32 = ValueType.UINT32, ValueType.FLOAT32
    writer.add("general.architecture", "llama", ValueType.STRING)
    writer.add("general.type", "model", ValueType.STRING)
    writer.add("general.name", name, ValueType.STRING)
    writer.add("general.file_type", file_type, u32)
    if quantized:
        writer.add("general.quantization_version", QUANTIZATION_VERSION, u32)
    writer.add("llama.vocab_size", config.vocab_size, u32)
    writer.add("llama.context_length", config.max_position_embeddings, u32)
    writer.add("llama.embedding_length", config.hidden_size, u32)
    writer.add("llama.block_count", config.num_hidden_layers, u32)
    writer.add("llama.feed_forward_length", config.intermediate_size, u32)
    writer.add("llama.attention.head_count", config.num_attention_heads, u32)
    writer.add("llama.attention.head_count_kv", config.num_key_value_heads, u32)
    writer.add("llama.attention.key_length", config.head_dim, u32)
    writer.add("llama.attention.value_length", config.head_dim, u32)
    writer.add("llama.attention.layer_norm_rms_epsilon", config.rms_norm_eps, f32)
    writer.add("llama.rope.dimension_count", config.head_dim, u32)
    writer.add("llama.rope.freq_base", config.rope_theta, f32)
    scaling = dict(config.rope_scaling or {})
    kind = scaling.get("rope_type", scaling.get("type", "default"))
    if kind == "default":
        return
    if kind not in ("linear", "yarn"):
        raise UnsupportedError(f"rope scaling {kind!r} cannot be written to GGUF by lmforge (it writes none, "
                               "'linear' and 'yarn'); convert this model with llama.cpp's convert_hf_to_gguf.py.")
    writer.add("llama.rope.scaling.type", kind, ValueType.STRING)
    writer.add("llama.rope.scaling.factor", scaling["factor"], f32)
    if "original_max_position_embeddings" in scaling:
        writer.add("llama.rope.scaling.original_context_length", scaling["original_max_position_embeddings"], u32)


# Text whose pre-tokenization tells llama.cpp's split rules apart: digit runs, cased
# contractions, punctuation before letters and newlines, repeated spaces, non-Latin script.
_SPLIT_PROBE = "Hello World! It's 2024: I'M   fine;\n\n(x1) 12345 tokens\tdon't 'LL éà 日本語?\r\n  end  "
# The pre-tokenizer names lmforge writes, one per distinct split rule (llama.cpp's spellings).
PRE_TOKENIZER_NAMES = ("gpt-2", "smollm", "llama-bpe", "qwen2")


def _splits(pre_tokenizer) -> list[str]:
    return [piece for piece, _ in pre_tokenizer.pre_tokenize_str(_SPLIT_PROBE)]


def pre_tokenizer_name(backend) -> str:
    """The `tokenizer.ggml.pre` name whose split rule cuts text exactly as this tokenizer does."""
    if backend.pre_tokenizer is not None:
        ours = _splits(backend.pre_tokenizer)
        for name in PRE_TOKENIZER_NAMES:
            if _splits(BYTE_LEVEL_PRE_TOKENIZERS[name]()) == ours:
                return name
    raise UnsupportedError(
        "this tokenizer splits text before BPE in a way none of llama.cpp's pre-tokenizers that lmforge "
        f"writes ({', '.join(PRE_TOKENIZER_NAMES)}) reproduces; convert the model with llama.cpp's "
        "convert_hf_to_gguf.py, which knows more of them."
    )


def _adds(backend, position: int, token_id: int | None) -> bool:
    """Whether encoding adds `token_id` at `position` (0: start, -1: end) on its own."""
    if token_id is None:
        return False
    plain = backend.encode("Hi", add_special_tokens=False).ids
    special = backend.encode("Hi", add_special_tokens=True).ids
    return len(special) > len(plain) and special[position] == token_id


def _first_int(value: Any) -> int | None:
    if isinstance(value, list):
        value = value[0] if value else None
    return value if isinstance(value, int) and not isinstance(value, bool) else None


def _add_tokenizer_metadata(writer: GGUFWriter, tokenizer, config) -> None:
    """tokenizer.* keys: a byte-level BPE vocabulary (llama.cpp's "gpt2" model) and the chat template."""
    backend = tokenizer.backend
    spec = json.loads(backend.to_str())
    model = spec.get("model") or {}
    decoder = spec.get("decoder") or {}
    byte_level = decoder.get("type") == "ByteLevel" or any(
        step.get("type") == "ByteLevel" for step in decoder.get("decoders") or [])
    if model.get("type") != "BPE" or not byte_level or model.get("byte_fallback"):
        raise UnsupportedError(
            f"lmforge writes byte-level BPE tokenizers (GPT-2 style, as in SmolLM2 and Llama 3) to GGUF; this one "
            f"is a {model.get('type')} tokenizer with a {decoder.get('type')} decoder. Convert the model with "
            "llama.cpp's convert_hf_to_gguf.py instead."
        )
    vocab = backend.get_vocab(with_added_tokens=True)
    size = max(vocab.values()) + 1
    if size > config.vocab_size:
        raise CheckpointError(
            f"the tokenizer has token ids up to {size - 1} but the model's embedding has {config.vocab_size} rows; "
            "they do not belong together. Pass the tokenizer the model was trained with."
        )
    # A vocabulary smaller than the embedding (padded for speed) is filled like llama.cpp's converter does.
    tokens = [f"[PAD{index}]" for index in range(config.vocab_size)]
    types = [UNUSED] * config.vocab_size
    for token, index in vocab.items():
        tokens[index], types[index] = token, NORMAL
    for added in spec.get("added_tokens") or []:
        types[added["id"]] = CONTROL if added.get("special") else USER_DEFINED
    merges = [merge if isinstance(merge, str) else " ".join(merge) for merge in model.get("merges") or []]
    if any(merge.count(" ") != 1 for merge in merges):
        raise UnsupportedError("a BPE merge of this tokenizer contains a space, which GGUF's \"left right\" "
                               "merge format cannot hold; convert the model with llama.cpp instead.")

    def token_id(role: str, fallback: Any = None) -> int | None:
        found = tokenizer.token_to_id(tokenizer.special_tokens.get(role))
        if found is None:  # the config may name the id when the tokenizer files do not
            found = _first_int(fallback)
        return found if found is not None and 0 <= found < config.vocab_size else None

    ids = {"bos": token_id("bos", config.bos_token_id), "eos": token_id("eos", config.eos_token_id),
           "unknown": token_id("unk"), "padding": token_id("pad", config.pad_token_id)}
    writer.add("tokenizer.ggml.model", "gpt2", ValueType.STRING)
    writer.add("tokenizer.ggml.pre", pre_tokenizer_name(backend), ValueType.STRING)
    writer.add("tokenizer.ggml.tokens", tokens, ValueType.ARRAY, ValueType.STRING)
    writer.add("tokenizer.ggml.token_type", types, ValueType.ARRAY, ValueType.INT32)
    writer.add("tokenizer.ggml.merges", merges, ValueType.ARRAY, ValueType.STRING)
    for kind, value in ids.items():
        if value is not None:
            writer.add(f"tokenizer.ggml.{kind}_token_id", value, ValueType.UINT32)
    writer.add("tokenizer.ggml.add_bos_token", _adds(backend, 0, ids["bos"]), ValueType.BOOL)
    writer.add("tokenizer.ggml.add_eos_token", _adds(backend, -1, ids["eos"]), ValueType.BOOL)
    if tokenizer.chat_template:
        writer.add("tokenizer.chat_template", tokenizer.chat_template, ValueType.STRING)


def _check_model(model) -> None:
    from lmforge.quant import QuantizedLinear

    if getattr(model.config, "model_type", None) != "llama" or model.hf_architecture != "LlamaForCausalLM":
        raise UnsupportedError(
            f"GGUF export takes a Llama causal LM (LlamaForCausalLM), not a {type(model).__name__}; load the "
            "model with AutoModelForCausalLM.from_pretrained and pass a Llama-family decoder."
        )
    quantized = [(name, module.method) for name, module in model.named_modules() if isinstance(module, QuantizedLinear)]
    if quantized:
        (first, method), count = quantized[0], len(quantized)
        raise UnsupportedError(
            f"the model is quantized in memory ({count} {method} layers, e.g. {first}); GGUF export needs its "
            "float weights. Export the model as loaded, before quantize_model(), and choose the GGUF type "
            "q8_0 or q4_0 to quantize into GGUF's own blocks."
        )


def export_gguf(model, tokenizer, path: str | Path, file_type: str = "f16", name: str | None = None,
                progress: bool = False) -> ExportResult:
    """Write `model` (an lmforge LlamaForCausalLM) and `tokenizer` to a GGUF v3 file at `path`.

    `file_type` is "f32", "f16", "q8_0" or "q4_0"; `name` goes to general.name (default: the
    file's stem). The file appears only once it is complete; a failed export leaves none.
    """
    start = time.perf_counter()
    path = output_path(path)
    if file_type not in FILE_TYPES:
        raise ValidationError(f"GGUF type {file_type!r} is not one lmforge writes; choose one of "
                              f"{', '.join(FILE_TYPES)}.")
    _check_model(model)
    config = model.config
    tensors: dict[str, torch.Tensor] = {}
    for hf_name, tensor in model.hf_state_dict().items():
        gguf_name = gguf_tensor_name(hf_name)
        if gguf_name is None:
            raise UnsupportedError(f"weight {hf_name!r} has no place in llama.cpp's llama architecture; "
                                   "this model variant cannot be exported to GGUF.")
        tensors[gguf_name] = tensor

    wanted, file_type_id = FILE_TYPES[file_type]
    head = "output.weight" if "output.weight" in tensors else "token_embd.weight"
    types = {gguf_name: storage_type(gguf_name, tuple(tensor.shape), wanted, head)
             for gguf_name, tensor in tensors.items()}
    writer = GGUFWriter()
    _add_model_metadata(writer, config, name or path.stem, file_type_id,
                        quantized=any(kind.startswith("Q") for kind in types.values()))
    _add_tokenizer_metadata(writer, tokenizer, config)
    for gguf_name, tensor in tensors.items():
        encode = partial(_encode, gguf_name, tensor, types[gguf_name],
                         config.num_attention_heads, config.num_key_value_heads)
        writer.add_tensor(gguf_name, tuple(tensor.shape), types[gguf_name], encode)
    size = writer.write(path, progress=progress, description=f"GGUF {file_type}")
    counts = dict(Counter(types.values()).most_common())
    return ExportResult(path, file_type, size, counts, time.perf_counter() - start)
