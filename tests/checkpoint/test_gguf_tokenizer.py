"""Tokenizers rebuilt from GGUF metadata, checked against HF transformers' GGUF loader."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from gguf import GGUFWriter
from tokenizers import Tokenizer, models, pre_tokenizers, trainers

from lmforge.checkpoint.gguf import GGUFFile
from lmforge.checkpoint.gguf_tokenizer import GGUFTokenizerSpec, tokenizer_from_gguf
from lmforge.errors import CheckpointError, UnsupportedError

TEXTS_WITHOUT_DIGITS = [
    "Hello, world!",
    "café naïve résumé Ærøskøbing",
    "日本語のテキストと中文",
    "emoji 😀👍🏽 done",
    "def f(x):\n    if x:\n        return x  \n\n\n\treturn None",
    "a   b    c\n\n\n  \n ",
    "   leading and trailing   ",
    "it's I'll they're WE'VE",
    "<|im_start|>user\nhi<|im_end|>\n<|im_start|>assistant\n",
    "<|endoftext|><repo_name>x<file_sep>",
    "",
    " ",
]
# Digit strings where splitting each digit off first changes nothing: no whitespace right before a digit.
TEXTS_WITH_DIGITS_ALIKE = ["x1 (22) 3.14159 1,000,000 v2.0", "price: $12.50", "2024-01-01T10:00"]
# Whitespace right before a digit: llama.cpp's "smollm" pre-tokenizer differs from transformers here.
TEXTS_WITH_DIGITS_DIFFERENT = ["a  1", "x\n 2", "    42", "१२३ ٣٤"]


def gguf_path(tmp_path: Path, name: str, configure) -> Path:
    writer = GGUFWriter(tmp_path / name, "llama")
    configure(writer)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return tmp_path / name


def hf_tokenizer(path: Path):
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(path.parent, gguf_file=path.name)


# --------------------------------------------------------------------------- #
# SmolLM2 (byte-level BPE, pre "smollm") against transformers
# --------------------------------------------------------------------------- #


@pytest.fixture(scope="module")
def spec(smollm2_path: Path) -> GGUFTokenizerSpec:
    return tokenizer_from_gguf(GGUFFile(smollm2_path).metadata)


@pytest.fixture(scope="module")
def hf(hf_smollm2_tokenizer):
    return hf_smollm2_tokenizer


@pytest.mark.parametrize("text", TEXTS_WITHOUT_DIGITS + TEXTS_WITH_DIGITS_ALIKE)
def test_smollm2_matches_transformers(spec: GGUFTokenizerSpec, hf, text: str) -> None:
    assert spec.tokenizer.encode(text).ids == hf.encode(text)
    assert spec.tokenizer.encode(text, add_special_tokens=False).ids == hf.encode(text, add_special_tokens=False)


@pytest.fixture(scope="module")
def original(hf) -> Tokenizer:
    """transformers' tokenizer with SmolLM2's own pre-tokenizer (as in its tokenizer.json) put back.

    transformers' GGUF loader ignores tokenizer.ggml.pre = "smollm" and splits with the GPT-2 regex
    alone. llama.cpp, and SmolLM2's tokenizer.json, first split off every digit
    (Digits(individual_digits=True)) and then apply the GPT-2 regex. Both give single-digit tokens
    (the vocabulary has no multi-digit token), but whitespace before a digit differs: "a  1" is
    [a, ĠĠ, 1] for the model's own tokenizer and [a, Ġ, Ġ, 1] in transformers. We follow the model.
    """
    tokenizer = Tokenizer.from_str(hf.backend_tokenizer.to_str())
    tokenizer.pre_tokenizer = pre_tokenizers.Sequence([
        pre_tokenizers.Digits(individual_digits=True),
        pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True),
    ])
    return tokenizer


@pytest.mark.parametrize("text", TEXTS_WITHOUT_DIGITS + TEXTS_WITH_DIGITS_ALIKE + TEXTS_WITH_DIGITS_DIFFERENT)
def test_smollm2_splits_digits_like_llama_cpp(spec: GGUFTokenizerSpec, original: Tokenizer, text: str) -> None:
    assert spec.tokenizer.encode(text).ids == original.encode(text).ids


def test_smollm2_whitespace_before_digit(spec: GGUFTokenizerSpec) -> None:
    # transformers gives [a, Ġ, Ġ, 1] here (see `original`); llama.cpp and SmolLM2's tokenizer.json this.
    assert spec.tokenizer.encode("a  1").tokens == ["a", "ĠĠ", "1"]
    assert spec.tokenizer.encode("    42").tokens == ["ĠĠĠĠ", "4", "2"]


@pytest.mark.parametrize("text", TEXTS_WITHOUT_DIGITS + TEXTS_WITH_DIGITS_ALIKE + TEXTS_WITH_DIGITS_DIFFERENT)
def test_smollm2_decode_inverts_encode(spec: GGUFTokenizerSpec, text: str) -> None:
    ids = spec.tokenizer.encode(text).ids
    assert spec.tokenizer.decode(ids, skip_special_tokens=False) == text


def test_smollm2_special_tokens_match_transformers(spec: GGUFTokenizerSpec, hf) -> None:
    for kind in ("bos", "eos", "pad", "unk"):
        assert getattr(spec, f"{kind}_token") == getattr(hf, f"{kind}_token"), kind
        assert getattr(spec, f"{kind}_token_id") == getattr(hf, f"{kind}_token_id"), kind
    assert (spec.bos_token, spec.bos_token_id, spec.eos_token_id) == ("<|im_start|>", 1, 2)
    assert spec.add_bos_token is False and spec.add_eos_token is False
    assert spec.chat_template == hf.chat_template and "<|im_start|>" in spec.chat_template
    assert spec.tokenizer.encode("<|im_start|><|im_end|>").ids == [1, 2]
    assert spec.tokenizer.get_vocab_size() == 49152


# --------------------------------------------------------------------------- #
# Synthetic vocabularies: other pre-tokenizers and SentencePiece, against transformers
# --------------------------------------------------------------------------- #

CORPUS = [
    "The year 2024 had 365 days; 1,000,000 people counted 123456789 times.",
    "Hello hello world, it's the world's 42nd hello.\n\n  Indented 7 lines\n\tand tabs 99",
    "def main():\n    return 1000 + 2000  # done",
] * 20
SYNTHETIC_TEXTS = ["Hello world 2024!", "it's 123456 and  78", "  Indented 7\n\n\nlines 99x", "<think>hi</think>",
                   "<|endoftext|>The 365 days", "naïve 😀 1 2  3"]


@pytest.fixture(scope="module")
def byte_level_vocab() -> tuple[list[str], list[str]]:
    """A small byte-level BPE trained here, with merges across digits and spaces (e.g. "Ġ1", "20")."""
    trained = Tokenizer(models.BPE())
    trained.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    trainer = trainers.BpeTrainer(vocab_size=400, initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
                                  special_tokens=["<|endoftext|>"], show_progress=False)
    trained.train_from_iterator(CORPUS, trainer)
    model = json.loads(trained.to_str())["model"]
    tokens = sorted(model["vocab"], key=model["vocab"].get) + ["<think>", "</think>"]
    merges = [" ".join(m) if isinstance(m, list) else m for m in model["merges"]]
    return tokens, merges


@pytest.mark.parametrize("pre", ["default", "llama-bpe", "qwen2"])
def test_byte_level_pre_tokenizers_match_transformers(tmp_path: Path, byte_level_vocab, pre: str) -> None:
    tokens, merges = byte_level_vocab

    def configure(w: GGUFWriter) -> None:
        w.add_tokenizer_model("gpt2")
        w.add_tokenizer_pre(pre)
        w.add_token_list(tokens)
        w.add_token_merges(merges)
        w.add_token_types([3] + [1] * (len(tokens) - 3) + [4, 4])  # <|endoftext|> control, <think> user-defined
        w.add_eos_token_id(0)
        w.add_bos_token_id(0)

    path = gguf_path(tmp_path, f"{pre}.gguf", configure)
    ours, reference = tokenizer_from_gguf(GGUFFile(path).metadata), hf_tokenizer(path)
    for text in SYNTHETIC_TEXTS:
        assert ours.tokenizer.encode(text).ids == reference.encode(text), text
        assert ours.tokenizer.decode(ours.tokenizer.encode(text).ids, skip_special_tokens=False) == text
    assert ours.tokenizer.encode("<think>").ids == [len(tokens) - 2]


def test_sentencepiece_matches_transformers(tmp_path: Path) -> None:
    pieces = ["▁", "h", "e", "l", "o", "w", "r", "d", "t", "s", "▁h", "he", "ll", "llo", "ello", "▁hello",
              "▁w", "or", "orld", "▁world", "▁t", "▁the", "th", "▁a", "▁is", "is", "▁▁", "▁▁▁▁"]
    tokens = ["<unk>", "<s>", "</s>"] + [f"<0x{b:02X}>" for b in range(256)] + pieces

    def configure(w: GGUFWriter) -> None:
        w.add_tokenizer_model("llama")
        w.add_token_list(tokens)
        w.add_token_types([2, 3, 3] + [6] * 256 + [1] * len(pieces))
        w.add_token_scores([0.0] * 259 + [-float(i) for i in range(len(pieces))])
        w.add_unk_token_id(0)
        w.add_bos_token_id(1)
        w.add_eos_token_id(2)

    path = gguf_path(tmp_path, "spm.gguf", configure)
    ours, reference = tokenizer_from_gguf(GGUFFile(path).metadata), hf_tokenizer(path)
    assert ours.add_bos_token is True and (ours.bos_token, ours.unk_token) == ("<s>", "<unk>")
    for text in ["hello world", "the world is hello", " hello", "  two    spaces", "héllo wörld 😀", "<s>hello</s>",
                 "", "\n"]:
        assert ours.tokenizer.encode(text).ids == reference.encode(text), text
        assert ours.tokenizer.decode(ours.tokenizer.encode(text).ids) == reference.decode(
            reference.encode(text), skip_special_tokens=True), text
    assert ours.tokenizer.encode("héllo").tokens[:3] == ["<s>", "▁h", "<0xC3>"]  # byte fallback


# --------------------------------------------------------------------------- #
# Errors
# --------------------------------------------------------------------------- #


def test_errors_name_the_problem() -> None:
    with pytest.raises(CheckpointError, match="no tokenizer.ggml.tokens"):
        tokenizer_from_gguf({"tokenizer.ggml.model": "gpt2"})
    with pytest.raises(UnsupportedError, match="'bert'.*gpt2, llama"):
        tokenizer_from_gguf({"tokenizer.ggml.model": "bert", "tokenizer.ggml.tokens": ["a"]})
    base = {"tokenizer.ggml.model": "gpt2", "tokenizer.ggml.tokens": ["a", "b", "ab"], "tokenizer.ggml.merges": ["a b"]}
    with pytest.raises(UnsupportedError, match="'mystery'.*smollm"):
        tokenizer_from_gguf({**base, "tokenizer.ggml.pre": "mystery"})
    with pytest.raises(CheckpointError, match="'a b c'"):
        tokenizer_from_gguf({**base, "tokenizer.ggml.merges": ["a b c"]})
    with pytest.raises(CheckpointError, match="id 7 is outside"):
        tokenizer_from_gguf({**base, "tokenizer.ggml.bos_token_id": 7})
    with pytest.raises(CheckpointError, match="token_type has 1 entries for 3 tokens"):
        tokenizer_from_gguf({**base, "tokenizer.ggml.token_type": [1]})
