"""Tokenizer wrapper: HF parity on the embedded models, padding, chat templates, save/load."""

import pytest
import torch
import transformers

from lmforge import AutoTokenizer
from lmforge.errors import InputError, UnsupportedError
from lmforge.sources import resolve

TEXTS = ["Hello world!", "Café naïve résumé", "東京は日本の首都です", "emoji 🤗🚀 ok",
         "def f(x):\n    return x  # code", "a   b\n\n\nc\t d", "numbers 12345 and 3.14159"]


@pytest.fixture(scope="module")
def minilm():
    return AutoTokenizer.from_pretrained("all-minilm-l6-v2")


@pytest.fixture(scope="module")
def hf_minilm():
    return transformers.AutoTokenizer.from_pretrained(resolve("all-minilm-l6-v2"))


def test_minilm_matches_hf(minilm, hf_minilm):
    for text in TEXTS:
        assert minilm.encode(text) == hf_minilm(text)["input_ids"], text
    assert minilm.pad_token_id == hf_minilm.pad_token_id == 0


def test_batch_padding_and_masks(minilm, hf_minilm):
    ours = minilm(TEXTS[:3])
    theirs = hf_minilm(TEXTS[:3], padding=True, return_tensors="pt")
    assert torch.equal(ours["input_ids"], theirs["input_ids"])
    assert torch.equal(ours["attention_mask"], theirs["attention_mask"])
    left = minilm(TEXTS[:2], padding_side="left")
    lengths = [len(minilm.encode(t)) for t in TEXTS[:2]]
    assert left["attention_mask"].sum(1).tolist() == lengths
    assert left["attention_mask"][:, -1].tolist() == [1, 1]


def test_max_length_needs_truncation(minilm):
    with pytest.raises(InputError, match="longer than max_length=3"):
        minilm(["a long sentence here"], max_length=3)
    assert minilm(["a long sentence here"], max_length=3, truncation=True)["input_ids"].shape == (1, 3)


def test_no_chat_template_is_a_clear_error(minilm):
    with pytest.raises(UnsupportedError, match="no chat template"):
        minilm.apply_chat_template([{"role": "user", "content": "hi"}])


def test_save_and_reload(minilm, tmp_path):
    minilm.chat_template = "{% for m in messages %}[{{ m['role'] }}] {{ m['content'] }}\n{% endfor %}"
    minilm.save_pretrained(tmp_path)
    from lmforge.tokenizer import Tokenizer

    reloaded = Tokenizer.from_folder(tmp_path)
    assert reloaded.encode(TEXTS[0]) == minilm.encode(TEXTS[0])
    assert reloaded.apply_chat_template([{"role": "user", "content": "hi"}]) == "[user] hi\n"
    hf = transformers.AutoTokenizer.from_pretrained(tmp_path)
    assert hf(TEXTS[1])["input_ids"] == minilm.encode(TEXTS[1])
    minilm.chat_template = None
