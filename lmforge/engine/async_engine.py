"""AsyncLLMEngine: the engine for servers — requests arrive at any time and stream their tokens back.

A background thread steps the `LLMEngine` whenever it has work, so new requests join the running
batch at the next step (continuous batching). Each request gets an async stream of deltas: every
item is a `RequestOutput` whose completions carry only the text and token ids produced since the
previous item (vLLM's DELTA output kind); the last one has `finished=True` and the finish reason.

    engine = AsyncLLMEngine.from_pretrained("smollm2-135m-instruct", EngineConfig(max_model_len=2048))
    async for delta in engine.add_request("r1", "Hello", SamplingParams(max_tokens=20)):
        print(delta.outputs[0].text, end="")

The engine is shared by one thread that steps it and the callers that add or abort requests; a
lock makes each of those one atomic operation, so a request is added or aborted between steps.
"""

from __future__ import annotations

import asyncio
import dataclasses
import threading
from collections.abc import Sequence

import torch

from lmforge.engine.config import EngineConfig
from lmforge.engine.llm_engine import EngineStats, LLMEngine
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
        self.engine = engine
        self._lock = threading.Lock()
        self._work = threading.Event()  # set when a request arrives
        self._streams: dict[str, RequestStream] = {}
        self._closed = False
        self._thread = threading.Thread(target=self._loop, name="lmforge-engine", daemon=True)
        self._thread.start()

    @classmethod
    def from_pretrained(cls, ref: str, config: EngineConfig | None = None,
                        dtype: torch.dtype = torch.float32) -> AsyncLLMEngine:
        return cls(LLMEngine.from_pretrained(ref, dtype, config))

    def add_request(self, request_id: str, prompt: str | Sequence[int],
                    params: SamplingParams | None = None) -> RequestStream:
        """Queue a request and return its stream of deltas. Must be called from a running event loop;
        bad input raises here, before anything is queued."""
        if self._closed:
            raise RuntimeError("this AsyncLLMEngine was shut down; create a new one.")
        stream = RequestStream(self, request_id)
        with self._lock:
            self.engine.add_request(request_id, prompt, params)
            self._streams[request_id] = stream
        self._work.set()
        return stream

    def abort(self, request_id: str) -> None:
        """Cancel a request; its stream ends with finish_reason "abort". Unknown or finished ids are ignored."""
        with self._lock:
            output = self.engine.abort_request(request_id)
            stream = self._streams.pop(request_id, None)
        if output is not None and stream is not None:
            stream._deliver(output)

    @property
    def stats(self) -> EngineStats:
        with self._lock:
            return self.engine.stats

    def shutdown(self) -> None:
        """Stop the engine thread; unfinished streams end with an error."""
        self._closed = True
        self._work.set()
        self._thread.join()
        with self._lock:
            streams, self._streams = list(self._streams.values()), {}
        for stream in streams:
            stream._push(RuntimeError("the engine was shut down before this request finished."))

    def _loop(self) -> None:
        while not self._closed:
            with self._lock:
                busy = self.engine.has_unfinished_requests()
                if not busy:
                    self._work.clear()  # under the lock: a request added after this sets it again
            if not busy:
                self._work.wait()
                continue
            with self._lock:
                try:
                    outputs = self.engine.step()
                except Exception as exc:  # fail the requests of this batch, keep serving the others
                    self._fail_all(exc)
                    continue
                deliveries = [(self._streams.get(out.request_id), out) for out in outputs]
                for out in outputs:
                    if out.finished:
                        self._streams.pop(out.request_id, None)
            for stream, output in deliveries:
                if stream is not None:
                    stream._deliver(output)

    def _fail_all(self, exc: Exception) -> None:
        """After a failed step nothing in flight can be trusted: abort every request with the error."""
        for request_id, stream in list(self._streams.items()):
            self.engine.abort_request(request_id)
            stream._push(exc)
        self._streams.clear()
