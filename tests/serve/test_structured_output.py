"""response_format, the structured_outputs extension and tool calling over HTTP, with the official client."""

import json

import jsonschema
import openai
import pytest

from lmforge import SamplingParams, generate
from lmforge.context.tools import Tool, with_tools
from tests.serve.conftest import MODEL

PERSON = {"type": "object", "properties": {"name": {"type": "string", "maxLength": 30},
                                           "age": {"type": "integer", "minimum": 0, "maximum": 120}},
          "required": ["name", "age"], "additionalProperties": False}
ASK = [{"role": "user", "content": "Describe a person called Ada who is 36, as JSON."}]
WEATHER = {"type": "function", "function": {
    "name": "get_weather", "description": "The current weather in a city.",
    "parameters": {"type": "object", "properties": {"city": {"type": "string", "maxLength": 30}},
                   "required": ["city"], "additionalProperties": False}}}
TIME = {"type": "function", "function": {"name": "get_time", "description": "The time now.", "parameters": None}}
WEATHER_QUESTION = [{"role": "user", "content": "What is the weather in Paris right now?"}]


def test_json_schema_response_format_validates_and_streams_the_same_text(client, smollm2, smollm2_tokenizer):
    response_format = {"type": "json_schema", "json_schema": {"name": "person", "schema": PERSON}}
    whole = client.chat.completions.create(model=MODEL, messages=ASK, max_tokens=40, temperature=0,
                                           response_format=response_format)
    text = whole.choices[0].message.content
    jsonschema.validate(json.loads(text), PERSON)
    prompt = smollm2_tokenizer.apply_chat_template(ASK, tokenize=True)
    offline = generate(smollm2, smollm2_tokenizer, prompt,
                       SamplingParams(temperature=0, max_tokens=40, structured_outputs={"json": PERSON}))[0]
    assert text == offline.outputs[0].text
    chunks = client.chat.completions.create(model=MODEL, messages=ASK, max_tokens=40, temperature=0, stream=True,
                                            response_format=response_format)
    assert "".join(c.choices[0].delta.content or "" for c in chunks if c.choices) == text


def test_json_object_and_the_structured_outputs_extension(client):
    sampled = client.chat.completions.create(model=MODEL, messages=ASK, max_tokens=60, temperature=1.0, seed=3, n=3,
                                             response_format={"type": "json_object"})
    for choice in sampled.choices:
        if choice.finish_reason == "stop":
            assert isinstance(json.loads(choice.message.content), dict)
    choice = client.chat.completions.create(model=MODEL, messages=[{"role": "user", "content": "Is water wet?"}],
                                            max_tokens=5, temperature=0,
                                            extra_body={"structured_outputs": {"choice": ["yes", "no"]}})
    assert choice.choices[0].message.content in ("yes", "no")
    date = client.completions.create(model=MODEL, prompt="The first moon landing was on", max_tokens=15,
                                     temperature=0, extra_body={"structured_outputs": {"regex": r" [0-9]{4}"}})
    assert len(date.choices[0].text) == 5 and date.choices[0].text[1:].isdigit()


def test_a_required_tool_call_comes_back_as_tool_calls(client):
    response = client.chat.completions.create(model=MODEL, messages=WEATHER_QUESTION, max_tokens=40, temperature=0,
                                              tools=[WEATHER, TIME], tool_choice="required")
    choice = response.choices[0]
    assert choice.finish_reason == "tool_calls" and choice.message.content is None
    [call] = choice.message.tool_calls
    assert call.type == "function" and call.id.startswith("call_") and call.function.name in ("get_weather", "get_time")
    arguments = json.loads(call.function.arguments)
    tool = WEATHER if call.function.name == "get_weather" else TIME
    jsonschema.validate(arguments, tool["function"]["parameters"] or {"type": "object"})

    named = client.chat.completions.create(model=MODEL, messages=WEATHER_QUESTION, max_tokens=40, temperature=0,
                                           tools=[WEATHER, TIME],
                                           tool_choice={"type": "function", "function": {"name": "get_weather"}})
    [call] = named.choices[0].message.tool_calls
    assert call.function.name == "get_weather" and "city" in json.loads(call.function.arguments)

    chunks = list(client.chat.completions.create(
        model=MODEL, messages=WEATHER_QUESTION, max_tokens=40, temperature=0, stream=True, tools=[WEATHER, TIME],
        tool_choice={"type": "function", "function": {"name": "get_weather"}}))
    streamed = [call for c in chunks if c.choices for call in c.choices[0].delta.tool_calls or []]
    assert [(c.function.name, c.function.arguments) for c in streamed] == [("get_weather", call.function.arguments)]
    assert [c.choices[0].finish_reason for c in chunks if c.choices][-1] == "tool_calls"


def test_auto_tool_choice_answers_in_text_or_a_valid_call_and_reads_results(client):
    conversation = WEATHER_QUESTION + [
        {"role": "assistant", "content": None, "tool_calls": [
            {"id": "call_1", "type": "function", "function": {"name": "get_weather", "arguments": '{"city": "Paris"}'}}]},
        {"role": "tool", "tool_call_id": "call_1", "content": "18 degrees and sunny"}]
    for messages in (WEATHER_QUESTION, conversation):
        response = client.chat.completions.create(model=MODEL, messages=messages, max_tokens=30, temperature=0,
                                                  tools=[WEATHER], tool_choice="auto")
        choice = response.choices[0]
        if choice.message.tool_calls:
            assert choice.finish_reason == "tool_calls"
            jsonschema.validate(json.loads(choice.message.tool_calls[0].function.arguments),
                                WEATHER["function"]["parameters"])
        else:
            assert choice.message.content and not choice.message.content.startswith("{")


def test_tools_are_described_in_the_system_prompt_and_results_become_user_turns():
    tool = Tool.from_openai(WEATHER)
    messages = with_tools([{"role": "system", "content": "Be brief."}, *WEATHER_QUESTION,
                           {"role": "assistant", "content": "", "tool_calls": [
                               {"function": {"name": "get_weather", "arguments": '{"city": "Paris"}'}}]},
                           {"role": "tool", "content": "sunny"}], [tool])
    assert messages[0]["role"] == "system" and messages[0]["content"].startswith("Be brief.")
    assert '"name": "get_weather"' in messages[0]["content"] and "The current weather" in messages[0]["content"]
    assert messages[2] == {"role": "assistant", "content": '{"name": "get_weather", "arguments": {"city": "Paris"}}'}
    assert messages[3] == {"role": "user", "content": "Function result: sunny"}


@pytest.mark.parametrize("extra, param, reason", [
    ({"response_format": {"type": "json_schema", "json_schema": {"name": "x", "schema": {"type": "foo"}}}},
     "response_format", "Invalid type: foo"),
    ({"extra_body": {"structured_outputs": {"regex": "[a-"}}}, "structured_outputs", "unclosed character class"),
    ({"extra_body": {"structured_outputs": {"choice": "yes"}}}, "structured_outputs", "non-empty list"),
    ({"response_format": {"type": "json_schema"}}, "response_format", "needs a \"json_schema\""),
    ({"tools": [WEATHER], "tool_choice": {"type": "function", "function": {"name": "nope"}}}, "tool_choice",
     "not among the tools"),
    ({"tools": [{"type": "function", "function": {"name": "bad name!"}}]}, "tools", "must be 1-64 letters"),
    ({"tools": [WEATHER], "response_format": {"type": "json_object"}}, "response_format", "use one of"),
])
def test_a_bad_constraint_is_a_400_naming_the_field(client, extra, param, reason):
    with pytest.raises(openai.BadRequestError) as error:
        client.chat.completions.create(model=MODEL, messages=ASK, max_tokens=5, **extra)
    body = error.value.body
    assert body["param"] == param and reason in body["message"], body


def test_reasoning_on_a_model_without_thinking_is_a_400(client):
    for reasoning in ("off", 32):
        with pytest.raises(openai.BadRequestError) as error:
            client.chat.completions.create(model=MODEL, messages=ASK, max_tokens=5,
                                           extra_body={"reasoning": reasoning})
        assert error.value.body["param"] == "reasoning" and "no thinking mode" in error.value.body["message"]
    with pytest.raises(openai.BadRequestError, match="reasoning_budget must be an integer >= 0"):
        client.chat.completions.create(model=MODEL, messages=ASK, max_tokens=5, extra_body={"reasoning": -1})
