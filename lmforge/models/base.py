"""What every lmforge model shares: construction from a config, HF-compatible
loading and saving, tied weights, and the choice of attention kernel.

A model is a backbone (embeddings + blocks, returning hidden states) or a task
model holding that backbone as `self.model` plus a head. Names on disk follow
Hugging Face; `hf_keymap` translates them to lmforge's canonical tree.
"""

from __future__ import annotations

import logging
from abc import ABC, abstractmethod
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any, ClassVar

import torch
from torch import nn

from lmforge.checkpoint.hf import save_hf_weights
from lmforge.checkpoint.keymap import KeyMap, StoredTensor
from lmforge.config import ModelConfig
from lmforge.errors import CheckpointError
from lmforge.nn.attention import Attention
from lmforge.nn.block import TransformerBlock
from lmforge.nn.kv_cache import KVCache
from lmforge.peft.adapters import ADAPTERS_KEY, prepare_adapter_layers
from lmforge.quant.checkpoint import QUANTIZATION_KEY, prepare_quantized_layers, reject_packed_tensors

logger = logging.getLogger(__name__)


@dataclass
class ModelOutput:
    """What a forward pass returns: task logits and/or the final hidden states."""

    logits: torch.Tensor | None = None
    last_hidden_state: torch.Tensor | None = None
    pooler_output: torch.Tensor | None = None  # one vector per sequence, for encoders with a pooler (BERT)
    encoder_last_hidden_state: torch.Tensor | None = None


_INIT_FUNCTIONS = ("normal_", "uniform_", "kaiming_uniform_", "kaiming_normal_", "xavier_uniform_",
                   "xavier_normal_", "trunc_normal_", "zeros_", "ones_", "constant_")


@contextmanager
def skip_weight_init():
    """Build modules without filling their weights (torch.nn.init becomes a no-op).

    Drawing 135M random numbers takes seconds and is wasted when a checkpoint
    overwrites them; weights the checkpoint lacks are initialised after loading.
    """
    saved = {name: getattr(nn.init, name) for name in _INIT_FUNCTIONS}
    for name in _INIT_FUNCTIONS:
        setattr(nn.init, name, lambda tensor, *args, **kwargs: tensor)
    try:
        yield
    finally:
        for name, function in saved.items():
            setattr(nn.init, name, function)


class PreTrainedModel(nn.Module):
    """Base of every architecture and task head."""

    config_class: ClassVar[type[ModelConfig]]
    hf_architecture: ClassVar[str]  # the HF class name written to config.json "architectures"
    hf_prefix: ClassVar[str] = "model"  # HF's base_model_prefix: where task models keep the backbone
    backbone_keymap: ClassVar[KeyMap] = KeyMap()  # backbone names, ours ↔ HF's bare backbone
    head_keymap: ClassVar[KeyMap] = KeyMap()  # head names, ours ↔ HF
    is_backbone: ClassVar[bool] = False
    tied_weights: ClassVar[dict[str, str]] = {}  # our name → the name it shares storage with, when tied
    defaulted_weights: ClassVar[frozenset[str]] = frozenset()  # may be absent from a checkpoint: keep init, no warning
    optional_backbone_weights: ClassVar[tuple[str, ...]] = ()  # backbone name prefixes a checkpoint may lack

    def __init__(self, config: ModelConfig):
        super().__init__()
        self.config = config

    # ----- construction ---------------------------------------------------------------

    def post_init(self) -> None:
        """Initialise weights (normal(0, 0.02), zero biases, unit norms) and tie shared weights.

        Modules a nested backbone already initialised are skipped, so each weight is drawn once.
        """
        for module in self.modules():
            if not getattr(module, "_lmforge_initialised", False):
                self._init_module(module)
                module._lmforge_initialised = True
        self.tie_weights()

    @staticmethod
    def _init_module(module: nn.Module) -> None:
        if isinstance(module, (nn.Linear, nn.Embedding)):
            nn.init.normal_(module.weight, std=0.02)
            if isinstance(module, nn.Linear) and module.bias is not None:
                nn.init.zeros_(module.bias)
        elif hasattr(module, "weight") and isinstance(module.weight, nn.Parameter) and module.weight.dim() == 1:
            nn.init.ones_(module.weight)  # LayerNorm / RMSNorm scales
            if getattr(module, "bias", None) is not None:
                nn.init.zeros_(module.bias)

    def tie_weights(self) -> None:
        if not getattr(self.config, "tie_word_embeddings", False):
            return
        for name, source in self.tied_weights.items():
            owner, attr = self._resolve(name)
            if isinstance(getattr(owner, attr, None), nn.Parameter):  # a quantized head shares its rows instead
                setattr(owner, attr, self.get_parameter(source))

    def _resolve(self, name: str) -> tuple[nn.Module, str]:
        module_name, _, attr = name.rpartition(".")
        return self.get_submodule(module_name), attr

    def set_gradient_checkpointing(self, enabled: bool = True) -> None:
        """Recompute each transformer block's activations in the backward pass instead of keeping them
        (less memory, about one more forward pass of compute); affects training only."""
        for module in self.modules():
            if isinstance(module, TransformerBlock):
                module.gradient_checkpointing = enabled

    def set_attention_implementation(self, name: str) -> None:
        """Switch every attention layer to the 'eager', 'sdpa' or 'flash' kernel."""
        for module in self.modules():
            if isinstance(module, Attention):
                module.set_implementation(name)

    @property
    def dtype(self) -> torch.dtype:
        return next(self.parameters()).dtype

    @property
    def device(self) -> torch.device:
        return next(self.parameters()).device

    def num_parameters(self) -> int:
        return sum(p.numel() for p in self.parameters())

    # ----- name translation -------------------------------------------------------------

    @classmethod
    def hf_keymap(cls) -> KeyMap:
        if cls.is_backbone:
            return cls.backbone_keymap
        return cls.head_keymap + cls.backbone_keymap.prefixed("model", cls.hf_prefix)

    def stored_tensor(self, name: str) -> StoredTensor:
        """Where our tensor `name` is in an HF checkpoint (a model that overrides `from_hf_layout` says how
        its fused or transposed tensors are stored here, so loaders can read slices of them)."""
        return StoredTensor(self.hf_keymap().to_hf(name))

    @classmethod
    def from_hf_layout(cls, state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        """Hook: rewrite HF tensors that are stored differently (fused, transposed) into HF-named unfused ones."""
        return state

    @classmethod
    def to_hf_layout(cls, state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        """Inverse of `from_hf_layout`."""
        return state

    def _match_backbone_nesting(self, state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        """Let task models load bare-backbone checkpoints and backbones load task checkpoints."""
        prefix = f"{self.hf_prefix}."
        nested = any(name.startswith(prefix) for name in state)
        if self.is_backbone and nested:
            return {name[len(prefix):]: t for name, t in state.items() if name.startswith(prefix)}
        if not self.is_backbone and not nested:
            return {prefix + name: t for name, t in state.items()}
        return state

    # ----- loading and saving --------------------------------------------------------------

    def load_hf_state_dict(self, hf_state: dict[str, torch.Tensor], source: str = "checkpoint",
                           strict: bool = False, assign: bool = False) -> None:
        """Load weights named the HF way; fail loudly on missing backbone weights or shape mismatches.

        With `strict` (quantized checkpoints, which must load bit for bit), any missing or unexpected
        tensor is an error too. With `assign`, the model takes the checkpoint's tensors themselves (converted
        only where dtype or layout differ) instead of copying them into its own: loading then needs the
        memory of one copy, not two — for state dicts no one else holds (read from a file).
        """
        keymap = self.hf_keymap()
        state = self.state_from_hf(hf_state)
        expected = self.state_dict()
        tied = set(self.tied_weights) if getattr(self.config, "tie_word_embeddings", False) else set()
        missing = [name for name in expected
                   if name not in state and name not in tied and name not in self.defaulted_weights]
        unexpected = [name for name in state if name not in expected]
        if strict and (missing or unexpected):
            raise CheckpointError(
                f"{source}: the checkpoint does not match the model its config describes: missing "
                f"{len(missing)} {[keymap.to_hf(n) for n in missing[:5]]}, unexpected {len(unexpected)} "
                f"{[keymap.to_hf(n) for n in unexpected[:5]]}; the folder is incomplete or its config.json "
                "belongs to other weights."
            )
        missing_backbone = [n for n in missing
                            if (self.is_backbone or n.startswith("model.")) and not self._is_optional(n)]
        if missing_backbone:
            raise CheckpointError(
                f"{source}: {len(missing_backbone)} weights of {type(self).__name__} are missing, e.g. "
                f"{[keymap.to_hf(n) for n in missing_backbone[:5]]}; the checkpoint is for another "
                "architecture or incomplete."
            )
        if missing:
            for name in missing:
                self._init_module(self._resolve(name)[0])
            logger.warning("%s: weights %s are not in the checkpoint and were randomly initialised; "
                           "train them before use.", source, missing)
        if unexpected:
            logger.warning("%s: ignoring weights %s that %s does not use.", source, unexpected[:10], type(self).__name__)
        loadable = {}
        for name in expected:
            if name not in state:
                continue
            target, tensor = expected[name], state[name]
            if target.shape != tensor.shape:
                raise CheckpointError(
                    f"{source}: tensor {keymap.to_hf(name)!r} has shape {tuple(tensor.shape)} in the "
                    f"checkpoint but the model expects {tuple(target.shape)}; the config does not match "
                    "these weights."
                )
            if target.dtype != tensor.dtype and not (target.is_floating_point() and tensor.is_floating_point()):
                raise CheckpointError(
                    f"{source}: tensor {keymap.to_hf(name)!r} is {tensor.dtype} in the checkpoint but the "
                    f"model expects {target.dtype}; integer codes are copied as they are, never converted."
                )
            loadable[name] = tensor.to(target.dtype).contiguous() if assign else tensor
        # torch's loading, so that modules which hold their tensors in another layout (quantized tiles) load them
        # through their own `_load_from_state_dict`
        self.load_state_dict(loadable, strict=False, assign=assign)
        self.tie_weights()

    def state_from_hf(self, hf_state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        """HF-named weights renamed and laid out as this model's own `state_dict()` (tied copies absent)."""
        hf_state = self.from_hf_layout(self._match_backbone_nesting(hf_state))
        keymap = self.hf_keymap()
        return {keymap.from_hf(name): tensor for name, tensor in hf_state.items()}

    def _is_optional(self, name: str) -> bool:
        """Whether a missing weight may be randomly initialised (with a warning) instead of failing the load."""
        prefix = "" if self.is_backbone else "model."
        return name.startswith(tuple(prefix + optional for optional in self.optional_backbone_weights))

    def hf_state_dict(self, state: dict[str, torch.Tensor] | None = None) -> dict[str, torch.Tensor]:
        """Our weights (or `state`, a full `state_dict()` gathered elsewhere) under HF names and layout,
        tied copies removed."""
        tied = set(self.tied_weights) if getattr(self.config, "tie_word_embeddings", False) else set()
        keymap = self.hf_keymap()
        state = self.state_dict() if state is None else state
        return self.to_hf_layout({keymap.to_hf(name): t for name, t in state.items() if name not in tied})

    def save_pretrained(self, folder: str | Path, max_shard_bytes: int = 5 * 2**30,
                        state: dict[str, torch.Tensor] | None = None) -> None:
        """Write `config.json` + `model.safetensors` (sharded above `max_shard_bytes`) that HF can load.

        `state` replaces the module's own weights, e.g. a full state gathered from FSDP shards.
        """
        folder = Path(folder)
        folder.mkdir(parents=True, exist_ok=True)
        self.config.architectures = [self.hf_architecture]
        self.config.save(folder)
        save_hf_weights(self.hf_state_dict(state), folder, max_shard_bytes)

    @classmethod
    def from_config(cls, config: ModelConfig, dtype: torch.dtype = torch.float32,
                    attn_implementation: str = "sdpa") -> "PreTrainedModel":
        model = cls(config).to(dtype)
        model.set_attention_implementation(attn_implementation)
        return model

    @classmethod
    def from_hf_state_dict(cls, config_dict: dict[str, Any], hf_state: dict[str, torch.Tensor], source: str,
                           dtype: torch.dtype = torch.float32, attn_implementation: str = "sdpa",
                           assign: bool = False):
        """Build the model `config_dict` describes and load `hf_state` into it (`assign`: take its tensors
        themselves, see `load_hf_state_dict`).

        A config with a "quantization" block (see lmforge.quant.checkpoint) gets the same quantized layers,
        empty, before the strict load fills them; `dtype` applies to the weights that are not quantized.
        An "adapters" block (see lmforge.peft.adapters) gets its adapters back the same way.
        """
        with skip_weight_init():  # every weight is about to be overwritten: do not draw random ones first
            model = cls.from_config(cls.config_class.from_dict(config_dict), dtype, attn_implementation)
        block = config_dict.get(QUANTIZATION_KEY)
        if block is None:
            reject_packed_tensors(hf_state, source)
        else:
            prepare_quantized_layers(model, block, source)
        if ADAPTERS_KEY in config_dict:
            prepare_adapter_layers(model, config_dict[ADAPTERS_KEY], source)
        model.load_hf_state_dict(hf_state, source, strict=block is not None, assign=assign)
        return model.eval()

    @classmethod
    def from_pretrained(cls, ref: str | Path, dtype: torch.dtype = torch.float32, attn_implementation: str = "sdpa",
                        **config_overrides: Any) -> "PreTrainedModel":
        """Load from an embedded short name, an HF folder or a GGUF file.

        `config_overrides` replace config.json fields before the model is built, e.g. `num_labels=6,
        id2label={0: "asyncio", ...}` for a classification head of another size (the checkpoint's own
        head, if any, must then match or be absent).
        """
        from lmforge.sources import load_checkpoint

        config_dict, hf_state, source = load_checkpoint(ref)  # tensors read from files: the model takes them
        return cls.from_hf_state_dict({**config_dict, **config_overrides}, hf_state, source, dtype,
                                      attn_implementation, assign=True)



class GenerativeModel(PreTrainedModel, ABC):
    """A model with a next-token head: adds `generate` and `stream` (see lmforge.generation)."""

    num_virtual_tokens: int = 0  # learned positions read before every input (prefix / prompt tuning)

    @property
    def context_window(self) -> int:
        """How many tokens a prompt and its completion may hold together."""
        return self.config.context_length - self.num_virtual_tokens

    @abstractmethod
    def decoder_attention_layers(self) -> list[Attention]:
        """The self-attention modules a KV cache serves, in layer order."""

    def generate(self, tokenizer, prompts, params=None):
        """Complete text or token-id prompts; returns one RequestOutput per prompt."""
        from lmforge.generation import generate

        return generate(self, tokenizer, prompts, params)

    def stream(self, tokenizer, prompt, params=None):
        """Yield the completion of one prompt as text deltas."""
        from lmforge.generation import stream

        return stream(self, tokenizer, prompt, params)


class DecoderLM(GenerativeModel):
    """A decoder-only backbone (`self.model`) with a next-token head (`self.lm_head`), tied when configured."""

    tied_weights = {"lm_head.weight": "model.embed_tokens.weight"}

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor | None = None,
                position_ids: torch.Tensor | None = None, kv_cache: KVCache | None = None,
                logits_to_keep: int | torch.Tensor | None = None) -> ModelOutput:
        """Logits [B, T, V]; only for the last `logits_to_keep` positions, or the positions it lists
        (a tensor of indices along T), when given.

        Generation samples from few positions: skipping the vocabulary projection
        elsewhere saves most of the prefill cost of a large LM head.
        """
        hidden = self.model(input_ids, attention_mask, position_ids, kv_cache).last_hidden_state
        if logits_to_keep is None:
            sampled = hidden
        elif isinstance(logits_to_keep, int):
            sampled = hidden[:, -logits_to_keep:]
        else:
            sampled = hidden[:, logits_to_keep]
        return ModelOutput(logits=self.lm_head(sampled), last_hidden_state=hidden)

    def decoder_attention_layers(self) -> list[Attention]:
        """The self-attention modules a KV cache serves, in layer order."""
        return [layer.self_attn for layer in self.model.layers]
