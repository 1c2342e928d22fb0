"""Generation: run the frozen model one token at a time until every sequence stops.

Each step: the model's next-token logits → the logits pipeline (penalties,
temperature, top-k/top-p/min-p, ...) → the sampler picks a token → the output
stream detokenizes it and applies the stop rules. The KV cache means each step
runs only the new token; finished sequences leave the batch at once.

`generate` returns vLLM-shaped `RequestOutput`s; `stream` yields text deltas.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field

import torch

from lmforge.errors import InputError
from lmforge.generation.processors import LogitsPipeline, Observer, SequenceState
from lmforge.generation.sampler import Sampler, TokenLogprob, sample_next_tokens
from lmforge.generation.sampling_params import SamplingParams
from lmforge.generation.session import open_session
from lmforge.generation.stopping import OutputStream, StepResult
from lmforge.nn.fusion import fuse_projections

Prompt = str | Sequence[int]


@dataclass
class CompletionOutput:
    """One generated continuation of a prompt."""

    index: int
    text: str
    token_ids: list[int]
    finish_reason: str | None
    stop_reason: str | int | None = None
    logprobs: list[TokenLogprob] | None = None


@dataclass
class RequestMetrics:
    """When a request's milestones happened (time.perf_counter seconds) and the latencies they give."""

    arrival_time: float
    first_scheduled_time: float | None = None
    first_token_time: float | None = None
    last_token_time: float | None = None
    finished_time: float | None = None
    num_output_tokens: int = 0  # of the longest completion (with n > 1 they are generated side by side)

    @property
    def time_to_first_token(self) -> float | None:
        return None if self.first_token_time is None else self.first_token_time - self.arrival_time

    @property
    def time_per_output_token(self) -> float | None:
        """Mean time between consecutive output tokens after the first (inter-token latency)."""
        if self.first_token_time is None or self.num_output_tokens < 2:
            return None
        return (self.last_token_time - self.first_token_time) / (self.num_output_tokens - 1)


@dataclass
class RequestOutput:
    """A prompt and its `n` completions (the engine also fills request_id, finished and metrics)."""

    prompt: str | None
    prompt_token_ids: list[int]
    outputs: list[CompletionOutput] = field(default_factory=list)
    request_id: str | None = None
    finished: bool = True
    metrics: RequestMetrics | None = None


@dataclass
class _Sequence:
    """Everything one generating row carries between steps."""

    request: int
    index: int
    prompt_token_ids: list[int]
    params: SamplingParams
    pipeline: LogitsPipeline
    sampling_state: SequenceState
    sampler: Sampler
    output: OutputStream
    logprobs: list[TokenLogprob] | None


def eos_token_ids(model, tokenizer) -> list[int]:
    """End-of-sequence ids from the model config and the tokenizer (either may list several)."""
    configured = getattr(model.config, "eos_token_id", None)
    ids = set(configured if isinstance(configured, list) else [configured] if configured is not None else [])
    if tokenizer is not None and tokenizer.eos_token_id is not None:
        ids.add(tokenizer.eos_token_id)
    return sorted(ids)


def prompt_list(prompts) -> list:
    """One prompt (text or token ids) or a batch of them, as a list of prompts."""
    if isinstance(prompts, str) or (len(prompts) > 0 and isinstance(prompts[0], int)):
        return [prompts]
    return list(prompts)


def encode_prompt(tokenizer, prompt: Prompt) -> list[int]:
    """Token ids of a prompt given as text or ids. An empty prompt starts from BOS when there is one."""
    ids = list(prompt) if not isinstance(prompt, str) else tokenizer.encode(prompt)
    if not ids:
        bos = tokenizer.bos_token_id if tokenizer is not None else None
        if bos is None:
            raise InputError("the prompt is empty and this model has no BOS token to start from; "
                             "pass at least one token of text.")
        ids = [bos]
    return ids


def decoder_prefixes(model, prompts: list[list[int]]) -> list[list[int]]:
    """What the decoder has seen before its first new token, per prompt.

    A decoder-only model continues the prompt itself; an encoder–decoder model reads the
    prompt through its encoder and decodes from the start token alone. Checks the prompts
    leave room to generate.
    """
    context = model.context_window
    seq2seq = getattr(model.config, "is_encoder_decoder", False)
    for i, ids in enumerate(prompts):
        if len(ids) > context or (len(ids) == context and not seq2seq):
            raise InputError(f"prompt {i} has {len(ids)} tokens but the model's context window is {context} "
                             "tokens, leaving no room to generate; shorten the prompt.")
    if seq2seq:
        return [[model.config.decoder_start_token_id] for _ in prompts]
    return prompts


def generate_steps(model, tokenizer, prompts: Sequence[Prompt], params: SamplingParams,
                   observer: Observer | None = None) -> Iterator[tuple[_Sequence, StepResult]]:
    """The generation loop: yields (sequence, step result) for every token of every sequence.

    `observer(processor_name, logits_before, logits_after)` sees each logits processor at work.
    """
    if params.num_beams > 1:
        raise InputError("beam search does not stream; call lmforge.generation.beam_search instead.")
    prompt_ids = [encode_prompt(tokenizer, p) for p in prompts]
    prefixes = decoder_prefixes(model, prompt_ids)
    context = model.context_window
    room = context - max(len(prefix) for prefix in prefixes)
    max_new = min(params.max_tokens or room, room)
    row_params = params if params.max_tokens == max_new else dataclasses.replace(params, max_tokens=max_new)
    eos = eos_token_ids(model, tokenizer)
    pipeline = LogitsPipeline.from_params(params, [] if params.ignore_eos else eos, tokenizer)

    sequences, rows = [], []
    for request, (ids, prefix) in enumerate(zip(prompt_ids, prefixes)):
        for index in range(params.n):
            seed = None if params.seed is None else params.seed + index
            sampler = Sampler(dataclasses.replace(params, seed=seed) if seed != params.seed else params,
                              device=model.device)
            context_ids = prefix if prefix is ids else None  # detokenize as a continuation of the prompt
            output = OutputStream(tokenizer, row_params, eos, len(prefix), context, context_ids)
            sequences.append(_Sequence(request, index, ids, params, pipeline, pipeline.new_state(prefix), sampler,
                                       output, [] if params.logprobs is not None else None))
            rows.append(ids)

    pad = tokenizer.pad_token_id if tokenizer is not None and tokenizer.pad_token_id is not None else 0
    fuse_projections(model)  # one matmul for q/k/v and for gate/up; the canonical weights stay in place
    with torch.inference_mode():
        session = open_session(model, rows, max_new, pad)
        logits = session.prefill()
        active = sequences
        while True:
            tokens = sample_next_tokens(logits, active, observer)
            keep = []
            for r, (seq, token) in enumerate(zip(active, tokens)):
                step = seq.output.append(token)
                yield seq, step
                if not step.finished:
                    keep.append(r)
            if not keep:
                return
            if len(keep) < len(active):  # finished rows leave the batch and stop costing compute
                session.keep(torch.tensor(keep, device=logits.device))
                active, tokens = [active[r] for r in keep], [tokens[r] for r in keep]
            logits = session.step(torch.tensor(tokens, device=logits.device))


def generate(model, tokenizer, prompts: Prompt | Sequence[Prompt], params: SamplingParams | None = None,
             observer: Observer | None = None) -> list[RequestOutput]:
    """Complete one prompt or a batch (text or token ids); returns one RequestOutput per prompt."""
    params = params or SamplingParams()
    prompts = prompt_list(prompts)
    if not prompts:
        return []
    if params.num_beams > 1:
        from lmforge.generation.beam_search import beam_search

        return [beam_search(model, tokenizer, prompt, params) for prompt in prompts]
    finished: dict[tuple[int, int], _Sequence] = {}
    for seq, step in generate_steps(model, tokenizer, prompts, params, observer):
        if step.finished:
            finished[(seq.request, seq.index)] = seq
    results = []
    for request, prompt in enumerate(prompts):
        first = finished[(request, 0)]
        result = RequestOutput(prompt if isinstance(prompt, str) else None, first.prompt_token_ids)
        for index in range(params.n):
            seq = finished[(request, index)]
            result.outputs.append(CompletionOutput(index, seq.output.text, list(seq.output.token_ids),
                                                   seq.output.finish_reason, seq.output.stop_reason, seq.logprobs))
        results.append(result)
    return results


def stream(model, tokenizer, prompt: Prompt, params: SamplingParams | None = None,
           observer: Observer | None = None) -> Iterator[str]:
    """Yield the generated text of one prompt as it is produced (deltas concatenate to the full text)."""
    params = params or SamplingParams()
    if params.n != 1:
        raise InputError(f"stream() follows one completion; got n={params.n}. Use generate() for several.")
    for _, step in generate_steps(model, tokenizer, [prompt], params, observer):
        if step.delta:
            yield step.delta
