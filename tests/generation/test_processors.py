"""Logits processors: exact effects on hand-made logits, parity with HF transformers, the pipeline, SamplingParams."""

import itertools
import math

import pytest
import torch
from transformers.generation import logits_process as hf

from lmforge.errors import ValidationError
from lmforge.generation.processors import (
    BadWords,
    LogitBias,
    LogitsPipeline,
    LogitsProcessor,
    MinP,
    MinTokens,
    NoRepeatNGram,
    PresenceFrequencyPenalty,
    RepetitionPenalty,
    SequenceState,
    Temperature,
    TopK,
    TopP,
    TypicalP,
)
from lmforge.generation.sampling_params import SamplingParams

INF = float("inf")
PROBS = [0.5, 0.3, 0.15, 0.05]  # a distribution whose filters are easy to work out by hand


def t(values) -> torch.Tensor:
    return torch.tensor(values, dtype=torch.float32)


def log_probs() -> torch.Tensor:
    return torch.tensor(PROBS).log()


def state_for(processor: LogitsProcessor, prompt=(), output=()) -> SequenceState:
    state = SequenceState(prompt, [processor])
    state.replay(output)
    return state


def run(processor: LogitsProcessor, logits: torch.Tensor, prompt=(), output=()) -> torch.Tensor:
    return processor(logits.clone(), state_for(processor, prompt, output))


def kept(logits: torch.Tensor) -> list[int]:
    return torch.isfinite(logits).nonzero().flatten().tolist()


class FakeTokenizer:
    """Just enough of lmforge.tokenizer.Tokenizer for bad_words: word -> ids, with and without a leading space."""

    ids = {"apple": [5], " apple": [6], "big deal": [1, 2], " big deal": [3, 2], "x": [7], " x": [7]}

    def encode(self, text: str, add_special_tokens: bool = True) -> list[int]:
        assert not add_special_tokens
        return list(self.ids[text])


# ----- each processor's exact effect --------------------------------------------------------------


def test_logit_bias_adds_to_listed_tokens():
    out = run(LogitBias({0: 1.5, 3: -10.0}), t([1, 2, 3, 4]))
    assert torch.equal(out, t([2.5, 2, 3, -6]))


def test_logit_bias_rejects_ids_outside_the_vocabulary():
    with pytest.raises(ValidationError, match="token id 9 .* 4 tokens"):
        run(LogitBias({9: 1.0}), t([1, 2, 3, 4]))


def test_bad_words_ban_single_tokens_always_and_last_tokens_after_a_matching_prefix():
    words = BadWords([[5], [1, 2, 3]])
    logits = torch.zeros(6)
    assert torch.equal(run(words, logits, output=[]), t([0, 0, 0, 0, 0, -INF]))
    assert torch.equal(run(words, logits, output=[1]), t([0, 0, 0, 0, 0, -INF]))
    assert torch.equal(run(words, logits, prompt=[1], output=[2]), t([0, 0, 0, 0, 0, -INF]))  # output only
    assert torch.equal(run(words, logits, output=[4, 1, 2]), t([0, 0, 0, -INF, 0, -INF]))


def test_min_tokens_bans_stop_ids_until_enough_output():
    processor = MinTokens(2, [0, 3])
    logits = t([1, 2, 3, 4])
    assert torch.equal(run(processor, logits, output=[]), t([-INF, 2, 3, -INF]))
    assert torch.equal(run(processor, logits, output=[1]), t([-INF, 2, 3, -INF]))
    assert torch.equal(run(processor, logits, output=[1, 2]), logits)


def test_no_repeat_ngram_bans_tokens_completing_a_seen_ngram():
    processor = NoRepeatNGram(2)
    logits = torch.zeros(5)
    # prompt 1 2 3 1: the last token is 1 and the bigram (1, 2) exists, so 2 is banned
    assert torch.equal(run(processor, logits, prompt=[1, 2, 3, 1]), t([0, 0, -INF, 0, 0]))
    # ... then 1 4: (4,) was never followed by anything
    assert torch.equal(run(processor, logits, prompt=[1, 2, 3, 1], output=[4]), logits)
    # ... then 1 4 1: both (1, 2) and (1, 4) exist now
    assert torch.equal(run(processor, logits, prompt=[1, 2, 3, 1], output=[4, 1]), t([0, 0, -INF, 0, -INF]))
    # trigrams: (2, 3) was followed by 1
    assert torch.equal(run(NoRepeatNGram(3), logits, prompt=[2, 3, 1, 2, 3]), t([0, -INF, 0, 0, 0]))


def test_repetition_penalty_divides_positive_and_multiplies_negative_seen_logits():
    out = run(RepetitionPenalty(2.0), t([2, -2, 1, 0.5]), prompt=[0], output=[1])
    assert torch.equal(out, t([1, -4, 1, 0.5]))


def test_presence_and_frequency_penalties_count_output_tokens_only():
    out = run(PresenceFrequencyPenalty(0.5, 0.25), torch.zeros(4), prompt=[0, 3], output=[1, 1, 2])
    assert torch.equal(out, t([0, -(0.5 + 2 * 0.25), -(0.5 + 0.25), 0]))


def test_temperature_divides_logits():
    assert torch.equal(run(Temperature(0.5), t([1, -2, 3])), t([2, -4, 6]))


def test_top_k_keeps_the_k_best_and_ties():
    assert torch.equal(run(TopK(2), t([1, 3, 2, 0])), t([-INF, 3, 2, -INF]))
    assert torch.equal(run(TopK(1), t([1, 3, 3, 0])), t([-INF, 3, 3, -INF]))
    assert torch.equal(run(TopK(10), t([1, 3])), t([1, 3]))


def test_top_p_keeps_the_smallest_set_reaching_p():
    assert kept(run(TopP(0.75), log_probs())) == [0, 1]  # 0.5 + 0.3 >= 0.75
    assert kept(run(TopP(0.85), log_probs())) == [0, 1, 2]  # 0.5 + 0.3 + 0.15 >= 0.85
    assert kept(run(TopP(0.01), log_probs())) == [0]  # the most likely token always stays
    out = run(TopP(0.75), log_probs())
    assert torch.equal(out[:2], log_probs()[:2])  # survivors are untouched


def test_min_p_scales_the_cutoff_with_the_top_probability():
    assert kept(run(MinP(0.2), log_probs())) == [0, 1, 2]  # cut-off 0.1 drops 0.05
    assert kept(run(MinP(0.7), log_probs())) == [0]  # cut-off 0.35


def test_typical_p_keeps_tokens_closest_to_the_entropy():
    # H = -sum p ln p = 1.142; |-ln p - H| = 0.449, 0.062, 0.755, 1.854, so the ranking is 1, 0, 2, 3
    # with cumulative mass 0.3, 0.8, 0.95, 1.0.
    assert kept(run(TypicalP(0.2), log_probs())) == [1]  # the most typical, not the most likely
    assert kept(run(TypicalP(0.5), log_probs())) == [0, 1]
    assert kept(run(TypicalP(0.9), log_probs())) == [0, 1, 2]


# ----- parity with transformers on random logits ---------------------------------------------------


@pytest.mark.parametrize("ours, theirs", [
    (TopK(7), hf.TopKLogitsWarper(7)),
    (TopP(0.9), hf.TopPLogitsWarper(0.9)),
    (TopP(0.3), hf.TopPLogitsWarper(0.3)),
    (MinP(0.05), hf.MinPLogitsWarper(0.05)),
    (TypicalP(0.8), hf.TypicalLogitsWarper(0.8)),
    (TypicalP(0.3), hf.TypicalLogitsWarper(0.3)),
])
def test_filters_match_transformers(ours, theirs):
    generator = torch.Generator().manual_seed(0)
    for _ in range(20):
        logits = torch.randn(100, generator=generator) * 3
        expected = theirs(torch.zeros(1, 1, dtype=torch.long), logits[None].clone())[0]
        assert torch.equal(run(ours, logits), expected)


@pytest.mark.parametrize("ours, theirs", [
    (RepetitionPenalty(1.3), hf.RepetitionPenaltyLogitsProcessor(1.3)),
    (NoRepeatNGram(2), hf.NoRepeatNGramLogitsProcessor(2)),
    (NoRepeatNGram(3), hf.NoRepeatNGramLogitsProcessor(3)),
])
def test_sequence_processors_match_transformers_at_every_step(ours, theirs):
    generator = torch.Generator().manual_seed(1)
    tokens = torch.randint(0, 6, (40,), generator=generator).tolist()  # small vocabulary: many repeats
    state = SequenceState(tokens[:5], [ours])
    for step in range(5, len(tokens)):
        logits = torch.randn(10, generator=generator)
        expected = theirs(torch.tensor([tokens[:step]]), logits[None].clone())[0]
        assert torch.equal(ours(logits.clone(), state), expected), step
        state.accept(tokens[step])


# ----- the pipeline --------------------------------------------------------------------------------

EVERYTHING = dict(logit_bias={1: 0.5}, bad_words=["apple"], min_tokens=1, no_repeat_ngram_size=3,
                  repetition_penalty=1.2, presence_penalty=0.1, frequency_penalty=0.1, temperature=0.7,
                  top_k=5, top_p=0.9, min_p=0.05, typical_p=0.95)
ORDER = ["logit_bias", "bad_words", "min_tokens", "no_repeat_ngram", "repetition_penalty",
         "presence_frequency_penalty", "temperature", "top_k", "top_p", "min_p", "typical_p"]


def test_pipeline_order_and_observer_sees_every_processor():
    pipeline = LogitsPipeline.from_params(SamplingParams(**EVERYTHING), eos_token_ids=[0], tokenizer=FakeTokenizer())
    assert pipeline.names == ORDER
    state = pipeline.new_state([3, 4, 3])
    state.replay([2, 8])
    raw = torch.randn(10, generator=torch.Generator().manual_seed(0))
    untouched = raw.clone()
    seen = []
    out = pipeline(raw, state, observer=lambda name, before, after: seen.append((name, before, after)))
    assert torch.equal(raw, untouched)  # the caller's logits are never modified
    assert [name for name, _, _ in seen] == ORDER
    assert torch.equal(seen[0][1], raw)
    for (_, _, after), (_, before, _) in itertools.pairwise(seen):
        assert torch.equal(after, before)  # each processor's input is the previous one's output
    assert torch.equal(seen[-1][2], out)
    assert torch.equal(pipeline(raw, state), out)  # the observer changes nothing


def test_greedy_pipeline_keeps_penalties_but_no_temperature_or_filters():
    sampling = dict(top_p=0.5, top_k=5, min_p=0.1, typical_p=0.5, repetition_penalty=1.2)
    for params in (SamplingParams(temperature=0, **sampling),
                   SamplingParams(temperature=0.7, **{**sampling, "top_k": 1}),
                   SamplingParams(temperature=0.7, num_beams=2, **sampling)):
        assert LogitsPipeline.from_params(params, eos_token_ids=[0]).names == ["repetition_penalty"]


def test_default_params_build_an_empty_pipeline_that_costs_nothing():
    pipeline = LogitsPipeline.from_params(SamplingParams(), eos_token_ids=[0])
    assert pipeline.processors == []
    logits = torch.randn(5)
    assert pipeline(logits, pipeline.new_state([1])) is logits


def test_min_tokens_covers_eos_and_stop_token_ids_unless_eos_is_ignored():
    def stop_ids(**kwargs):
        params = SamplingParams(min_tokens=2, **kwargs)
        (processor,) = LogitsPipeline.from_params(params, eos_token_ids=[0, 9]).processors
        return processor.stop_token_ids

    assert stop_ids(stop_token_ids=[4]) == [0, 4, 9]
    assert stop_ids(stop_token_ids=[4], ignore_eos=True) == [4]


def test_bad_words_are_tokenized_with_and_without_a_leading_space():
    params = SamplingParams(bad_words=["apple", " big deal", "x"])
    (processor,) = LogitsPipeline.from_params(params, eos_token_ids=[0], tokenizer=FakeTokenizer()).processors
    assert processor.single == [5, 6, 7]
    assert processor.multi == [([1], 2), ([3], 2)]
    with pytest.raises(ValidationError, match="bad_words needs a tokenizer"):
        LogitsPipeline.from_params(params, eos_token_ids=[0])


def test_constraints_run_first_and_names_must_be_unique():
    class Only3(LogitsProcessor):
        name = "grammar"

        def __call__(self, logits, state):
            return logits.masked_fill_(torch.arange(logits.shape[-1]) != 3, -INF)

    params = SamplingParams(temperature=0.5, repetition_penalty=2.0)
    pipeline = LogitsPipeline.from_params(params, eos_token_ids=[0], constraints=[Only3()])
    assert pipeline.names == ["grammar", "repetition_penalty", "temperature"]
    assert torch.equal(pipeline(t([1, 1, 1, 4]), pipeline.new_state([3])), t([-INF, -INF, -INF, 4]))
    with pytest.raises(ValidationError, match="'grammar'.* more than once"):
        LogitsPipeline([Only3(), Only3()])


# ----- SequenceState -------------------------------------------------------------------------------


def test_replay_rebuilds_the_same_state_as_incremental_accepts():
    pipeline = LogitsPipeline.from_params(SamplingParams(no_repeat_ngram_size=2, repetition_penalty=1.5,
                                                         frequency_penalty=0.5, presence_penalty=0.2),
                                          eos_token_ids=[0])
    generator = torch.Generator().manual_seed(0)
    outputs = torch.randint(0, 8, (25,), generator=generator).tolist()
    incremental = pipeline.new_state([1, 2, 3])
    for token in outputs:
        pipeline(torch.randn(8, generator=generator), incremental)  # builds the dense caches mid-way
        incremental.accept(token)
    replayed = pipeline.new_state([1, 2, 3])
    replayed.replay([7, 7, 7])  # replay starts from scratch, whatever came before
    replayed.replay(outputs)

    assert replayed.output_token_ids == incremental.output_token_ids == outputs
    assert replayed.output_counts == incremental.output_counts
    assert replayed.seen == incremental.seen == {1, 2, 3, *outputs}
    assert replayed.processor_state == incremental.processor_state
    cpu = torch.device("cpu")
    assert torch.equal(replayed.counts_tensor(8, cpu), incremental.counts_tensor(8, cpu))
    assert torch.equal(replayed.seen_mask(8, cpu), incremental.seen_mask(8, cpu))
    logits = torch.randn(8, generator=generator)
    assert torch.equal(pipeline(logits, replayed), pipeline(logits, incremental))


def test_reset_keeps_the_prompt_and_last_token_ids_spans_prompt_and_output():
    state = SequenceState([1, 2, 3])
    state.replay([4, 5])
    assert state.last_token_ids(3) == [3, 4, 5]
    assert state.last_token_ids(1) == [5]
    assert state.last_token_ids(9) == [1, 2, 3, 4, 5]
    assert state.last_token_ids(0) == []
    state.reset()
    assert (state.output_token_ids, state.output_counts, state.seen) == ([], {}, {1, 2, 3})


# ----- SamplingParams validation -------------------------------------------------------------------


@pytest.mark.parametrize("field, value", [
    ("temperature", -0.1), ("temperature", "hot"), ("top_p", 0.0), ("top_p", 1.5), ("top_k", -2),
    ("top_k", 2.5), ("max_tokens", 0), ("stop", 5), ("stop", ["ok", ""]), ("stop_token_ids", 5),
    ("bad_words", [""]), ("logit_bias", {-1: 1.0}), ("min_p", math.nan),
])
def test_sampling_params_errors_name_the_field(field, value):
    with pytest.raises(ValidationError, match=f"SamplingParams.{field} "):
        SamplingParams(**{field: value})


def test_sampling_params_normalizes_convenience_values():
    params = SamplingParams(stop="###", bad_words="apple", top_k=-1, logit_bias={"5": 2})
    assert (params.stop, params.bad_words, params.top_k, params.logit_bias) == (["###"], ["apple"], 0, {5: 2.0})
