"""Map a GGUF model onto the Hugging Face layout: config, tensor names, weight order.

llama.cpp renames tensors (`blk.0.attn_q.weight`), stores the config as
`<architecture>.*` metadata and re-orders q/k rows for its rotary kernel. This
module undoes all three, so a GGUF model loads through the same HF path as a
safetensors folder.
"""

from __future__ import annotations

import os
import re
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch

from lmforge.checkpoint.gguf import GGUFFile, open_gguf
from lmforge.errors import CheckpointError, UnsupportedError


def permute_qk(weight: torch.Tensor, n_head: int) -> torch.Tensor:
    """llama.cpp's rotary re-ordering of q_proj/k_proj rows (convert_hf_to_gguf.py).

    HF rotates the two halves of each head (rotate_half); ggml rotates adjacent pairs,
    so the converter interleaves each head's halves: rows [a0..a31, b0..b31] become
    [a0, b0, a1, b1, ...]. For k_proj, `n_head` is the number of key/value heads.
    """
    rows = weight.shape[0]
    return weight.reshape(n_head, 2, rows // n_head // 2, *weight.shape[1:]).transpose(1, 2).reshape(weight.shape)


def unpermute_qk(weight: torch.Tensor, n_head: int) -> torch.Tensor:
    """Inverse of `permute_qk`: bring q_proj/k_proj rows (or biases) back to HF order."""
    rows = weight.shape[0]
    return weight.reshape(n_head, rows // n_head // 2, 2, *weight.shape[1:]).transpose(1, 2).reshape(weight.shape)


# "{i}" stands for the layer number.
LLAMA_TENSOR_NAMES: dict[str, str] = {
    "token_embd.weight": "model.embed_tokens.weight",
    "output_norm.weight": "model.norm.weight",
    "output.weight": "lm_head.weight",
    "blk.{i}.attn_norm.weight": "model.layers.{i}.input_layernorm.weight",
    "blk.{i}.attn_q.weight": "model.layers.{i}.self_attn.q_proj.weight",
    "blk.{i}.attn_q.bias": "model.layers.{i}.self_attn.q_proj.bias",
    "blk.{i}.attn_k.weight": "model.layers.{i}.self_attn.k_proj.weight",
    "blk.{i}.attn_k.bias": "model.layers.{i}.self_attn.k_proj.bias",
    "blk.{i}.attn_v.weight": "model.layers.{i}.self_attn.v_proj.weight",
    "blk.{i}.attn_v.bias": "model.layers.{i}.self_attn.v_proj.bias",
    "blk.{i}.attn_output.weight": "model.layers.{i}.self_attn.o_proj.weight",
    "blk.{i}.attn_output.bias": "model.layers.{i}.self_attn.o_proj.bias",
    "blk.{i}.ffn_norm.weight": "model.layers.{i}.post_attention_layernorm.weight",
    "blk.{i}.ffn_gate.weight": "model.layers.{i}.mlp.gate_proj.weight",
    "blk.{i}.ffn_gate.bias": "model.layers.{i}.mlp.gate_proj.bias",
    "blk.{i}.ffn_up.weight": "model.layers.{i}.mlp.up_proj.weight",
    "blk.{i}.ffn_up.bias": "model.layers.{i}.mlp.up_proj.bias",
    "blk.{i}.ffn_down.weight": "model.layers.{i}.mlp.down_proj.weight",
    "blk.{i}.ffn_down.bias": "model.layers.{i}.mlp.down_proj.bias",
}

GPT2_TENSOR_NAMES: dict[str, str] = {
    "token_embd.weight": "transformer.wte.weight",
    "position_embd.weight": "transformer.wpe.weight",
    "output_norm.weight": "transformer.ln_f.weight",
    "output_norm.bias": "transformer.ln_f.bias",
    "output.weight": "lm_head.weight",
    "blk.{i}.attn_norm.weight": "transformer.h.{i}.ln_1.weight",
    "blk.{i}.attn_norm.bias": "transformer.h.{i}.ln_1.bias",
    "blk.{i}.attn_qkv.weight": "transformer.h.{i}.attn.c_attn.weight",
    "blk.{i}.attn_qkv.bias": "transformer.h.{i}.attn.c_attn.bias",
    "blk.{i}.attn_output.weight": "transformer.h.{i}.attn.c_proj.weight",
    "blk.{i}.attn_output.bias": "transformer.h.{i}.attn.c_proj.bias",
    "blk.{i}.ffn_norm.weight": "transformer.h.{i}.ln_2.weight",
    "blk.{i}.ffn_norm.bias": "transformer.h.{i}.ln_2.bias",
    "blk.{i}.ffn_up.weight": "transformer.h.{i}.mlp.c_fc.weight",
    "blk.{i}.ffn_up.bias": "transformer.h.{i}.mlp.c_fc.bias",
    "blk.{i}.ffn_down.weight": "transformer.h.{i}.mlp.c_proj.weight",
    "blk.{i}.ffn_down.bias": "transformer.h.{i}.mlp.c_proj.bias",
}


class _Metadata:
    """Typed access to `<architecture>.*` metadata keys, with errors that name the file."""

    def __init__(self, gguf_file: GGUFFile) -> None:
        self.file = gguf_file
        self.arch = gguf_file.architecture

    def get(self, key: str, default: Any = None) -> Any:
        return self.file.metadata.get(f"{self.arch}.{key}", default)

    def require(self, key: str) -> Any:
        value = self.get(key)
        if value is None:
            raise CheckpointError(
                f"{self.file.path} lacks metadata {self.arch}.{key}, which a {self.arch} model needs; "
                "re-convert it with a current llama.cpp."
            )
        return value

    def token_id(self, kind: str) -> int | None:
        return self.file.metadata.get(f"tokenizer.ggml.{kind}_token_id")


def _llama_config(gguf_file: GGUFFile) -> dict[str, Any]:
    """A Hugging Face LlamaConfig dict from `llama.*` metadata and the tensor table."""
    meta = _Metadata(gguf_file)
    hidden, n_heads = int(meta.require("embedding_length")), int(meta.require("attention.head_count"))
    names = set(gguf_file.tensor_names)
    if "rope_freqs.weight" in names:
        raise UnsupportedError(
            f"{gguf_file.path} stores Llama-3-style rope scaling as a rope_freqs tensor, which lmforge "
            "cannot turn into HF rope_scaling yet; load the model from its HF folder instead."
        )
    config: dict[str, Any] = {
        "model_type": "llama",
        "architectures": ["LlamaForCausalLM"],
        "vocab_size": gguf_file.tensor_shape("token_embd.weight")[0],
        "hidden_size": hidden,
        "intermediate_size": int(meta.require("feed_forward_length")),
        "num_hidden_layers": int(meta.require("block_count")),
        "num_attention_heads": n_heads,
        "num_key_value_heads": int(meta.get("attention.head_count_kv", n_heads)),
        "head_dim": int(meta.get("attention.key_length", meta.get("rope.dimension_count", hidden // n_heads))),
        "max_position_embeddings": int(meta.get("context_length", 2048)),
        "rms_norm_eps": float(meta.get("attention.layer_norm_rms_epsilon", 1e-6)),
        "rope_theta": float(meta.get("rope.freq_base", 10000.0)),
        "hidden_act": "silu",
        "tie_word_embeddings": "output.weight" not in names,
        "attention_bias": "blk.0.attn_q.bias" in names,
        "mlp_bias": "blk.0.ffn_up.bias" in names,
        "bos_token_id": meta.token_id("bos"),
        "eos_token_id": meta.token_id("eos"),
        "pad_token_id": meta.token_id("padding"),
        "torch_dtype": "float32",
    }
    rope_scaling = _rope_scaling(meta)
    if rope_scaling is not None:
        config["rope_scaling"] = rope_scaling
    return config


def _rope_scaling(meta: _Metadata) -> dict[str, Any] | None:
    """HF `rope_scaling` from llama.cpp's `rope.scaling.*` keys (or the older `rope.scale_linear`)."""
    kind = meta.get("rope.scaling.type")
    if kind is None and meta.get("rope.scale_linear") is not None:
        return {"rope_type": "linear", "factor": float(meta.get("rope.scale_linear"))}
    if kind in (None, "none"):
        return None
    scaling: dict[str, Any] = {"rope_type": kind, "factor": float(meta.require("rope.scaling.factor"))}
    original = meta.get("rope.scaling.original_context_length")
    if original is not None:
        scaling["original_max_position_embeddings"] = int(original)
    return scaling


def _llama_weight(gguf_name: str, weight: torch.Tensor, config: dict[str, Any]) -> torch.Tensor:
    """Undo llama.cpp's rotary row permutation of q and k."""
    if ".attn_q." in gguf_name:
        return unpermute_qk(weight, config["num_attention_heads"])
    if ".attn_k." in gguf_name:
        return unpermute_qk(weight, config["num_key_value_heads"])
    return weight


def _gpt2_config(gguf_file: GGUFFile) -> dict[str, Any]:
    """A Hugging Face GPT2Config dict from `gpt2.*` metadata and the tensor table."""
    meta = _Metadata(gguf_file)
    return {
        "model_type": "gpt2",
        "architectures": ["GPT2LMHeadModel"],
        "vocab_size": gguf_file.tensor_shape("token_embd.weight")[0],
        "n_positions": int(meta.require("context_length")),
        "n_embd": int(meta.require("embedding_length")),
        "n_layer": int(meta.require("block_count")),
        "n_head": int(meta.require("attention.head_count")),
        "n_inner": int(meta.require("feed_forward_length")),
        "layer_norm_epsilon": float(meta.get("attention.layer_norm_epsilon", 1e-5)),
        "activation_function": "gelu_new",
        "tie_word_embeddings": "output.weight" not in gguf_file.tensor_names,
        "bos_token_id": meta.token_id("bos"),
        "eos_token_id": meta.token_id("eos"),
        "torch_dtype": "float32",
    }


_GPT2_CONV1D = (".attn_qkv.weight", ".attn_output.weight", ".ffn_up.weight", ".ffn_down.weight")


def _gpt2_weight(gguf_name: str, weight: torch.Tensor, config: dict[str, Any]) -> torch.Tensor:
    """HF GPT-2 uses Conv1D, whose weight is [in, out]: transpose the projections back."""
    return weight.t().contiguous() if gguf_name.endswith(_GPT2_CONV1D) else weight


@dataclass(frozen=True)
class _Architecture:
    """What `gguf_to_hf` needs to know about one `general.architecture`."""

    tensor_names: dict[str, str]
    config: Callable[[GGUFFile], dict[str, Any]]
    fix_weight: Callable[[str, torch.Tensor, dict[str, Any]], torch.Tensor]


ARCHITECTURES: dict[str, _Architecture] = {
    "llama": _Architecture(LLAMA_TENSOR_NAMES, _llama_config, _llama_weight),
    "gpt2": _Architecture(GPT2_TENSOR_NAMES, _gpt2_config, _gpt2_weight),
}

_LAYER = re.compile(r"blk\.(\d+)\.")


def hf_tensor_name(gguf_name: str, names: dict[str, str]) -> str | None:
    """Translate one GGUF tensor name through a template table ("{i}" = layer number)."""
    match = _LAYER.match(gguf_name)
    if match is None:
        return names.get(gguf_name)
    template = names.get("blk.{i}." + gguf_name[match.end():])
    return None if template is None else template.format(i=match.group(1))


def _architecture(gguf_file: GGUFFile) -> _Architecture:
    arch = ARCHITECTURES.get(gguf_file.architecture)
    if arch is None:
        raise UnsupportedError(
            f"{gguf_file.path} holds a {gguf_file.architecture!r} model; lmforge converts GGUF "
            f"architectures {', '.join(ARCHITECTURES)}. Use the model's HF folder instead."
        )
    if "token_embd.weight" not in gguf_file.tensor_names:
        raise CheckpointError(f"{gguf_file.path} has no token_embd.weight tensor; the file is incomplete.")
    return arch


def gguf_config(gguf_file: GGUFFile | str | os.PathLike[str]) -> dict[str, Any]:
    """The Hugging Face config dict of a GGUF model, from metadata alone (no tensor is decoded)."""
    if not isinstance(gguf_file, GGUFFile):
        gguf_file = open_gguf(gguf_file)
    return _architecture(gguf_file).config(gguf_file)


def gguf_to_hf(gguf_file: GGUFFile | str | os.PathLike[str]) -> tuple[dict[str, Any], dict[str, torch.Tensor]]:
    """A Hugging Face config dict and float32 state dict (HF tensor names) for a GGUF model."""
    if not isinstance(gguf_file, GGUFFile):
        gguf_file = open_gguf(gguf_file)
    arch = _architecture(gguf_file)
    config = arch.config(gguf_file)
    state_dict: dict[str, torch.Tensor] = {}
    for name in gguf_file.tensor_names:
        hf_name = hf_tensor_name(name, arch.tensor_names)
        if hf_name is None:
            raise UnsupportedError(
                f"{gguf_file.path}: tensor {name!r} has no place in an HF {config['architectures'][0]}; "
                "this GGUF variant (e.g. mixture-of-experts) is not supported."
            )
        state_dict[hf_name] = arch.fix_weight(name, gguf_file.load_tensor(name), config)
    return config, state_dict
