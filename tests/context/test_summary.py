"""The summarize strategy: nothing is summarized while the conversation fits; once it does not, the older
exchanges become a summary the model writes (its tokens counted), the recent ones stay word for word, each
exchange is summarized once, and the prompt fits the budget."""

import pytest

from lmforge.context.strategies import prompt_tokens
from lmforge.context.summary import SUMMARY_HEADER, SummarizedContext
from lmforge.errors import InputError, ValidationError
from lmforge.generation.chat import ChatHistory

FACTS = ["My name is Ada and I live in Lyon.", "My cat is called Pixel.", "I was born in 1990.",
         "I work as a baker.", "My favourite colour is green."]


def conversation() -> ChatHistory:
    history = ChatHistory("You are a helpful assistant.")
    for fact in FACTS:
        history.add_user(fact)
        history.add_assistant("Noted, thank you for telling me.")
    history.add_user("What is my cat called?")
    return history


def test_older_exchanges_are_summarized_once_and_the_prompt_fits(smollm2, smollm2_tokenizer):
    history = conversation()
    context = SummarizedContext(smollm2, smollm2_tokenizer, reserve_output=64, keep_turns=2, summary_tokens=40)
    roomy = context.select(history, 4096)
    assert roomy.history == history and context.spent.prompt == 0 and context.summary == ""
    selected = context.select(history, 200)
    assert selected.tokens == prompt_tokens(smollm2_tokenizer, selected.history) <= 200 - 64
    assert selected.history.system.startswith("You are a helpful assistant.\n\n" + SUMMARY_HEADER)
    assert context.summary and context.summary in selected.history.system
    assert selected.history.messages == history.messages[-3:]  # the last exchange and the new question
    assert selected.dropped_messages == context.covered == len(history.messages) - 3
    assert context.spent.prompt > 0 and 0 < context.spent.generated <= 40
    spent = (context.spent.prompt, context.spent.generated)
    assert context.select(history, 200) == selected  # asked again: the summary is reused, not rewritten
    assert (context.spent.prompt, context.spent.generated) == spent


def test_recent_turns_too_long_for_the_budget_and_bad_settings_are_clear(smollm2, smollm2_tokenizer):
    with pytest.raises(InputError, match="even with the summary, the last 2 exchange"):
        SummarizedContext(smollm2, smollm2_tokenizer, reserve_output=64, keep_turns=2).select(conversation(), 100)
    with pytest.raises(ValidationError, match="keep_turns >= 1"):
        SummarizedContext(smollm2, smollm2_tokenizer, keep_turns=0)
    with pytest.raises(ValidationError, match="leaves no room"):
        SummarizedContext(smollm2, smollm2_tokenizer, reserve_output=300).select(conversation(), 200)
