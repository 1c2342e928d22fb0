"""Rebuild a Hugging Face `tokenizers.Tokenizer` from a GGUF file's metadata.

A GGUF carries no tokenizer.json, only llama.cpp's description of one: the token
strings (`tokenizer.ggml.tokens`), their kinds (`token_type`), BPE merges or
SentencePiece scores, special token ids, and the name of the pre-tokenizer
(`tokenizer.ggml.pre`). This module turns that back into an equivalent tokenizer.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

from tokenizers import (
    AddedToken,
    Regex,
    Tokenizer,
    decoders,
    pre_tokenizers,
    processors,
)
from tokenizers.models import BPE

from lmforge.errors import CheckpointError, UnsupportedError

# llama.cpp token types (tokenizer.ggml.token_type) that change how a token is handled;
# the others (2 unknown, 5 unused, 6 byte like <0x0A>) are ordinary vocabulary entries here.
NORMAL, CONTROL, USER_DEFINED = 1, 3, 4

# llama.cpp's split regexes (llama-vocab.cpp), for pre-tokenizers that are not GPT-2's.
_LLAMA3_SPLIT = (
    r"(?:'[sS]|'[tT]|'[rR][eE]|'[vV][eE]|'[mM]|'[lL][lL]|'[dD])|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}"
    r"| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+"
)
_QWEN2_SPLIT = (
    r"(?:'[sS]|'[tT]|'[rR][eE]|'[vV][eE]|'[mM]|'[lL][lL]|'[dD])|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}"
    r"| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+"
)


def _gpt2_split() -> pre_tokenizers.PreTokenizer:
    """GPT-2's regex ('s|'t|...| ?\\p{L}+| ?\\p{N}+| ?[^\\s\\p{L}\\p{N}]+|\\s+(?!\\S)|\\s+), then bytes -> symbols."""
    return pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)


def _digits_then_gpt2_split() -> pre_tokenizers.PreTokenizer:
    """Every digit on its own first, then the GPT-2 regex (llama.cpp's `\\p{N}` pass before it)."""
    return pre_tokenizers.Sequence([pre_tokenizers.Digits(individual_digits=True), _gpt2_split()])


def _regex_split(pattern: str) -> Callable[[], pre_tokenizers.PreTokenizer]:
    def build() -> pre_tokenizers.PreTokenizer:
        return pre_tokenizers.Sequence([
            pre_tokenizers.Split(Regex(pattern), behavior="isolated"),
            pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False),
        ])
    return build


# tokenizer.ggml.pre -> how byte-level BPE text is split before merging, as llama.cpp does it.
BYTE_LEVEL_PRE_TOKENIZERS: dict[str, Callable[[], pre_tokenizers.PreTokenizer]] = {
    "default": _gpt2_split,
    "gpt2": _gpt2_split,
    "gpt-2": _gpt2_split,
    "smollm": _digits_then_gpt2_split,
    "starcoder": _digits_then_gpt2_split,
    "refact": _digits_then_gpt2_split,
    "command-r": _digits_then_gpt2_split,
    "codeshell": _digits_then_gpt2_split,
    "llama-bpe": _regex_split(_LLAMA3_SPLIT),
    "llama3": _regex_split(_LLAMA3_SPLIT),
    "llama-v3": _regex_split(_LLAMA3_SPLIT),
    "qwen2": _regex_split(_QWEN2_SPLIT),
    "deepseek-r1-qwen": _regex_split(_QWEN2_SPLIT),
}


@dataclass
class GGUFTokenizerSpec:
    """A tokenizer rebuilt from GGUF metadata, with its special tokens and chat template."""

    tokenizer: Tokenizer
    bos_token: str | None
    bos_token_id: int | None
    eos_token: str | None
    eos_token_id: int | None
    unk_token: str | None
    unk_token_id: int | None
    pad_token: str | None
    pad_token_id: int | None
    add_bos_token: bool
    add_eos_token: bool
    chat_template: str | None


class _Vocab:
    """The tokenizer.ggml.* arrays of one file, checked for consistency."""

    def __init__(self, metadata: Mapping[str, Any]) -> None:
        tokens = metadata.get("tokenizer.ggml.tokens")
        if not tokens:
            raise CheckpointError(
                "this GGUF has no tokenizer.ggml.tokens, so it carries no tokenizer; "
                "load the tokenizer from the model's Hugging Face folder instead."
            )
        self.tokens: list[str] = list(tokens)
        self.types: list[int] = list(metadata.get("tokenizer.ggml.token_type") or [NORMAL] * len(tokens))
        self.scores: list[float] | None = metadata.get("tokenizer.ggml.scores")
        self.merges: list[str] | None = metadata.get("tokenizer.ggml.merges")
        for name, values in (("token_type", self.types), ("scores", self.scores)):
            if values is not None and len(values) != len(tokens):
                raise CheckpointError(
                    f"tokenizer.ggml.{name} has {len(values)} entries for {len(tokens)} tokens; "
                    "the GGUF is corrupt. Re-convert it with llama.cpp."
                )

    def ids(self) -> dict[str, int]:
        return {token: index for index, token in enumerate(self.tokens)}

    def of_type(self, token_type: int) -> list[str]:
        return [token for token, kind in zip(self.tokens, self.types) if kind == token_type]

    def token(self, token_id: int | None) -> str | None:
        if token_id is None:
            return None
        if not 0 <= token_id < len(self.tokens):
            raise CheckpointError(
                f"a special token id {token_id} is outside the vocabulary of {len(self.tokens)} tokens; "
                "the GGUF is corrupt. Re-convert it with llama.cpp."
            )
        return self.tokens[token_id]


def _parsed_merges(merges: Sequence[str]) -> list[tuple[str, str]]:
    """llama.cpp writes each merge as "left right"."""
    pairs = []
    for merge in merges:
        parts = merge.split(" ")
        if len(parts) != 2:
            raise CheckpointError(f"tokenizer.ggml.merges holds {merge!r}, not two tokens separated by one space; "
                                  "the GGUF is corrupt. Re-convert it with llama.cpp.")
        pairs.append((parts[0], parts[1]))
    return pairs


def _byte_level_bpe(vocab: _Vocab, metadata: Mapping[str, Any]) -> Tokenizer:
    """GPT-2-style byte-level BPE ("gpt2"): token strings and merges as written.

    The pre-tokenizer follows llama.cpp's reading of `tokenizer.ggml.pre`, which is
    what the model was trained with. This matters for SmolLM2 ("smollm"): its
    vocabulary has only the ten single digits and no merge involving a digit, and
    llama.cpp (like the original tokenizer.json) splits off every digit before the
    GPT-2 regex. HF transformers' GGUF loader ignores "smollm" and uses the GPT-2 regex
    alone, which keeps " 12" in one piece; that tokenizes digits the same way but
    whitespace before a digit differently, e.g. "a  1" is [a, ĠĠ, 1] here (and in
    llama.cpp) but [a, Ġ, Ġ, 1] in transformers.
    """
    pre = metadata.get("tokenizer.ggml.pre", "default")
    if pre not in BYTE_LEVEL_PRE_TOKENIZERS:
        raise UnsupportedError(
            f"GGUF pre-tokenizer {pre!r} (tokenizer.ggml.pre) is not supported; lmforge knows "
            f"{', '.join(BYTE_LEVEL_PRE_TOKENIZERS)}. Load the tokenizer from the model's HF folder instead."
        )
    if vocab.merges is None:
        raise CheckpointError("this byte-level BPE GGUF has no tokenizer.ggml.merges; the file is incomplete. "
                              "Re-convert it with llama.cpp.")
    tokenizer = Tokenizer(BPE(vocab.ids(), _parsed_merges(vocab.merges), fuse_unk=False, byte_fallback=False))
    tokenizer.pre_tokenizer = BYTE_LEVEL_PRE_TOKENIZERS[pre]()
    tokenizer.decoder = decoders.ByteLevel()
    return tokenizer


def _sentencepiece_merges(vocab: _Vocab) -> list[tuple[str, str]]:
    """BPE merges equivalent to SentencePiece's rule "join the adjacent pair whose
    concatenation is the highest-scoring token": every split of every token into two
    known tokens, ranked by the score of the token it makes (ties: longer left part,
    longer right part, vocabulary order), the order HF transformers also uses."""
    ids = vocab.ids()
    merges: list[tuple[float, int, int, int, int, int, str, str]] = []
    for index, (token, score) in enumerate(zip(vocab.tokens, vocab.scores or [])):
        for cut in range(1, len(token)):
            left, right = token[:cut], token[cut:]
            if left in ids and right in ids:
                merges.append((-score, -len(left), -len(right), index, ids[left], ids[right], left, right))
    return [(left, right) for *_, left, right in sorted(merges)]


def _sentencepiece_bpe(vocab: _Vocab, metadata: Mapping[str, Any]) -> Tokenizer:
    """SentencePiece BPE ("llama"): "▁" stands for a space, unknown characters fall back
    to <0xNN> byte tokens, merges come from the token scores. A "▁" is prepended to the
    start of the text only (not after each special token), as SentencePiece does, when
    tokenizer.ggml.add_space_prefix is true (the default)."""
    if vocab.merges is not None:
        merges = _parsed_merges(vocab.merges)
    elif vocab.scores is not None:
        merges = _sentencepiece_merges(vocab)
    else:
        raise CheckpointError("this SentencePiece GGUF has neither tokenizer.ggml.scores nor merges; the file is "
                              "incomplete. Re-convert it with llama.cpp.")
    unk = vocab.token(metadata.get("tokenizer.ggml.unknown_token_id"))
    tokenizer = Tokenizer(BPE(vocab.ids(), merges, unk_token=unk, fuse_unk=True, byte_fallback=True))
    add_prefix = bool(metadata.get("tokenizer.ggml.add_space_prefix", True))
    tokenizer.pre_tokenizer = pre_tokenizers.Metaspace(
        replacement="▁", prepend_scheme="first" if add_prefix else "never", split=False
    )
    steps = [decoders.Replace("▁", " "), decoders.ByteFallback(), decoders.Fuse()]
    if add_prefix:
        steps.append(decoders.Strip(content=" ", left=1, right=0))
    tokenizer.decoder = decoders.Sequence(steps)
    return tokenizer


# tokenizer.ggml.model -> (builder, whether llama.cpp adds BOS when the file does not say).
TOKENIZER_MODELS: dict[str, tuple[Callable[[_Vocab, Mapping[str, Any]], Tokenizer], bool]] = {
    "gpt2": (_byte_level_bpe, False),
    "llama": (_sentencepiece_bpe, True),
}


def _add_bos_eos(tokenizer: Tokenizer, bos: tuple[str, int] | None, eos: tuple[str, int] | None) -> None:
    """Wrap every encoded sequence in the given (token, id) BOS and/or EOS."""
    before = [bos[0]] if bos else []
    after = [eos[0]] if eos else []
    tokenizer.post_processor = processors.TemplateProcessing(
        single=" ".join([*before, "$A", *after]),
        pair=" ".join([*before, "$A", *after, *before, "$B:1", *after]),
        special_tokens=list(dict.fromkeys(token for token in (bos, eos) if token)),
    )


def tokenizer_from_gguf(metadata: Mapping[str, Any]) -> GGUFTokenizerSpec:
    """Rebuild the tokenizer described by GGUF metadata (e.g. `GGUFFile(path).metadata`).

    Tokens typed CONTROL become special added tokens and USER_DEFINED ones plain added
    tokens, so both are matched whole in the input text, as llama.cpp does.
    """
    model = metadata.get("tokenizer.ggml.model")
    if model not in TOKENIZER_MODELS:
        raise UnsupportedError(
            f"GGUF tokenizer model {model!r} (tokenizer.ggml.model) is not supported; lmforge rebuilds "
            f"{', '.join(TOKENIZER_MODELS)}. Load the tokenizer from the model's HF folder instead."
        )
    build, adds_bos_by_default = TOKENIZER_MODELS[model]
    vocab = _Vocab(metadata)
    tokenizer = build(vocab, metadata)
    tokenizer.add_special_tokens([AddedToken(t, special=True, normalized=False) for t in vocab.of_type(CONTROL)])
    tokenizer.add_tokens([AddedToken(t, special=False, normalized=False) for t in vocab.of_type(USER_DEFINED)])

    kinds = ("bos", "eos", "unknown", "padding")
    special_ids = {kind: metadata.get(f"tokenizer.ggml.{kind}_token_id") for kind in kinds}
    special = {kind: vocab.token(token_id) for kind, token_id in special_ids.items()}
    add_bos = bool(metadata.get("tokenizer.ggml.add_bos_token", adds_bos_by_default)) and special["bos"] is not None
    add_eos = bool(metadata.get("tokenizer.ggml.add_eos_token", False)) and special["eos"] is not None
    if add_bos or add_eos:
        _add_bos_eos(
            tokenizer,
            (special["bos"], special_ids["bos"]) if add_bos else None,
            (special["eos"], special_ids["eos"]) if add_eos else None,
        )
    return GGUFTokenizerSpec(
        tokenizer=tokenizer,
        bos_token=special["bos"], bos_token_id=special_ids["bos"],
        eos_token=special["eos"], eos_token_id=special_ids["eos"],
        unk_token=special["unknown"], unk_token_id=special_ids["unknown"],
        pad_token=special["padding"], pad_token_id=special_ids["padding"],
        add_bos_token=add_bos,
        add_eos_token=add_eos,
        chat_template=metadata.get("tokenizer.chat_template"),
    )
