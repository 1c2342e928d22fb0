"""Beam search: keep the `num_beams` most likely partial outputs instead of one, and extend them all.

Each step scores every (beam, next token) pair by the beam's summed log-probability plus the token's,
keeps the best 2 x num_beams candidates, retires those ending in EOS as finished hypotheses (scored
sum_logprobs / generated_length ** length_penalty) and continues with the best num_beams others. One
batched session holds the beams; `session.keep(parents)` makes each beam's KV cache follow its parent.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from lmforge.errors import ValidationError
from lmforge.generation.generate import (
    CompletionOutput,
    Prompt,
    RequestOutput,
    decoder_prefixes,
    encode_prompt,
    eos_token_ids,
)
from lmforge.generation.processors import LogitsPipeline, SequenceState
from lmforge.generation.sampling_params import SamplingParams
from lmforge.generation.session import open_session
from lmforge.generation.stopping import OutputStream
from lmforge.nn.fusion import fuse_projections

UNREACHABLE = -1.0e9  # HF's score for placeholder beams: any real candidate beats it


@dataclass
class _Beam:
    """A running partial output: its generated tokens, summed log-probability and processor state."""

    token_ids: list[int]
    score: float
    state: SequenceState


@dataclass
class _Hypothesis:
    """A finished output and its length-normalised score."""

    token_ids: list[int]
    score: float


def _follow_parents(beams: list[_Beam], parents: list[int], pipeline: LogitsPipeline,
                    prefix: list[int]) -> list[SequenceState]:
    """Processor states for the children of `parents`: the first child takes its parent's state,
    any sibling gets a copy rebuilt from the parent's tokens."""
    states, taken = [], set()
    for parent in parents:
        if parent in taken:
            state = pipeline.new_state(prefix)
            state.replay(beams[parent].token_ids)
        else:
            state = beams[parent].state
            taken.add(parent)
        states.append(state)
    return states


def _ranked_candidates(log_probs: torch.Tensor, beams: list[_Beam], count: int, length: int,
                       length_penalty: float) -> list[tuple[int, int, float, float]]:
    """The `count` best (parent beam, token, summed log-prob, length-normalised score), best first.
    Scores stay float32 tensors until the end, as in HF, so ties and comparisons come out the same."""
    scores = torch.tensor([beam.score for beam in beams], device=log_probs.device)
    top, index = (log_probs + scores[:, None]).view(-1).topk(count)
    normalised = top / length ** length_penalty
    vocab = log_probs.shape[-1]
    return list(zip((index // vocab).tolist(), (index % vocab).tolist(), top.tolist(), normalised.tolist()))


def beam_search(model, tokenizer, prompt: Prompt, params: SamplingParams) -> RequestOutput:
    """Beam search over one prompt; returns the best `params.n` finished hypotheses, best first.

    Matches Hugging Face transformers' `generate(num_beams=..., do_sample=False, early_stopping=False)`:
    logits processors act on the log-softmax scores, the top 2 x num_beams candidates are considered
    (more with several EOS ids), only candidates ranked within the top num_beams may finish, and the
    search stops at max_tokens or once num_beams hypotheses are finished and the best running beam,
    normalised by its current length, cannot beat the worst of them. `stop_token_ids` end hypotheses
    like extra EOS ids. Stop strings do not steer the search: each final text is cut at its first
    stop string afterwards.
    """
    num_beams = params.num_beams
    if params.n > num_beams:
        raise ValidationError(f"SamplingParams.n must not exceed num_beams={num_beams} with beam search "
                              f"(only num_beams hypotheses are kept), got {params.n}.")
    prompt_ids = encode_prompt(tokenizer, prompt)
    prefix = decoder_prefixes(model, [prompt_ids])[0]  # what the processors see as the sequence so far (as HF)
    room = model.context_window - len(prefix)
    max_new = min(params.max_tokens or room, room)
    eos = [] if params.ignore_eos else eos_token_ids(model, tokenizer)
    finish_ids = set(eos) | set(params.stop_token_ids or [])
    count = max(2, 1 + len(finish_ids)) * num_beams  # enough candidates that num_beams of them keep running
    pipeline = LogitsPipeline.from_params(params, eos, tokenizer)

    fuse_projections(model)
    with torch.inference_mode():
        session = open_session(model, [prompt_ids], max_new)  # one prompt: no padding
        logits = session.prefill()
        # Every beam starts as the prompt; all but the first are placeholders, so step one extends only it.
        session.keep(torch.zeros(num_beams, dtype=torch.long, device=logits.device))
        logits = logits.expand(num_beams, -1)
        beams = [_Beam([], 0.0 if b == 0 else UNREACHABLE, pipeline.new_state(prefix)) for b in range(num_beams)]
        finished: list[_Hypothesis] = []
        for length in range(1, max_new + 1):  # `length` = tokens generated once this step's token is added
            log_probs = logits.log_softmax(-1)
            if pipeline.processors:
                log_probs = torch.stack([pipeline(log_probs[b], beam.state) for b, beam in enumerate(beams)])
            running: list[tuple[int, int, float, float]] = []
            for rank, (parent, token, score, normalised) in enumerate(
                    _ranked_candidates(log_probs, beams, count, length, params.length_penalty)):
                if token in finish_ids or length == max_new:
                    if rank < num_beams:  # lower-ranked candidates only back up the running beams
                        finished.append(_Hypothesis(beams[parent].token_ids + [token], normalised))
                elif len(running) < num_beams:
                    running.append((parent, token, score, normalised))
            finished = sorted(finished, key=lambda h: h.score, reverse=True)[:num_beams]
            if length == max_new or (len(finished) == num_beams and running[0][3] <= finished[-1].score):
                break  # out of room, or no running beam, scored at its current length, beats the worst finished
            parents = [parent for parent, *_ in running]
            states = _follow_parents(beams, parents, pipeline, prefix)
            beams = [_Beam(beams[parent].token_ids + [token], score, state)
                     for (parent, token, score, _), state in zip(running, states)]
            for beam in beams:
                beam.state.accept(beam.token_ids[-1])
            session.keep(torch.tensor(parents, device=logits.device))
            logits = session.step(torch.tensor([beam.token_ids[-1] for beam in beams], device=logits.device))

    # A decoder-only output continues the prompt's text; an encoder-decoder output is a text of its own.
    text_context = None if getattr(model.config, "is_encoder_decoder", False) else prompt_ids
    result = RequestOutput(prompt if isinstance(prompt, str) else None, prompt_ids)
    for index, hypothesis in enumerate(finished[:params.n]):
        output = OutputStream(tokenizer, params, eos, len(prefix), model.context_window, text_context)
        for token in hypothesis.token_ids:
            if output.append(token).finished:
                break
        result.outputs.append(CompletionOutput(index, output.text, list(output.token_ids), output.finish_reason,
                                               output.stop_reason))
    return result
