"""SFT: answer-only labels for every row shape, row-numbered errors, over-long rows, packing, and training
that learns the answers (full and LoRA) on a tiny model with SmolLM2's real tokenizer and chat template."""

import json

import pytest
import torch

from lmforge import AutoTokenizer
from lmforge.align import SFTConfig, SFTTrainer, read_rows, tokenize_rows
from lmforge.align.sft import pack_examples
from lmforge.config import LlamaConfig
from lmforge.errors import InputError, ValidationError
from lmforge.models.llama import LlamaForCausalLM
from lmforge.peft import LoraConfig, add_lora
from lmforge.train.collate import IGNORE_INDEX
from lmforge.train.metrics import loss_sum


@pytest.fixture(scope="module")
def tokenizer():
    return AutoTokenizer.from_pretrained("smollm2-135m-instruct")


def answer(tokenizer, example):
    return tokenizer.decode([i for i, label in zip(example["input_ids"], example["labels"]) if label != IGNORE_INDEX])


def test_only_answers_are_labelled_in_every_row_shape(tokenizer):
    rows = [{"instruction": "Say hi", "input": "politely", "response": "Hello there."},
            {"messages": [{"role": "user", "content": "2+2?"}, {"role": "assistant", "content": "4"},
                          {"role": "user", "content": "3+3?"}, {"role": "assistant", "content": "6"}]},
            {"prompt": "x =", "completion": " 1"}]
    (alpaca, chat, plain), report = tokenize_rows(rows, tokenizer)
    assert report.kept == 3 and report.truncated == report.skipped == 0
    assert answer(tokenizer, alpaca) == "Hello there.<|im_end|>\n"
    assert "Say hi\n\npolitely<|im_end|>" in tokenizer.decode(alpaca["input_ids"])
    assert answer(tokenizer, chat) == "4<|im_end|>\n6<|im_end|>\n"
    assert answer(tokenizer, plain) == " 1<|im_end|>"
    for example in (alpaca, chat, plain):
        assert len(example["labels"]) == len(example["input_ids"])
        kept = [label for label in example["labels"] if label != IGNORE_INDEX]
        assert kept == [i for i, label in zip(example["input_ids"], example["labels"]) if label != IGNORE_INDEX]
    # the prompt is tokenized as generation sees it: the rendered prompt alone is a prefix of the ids
    prompt = tokenizer.apply_chat_template([{"role": "user", "content": "Say hi\n\npolitely"}])
    assert alpaca["input_ids"][:len(tokenizer.encode(prompt, add_special_tokens=False))] == \
        tokenizer.encode(prompt, add_special_tokens=False)


def test_bad_rows_name_their_number(tokenizer, tmp_path):
    with pytest.raises(InputError, match="row 2: 'response' is missing"):
        tokenize_rows([{"instruction": "a", "response": "b"}, {"instruction": "c"}], tokenizer)
    with pytest.raises(InputError, match="row 1: no 'assistant' message"):
        tokenize_rows([{"messages": [{"role": "user", "content": "a"}]}], tokenizer)
    with pytest.raises(InputError, match="row 1: has fields \\['text'\\]"):
        tokenize_rows([{"text": "a"}], tokenizer)
    path = tmp_path / "rows.jsonl"
    path.write_text(json.dumps({"prompt": "a", "completion": "b"}) + "\n{oops\n")
    with pytest.raises(InputError, match="rows.jsonl:2: not a JSON object"):
        read_rows(path)
    path.write_text(json.dumps([{"prompt": "a", "completion": "b"}]))
    assert read_rows(path) == [{"prompt": "a", "completion": "b"}]


def test_overlong_rows_error_truncate_or_skip_with_a_count(tokenizer):
    rows = [{"prompt": "short", "completion": " yes"}, {"prompt": "word " * 50, "completion": " no"}]
    with pytest.raises(InputError, match="row 2: .* longer than max_length=20"):
        tokenize_rows(rows, tokenizer, max_length=20)
    kept, report = tokenize_rows(rows, tokenizer, max_length=20, overlong="skip")
    assert (len(kept), report.kept, report.skipped) == (1, 1, 1)
    long_answer = [{"prompt": "Q:", "completion": " a b c d e f g h i j k l m n o p"}]
    kept, report = tokenize_rows(long_answer, tokenizer, max_length=8, overlong="truncate")
    assert report.truncated == 1 and len(kept[0]["input_ids"]) == 8
    kept, report = tokenize_rows(rows, tokenizer, max_length=20, overlong="truncate")
    assert (report.kept, report.truncated, report.skipped) == (1, 0, 1)  # the cut left row 2 no answer token
    with pytest.raises(InputError, match="all 1 rows were skipped"):
        tokenize_rows(rows[1:], tokenizer, max_length=20, overlong="truncate")


def tiny_model(tokenizer):
    torch.manual_seed(0)
    return LlamaForCausalLM(LlamaConfig(vocab_size=len(tokenizer.backend.get_vocab()), hidden_size=32,
                                        intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
                                        num_key_value_heads=2, max_position_embeddings=256))


ROWS = [{"instruction": f"Spell {word}", "response": "-".join(word)} for word in ("cat", "dog", "sun", "map")]


@pytest.mark.parametrize("method", ["full", "lora"])
def test_sft_learns_the_answers_and_only_counts_answer_tokens(method, tokenizer, tmp_path):
    model = tiny_model(tokenizer)
    if method == "lora":  # the random tiny model's frozen head is far from the answers: train it beside LoRA
        add_lora(model, LoraConfig(r=8, lora_alpha=16, target_modules="all-linear", modules_to_save=["lm_head"]))
    arguments = SFTConfig(output_dir=tmp_path, max_steps=30, per_device_batch_size=4, learning_rate=1e-2,
                          logging_steps=1, progress=False)
    trainer = SFTTrainer(model, arguments, ROWS, tokenizer)
    batch = trainer.collator(trainer.train_dataset)
    with torch.no_grad():
        expected = loss_sum("causal-lm", model(input_ids=batch["input_ids"],
                                                attention_mask=batch["attention_mask"]).logits, batch["labels"])
        answer_tokens = int((batch["labels"][:, 1:] != IGNORE_INDEX).sum())
    first_answer = int((batch["labels"] != IGNORE_INDEX).any(0).nonzero()[0])
    assert trainer.prediction_start(batch["labels"]) == first_answer - 1 > 0  # no head over the prompts
    state = trainer.train()
    assert state.history[0]["loss"] == pytest.approx(expected.item() / answer_tokens, rel=1e-4)
    assert state.history[-1]["loss"] < 0.5 * state.history[0]["loss"]


def test_packing_keeps_answer_only_labels_and_never_predicts_across_examples(tokenizer):
    examples, _ = tokenize_rows(ROWS, tokenizer)
    length = len(examples[0]["input_ids"]) + len(examples[1]["input_ids"])
    rows = pack_examples(examples, length)
    assert len(rows) == 2
    first = rows[0]
    assert first["input_ids"] == examples[0]["input_ids"] + examples[1]["input_ids"]
    boundary = len(examples[0]["input_ids"])
    assert first["attention_mask"] == [1] * boundary + [2] * (length - boundary)
    assert first["labels"][boundary] == IGNORE_INDEX  # the first token of example 2 is not a target
    assert [label for label in first["labels"] if label != IGNORE_INDEX] == [
        label for example in examples[:2] for label in example["labels"] if label != IGNORE_INDEX]
    with pytest.raises(InputError, match="does not fit a packed row of 5"):
        pack_examples(examples, 5)


def test_a_packed_example_computes_what_it_computes_alone(tokenizer):
    model = tiny_model(tokenizer).eval()
    examples, _ = tokenize_rows(ROWS, tokenizer)
    row = pack_examples(examples, 10_000)[0]
    with torch.no_grad():
        packed = model(torch.tensor([row["input_ids"]]), torch.tensor([row["attention_mask"]])).logits[0]
        start = 0
        for example in examples:
            alone = model(torch.tensor([example["input_ids"]])).logits[0]
            torch.testing.assert_close(packed[start:start + len(alone)], alone, rtol=1e-5, atol=1e-5)
            start += len(alone)
        unmasked = model(torch.tensor([row["input_ids"]])).logits[0]  # without the numbering, examples would mix
        assert not torch.allclose(unmasked[start - 1], packed[start - 1], atol=1e-3)


def test_packed_training_has_the_loss_of_padded_training(tokenizer, tmp_path):
    losses = {}
    for packing in (False, True):
        arguments = SFTConfig(output_dir=tmp_path / str(packing), max_steps=3, per_device_batch_size=4,
                              learning_rate=1e-2, logging_steps=1, progress=False, packing=packing, max_length=200)
        trainer = SFTTrainer(tiny_model(tokenizer), arguments, ROWS, tokenizer)
        assert len(trainer.train_dataset) == (1 if packing else 4)
        losses[packing] = trainer.train().history[0]["loss"]
    assert losses[True] == pytest.approx(losses[False], rel=1e-5)
