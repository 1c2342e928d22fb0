"""Exact-match task accuracy: rows split into question and answer, few-shot turns as a chat history, greedy
answers identical to generating each rendered prompt alone, and the score counting exactly the right ones."""

import pytest

from lmforge.align.tasks import date_splits
from lmforge.errors import InputError
from lmforge.evaluation import evaluate_exact_match, few_shot_history
from lmforge.evaluation.exact_match import question_and_answer
from lmforge.generation import SamplingParams, generate
from lmforge.generation.chat import ChatHistory


def test_rows_split_into_the_asking_turns_and_the_last_answer():
    chat = {"messages": [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hi"},
                         {"role": "assistant", "content": "Hello"}, {"role": "user", "content": "2+2?"},
                         {"role": "assistant", "content": "4"}]}
    question, answer = question_and_answer(chat, 1)
    assert answer == "4" and [m["content"] for m in question] == ["Be brief.", "Hi", "Hello", "2+2?"]
    question, answer = question_and_answer({"instruction": "Add", "input": "2 and 2", "response": "4"}, 2)
    assert question == [{"role": "user", "content": "Add\n\n2 and 2"}] and answer == "4"
    with pytest.raises(InputError, match="row 3: prompt/completion rows are plain text"):
        question_and_answer({"prompt": "2+2=", "completion": "4"}, 3)
    with pytest.raises(InputError, match="row 4: 'response' is missing"):
        question_and_answer({"instruction": "Add"}, 4)


def test_few_shot_turns_are_a_chat_history_that_survives_a_save_and_load(tmp_path):
    train, _ = date_splits(train=3, held_out=1)
    history = few_shot_history(train, system="Answer with the date only.")
    assert [m["role"] for m in history.messages] == ["user", "assistant"] * 3
    assert [m["content"] for m in history.messages[1::2]] == [row["response"] for row in train]
    history.save(tmp_path / "shots.json")
    assert ChatHistory.load(tmp_path / "shots.json") == history


def test_answers_are_the_greedy_answers_after_the_history_and_only_exact_ones_count(smollm2, smollm2_tokenizer):
    train, held_out = date_splits(train=2, held_out=3)
    history = few_shot_history(train)
    result = evaluate_exact_match(smollm2, smollm2_tokenizer, held_out, history, max_new_tokens=8)
    for row, answer in zip(held_out, result.answers):
        messages = [*history.messages, {"role": "user", "content": row["instruction"]}]
        prompt = smollm2_tokenizer.apply_chat_template(messages)
        alone = generate(smollm2, smollm2_tokenizer, prompt, SamplingParams(temperature=0.0, max_tokens=8))
        assert answer == alone[0].outputs[0].text
    assert result.expected == [row["response"] for row in held_out]
    # Score the model against its own answers (padded with spaces, which do not count), two of them spoiled.
    rows = [{"instruction": row["instruction"], "response": f" {answer} "} for row, answer in
            zip(held_out, result.answers)]
    rows[1]["response"] += "x"
    rows[2]["response"] = "no"
    again = evaluate_exact_match(smollm2, smollm2_tokenizer, rows, history, max_new_tokens=8)
    assert again.answers == result.answers and again.exact_match == pytest.approx(1 / 3)
    zero_shot = evaluate_exact_match(smollm2, smollm2_tokenizer, held_out[:1], max_new_tokens=8)
    assert zero_shot.answers[0] != result.answers[0]  # the shots change what the model says
    with pytest.raises(InputError, match="no rows to evaluate"):
        evaluate_exact_match(smollm2, smollm2_tokenizer, [])
