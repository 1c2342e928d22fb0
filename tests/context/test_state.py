"""The state strategy: exchanges that leave the window are read into a JSON object of facts (a constrained,
counted model call, once each), merged so pinned facts stay, and the prompt carries the state and the last turns."""

import json

import pytest

from lmforge.context.model_calls import local_completion
from lmforge.context.state import FACTS_GRAMMAR, STATE_HEADER, StatefulContext
from lmforge.context.strategies import prompt_tokens
from lmforge.errors import InputError, ValidationError
from lmforge.generation.chat import ChatHistory
from tests.context.test_summary import conversation


def test_older_exchanges_become_facts_read_once_and_the_prompt_keeps_the_last_turns(smollm2, smollm2_tokenizer):
    history = conversation()
    calls = []
    model_call = local_completion(smollm2, smollm2_tokenizer)

    def complete(prompt_ids, params):
        calls.append(params)
        return model_call(prompt_ids, params)

    context = StatefulContext(None, smollm2_tokenizer, reserve_output=64, keep_turns=1, update_tokens=64,
                              state={"language": "French"}, complete=complete)
    selected = context.select(history, 2048)
    assert len(calls) == 1 and calls[0].structured_outputs.grammar == FACTS_GRAMMAR
    assert context.covered == len(history.messages) - 1 == selected.dropped_messages
    assert selected.history.messages == history.messages[-1:]
    assert selected.tokens == prompt_tokens(smollm2_tokenizer, selected.history)
    system = selected.history.system
    assert system.startswith("You are a helpful assistant.\n\n" + STATE_HEADER)
    assert json.loads(system.split(STATE_HEADER, 1)[1]) == context.state
    assert context.state["language"] == "French" and len(context.state) > 1  # pinned, plus what the model read
    assert all(isinstance(v, str) for v in context.state.values())
    assert context.spent.prompt > 0 and 0 < context.spent.generated <= 64

    assert context.select(history, 2048) == selected and len(calls) == 1  # nothing new to read
    history.add_assistant("Your cat is Pixel.")
    history.add_user("Thanks!")
    later = context.select(history, 2048)
    assert len(calls) == 2 and later.history.messages == history.messages[-1:]


def test_a_state_too_big_for_the_budget_and_bad_settings_are_clear(smollm2_tokenizer):
    never = StatefulContext(None, smollm2_tokenizer, reserve_output=10, state={"notes": "x " * 100},
                            complete=lambda ids, params: ("{}", 2))
    with pytest.raises(InputError, match="even with the facts, the last 1 exchange"):
        never.select(ChatHistory(None, [{"role": "user", "content": "hi"}]), 100)
    with pytest.raises(ValidationError, match="keep_turns >= 1"):
        StatefulContext(None, smollm2_tokenizer, keep_turns=0, complete=lambda ids, params: ("{}", 2))


def test_an_answer_cut_short_still_pins_its_whole_facts(smollm2_tokenizer):
    context = StatefulContext(None, smollm2_tokenizer, state={"dog": "Fido"},
                              complete=lambda ids, params: ('{"dog": "Rex", "home_city": "Rome", "job": "ba', 20))
    history = ChatHistory(None, [{"role": "user", "content": "My dog is Rex now, I live in Rome."},
                                 {"role": "assistant", "content": "Nice!"}, {"role": "user", "content": "And?"}])
    context.select(history, 2048)
    assert context.state == {"dog": "Fido", "dog_2": "Rex", "home_city": "Rome"}  # nothing replaced
    assert context.spent.generated == 20


def test_the_state_keeps_within_its_tokens_by_forgetting_the_oldest_written_facts(smollm2_tokenizer):
    answers = iter(['{"a": "one two three four five"}', '{"b": "six seven eight nine ten"}',
                    '{"c": "eleven twelve thirteen fourteen"}', '{"a": "one two three four five"}'])
    context = StatefulContext(None, smollm2_tokenizer, keep_turns=1, state_tokens=40, state={"me": "Ada"},
                              complete=lambda ids, params: (next(answers), 9))
    history = ChatHistory(None, [])
    for turn in range(5):
        history.add_user(f"message {turn}")
        context.select(history, 2048)
        history.add_assistant("ok")
    # a, b went as c and a (again) came; the pinned fact stayed
    assert context.state == {"me": "Ada", "c": "eleven twelve thirteen fourteen", "a": "one two three four five"}
    assert len(smollm2_tokenizer.encode(context.condensed_text(), add_special_tokens=False)) <= 40


def test_questions_are_not_kept_as_facts(smollm2_tokenizer):
    context = StatefulContext(None, smollm2_tokenizer,
                              complete=lambda ids, params: ('{"user": "What is my name?", "name": "Ada"}', 12))
    history = ChatHistory(None, [{"role": "user", "content": "I am Ada. What is my name?"},
                                 {"role": "assistant", "content": "Ada."}, {"role": "user", "content": "Thanks"}])
    context.select(history, 2048)
    assert context.state == {"name": "Ada"}
