"""Model configurations: small dataclasses that read and write HF `config.json`.

Field names follow Hugging Face so a config round-trips through `config.json`
unchanged; fields lmforge does not use are kept in `extra` and written back.
Each config checks its own consistency at construction, so a bad shape fails
here with a clear message instead of deep inside a matmul.
"""

from __future__ import annotations

import dataclasses
import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, ClassVar

from lmforge.errors import CheckpointError, ConfigError

# HF bookkeeping keys that describe the file, not the model; never copied into `extra`.
_HF_BOOKKEEPING = {"transformers_version", "_name_or_path", "model_type"}


@dataclass
class ModelConfig:
    """Base class: HF-compatible (de)serialisation plus validation."""

    model_type: ClassVar[str] = ""
    architectures: list[str] | None = None
    num_labels: int = 2  # classification heads; HF stores it as `id2label`
    extra: dict[str, Any] = field(default_factory=dict, repr=False)

    def __post_init__(self) -> None:
        self.validate()

    def validate(self) -> None:
        """Raise ConfigError when fields are inconsistent; subclasses extend this."""

    @property
    def context_length(self) -> int:
        """The most positions (prompt + generated tokens) the model can attend over."""
        return self.max_position_embeddings

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> "ModelConfig":
        """Build from an HF-style dict, keeping unknown keys in `extra`."""
        data = cls._normalise(dict(data))
        names = {f.name for f in dataclasses.fields(cls)} - {"extra"}
        known = {k: v for k, v in data.items() if k in names}
        extra = {k: v for k, v in data.items() if k not in names and k not in _HF_BOOKKEEPING}
        return cls(**known, extra=extra)

    @classmethod
    def _normalise(cls, data: dict[str, Any]) -> dict[str, Any]:
        """Accept HF spellings that differ from our fields; subclasses add their own."""
        if "id2label" in data:  # JSON object keys are strings; accept ints from Python dicts too
            data["id2label"] = {str(k): v for k, v in data["id2label"].items()}
            data.setdefault("num_labels", len(data["id2label"]))
        return data

    def to_dict(self) -> dict[str, Any]:
        """HF-style dict: `model_type`, every field, and the preserved extras."""
        out: dict[str, Any] = {"model_type": self.model_type}
        out.update(self.extra)
        for f in dataclasses.fields(self):
            if f.name != "extra":
                out[f.name] = getattr(self, f.name)
        num_labels = out.pop("num_labels")
        if len(out.get("id2label", {})) != num_labels:  # keep the user's own label names when they fit
            out["id2label"] = {str(i): f"LABEL_{i}" for i in range(num_labels)}
            out["label2id"] = {f"LABEL_{i}": i for i in range(num_labels)}
        return out

    @classmethod
    def from_json_file(cls, path: str | Path) -> "ModelConfig":
        return cls.from_dict(read_config_json(path))

    def save(self, folder: str | Path) -> None:
        """Write `config.json` into `folder`."""
        path = Path(folder) / "config.json"
        path.write_text(json.dumps(self.to_dict(), indent=2, sort_keys=True) + "\n")

    def _require_divisible(self, numerator: str, denominator: str) -> None:
        n, d = getattr(self, numerator), getattr(self, denominator)
        if d <= 0 or n % d != 0:
            raise ConfigError(
                f"{type(self).__name__}: {numerator}={n} must be a positive multiple of "
                f"{denominator}={d}; change one of them so that it divides evenly."
            )

    def _require_positive(self, *names: str) -> None:
        for name in names:
            if getattr(self, name) <= 0:
                raise ConfigError(f"{type(self).__name__}: {name} must be > 0, got {getattr(self, name)}.")


def read_config_json(path: str | Path) -> dict[str, Any]:
    """Read a config.json, turning a missing or malformed file into a CheckpointError."""
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"{path}: config.json not found; a model folder needs one (save with save_pretrained).")
    try:
        data = json.loads(path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise CheckpointError(f"{path}: not valid JSON ({exc}); re-save or repair the file.") from exc
    if not isinstance(data, dict):
        raise CheckpointError(f"{path}: expected a JSON object, got {type(data).__name__}.")
    return data


@dataclass
class LlamaConfig(ModelConfig):
    """Decoder-only Llama family (Llama 2/3, Mistral, Qwen2-style, SmolLM2)."""

    model_type: ClassVar[str] = "llama"
    vocab_size: int = 32000
    hidden_size: int = 4096
    intermediate_size: int = 11008
    num_hidden_layers: int = 32
    num_attention_heads: int = 32
    num_key_value_heads: int | None = None
    head_dim: int | None = None
    hidden_act: str = "silu"
    max_position_embeddings: int = 2048
    rms_norm_eps: float = 1e-6
    rope_theta: float = 10000.0
    rope_scaling: dict[str, Any] | None = None
    attention_bias: bool = False
    mlp_bias: bool = False
    tie_word_embeddings: bool = False
    bos_token_id: int | None = 1
    eos_token_id: int | list[int] | None = 2
    pad_token_id: int | None = None

    @classmethod
    def _normalise(cls, data: dict[str, Any]) -> dict[str, Any]:
        # transformers >= 5 nests rope_theta and the scaling inside `rope_parameters`.
        data = super()._normalise(data)
        rope = data.pop("rope_parameters", None)
        if rope:
            rope = dict(rope)
            data.setdefault("rope_theta", rope.pop("rope_theta", 10000.0))
            if rope.get("rope_type", "default") != "default":
                data.setdefault("rope_scaling", rope)
        return data

    def validate(self) -> None:
        if self.num_key_value_heads is None:
            self.num_key_value_heads = self.num_attention_heads
        if self.head_dim is None and self.num_attention_heads > 0:
            self._require_divisible("hidden_size", "num_attention_heads")
            self.head_dim = self.hidden_size // self.num_attention_heads
        self._require_positive("vocab_size", "hidden_size", "intermediate_size", "num_hidden_layers",
                               "num_attention_heads", "num_key_value_heads", "head_dim")
        self._require_divisible("num_attention_heads", "num_key_value_heads")
        if self.head_dim % 2:
            raise ConfigError(f"LlamaConfig: head_dim={self.head_dim} must be even for rotary embeddings.")


@dataclass
class GPT2Config(ModelConfig):
    """Decoder-only GPT-2: learned positions, pre-norm LayerNorm, GELU MLP."""

    model_type: ClassVar[str] = "gpt2"
    vocab_size: int = 50257
    n_positions: int = 1024
    n_embd: int = 768
    n_layer: int = 12
    n_head: int = 12
    n_inner: int | None = None
    activation_function: str = "gelu_new"
    layer_norm_epsilon: float = 1e-5
    resid_pdrop: float = 0.1
    embd_pdrop: float = 0.1
    attn_pdrop: float = 0.1
    scale_attn_weights: bool = True
    tie_word_embeddings: bool = True
    bos_token_id: int | None = 50256
    eos_token_id: int | None = 50256
    pad_token_id: int | None = None

    def validate(self) -> None:
        self._require_positive("vocab_size", "n_positions", "n_embd", "n_layer", "n_head")
        self._require_divisible("n_embd", "n_head")
        if not self.scale_attn_weights:
            raise ConfigError("GPT2Config: scale_attn_weights=False is not supported; set it to true.")


    @property
    def intermediate_size(self) -> int:
        return self.n_inner or 4 * self.n_embd

    @property
    def context_length(self) -> int:
        return self.n_positions


@dataclass
class BertConfig(ModelConfig):
    """Encoder-only BERT (covers MiniLM): learned absolute positions, post-norm."""

    model_type: ClassVar[str] = "bert"
    vocab_size: int = 30522
    hidden_size: int = 768
    num_hidden_layers: int = 12
    num_attention_heads: int = 12
    intermediate_size: int = 3072
    hidden_act: str = "gelu"
    hidden_dropout_prob: float = 0.1
    attention_probs_dropout_prob: float = 0.1
    max_position_embeddings: int = 512
    type_vocab_size: int = 2
    layer_norm_eps: float = 1e-12
    pad_token_id: int | None = 0
    classifier_dropout: float | None = None
    tie_word_embeddings: bool = True

    def validate(self) -> None:
        self._require_positive("vocab_size", "hidden_size", "num_hidden_layers", "num_attention_heads",
                               "intermediate_size", "max_position_embeddings")
        self._require_divisible("hidden_size", "num_attention_heads")
        position_type = self.extra.get("position_embedding_type", "absolute")
        if position_type != "absolute":
            raise ConfigError(f"BertConfig: position_embedding_type={position_type!r} is not supported; "
                              "only 'absolute' is implemented.")



@dataclass
class BartConfig(ModelConfig):
    """Encoder-decoder BART: learned positions (offset 2), post-norm, cross-attention."""

    model_type: ClassVar[str] = "bart"
    vocab_size: int = 50265
    d_model: int = 1024
    encoder_layers: int = 12
    decoder_layers: int = 12
    encoder_attention_heads: int = 16
    decoder_attention_heads: int = 16
    encoder_ffn_dim: int = 4096
    decoder_ffn_dim: int = 4096
    activation_function: str = "gelu"
    dropout: float = 0.1
    attention_dropout: float = 0.0
    activation_dropout: float = 0.0
    max_position_embeddings: int = 1024
    scale_embedding: bool = False
    tie_word_embeddings: bool = True
    is_encoder_decoder: bool = True
    pad_token_id: int | None = 1
    bos_token_id: int | None = 0
    eos_token_id: int | None = 2
    decoder_start_token_id: int | None = 2
    forced_eos_token_id: int | None = 2

    def validate(self) -> None:
        self._require_positive("vocab_size", "d_model", "encoder_layers", "decoder_layers",
                               "encoder_attention_heads", "decoder_attention_heads", "max_position_embeddings")
        self._require_divisible("d_model", "encoder_attention_heads")
        self._require_divisible("d_model", "decoder_attention_heads")
