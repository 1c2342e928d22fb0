"""AsyncLLMEngine: the engine for servers — requests arrive at any time and stream their tokens back.

A background thread steps the `LLMEngine` whenever it has work, so new requests join the running
batch at the next step (continuous batching). Each request gets an async stream of deltas: every
item is a `RequestOutput` whose completions carry only the text and token ids produced since the
previous item (vLLM's DELTA output kind); the last one has `finished=True` and the finish reason.

    engine = AsyncLLMEngine.from_pretrained("smollm2-135m-instruct", EngineConfig(max_model_len=2048))
    async for delta in engine.add_request("r1", "Hello", SamplingParams(max_tokens=20)):
        print(delta.outputs[0].text, end="")

Only the engine thread touches the engine's queues. Callers validate and tokenize their request
in their own thread, then hand it over (and abort requests) through a short lock that is never
held during a step: the event loop never waits for the model. Hand-overs take effect between
steps, so an abort frees its KV blocks before the next step runs.
"""

from __future__ import annotations

import asyncio
import dataclasses
import threading
from collections.abc import Sequence

import torch

from lmforge.engine.config import EngineConfig
from lmforge.engine.llm_engine import EngineRequest, EngineStats, LLMEngine
from lmforge.errors import InputError
from lmforge.generation.generate import RequestOutput
from lmforge.generation.sampling_params import SamplingParams

_END = object()  # closes a stream


class RequestStream:
    """Async iterator over one request's deltas; leaving it early (or `aclose()`) aborts the request."""

    def __init__(self, engine: AsyncLLMEngine, request_id: str):
        self.request_id = request_id
        self._engine = engine
        self._loop = asyncio.get_running_loop()
        self._queue: asyncio.Queue = asyncio.Queue()
        self._sent: dict[int, tuple[int, int, int]] = {}  # completion index -> (chars, tokens, logprobs) sent
        self.finished = False

    def __aiter__(self) -> RequestStream:
        return self

    async def __anext__(self) -> RequestOutput:
        item = await self._queue.get()
        if item is _END:
            raise StopAsyncIteration
        if isinstance(item, BaseException):
            self.finished = True
            raise item
        return item

    async def aclose(self) -> None:
        """Stop listening; an unfinished request is aborted so its KV blocks are freed."""
        if not self.finished:
            self._engine.abort(self.request_id)

    def _push(self, item) -> None:
        """Called from the engine thread: hand an item to the caller's event loop."""
        try:
            self._loop.call_soon_threadsafe(self._queue.put_nowait, item)
        except RuntimeError:  # the caller's loop is closed: nobody listens any more
            pass

    def _deliver(self, output: RequestOutput) -> None:
        """Turn a cumulative output into a delta (what is new since the last one) and send it."""
        completions = []
        for completion in output.outputs:
            chars, tokens, logprobs = self._sent.get(completion.index, (0, 0, 0))
            delta = dataclasses.replace(
                completion, text=completion.text[chars:], token_ids=completion.token_ids[tokens:],
                logprobs=None if completion.logprobs is None else completion.logprobs[logprobs:])
            self._sent[completion.index] = (len(completion.text), len(completion.token_ids),
                                            len(completion.logprobs or ()))
            if delta.text or delta.token_ids or completion.finish_reason:
                completions.append(delta)
        self._push(dataclasses.replace(output, outputs=completions))
        if output.finished:
            self.finished = True
            self._push(_END)


class AsyncLLMEngine:
    def __init__(self, engine: LLMEngine):
        self.engine = engine  # stepped by the engine thread only
        self._lock = threading.Lock()  # guards the hand-over lists below; never held during a step
        self._arrivals: list[tuple[EngineRequest, RequestStream]] = []
        self._aborts: list[str] = []
        self._streams: dict[str, RequestStream] = {}  # every request not finished yet, queued or running
        self._work = threading.Event()  # set when there is something to hand over
        self._closed = False
        self._thread = threading.Thread(target=self._loop, name="lmforge-engine", daemon=True)
        self._thread.start()

    @classmethod
    def from_pretrained(cls, ref: str, config: EngineConfig | None = None, dtype: str | torch.dtype = "auto",
                        quantization: str | None = None, tensor_parallel_size: int = 1) -> AsyncLLMEngine:
        return cls(LLMEngine.from_pretrained(ref, dtype, config, quantization, tensor_parallel_size))

    def add_request(self, request_id: str, prompt: str | Sequence[int],
                    params: SamplingParams | None = None) -> RequestStream:
        """Queue a request and return its stream of deltas. Must be called from a running event loop;
        bad input raises here, before anything is queued. Never waits for the engine's current step."""
        if self._closed:
            raise RuntimeError("this AsyncLLMEngine was shut down; create a new one.")
        request = self.engine.prepare_request(request_id, prompt, params)  # validation, tokenization
        stream = RequestStream(self, request_id)
        with self._lock:
            if request_id in self._streams:
                raise InputError(f"request id {request_id!r} is already in use; give every request a unique id.")
            self._streams[request_id] = stream
            self._arrivals.append((request, stream))
        self._work.set()
        return stream

    def abort(self, request_id: str) -> None:
        """Cancel a request before the next step; its stream ends with finish_reason "abort".
        Unknown or finished ids are ignored."""
        with self._lock:
            self._aborts.append(request_id)
        self._work.set()

    @property
    def stats(self) -> EngineStats:
        """The engine's figures, read without waiting for the current step (they may be mid-update)."""
        return self.engine.stats

    def shutdown(self) -> None:
        """Stop the engine thread (and tensor-parallel workers); unfinished streams end with an error."""
        self._closed = True
        self._work.set()
        self._thread.join()
        self.engine.shutdown()
        with self._lock:
            streams, self._streams = list(self._streams.values()), {}
        for stream in streams:
            stream._push(RuntimeError("the engine was shut down before this request finished."))

    def _loop(self) -> None:
        while not self._closed:
            self._hand_over()
            if not self.engine.has_unfinished_requests():
                self._work.wait()
                continue
            try:
                outputs = self.engine.step()
            except Exception as exc:  # fail the requests in flight, keep serving new ones
                self._fail_all(exc)
                continue
            for output in outputs:
                self._deliver(output)

    def _hand_over(self) -> None:
        """Between steps: queue the requests that arrived and carry out the aborts asked for."""
        with self._lock:
            arrivals, self._arrivals = self._arrivals, []
            aborts, self._aborts = self._aborts, []
            if not arrivals and not aborts and not self.engine.has_unfinished_requests():
                self._work.clear()  # under the lock: a request added after this sets it again
        for request, stream in arrivals:
            try:
                self.engine.enqueue(request)
            except Exception as exc:
                self._end(request.request_id)
                stream._push(exc)
        for request_id in aborts:
            output = self.engine.abort_request(request_id)
            if output is not None:
                self._deliver(output)

    def _deliver(self, output: RequestOutput) -> None:
        with self._lock:
            stream = self._streams.get(output.request_id)
        if stream is not None:
            stream._deliver(output)
            if output.finished:
                self._end(output.request_id)

    def _end(self, request_id: str) -> None:
        with self._lock:
            self._streams.pop(request_id, None)

    def _fail_all(self, exc: Exception) -> None:
        """After a failed step nothing in flight can be trusted: abort every request with the error."""
        for request_id in list(self.engine.requests):
            self.engine.abort_request(request_id)
            with self._lock:
                stream = self._streams.pop(request_id, None)
            if stream is not None:
                stream._push(exc)
