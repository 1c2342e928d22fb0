"""LLMEngine: requests in, tokens out — the scheduler, the model runner and sampling, one step at a time.

Each `step()` asks the scheduler for a batch (decodes and prompt chunks within the token budget),
runs it as one packed forward pass, samples one token for every sequence that reached its last
token (each request with its own logits pipeline and seeded sampler, the same code as
`lmforge.generate`), and hands the tokens back to the scheduler, which applies the stop rules and
frees finished sequences' blocks. Parallel sampling (n > 1) forks a request's siblings when its
first token is sampled, so the prompt is computed once and its blocks are shared.
"""

from __future__ import annotations

import dataclasses
import time
from collections.abc import Sequence as Seq
from dataclasses import dataclass

import torch

from lmforge.engine.block_manager import BlockManager
from lmforge.engine.config import EngineConfig
from lmforge.engine.model_runner import ModelRunner
from lmforge.engine.scheduler import Scheduler, SchedulerOutput
from lmforge.engine.sequence import Sequence
from lmforge.errors import InputError, UnsupportedError
from lmforge.generation.generate import (
    CompletionOutput,
    RequestMetrics,
    RequestOutput,
    encode_prompt,
    eos_token_ids,
)
from lmforge.generation.processors import LogitsPipeline
from lmforge.generation.sampler import Sampler, sample_next_tokens
from lmforge.generation.sampling_params import SamplingParams
from lmforge.generation.stopping import OutputStream
from lmforge.hardware import resolve_dtype
from lmforge.nn.paged_kv_cache import PagedKVCache


@dataclass
class EngineStats:
    num_running: int
    num_waiting: int
    kv_blocks_used: int
    kv_blocks_total: int
    prefix_cache_hit_rate: float  # prompt tokens served from the cache / prompt tokens looked up
    num_preemptions: int
    prompt_tokens_computed: int  # prefill work actually done (cache hits excluded)
    output_tokens: int
    tokens_per_second: float  # computed tokens (prompt + output) per second of stepping


class EngineRequest:
    """One user request: its prompt, params and the n sequences that generate its completions."""

    def __init__(self, request_id: str, prompt: str | None, prompt_token_ids: list[int], params: SamplingParams):
        self.request_id, self.prompt, self.prompt_token_ids, self.params = request_id, prompt, prompt_token_ids, params
        self.seqs: list[Sequence] = []  # index i generates completion i
        self.metrics = RequestMetrics(arrival_time=time.perf_counter())

    @property
    def finished(self) -> bool:
        return len(self.seqs) == self.params.n and all(seq.is_finished for seq in self.seqs)

    def output(self) -> RequestOutput:
        completions = [CompletionOutput(i, seq.output.text, list(seq.output_token_ids), seq.finish_reason,
                                        seq.output.stop_reason, seq.logprobs) for i, seq in enumerate(self.seqs)]
        self.metrics.num_output_tokens = max((seq.num_output_tokens for seq in self.seqs), default=0)
        return RequestOutput(self.prompt, self.prompt_token_ids, completions, self.request_id, self.finished,
                             self.metrics)


class LLMEngine:
    def __init__(self, model, tokenizer, config: EngineConfig | None = None, workers=None):
        """`workers`: the other processes of a tensor-parallel model (lmforge.engine.tensor_parallel), whose
        shard `model` is; each step runs on all of them, and this process samples."""
        if getattr(model.config, "is_encoder_decoder", False) or not hasattr(model, "lm_head"):
            raise UnsupportedError(f"the engine serves decoder-only language models; {type(model).__name__} is not "
                                   "one. Use lmforge.generate for encoder-decoder models.")
        self.config = config or EngineConfig()
        self.model, self.tokenizer = model, tokenizer
        context = model.config.context_length
        self.max_model_len = min(self.config.max_model_len or context, context)
        block_size = self.config.block_size
        num_blocks = self.config.num_kv_blocks(PagedKVCache.bytes_per_block(model, block_size), self.max_model_len,
                                               model.device)
        self.eos_token_ids = eos_token_ids(model, tokenizer)
        self.block_manager = BlockManager(num_blocks, block_size, self.config.enable_prefix_caching)
        self.scheduler = Scheduler(self.config.scheduler_config(self.max_model_len), self.block_manager,
                                   self.eos_token_ids)
        self.workers = workers
        self.runner = ModelRunner(model, num_blocks, block_size, workers)
        self.requests: dict[str, EngineRequest] = {}
        self._step_seconds = 0.0
        self._computed_tokens = self._prompt_tokens_computed = self._output_tokens = 0

    @classmethod
    def from_pretrained(cls, ref: str, dtype: str | torch.dtype = "auto", config: EngineConfig | None = None,
                        quantization: str | None = None, tensor_parallel_size: int = 1):
        """Load a model and its tokenizer (embedded short name, HF folder or GGUF file) into an engine.
        dtype "auto" is bfloat16 where this machine multiplies it natively (batched steps gain most), else float32;
        `quantization` ("int8", "int4", "nf4") quantizes the Linear layers at load time; "gguf" keeps a GGUF
        file's own 4-/8-bit blocks. `tensor_parallel_size` N > 1 splits the model over N processes
        (lmforge.engine.tensor_parallel)."""
        from lmforge.quant import load_quantized
        from lmforge.registry import AutoTokenizer

        if tensor_parallel_size != 1:
            from lmforge.engine.tensor_parallel import start_tensor_parallel_engine

            return start_tensor_parallel_engine(ref, tensor_parallel_size, None, config, dtype, quantization)
        return cls(load_quantized(ref, resolve_dtype(dtype), quantization), AutoTokenizer.from_pretrained(ref), config)

    # ----- requests ----------------------------------------------------------------------

    def add_request(self, request_id: str, prompt: str | Seq[int], params: SamplingParams | None = None) -> None:
        """Queue a prompt (text or token ids). Bad params or a prompt that can never fit fail here, at once."""
        self.enqueue(self.prepare_request(request_id, prompt, params))

    def prepare_request(self, request_id: str, prompt: str | Seq[int], params: SamplingParams | None = None
                        ) -> EngineRequest:
        """Validate and tokenize a request without touching the engine's queues (any thread may call it)."""
        params = params or SamplingParams()
        if not isinstance(params, SamplingParams):
            raise InputError(f"params must be a SamplingParams, got {type(params).__name__}.")
        if params.num_beams > 1:
            raise UnsupportedError("the engine does not run beam search; use lmforge.generate with num_beams.")
        if params.n > self.config.max_num_seqs:
            raise InputError(f"n={params.n} completions run side by side but max_num_seqs="
                             f"{self.config.max_num_seqs}; lower n or raise max_num_seqs.")
        ids = encode_prompt(self.tokenizer, prompt)
        request = EngineRequest(request_id, prompt if isinstance(prompt, str) else None, ids, params)
        pipeline = LogitsPipeline.from_params(params, [] if params.ignore_eos else self.eos_token_ids, self.tokenizer)
        seq = Sequence(ids, params, request_id)
        seq.output = OutputStream(self.tokenizer, params, self.eos_token_ids, len(ids), self.max_model_len, ids)
        self._prepare_sampling(seq, pipeline, index=0)
        self.scheduler.check(seq)  # the length against max_model_len and the pool size
        request.seqs.append(seq)
        return request

    def enqueue(self, request: EngineRequest) -> None:
        """Hand a prepared request to the scheduler; it runs from the next step on."""
        if request.request_id in self.requests:
            raise InputError(f"request id {request.request_id!r} is already in use; give every request a unique id.")
        self.scheduler.add(request.seqs[0])
        self.requests[request.request_id] = request

    def _prepare_sampling(self, seq: Sequence, pipeline: LogitsPipeline, index: int) -> None:
        params = seq.params
        if params.seed is not None and index:  # siblings draw different samples, reproducibly
            params = dataclasses.replace(params, seed=params.seed + index)
        seq.pipeline = pipeline
        seq.sampling_state = pipeline.new_state(seq.prompt_token_ids)
        seq.sampler = Sampler(params, device=self.model.device)
        seq.logprobs = [] if params.logprobs is not None else None

    def abort_request(self, request_id: str) -> RequestOutput | None:
        """Stop a request and free its blocks; returns its final output (None if unknown or finished)."""
        request = self.requests.pop(request_id, None)
        if request is None:
            return None
        self.scheduler.abort(request_id)
        request.metrics.finished_time = time.perf_counter()
        return request.output()

    def has_unfinished_requests(self) -> bool:
        return bool(self.requests)

    def shutdown(self) -> None:
        """Stop the tensor-parallel worker processes, if any (the engine cannot step afterwards)."""
        if self.workers is not None:
            self.workers.shutdown()

    # ----- one step ----------------------------------------------------------------------

    def step(self) -> list[RequestOutput]:
        """Run one batch; returns the current output of every request that got tokens (finished ones last time)."""
        start = time.perf_counter()
        out = self.scheduler.schedule()
        if out.is_empty:
            return []
        for seq, _ in out.scheduled:
            metrics = self.requests[seq.request_id].metrics
            metrics.first_scheduled_time = metrics.first_scheduled_time or start
        logits = self.runner.execute(out)
        self._count_work(out)
        rows = []  # (sequence, its logits row)
        for row, seq in enumerate(out.sampling):
            rows.append((seq, row))
            if not seq.forked and seq.params.n > 1:
                rows += [(self._fork(seq, out, index), row) for index in range(1, seq.params.n)]
        tokens = sample_next_tokens(logits, [seq for seq, _ in rows], logit_rows=[row for _, row in rows])
        self._output_tokens += len(tokens)
        self.scheduler.update(out, {seq.seq_id: token for (seq, _), token in zip(rows, tokens)})
        now = time.perf_counter()
        self._step_seconds += now - start
        outputs = []
        for request_id in dict.fromkeys(seq.request_id for seq, _ in rows):
            request = self.requests[request_id]
            request.metrics.first_token_time = request.metrics.first_token_time or now
            request.metrics.last_token_time = now
            if request.finished:
                request.metrics.finished_time = now
                del self.requests[request_id]
            outputs.append(request.output())
        return outputs

    def _fork(self, parent: Sequence, out: SchedulerOutput, index: int) -> Sequence:
        child = self.scheduler.fork(parent, out)
        self._prepare_sampling(child, parent.pipeline, index)
        self.requests[parent.request_id].seqs.append(child)
        return child

    def _count_work(self, out: SchedulerOutput) -> None:
        self._computed_tokens += out.num_batched_tokens
        self._prompt_tokens_computed += sum(max(0, min(seq.num_computed_tokens + n, seq.num_prompt_tokens)
                                                - seq.num_computed_tokens) for seq, n in out.scheduled)

    @property
    def stats(self) -> EngineStats:
        s, bm = self.scheduler.stats, self.block_manager
        rate = self._computed_tokens / self._step_seconds if self._step_seconds else 0.0
        return EngineStats(s.num_running, s.num_waiting, bm.num_used_blocks, bm.num_blocks, s.prefix_hit_rate,
                           s.num_preemptions, self._prompt_tokens_computed, self._output_tokens, rate)
