"""Sampling decisions, step by step: what the model proposed, what each logits processor did, what was chosen.

At every step the model scores the whole vocabulary (logits); the logits processors then reshape those
scores — penalties push repeated tokens down, temperature sharpens or flattens, top-k / top-p / min-p cut
the tail to -inf — and the sampler picks one token (the argmax when greedy, a seeded draw otherwise).
`trace_generation` runs the same pieces as `generate` (the same pipeline, sampler, KV-cache session and
stop rules) for one prompt, and records each stage's top candidates with their logits and probabilities,
so the path from "the model's guess" to "the chosen word" can be read off a table.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass

import torch
from torch import Tensor

from lmforge.generation.generate import decoder_prefixes, eos_token_ids
from lmforge.generation.processors import LogitsPipeline
from lmforge.generation.sampler import Sampler, sample_batch
from lmforge.generation.sampling_params import SamplingParams
from lmforge.generation.session import open_session
from lmforge.generation.stopping import OutputStream
from lmforge.nn.fusion import fuse_projections

MODEL_STAGE = "model"  # the raw logits, before any processor


@dataclass(frozen=True)
class Candidate:
    token_id: int
    token: str
    logit: float
    probability: float


@dataclass(frozen=True)
class Stage:
    """The distribution after one stage: its top candidates, the chosen token's logit and probability, and how
    many tokens are still possible (finite logits)."""

    name: str
    top: list[Candidate]
    chosen_logit: float
    chosen_probability: float
    possible: int


@dataclass(frozen=True)
class SamplingStep:
    position: int  # index of the generated token in the output
    chosen: Candidate  # with its probability under the final stage (what the sampler drew from)
    stages: list[Stage]  # "model" first, then each processor in pipeline order
    greedy: bool


def _stage(name: str, logits: Tensor, chosen: int, top: int, tokenizer) -> Stage:
    probabilities = logits.double().softmax(-1)
    values, ids = logits.topk(min(top, logits.shape[-1]))
    candidates = [Candidate(int(i), tokenizer.decode([int(i)]), float(v), float(probabilities[i]))
                  for v, i in zip(values, ids) if torch.isfinite(v)]
    return Stage(name, candidates, float(logits[chosen]), float(probabilities[chosen]),
                 int(torch.isfinite(logits).sum()))


def trace_generation(model, tokenizer, prompt_ids: list[int], params: SamplingParams, top: int = 10
                     ) -> tuple[list[SamplingStep], OutputStream]:
    """Generate from `prompt_ids` exactly as `generate` does (n = 1), recording every step's decision."""
    params = dataclasses.replace(params, n=1, num_beams=1)
    prefix = decoder_prefixes(model, [prompt_ids])[0]
    room = model.context_window - len(prefix)
    max_new = min(params.max_tokens or room, room)
    eos = eos_token_ids(model, tokenizer)
    pipeline = LogitsPipeline.from_params(params, [] if params.ignore_eos else eos, tokenizer)
    state = pipeline.new_state(prefix)
    sampler = Sampler(params, device=model.device)
    output = OutputStream(tokenizer, dataclasses.replace(params, max_tokens=max_new), eos, len(prefix),
                          model.context_window, prefix if prefix is prompt_ids else None)
    fuse_projections(model)  # the same numerics as generate
    steps: list[SamplingStep] = []
    with torch.inference_mode():
        session = open_session(model, [prompt_ids], max_new,
                               tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0)
        logits = session.prefill()
        while True:
            raw = logits[0]
            after: list[tuple[str, Tensor]] = [(MODEL_STAGE, raw.float().clone())]
            processed = pipeline(raw, state, lambda name, before, result: after.append((name, result)))
            token = sample_batch(processed.unsqueeze(0), [sampler])[0]
            state.accept(token)
            stages = [_stage(name, stage_logits, token, top, tokenizer) for name, stage_logits in after]
            final = stages[-1]
            steps.append(SamplingStep(len(steps), Candidate(token, tokenizer.decode([token]), final.chosen_logit,
                                                            final.chosen_probability), stages, params.greedy))
            if output.append(token).finished:
                return steps, output
            logits = session.step(torch.tensor([token], device=logits.device))
