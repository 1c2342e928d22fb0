"""Tokenizer: text ↔ token ids, batches with attention masks, and chat templates.

The heavy lifting (BPE / WordPiece) is Hugging Face `tokenizers`; this wrapper
adds what a model needs around it: special tokens (BOS/EOS/PAD), padding into a
rectangular batch with an attention mask (1 = real token, 0 = padding), and the
model's chat template (a Jinja program that turns messages into one prompt).
Loads from an HF folder (tokenizer.json + tokenizer_config.json) or a GGUF file.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import torch
from jinja2.exceptions import TemplateError
from jinja2.sandbox import ImmutableSandboxedEnvironment
from tokenizers import Tokenizer as BackendTokenizer

from lmforge.errors import CheckpointError, InputError, UnsupportedError

SPECIAL_ROLES = ("bos", "eos", "unk", "pad")


def _token_content(value: Any) -> str | None:
    """tokenizer_config.json stores a special token as a string or as {"content": ...}."""
    if isinstance(value, dict):
        return value.get("content")
    return value


class Tokenizer:
    def __init__(self, backend: BackendTokenizer, special_tokens: dict[str, str | None] | None = None,
                 chat_template: str | None = None, model_max_length: int | None = None):
        self.backend = backend
        # Padding and truncation are decided per call (see __call__), not baked into tokenizer.json.
        backend.no_padding()
        backend.no_truncation()
        self.special_tokens = {role: (special_tokens or {}).get(role) for role in SPECIAL_ROLES}
        self.chat_template = chat_template
        self.model_max_length = model_max_length

    # ----- loading and saving ---------------------------------------------------------

    @classmethod
    def from_pretrained(cls, ref: str | Path) -> "Tokenizer":
        """Load from an embedded short name, an HF folder or a GGUF file."""
        from lmforge.sources import is_gguf, resolve

        path = resolve(ref)
        return cls.from_gguf(path) if is_gguf(path) else cls.from_folder(path)

    @classmethod
    def from_folder(cls, folder: str | Path) -> "Tokenizer":
        folder = Path(folder)
        if not (folder / "tokenizer.json").is_file():
            raise CheckpointError(f"{folder}: no tokenizer.json; lmforge reads fast-tokenizer files only "
                                  "(convert once with transformers' AutoTokenizer(...).save_pretrained).")
        try:
            backend = BackendTokenizer.from_file(str(folder / "tokenizer.json"))
        except Exception as exc:  # tokenizers raises a plain Exception on malformed files
            raise CheckpointError(f"{folder / 'tokenizer.json'}: cannot be read ({exc}).") from exc
        config: dict[str, Any] = {}
        for name in ("special_tokens_map.json", "tokenizer_config.json"):  # later files win
            if (folder / name).is_file():
                config.update(json.loads((folder / name).read_text()))
        template = config.get("chat_template")
        if (folder / "chat_template.jinja").is_file():
            template = (folder / "chat_template.jinja").read_text()
        special = {role: _token_content(config.get(f"{role}_token")) for role in SPECIAL_ROLES}
        max_length = config.get("model_max_length")
        max_length = int(max_length) if isinstance(max_length, (int, float)) and max_length < 1e9 else None
        return cls(backend, special, template, max_length)

    @classmethod
    def from_gguf(cls, path: str | Path) -> "Tokenizer":
        from lmforge.checkpoint.gguf import open_gguf
        from lmforge.checkpoint.gguf_tokenizer import tokenizer_from_gguf

        spec = tokenizer_from_gguf(open_gguf(path).metadata)
        special = {role: getattr(spec, f"{role}_token") for role in SPECIAL_ROLES}
        return cls(spec.tokenizer, special, spec.chat_template)

    def save_pretrained(self, folder: str | Path) -> None:
        """Write tokenizer.json and tokenizer_config.json (with the chat template) in HF's layout."""
        folder = Path(folder)
        folder.mkdir(parents=True, exist_ok=True)
        self.backend.save(str(folder / "tokenizer.json"))
        config: dict[str, Any] = {"tokenizer_class": "PreTrainedTokenizerFast"}
        config.update({f"{role}_token": token for role, token in self.special_tokens.items() if token})
        if self.chat_template:
            config["chat_template"] = self.chat_template
        if self.model_max_length:
            config["model_max_length"] = self.model_max_length
        (folder / "tokenizer_config.json").write_text(json.dumps(config, indent=2, ensure_ascii=False) + "\n")

    # ----- special tokens -------------------------------------------------------------

    def token_to_id(self, token: str | None) -> int | None:
        return None if token is None else self.backend.token_to_id(token)

    @property
    def bos_token_id(self) -> int | None:
        return self.token_to_id(self.special_tokens["bos"])

    @property
    def eos_token_id(self) -> int | None:
        return self.token_to_id(self.special_tokens["eos"])

    @property
    def pad_token_id(self) -> int | None:
        """The padding id; falls back to EOS (a common choice for decoders without a pad token)."""
        pad = self.token_to_id(self.special_tokens["pad"])
        return self.eos_token_id if pad is None else pad

    @property
    def vocab_size(self) -> int:
        return self.backend.get_vocab_size(with_added_tokens=True)

    def __len__(self) -> int:
        return self.vocab_size

    # ----- encoding and decoding -------------------------------------------------------

    def encode(self, text: str, add_special_tokens: bool = True) -> list[int]:
        return self.backend.encode(text, add_special_tokens=add_special_tokens).ids

    def tokenize(self, text: str, add_special_tokens: bool = False) -> list[str]:
        """The token strings (pieces) of `text`."""
        return self.backend.encode(text, add_special_tokens=add_special_tokens).tokens

    def decode(self, ids: list[int] | torch.Tensor, skip_special_tokens: bool = False) -> str:
        if isinstance(ids, torch.Tensor):
            ids = ids.tolist()
        return self.backend.decode(ids, skip_special_tokens=skip_special_tokens)

    def __call__(self, texts: str | list[str], padding_side: str = "right", max_length: int | None = None,
                 truncation: bool = False, add_special_tokens: bool = True) -> dict[str, torch.Tensor]:
        """Encode a batch into `input_ids`, `attention_mask` and `token_type_ids` tensors, padded to the longest.

        Decoders generate after the last token, so they batch prompts with `padding_side="left"`.
        """
        if padding_side not in ("left", "right"):
            raise InputError(f"padding_side must be 'left' or 'right', got {padding_side!r}.")
        texts = [texts] if isinstance(texts, str) else list(texts)
        encodings = self.backend.encode_batch(texts, add_special_tokens=add_special_tokens)
        rows = [(e.ids, e.type_ids) for e in encodings]
        if max_length is not None:
            too_long = [i for i, (ids, _) in enumerate(rows) if len(ids) > max_length]
            if too_long and not truncation:
                raise InputError(f"texts {too_long} are longer than max_length={max_length} tokens; "
                                 "shorten them or pass truncation=True.")
            rows = [(ids[:max_length], types[:max_length]) for ids, types in rows]
        width = max((len(ids) for ids, _ in rows), default=0)
        pad_id = self.pad_token_id if self.pad_token_id is not None else 0
        batch = {name: torch.zeros(len(rows), width, dtype=torch.long)
                 for name in ("input_ids", "attention_mask", "token_type_ids")}
        batch["input_ids"].fill_(pad_id)
        for row, (ids, types) in enumerate(rows):
            span = slice(width - len(ids), width) if padding_side == "left" else slice(0, len(ids))
            batch["input_ids"][row, span] = torch.tensor(ids, dtype=torch.long)
            batch["token_type_ids"][row, span] = torch.tensor(types, dtype=torch.long)
            batch["attention_mask"][row, span] = 1
        return batch

    # ----- chat -----------------------------------------------------------------------

    def apply_chat_template(self, messages: list[dict[str, Any]], add_generation_prompt: bool = True,
                            tokenize: bool = False, **template_vars: Any) -> str | list[int]:
        """Render `messages` ([{"role": ..., "content": ...}]) with the model's chat template."""
        if not self.chat_template:
            raise UnsupportedError("this tokenizer has no chat template; pass a plain prompt instead, or set "
                                   "`tokenizer.chat_template` to a Jinja template.")
        for message in messages:
            if not isinstance(message, dict) or "role" not in message or "content" not in message:
                raise InputError(f"each chat message needs 'role' and 'content' keys, got {message!r}.")
        environment = ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True)
        environment.filters["tojson"] = lambda value, indent=None: json.dumps(value, indent=indent, ensure_ascii=False)
        environment.globals["raise_exception"] = _raise_template_error
        try:
            text = environment.from_string(self.chat_template).render(
                messages=messages, add_generation_prompt=add_generation_prompt,
                bos_token=self.special_tokens["bos"] or "", eos_token=self.special_tokens["eos"] or "",
                **template_vars)
        except TemplateError as exc:
            raise InputError(f"the chat template rejected these messages: {exc}") from exc
        return self.encode(text, add_special_tokens=False) if tokenize else text


def _raise_template_error(message: str) -> None:
    raise TemplateError(message)
