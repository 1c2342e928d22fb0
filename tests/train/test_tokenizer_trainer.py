"""Byte-level BPE training on a small stdlib corpus: vocabulary, special ids, exact round trips, save/load."""

import json
from pathlib import Path

import pytest

from lmforge.errors import InputError
from lmforge.tokenizer import Tokenizer
from lmforge.train.collate import MLMCollator
from lmforge.train.data import read_text
from lmforge.train.tokenizer_trainer import save_tokenizer, train_bpe_tokenizer

CORPUS = [doc.text for doc in read_text(Path(json.__file__).parent, pattern="*.py")]  # ~60 kB of real Python
SAMPLES = ["def encode(self, o):\n    return ''.join(chunks)\n",
           "Café naïve résumé — 東京は日本の首都です 🤗🚀\r\n\ttabs  and   spaces ",
           "<|endoftext|>a new document<pad>", ""]


@pytest.fixture(scope="module")
def clm(tmp_path_factory):
    folder = tmp_path_factory.mktemp("clm")
    tokenizer = train_bpe_tokenizer(CORPUS, vocab_size=600, min_frequency=2, output_dir=folder, progress=True)
    return tokenizer, folder


@pytest.fixture(scope="module")
def mlm(tmp_path_factory):
    folder = tmp_path_factory.mktemp("mlm")
    return train_bpe_tokenizer(CORPUS, vocab_size=500, objective="mlm", output_dir=folder), folder


def test_vocab_size_and_special_token_ids(clm):
    tokenizer, _ = clm
    assert tokenizer.vocab_size == 600  # the corpus has more than enough frequent pairs to fill it
    assert tokenizer.token_to_id("<|endoftext|>") == 0 and tokenizer.token_to_id("<pad>") == 1
    assert tokenizer.eos_token_id == tokenizer.bos_token_id == 0 and tokenizer.pad_token_id == 1
    assert len(tokenizer.encode("    return self")) < len("    return self")  # merges were learned


def test_round_trip_is_exact(clm):
    tokenizer, _ = clm
    for text in SAMPLES + CORPUS[:2]:
        ids = tokenizer.encode(text)
        assert tokenizer.decode(ids) == text
    # Special tokens are atomic even inside text, and nothing is added around a CLM text.
    ids = tokenizer.encode(SAMPLES[2])
    assert ids[0] == 0 and ids[-1] == 1 and ids.count(0) == 1


def test_saved_folder_loads_through_from_pretrained(clm):
    tokenizer, folder = clm
    assert {"tokenizer.json", "tokenizer_config.json", "config.json"} <= {p.name for p in folder.iterdir()}
    loaded = Tokenizer.from_pretrained(folder)
    assert loaded.vocab_size == 600 and (loaded.eos_token_id, loaded.pad_token_id) == (0, 1)
    for text in SAMPLES + CORPUS[:2]:
        assert loaded.encode(text) == tokenizer.encode(text)
        assert loaded.decode(loaded.encode(text)) == text
    config = json.loads((folder / "config.json").read_text())
    assert config == {"vocab_size": 600, "bos_token_id": 0, "eos_token_id": 0, "pad_token_id": 1}


def test_mlm_tokenizer_wraps_texts_and_pairs(mlm):
    tokenizer, folder = mlm
    assert tokenizer.vocab_size == 500
    ids = {token: tokenizer.token_to_id(token) for token in ("<pad>", "[CLS]", "[SEP]", "[MASK]")}
    assert list(ids.values()) == [0, 1, 2, 3]
    body = tokenizer.encode("import json", add_special_tokens=False)
    assert tokenizer.encode("import json") == [1, *body, 2]
    pair = tokenizer.backend.encode("a", "b")
    assert pair.type_ids == [0, 0, 0, 1, 1] and pair.ids[0] == 1 and pair.ids[-1] == 2
    assert tokenizer.decode(tokenizer.encode(SAMPLES[1]), skip_special_tokens=True) == SAMPLES[1]

    loaded = Tokenizer.from_pretrained(folder)
    assert loaded.encode("import json") == [1, *body, 2] and loaded.pad_token_id == 0
    config = json.loads((folder / "tokenizer_config.json").read_text())
    assert (config["cls_token"], config["sep_token"], config["mask_token"]) == ("[CLS]", "[SEP]", "[MASK]")
    collator = MLMCollator.from_tokenizer(loaded)
    assert (collator.mask_token_id, collator.pad_token_id) == (3, 0)
    assert set(collator.special_token_ids) == {0, 1, 2, 3}


def test_save_keeps_a_models_own_config(clm, tmp_path):
    tokenizer, _ = clm
    (tmp_path / "config.json").write_text('{"model_type": "llama"}')
    save_tokenizer(tokenizer, tmp_path)
    assert json.loads((tmp_path / "config.json").read_text()) == {"model_type": "llama"}
    assert Tokenizer.from_pretrained(tmp_path).encode("json") == tokenizer.encode("json")


def test_trainer_errors():
    with pytest.raises(InputError, match="vocab_size=200 leaves no room for merges"):
        train_bpe_tokenizer(CORPUS, vocab_size=200)
    with pytest.raises(InputError, match=r"needs the special tokens \[MASK\]"):
        train_bpe_tokenizer(CORPUS, objective="mlm", special_tokens=["<pad>", "[CLS]", "[SEP]"])
    with pytest.raises(InputError, match="nothing was learned"):
        train_bpe_tokenizer(["", ""], vocab_size=300)
    with pytest.raises(InputError, match="objective must be one of"):
        train_bpe_tokenizer(CORPUS, objective="seq2seq")


def test_transformers_reads_the_saved_folder_the_same_way(clm, mlm):
    transformers = pytest.importorskip("transformers")
    for tokenizer, folder in (clm, mlm):
        theirs = transformers.AutoTokenizer.from_pretrained(folder)
        for text in SAMPLES[:2]:
            assert theirs(text)["input_ids"] == tokenizer.encode(text)
        assert theirs.pad_token_id == tokenizer.pad_token_id
    assert transformers.AutoTokenizer.from_pretrained(mlm[1]).mask_token_id == 3
