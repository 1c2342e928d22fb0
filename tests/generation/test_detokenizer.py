"""IncrementalDetokenizer on real tokenizers: byte-level BPE (SmolLM2) and WordPiece (MiniLM)."""

import pytest
from tokenizers import Tokenizer as BackendTokenizer
from tokenizers import decoders, models

from lmforge import AutoTokenizer
from lmforge.generation.detokenizer import REPLACEMENT_CHAR, IncrementalDetokenizer
from lmforge.tokenizer import Tokenizer

TEXTS = {
    "emoji": "Hello 👋🏽 world! 🎉🚀 done",
    "cjk": "日本語のテキスト、中文字符和한국어",
    "accents": "café naïve résumé Ærøskøbing Ωμέγα",
    "code": 'def f(x):\n    return {"a": x**2}  # ünïcode ✓\n\tpass',
}


@pytest.fixture(scope="module")
def minilm_tokenizer():
    return AutoTokenizer.from_pretrained("all-minilm-l6-v2")


def stream(tokenizer, ids, **kwargs) -> tuple[list[str], IncrementalDetokenizer]:
    detokenizer = IncrementalDetokenizer(tokenizer, **kwargs)
    return [detokenizer.add(token_id) for token_id in ids], detokenizer


@pytest.mark.parametrize("name", TEXTS)
def test_byte_level_deltas_add_up_to_decode(smollm2_tokenizer, name):
    ids = smollm2_tokenizer.encode(TEXTS[name], add_special_tokens=False)
    deltas, detokenizer = stream(smollm2_tokenizer, ids)
    assert not any(REPLACEMENT_CHAR in delta for delta in deltas)
    assert detokenizer.flush() == ""
    assert "".join(deltas) == detokenizer.text == smollm2_tokenizer.decode(ids) == TEXTS[name]
    assert detokenizer.token_ids == ids


def test_split_emoji_is_held_until_its_last_byte(smollm2_tokenizer):
    ids = smollm2_tokenizer.encode("Hi 👋", add_special_tokens=False)
    assert smollm2_tokenizer.tokenize("Hi 👋") == ["Hi", "ĠðŁ", "ĳ", "ĭ"]  # 4 UTF-8 bytes over 3 tokens
    deltas, _ = stream(smollm2_tokenizer, ids)
    assert deltas == ["Hi", "", "", " 👋"]


def test_flush_releases_an_incomplete_character_as_decode_does(smollm2_tokenizer):
    ids = smollm2_tokenizer.encode("Hi 👋", add_special_tokens=False)[:3]  # the emoji's last byte is missing
    deltas, detokenizer = stream(smollm2_tokenizer, ids)
    assert deltas == ["Hi", "", ""]
    assert "".join(deltas) + detokenizer.flush() == smollm2_tokenizer.decode(ids)
    assert detokenizer.text == smollm2_tokenizer.decode(ids)


@pytest.mark.parametrize("name", TEXTS)
def test_prompt_context_keeps_the_continuation(smollm2_tokenizer, name):
    prompt = smollm2_tokenizer.apply_chat_template([{"role": "user", "content": "Write 日本 👋"}], tokenize=True)
    ids = smollm2_tokenizer.encode(TEXTS[name], add_special_tokens=False)
    deltas, detokenizer = stream(smollm2_tokenizer, ids, prompt_token_ids=prompt)
    assert "".join(deltas) + detokenizer.flush() == TEXTS[name]


@pytest.mark.parametrize("skip", [True, False])
def test_special_tokens_follow_skip_special_tokens(smollm2_tokenizer, skip):
    eos = smollm2_tokenizer.eos_token_id
    ids = smollm2_tokenizer.encode("Hi 👋 there", add_special_tokens=False)
    ids = ids[:2] + [eos] + ids[2:] + [eos, eos]
    deltas, detokenizer = stream(smollm2_tokenizer, ids, skip_special_tokens=skip)
    assert "".join(deltas) + detokenizer.flush() == smollm2_tokenizer.decode(ids, skip_special_tokens=skip)
    assert ("<|im_end|>" in detokenizer.text) is not skip


class CountingTokenizer:
    """Wraps a tokenizer and records how many ids each decode call received."""

    def __init__(self, tokenizer: Tokenizer):
        self.tokenizer = tokenizer
        self.backend = tokenizer.backend
        self.decoded_lengths: list[int] = []

    def decode(self, ids, skip_special_tokens=False):
        self.decoded_lengths.append(len(ids))
        return self.tokenizer.decode(ids, skip_special_tokens=skip_special_tokens)


def test_each_step_decodes_a_bounded_window(smollm2_tokenizer):
    eos = smollm2_tokenizer.eos_token_id
    text = " ".join(TEXTS.values()) * 8
    ids = [t for token_id in smollm2_tokenizer.encode(text, add_special_tokens=False) for t in (token_id, eos)]
    counting = CountingTokenizer(smollm2_tokenizer)
    deltas, _ = stream(counting, ids)
    assert len(ids) > 600
    assert "".join(deltas) == text
    # The previous step's tokens + this step's: at most the byte tokens of two 4-byte characters.
    assert max(counting.decoded_lengths) <= 8


def test_wordpiece_continuation_pieces(minilm_tokenizer):
    text = "unaffable tokenization of naïve café prices, 42!"
    ids = minilm_tokenizer.encode(text, add_special_tokens=False)
    assert "##ffa" in minilm_tokenizer.tokenize(text)
    deltas, detokenizer = stream(minilm_tokenizer, ids)
    assert deltas[:5] == ["una", "ffa", "ble", " token", "ization"]
    assert "".join(deltas) + detokenizer.flush() == minilm_tokenizer.decode(ids)


@pytest.mark.parametrize("skip", [True, False])
@pytest.mark.parametrize("name", TEXTS)
def test_wordpiece_deltas_add_up_to_decode(minilm_tokenizer, name, skip):
    ids = minilm_tokenizer.encode(TEXTS[name])  # with [CLS] ... [SEP]
    deltas, detokenizer = stream(minilm_tokenizer, ids, skip_special_tokens=skip)
    assert "".join(deltas) + detokenizer.flush() == minilm_tokenizer.decode(ids, skip_special_tokens=skip)


def test_sentencepiece_leading_space_survives():
    """A Metaspace decoder strips the space of the first token it sees; one-token decodes lose every space."""
    backend = BackendTokenizer(models.WordLevel({"▁Hello": 0, "▁world": 1, "!": 2, "<unk>": 3}, unk_token="<unk>"))
    backend.decoder = decoders.Metaspace()
    tokenizer = Tokenizer(backend)
    ids = [0, 1, 2, 1]
    assert [tokenizer.decode([t]) for t in ids] == ["Hello", "world", "!", "world"]
    deltas, _ = stream(tokenizer, ids)
    assert deltas == ["Hello", " world", "!", " world"]
    deltas, _ = stream(tokenizer, ids[1:], prompt_token_ids=ids[:1])
    assert deltas == [" world", "!", " world"]  # the continuation of the prompt keeps its space
