"""Constrained decoding: outputs match their JSON schema / regex / choice on a random model (which would
never produce them by chance) and on the real model, through generate, beam search and the engine."""

import json
import re

import jsonschema
import pytest
import torch

from lmforge.context.structured import (
    GrammarConstraint,
    StructuredOutputParams,
    grammar_constraint,
)
from lmforge.engine.llm import LLM
from lmforge.errors import ValidationError
from lmforge.generation.generate import generate
from lmforge.generation.processors import LogitsPipeline
from lmforge.generation.sampling_params import SamplingParams
from tests.models.test_llama import hf_llama
from tests.parity import ours_from_hf

# Bounded schemas: a random model never closes a string or stops a number of its own accord.
NESTED = {
    "type": "object",
    "properties": {
        "name": {"type": "string", "maxLength": 6},
        "role": {"enum": ["admin", "user", "guest"]},
        "scores": {"type": "array", "items": {"type": "integer", "minimum": 0, "maximum": 99}, "minItems": 1,
                   "maxItems": 3},
        "address": {"type": "object", "properties": {"city": {"type": "string", "maxLength": 5},
                                                     "zip": {"type": "string", "pattern": "^[0-9]{5}$"}},
                    "required": ["city", "zip"], "additionalProperties": False},
        "active": {"type": "boolean"},
    },
    "required": ["name", "role", "scores", "address", "active"],
    "additionalProperties": False,
}
DATE = r"(19|20)[0-9]{2}-(0[1-9]|1[0-2])-(0[1-9]|[12][0-9]|3[01])"


@pytest.fixture(scope="module")
def random_model(smollm2_tokenizer):
    """A tiny random Llama over SmolLM2's 49k-token vocabulary: its samples are noise unless constrained."""
    hf = hf_llama(vocab_size=smollm2_tokenizer.vocab_size, max_position_embeddings=512)
    return ours_from_hf(hf, "causal-lm")


def sampled(so, seed: int, n: int = 4, max_tokens: int = 120) -> SamplingParams:
    return SamplingParams(n=n, temperature=1.0, seed=seed, max_tokens=max_tokens, structured_outputs=so)


def test_sampled_json_from_a_random_model_validates_against_a_nested_schema(random_model, smollm2_tokenizer):
    [output] = generate(random_model, smollm2_tokenizer, "hello", sampled({"json": NESTED}, seed=1, n=6))
    for completion in output.outputs:
        assert completion.finish_reason == "stop", completion.text
        jsonschema.validate(json.loads(completion.text), NESTED)
    assert len({c.text for c in output.outputs}) > 1  # still sampled, not forced to one answer


def test_json_object_regex_and_choice_hold_for_every_sample(random_model, smollm2_tokenizer):
    for so, check in [({"regex": DATE}, lambda text: re.fullmatch(DATE, text)),
                      ({"choice": ["red", "green", "dark blue"]}, lambda text: text in ("red", "green", "dark blue")),
                      ({"json": {"type": "array", "items": {"enum": [1, "two", None]}, "maxItems": 4}},
                       lambda text: all(x in (1, "two", None) for x in json.loads(text)))]:
        [output] = generate(random_model, smollm2_tokenizer, "hello", sampled(so, seed=2))
        for completion in output.outputs:
            assert completion.finish_reason == "stop" and check(completion.text), (so, completion.text)


def test_the_first_allowed_tokens_are_exactly_the_prefixes_of_the_choices(smollm2_tokenizer):
    constraint = grammar_constraint({"choice": ["yes", "no"]}, smollm2_tokenizer, [smollm2_tokenizer.eos_token_id])
    state = LogitsPipeline([constraint]).new_state([])
    allowed = constraint.allowed(state).nonzero().flatten().tolist()
    texts = {smollm2_tokenizer.decode([t]) for t in allowed}
    assert texts and all("yes".startswith(t) or "no".startswith(t) for t in texts)
    assert {"yes", "no", "y", "n"} <= texts


def test_greedy_constrained_decoding_takes_the_best_allowed_token(smollm2, smollm2_tokenizer):
    """Each step's token is the argmax of the model's logits over exactly the tokens the grammar allows."""
    schema = {"type": "object", "properties": {"name": {"type": "string"}, "age": {"type": "integer"}},
              "required": ["name", "age"], "additionalProperties": False}
    prompt = smollm2_tokenizer.apply_chat_template([{"role": "user", "content": "A person as JSON, with name and age."}])
    params = SamplingParams(temperature=0, max_tokens=30, structured_outputs={"json": schema})
    [output] = generate(smollm2, smollm2_tokenizer, prompt, params)
    completion = output.outputs[0]
    jsonschema.validate(json.loads(completion.text), schema)

    ids = smollm2_tokenizer.encode(prompt, add_special_tokens=False)
    constraint = grammar_constraint(params.structured_outputs, smollm2_tokenizer, [smollm2_tokenizer.eos_token_id])
    state = LogitsPipeline([constraint]).new_state(ids)
    with torch.inference_mode():
        logits = smollm2(torch.tensor([ids + completion.token_ids])).logits[0, len(ids) - 1:]
    for step, token in enumerate(completion.token_ids):
        allowed = constraint.allowed(state)
        assert token == int(logits[step].masked_fill(~allowed, float("-inf")).argmax())
        state.accept(token)


def test_beam_search_and_the_engine_respect_the_grammar(random_model, smollm2_tokenizer):
    regex_params = SamplingParams(num_beams=3, max_tokens=20, structured_outputs={"regex": DATE})
    [beams] = generate(random_model, smollm2_tokenizer, "hi", regex_params)
    assert re.fullmatch(DATE, beams.outputs[0].text)

    # A small KV pool preempts sequences mid-output: their grammar state is rebuilt by replaying their tokens.
    llm = LLM(random_model, smollm2_tokenizer, kv_cache_tokens=96, block_size=4, max_num_seqs=4, max_model_len=64)
    params = sampled({"json": NESTED}, seed=3, n=2, max_tokens=60)
    outputs = llm.generate(["hello", "one two", "three"], params, use_tqdm=False)
    assert llm.engine.stats.num_preemptions > 0
    for output in outputs:
        for completion in output.outputs:
            jsonschema.validate(json.loads(completion.text), NESTED)
    expected = generate(random_model, smollm2_tokenizer, "hello", params)[0]
    assert [c.token_ids for c in outputs[0].outputs] == [c.token_ids for c in expected.outputs]


@pytest.mark.parametrize("so, reason", [
    ({"json": {"type": "foo"}}, "Invalid type: foo"),
    ({"json": "{not json"}, "not valid JSON"),
    ({"regex": "[a-"}, "unclosed character class"),
    ({"choice": []}, "non-empty list"),
    ({"grammar": "start: missing_rule"}, "unknown name"),
    ({"json": {"type": "object"}, "regex": "a"}, "exactly one of"),
    ({"jsonschema": {}}, "one of the keys"),
])
def test_an_invalid_constraint_fails_when_the_params_are_made(so, reason):
    with pytest.raises(ValidationError, match=re.escape(reason)):
        SamplingParams(structured_outputs=so)


def test_params_are_coerced_once_and_the_pipeline_puts_the_grammar_first(smollm2_tokenizer):
    params = SamplingParams(temperature=0.5, top_k=5, structured_outputs={"json_object": True})
    assert isinstance(params.structured_outputs, StructuredOutputParams)
    pipeline = LogitsPipeline.from_params(params, [smollm2_tokenizer.eos_token_id], smollm2_tokenizer)
    assert isinstance(pipeline.processors[0], GrammarConstraint) and pipeline.names[1:] == ["temperature", "top_k"]
    with pytest.raises(ValidationError, match="needs the tokenizer"):
        LogitsPipeline.from_params(params, [2])
