"""Beam search: exact token parity with HF transformers' beam search on tiny random Llama, GPT-2 and BART.

Each model's EOS is a token it likes, so finished hypotheses compete with the running beams.
"""

import dataclasses
from dataclasses import dataclass

import pytest
import torch
from tokenizers import Tokenizer as BackendTokenizer
from tokenizers import models, pre_tokenizers

from lmforge.errors import ValidationError
from lmforge.generation import SamplingParams, generate
from lmforge.generation.beam_search import beam_search
from lmforge.generation.processors import bad_words_token_ids
from lmforge.tokenizer import Tokenizer
from tests.models.test_bart import hf_bart
from tests.models.test_gpt2 import hf_gpt2
from tests.models.test_llama import hf_llama
from tests.parity import ours_from_hf

MAX_TOKENS = 10
PROMPT = [5, 17, 33, 8, 41]


@dataclass
class Case:
    hf: torch.nn.Module
    ours: torch.nn.Module
    tokenizer: Tokenizer
    prompt: list[int]
    eos: int


def word_tokenizer(vocab_size: int) -> Tokenizer:
    """Token i is the word "t{i}"; text is the words joined by spaces."""
    backend = BackendTokenizer(models.WordLevel({f"t{i}": i for i in range(vocab_size)}, unk_token="t0"))
    backend.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    return Tokenizer(backend)


def make_case(hf, task: str, prompt: list[int], eos: int) -> Case:
    hf.config.eos_token_id = eos
    config = hf.generation_config  # only what lmforge does too: no forced tokens, no default n-gram ban
    config.eos_token_id, config.forced_bos_token_id, config.forced_eos_token_id = eos, None, None
    config.no_repeat_ngram_size, config.pad_token_id = 0, hf.config.pad_token_id
    return Case(hf, ours_from_hf(hf, task), word_tokenizer(hf.config.vocab_size), prompt, eos)


@pytest.fixture(scope="module", autouse=True)
def one_thread():
    """Tiny models run faster on one thread, and do not stall when other processes share the CPU."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def cases() -> dict[str, Case]:
    # The EOS ids were picked so that, for num_beams=4 and length_penalty=0.5, several returned
    # hypotheses end in EOS at different lengths (test_finished_hypotheses_compete checks it).
    # Llama's prompt and BART's source hold tokens the models like, so that the processors matter
    # (and, for BART, must see the decoder's tokens, not the source's).
    return {"llama": make_case(hf_llama(num_key_value_heads=2), "causal-lm", [5, 17, 38, 62, 41], eos=48),
            "gpt2": make_case(hf_gpt2(), "causal-lm", PROMPT, eos=37),
            "bart": make_case(hf_bart(), "seq2seq-lm", [5, 26, 33, 77, 41, 2], eos=77)}


def hf_beams(case: Case, num_beams: int, n: int, **generation) -> list[list[int]]:
    """HF's returned sequences, generated part only, each ending at its first EOS (HF pads after it)."""
    generation = {"early_stopping": False, "eos_token_id": case.eos, **generation}
    ids = torch.tensor([case.prompt])
    with torch.no_grad():
        out = case.hf.generate(ids, attention_mask=torch.ones_like(ids), num_beams=num_beams, do_sample=False,
                               num_return_sequences=n, max_new_tokens=MAX_TOKENS, **generation)
    start = 1 if case.hf.config.is_encoder_decoder else len(case.prompt)  # the decoder start token / the prompt
    eos = generation["eos_token_id"]
    eos = set(eos) if isinstance(eos, list) else {eos}
    rows = []
    for row in out[:, start:].tolist():
        ends = [i for i, token in enumerate(row) if token in eos]
        rows.append(row[:ends[0] + 1] if ends else row)
    return rows


def text_of(case: Case, token_ids: list[int]) -> str:
    """A decoder-only output's text continues the prompt's; an encoder-decoder output stands alone."""
    if case.hf.config.is_encoder_decoder:
        return case.tokenizer.decode(token_ids)
    return case.tokenizer.decode(case.prompt + token_ids)[len(case.tokenizer.decode(case.prompt)):]


@pytest.mark.parametrize("length_penalty", [1.0, 0.5, 2.0])
@pytest.mark.parametrize("num_beams", [2, 4])
@pytest.mark.parametrize("name", ["llama", "gpt2", "bart"])
def test_matches_hf(cases, name, num_beams, length_penalty):
    case = cases[name]
    params = SamplingParams(num_beams=num_beams, n=num_beams, length_penalty=length_penalty, max_tokens=MAX_TOKENS)
    result = beam_search(case.ours, case.tokenizer, case.prompt, params)
    expected = hf_beams(case, num_beams, num_beams, length_penalty=length_penalty)
    assert [out.token_ids for out in result.outputs] == expected
    assert result.prompt_token_ids == case.prompt and [out.index for out in result.outputs] == list(range(num_beams))
    for out in result.outputs:
        ends_in_eos = out.token_ids[-1] == case.eos
        assert out.finish_reason == ("stop" if ends_in_eos else "length")
        assert len(out.token_ids) == MAX_TOKENS or ends_in_eos
        assert out.text == text_of(case, out.token_ids[:-1] if ends_in_eos else out.token_ids)


@pytest.mark.parametrize("name", ["llama", "gpt2", "bart"])
def test_finished_hypotheses_compete(cases, name):
    case = cases[name]
    params = SamplingParams(num_beams=4, n=4, length_penalty=0.5, max_tokens=MAX_TOKENS)
    stopped = [len(out.token_ids) for out in beam_search(case.ours, case.tokenizer, case.prompt, params).outputs
               if out.finish_reason == "stop"]
    assert len(set(stopped)) >= 2  # EOS hypotheses of different lengths made the final cut


PROCESSORS = {  # SamplingParams fields → the HF generate() arguments that do the same
    "repetition_penalty": ({"repetition_penalty": 1.8}, {"repetition_penalty": 1.8}),
    "no_repeat_ngram": ({"no_repeat_ngram_size": 2}, {"no_repeat_ngram_size": 2}),
    "logit_bias": ({"logit_bias": {48: 1.5, 77: 1.5, 60: -3.0}},
                   {"sequence_bias": {(48,): 1.5, (77,): 1.5, (60,): -3.0}}),
    "min_tokens": ({"min_tokens": 6}, {"min_new_tokens": 6}),
}


@pytest.mark.parametrize("processor", [*PROCESSORS, "bad_words"])
@pytest.mark.parametrize("name", ["llama", "bart"])
def test_logits_processors_match_hf(cases, name, processor):
    case = cases[name]
    if processor == "bad_words":
        words = ["t69", "t26 t26"]
        ours, theirs = {"bad_words": words}, {"bad_words_ids": bad_words_token_ids(words, case.tokenizer)}
    else:
        ours, theirs = PROCESSORS[processor]
    params = SamplingParams(num_beams=4, n=3, length_penalty=0.5, max_tokens=MAX_TOKENS)
    plain = beam_search(case.ours, case.tokenizer, case.prompt, params).outputs
    processed = beam_search(case.ours, case.tokenizer, case.prompt, dataclasses.replace(params, **ours)).outputs
    assert [out.token_ids for out in processed] == hf_beams(case, 4, 3, length_penalty=0.5, **theirs)
    assert [out.token_ids for out in processed] != [out.token_ids for out in plain]  # the processor mattered


def test_search_stops_when_no_running_beam_can_win():
    """HF's default (early_stopping=False) ends the search once num_beams hypotheses are finished and the
    best running beam, scored at its current length, is no better than the worst of them. Here that
    happens before max_tokens and changes the result (a search to max_tokens finds another hypothesis)."""
    case = make_case(hf_llama(num_key_value_heads=2), "causal-lm", PROMPT, eos=60)
    params = SamplingParams(num_beams=2, n=2, max_tokens=MAX_TOKENS)
    got = [out.token_ids for out in beam_search(case.ours, case.tokenizer, case.prompt, params).outputs]
    assert got == hf_beams(case, 2, 2)
    assert got != hf_beams(case, 2, 2, early_stopping="never")


def test_stop_token_ids_finish_hypotheses_like_extra_eos_ids(cases):
    case = cases["llama"]
    params = SamplingParams(num_beams=4, n=4, length_penalty=0.5, max_tokens=MAX_TOKENS, stop_token_ids=[60])
    outputs = beam_search(case.ours, case.tokenizer, case.prompt, params).outputs
    assert [out.token_ids for out in outputs] == hf_beams(case, 4, 4, length_penalty=0.5, eos_token_id=[case.eos, 60])
    assert {out.stop_reason for out in outputs if out.finish_reason == "stop"} == {None, 60}  # None: EOS


def test_stop_strings_cut_the_final_texts(cases):
    case = cases["llama"]
    params = SamplingParams(num_beams=2, n=2, length_penalty=2.0, max_tokens=MAX_TOKENS)  # favours long outputs
    plain = beam_search(case.ours, case.tokenizer, case.prompt, params).outputs
    stop = " ".join(plain[0].text.split()[2:4])  # two tokens of the best text
    cut = beam_search(case.ours, case.tokenizer, case.prompt, dataclasses.replace(params, stop=[stop])).outputs
    assert cut[0].text == plain[0].text[:plain[0].text.index(stop)]
    assert (cut[0].finish_reason, cut[0].stop_reason) == ("stop", stop)
    completed = next(k for k in range(1, MAX_TOKENS + 1) if stop in text_of(case, plain[0].token_ids[:k]))
    assert cut[0].token_ids == plain[0].token_ids[:completed]  # up to the token that completed the stop string
    for before, after in zip(plain[1:], cut[1:]):  # the search itself did not change
        assert after.text == (before.text[:before.text.index(stop)] if stop in before.text else before.text)


def test_generate_dispatches_to_beam_search(cases):
    case = cases["gpt2"]
    params = SamplingParams(num_beams=3, n=2, max_tokens=MAX_TOKENS)
    [result] = generate(case.ours, case.tokenizer, case.prompt, params)
    assert [out.token_ids for out in result.outputs] == hf_beams(case, 3, 2)


def test_more_outputs_than_beams_is_rejected(cases):
    case = cases["gpt2"]
    with pytest.raises(ValidationError, match="num_beams=2"):
        beam_search(case.ours, case.tokenizer, case.prompt, SamplingParams(num_beams=2, n=3))
