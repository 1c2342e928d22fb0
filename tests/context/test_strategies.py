"""Context strategies: full sends everything or fails clearly, truncate drops the oldest exchanges, window
keeps the last ones; all keep the system prompt and the latest message and stay within the budget."""

import pytest

from lmforge.context.strategies import (
    ContextPolicy,
    exchanges,
    prompt_tokens,
    select_context,
)
from lmforge.errors import InputError, ValidationError
from lmforge.generation.chat import ChatHistory


def conversation(turns: int) -> ChatHistory:
    history = ChatHistory("You are a patient tutor.")
    for turn in range(turns):
        history.add_user(f"Question {turn}: what is {turn} times seven, and why does it matter?")
        history.add_assistant(f"It is {turn * 7}. Multiplication by seven repeats the addition {turn} times.")
    history.add_user("And what did I ask first?")
    return history


def test_messages_group_into_exchanges_that_start_with_the_user():
    messages = [{"role": "assistant", "content": "Hi"}, {"role": "user", "content": "a"},
                {"role": "assistant", "content": "b"}, {"role": "tool", "content": "c"}, {"role": "user", "content": "d"}]
    assert [[m["content"] for m in group] for group in exchanges(messages)] == [["Hi"], ["a", "b", "c"], ["d"]]


def test_full_sends_everything_while_it_fits_and_then_says_what_to_do(smollm2_tokenizer):
    history = conversation(6)
    whole = prompt_tokens(smollm2_tokenizer, history)
    selected = select_context(history, smollm2_tokenizer, whole + 100, ContextPolicy("full", reserve_output=100))
    assert selected.history == history and selected.tokens == whole and selected.dropped_messages == 0
    with pytest.raises(InputError, match="choose the truncate or window strategy"):
        select_context(history, smollm2_tokenizer, whole + 99, ContextPolicy("full", reserve_output=100))


def test_truncate_drops_the_oldest_exchanges_until_the_prompt_fits(smollm2_tokenizer):
    history = conversation(8)
    budget = prompt_tokens(smollm2_tokenizer, history) // 2
    selected = select_context(history, smollm2_tokenizer, budget + 50, ContextPolicy("truncate", reserve_output=50))
    sent = selected.history
    assert selected.tokens == prompt_tokens(smollm2_tokenizer, sent) <= budget
    assert sent.system == history.system and sent.messages[-1] == history.messages[-1]
    assert sent.messages == history.messages[-len(sent.messages):] and sent.messages[0]["role"] == "user"
    assert selected.dropped_messages == len(history.messages) - len(sent.messages) > 0
    one_more = ChatHistory(history.system, history.messages[-len(sent.messages) - 2:])
    assert prompt_tokens(smollm2_tokenizer, one_more) > budget  # it kept as much as fits


def test_window_keeps_the_last_turns_or_tokens(smollm2_tokenizer):
    history = conversation(8)
    last_two = select_context(history, smollm2_tokenizer, 8192, ContextPolicy("window", max_turns=2))
    assert last_two.history.messages == history.messages[-3:]  # one full exchange and the new question
    capped = select_context(history, smollm2_tokenizer, 8192, ContextPolicy("window", max_tokens=120))
    assert capped.tokens <= 120 and capped.history.messages[-1] == history.messages[-1]


def test_a_budget_too_small_for_the_essentials_and_bad_policies_are_clear(smollm2_tokenizer):
    with pytest.raises(InputError, match="the system prompt and the latest message alone take"):
        select_context(conversation(2), smollm2_tokenizer, 40, ContextPolicy("truncate", reserve_output=30))
    with pytest.raises(ValidationError, match="leaves no room for the prompt"):
        ContextPolicy("truncate", reserve_output=100).budget(100)
    with pytest.raises(ValidationError, match="must be one of full, truncate, window"):
        ContextPolicy("summarise")
    with pytest.raises(ValidationError, match="needs max_turns"):
        ContextPolicy("window")
    with pytest.raises(ValidationError, match="max_turns must be >= 1"):
        ContextPolicy("window", max_turns=0)
    with pytest.raises(ValidationError, match="max_turns applies to the window strategy, not 'truncate'"):
        ContextPolicy("truncate", max_turns=3)
    with pytest.raises(ValidationError, match="full sends everything"):
        ContextPolicy("full", max_tokens=100)
