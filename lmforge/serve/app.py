"""The OpenAI-compatible HTTP server: FastAPI routes over one `AsyncLLMEngine`.

Every request becomes engine requests (one per prompt; `n` completions fork inside the engine),
so all clients share one continuous batch and one paged KV cache. The event loop only awaits:
the model runs in the engine's thread. A client that goes away — mid-stream or while waiting
for a non-streamed answer — aborts its request, which frees its KV blocks at the next step.
"""

from __future__ import annotations

import asyncio
import hmac
import json
import time
import uuid
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from pathlib import Path

from fastapi import APIRouter, Depends, FastAPI, Request
from fastapi.responses import HTMLResponse, JSONResponse, Response, StreamingResponse
from prometheus_client import CONTENT_TYPE_LATEST

from lmforge.context.model_calls import TokenUsage
from lmforge.context.rag import Retriever, ScoredChunk
from lmforge.context.tools import Tool, parse_tool_call
from lmforge.engine.async_engine import AsyncLLMEngine, RequestStream
from lmforge.generation.chat import ChatHistory
from lmforge.generation.generate import CompletionOutput, RequestOutput
from lmforge.generation.sampling_params import SamplingParams
from lmforge.serve.context import ConversationContexts
from lmforge.serve.embeddings import Embedder, encode_vector
from lmforge.serve.errors import APIError, install_error_handlers
from lmforge.serve.metrics import ResponseCounter, ServerMetrics
from lmforge.serve.protocol import (
    ChatCompletionRequest,
    CompletionRequest,
    DetokenizeRequest,
    EmbeddingRequest,
    TokenizeRequest,
)

CHAT_PAGE = Path(__file__).parent / "static" / "chat.html"


@dataclass
class ServerState:
    """What the routes share. `engine` is None while the model loads; `draining` once shutdown began."""

    model_name: str
    engine: AsyncLLMEngine | None = None
    embedder: Embedder | None = None  # serves /v1/embeddings when set
    retriever: Retriever | None = None  # the document index of the `context` extension's rag
    api_key: str | None = None
    max_queue: int | None = None  # waiting requests beyond which new ones get 429
    draining: bool = False
    created: int = field(default_factory=lambda: int(time.time()))

    @property
    def tokenizer(self):
        return self.engine.engine.tokenizer

    def ready_engine(self) -> AsyncLLMEngine:
        if self.engine is None or self.draining:
            state = "shutting down" if self.draining else "loading the model"
            raise APIError(503, f"the server is {state}; retry shortly.", type="service_unavailable",
                           headers={"Retry-After": "1"})
        return self.engine

    def check_model(self, name: str | None, served: str | None = None) -> None:
        served = served or self.model_name
        if name not in (None, "", served):
            raise APIError(404, f"model {name!r} is not served here; GET /v1/models lists what is.",
                           type="not_found_error", param="model", code="model_not_found")


def create_app(state: ServerState) -> FastAPI:
    app = FastAPI(title="lmforge", description="OpenAI-compatible API over the lmforge engine.")
    app.state.server = state
    install_error_handlers(app)
    metrics = ServerMetrics(lambda: state.engine.stats if state.engine is not None else None)
    app.add_middleware(ResponseCounter, counter=metrics.responses)
    condensed: dict[int, ConversationContexts] = {}  # per engine (the engine arrives once the model has loaded)

    def contexts(engine: AsyncLLMEngine) -> ConversationContexts:
        return condensed.setdefault(id(engine), ConversationContexts(engine, metrics))

    async def check_api_key(request: Request) -> None:
        if state.api_key is None:
            return
        header = request.headers.get("authorization", "")
        given = header[7:] if header.lower().startswith("bearer ") else ""
        if not hmac.compare_digest(given.encode(), state.api_key.encode()):  # constant time
            raise APIError(401, "missing or invalid API key; send 'Authorization: Bearer <key>'.",
                           type="authentication_error", code="invalid_api_key")

    v1 = APIRouter(prefix="/v1", dependencies=[Depends(check_api_key)])

    @app.get("/health")
    async def health() -> JSONResponse:
        if state.engine is None or state.draining:
            return JSONResponse({"status": "draining" if state.draining else "loading"}, status_code=503)
        return JSONResponse({"status": "ok"})

    @app.get("/", response_class=HTMLResponse)
    async def chat_page() -> str:
        """The web chat: plain HTML/CSS/JS from the package, no build step, nothing fetched from elsewhere."""
        return CHAT_PAGE.read_text(encoding="utf-8")

    @app.get("/stats")
    async def stats() -> dict:
        """The engine's live figures, for the chat page."""
        figures = state.ready_engine().stats
        return {"model": state.model_name, "running": figures.num_running, "waiting": figures.num_waiting,
                "kv_blocks_used": figures.kv_blocks_used, "kv_blocks_total": figures.kv_blocks_total,
                "prefix_cache_hit_rate": figures.prefix_cache_hit_rate,
                "tokens_per_second": figures.tokens_per_second}

    @app.get("/metrics")
    async def prometheus() -> Response:
        return Response(metrics.exposition(), media_type=CONTENT_TYPE_LATEST)

    @v1.get("/models")
    async def models() -> dict:
        engine = state.ready_engine()
        data = [{"id": state.model_name, "object": "model", "created": state.created, "owned_by": "lmforge",
                 "max_model_len": engine.engine.max_model_len}]
        if state.embedder is not None:
            data.append({"id": state.embedder.name, "object": "model", "created": state.created,
                         "owned_by": "lmforge", "max_model_len": state.embedder.max_length})
        return {"object": "list", "data": data}

    @v1.post("/embeddings")
    async def embeddings(body: EmbeddingRequest) -> dict:
        if state.embedder is None:
            raise APIError(404, "this server has no embedding model; start it with --embedding-model.",
                           type="not_found_error", param="model", code="model_not_found")
        state.check_model(body.model, state.embedder.name)
        inputs = body.inputs()
        if not inputs or any(len(item) == 0 for item in inputs):
            raise APIError(400, "input must be a non-empty string or token list (or a list of them).", param="input")
        vectors, tokens = await state.embedder.embed(inputs)
        data = [{"object": "embedding", "index": i, "embedding": encode_vector(vector, body.encoding_format)}
                for i, vector in enumerate(vectors)]
        return {"object": "list", "data": data, "model": state.embedder.name,
                "usage": {"prompt_tokens": tokens, "total_tokens": tokens}}

    @v1.post("/chat/completions")
    async def chat_completions(body: ChatCompletionRequest, request: Request):
        engine = state.ready_engine()
        state.check_model(body.model)
        params = body.sampling_params(default_max_tokens=None)
        text, context_usage, passages = await _chat_prompt(state, contexts(engine), body, params)
        prompt_ids = state.tokenizer.encode(text, add_special_tokens=False)
        request_id = f"chatcmpl-{uuid.uuid4().hex}"
        stream = _submit(state, engine, request_id, prompt_ids, params)
        meta = {"id": request_id, "created": int(time.time()), "model": state.model_name}
        # lmforge's extension: the numbered sources a rag prompt carried
        sources = {} if passages is None else {"sources": [
            {"number": n, "source": p.chunk.source, "score": round(p.score, 4), "text": p.chunk.text}
            for n, p in enumerate(passages, 1)]}
        tools = body.callable_tools()
        if body.stream:
            include_usage = bool(body.stream_options and body.stream_options.include_usage)
            return _sse(_chat_chunks(state, metrics, stream, meta, params.n, len(prompt_ids), include_usage, tools,
                                     context_usage, sources))
        final = await _collect([stream], request, metrics)
        return {**_chat_response(state, final[0], meta, tools, context_usage), **sources}

    @v1.post("/completions")
    async def completions(body: CompletionRequest, request: Request):
        engine = state.ready_engine()
        state.check_model(body.model)
        params = body.sampling_params()
        request_id = f"cmpl-{uuid.uuid4().hex}"
        prompts = [p if not isinstance(p, str) else state.tokenizer.encode(p) for p in body.prompts()]
        streams = []
        try:
            for i, prompt in enumerate(prompts):
                streams.append(_submit(state, engine, f"{request_id}-{i}", prompt, params))
        except BaseException:
            for stream in streams:
                await stream.aclose()
            raise
        meta = {"id": request_id, "created": int(time.time()), "model": state.model_name}
        if body.stream:
            include_usage = bool(body.stream_options and body.stream_options.include_usage)
            return _sse(_completion_chunks(state, metrics, streams, meta, body, prompts, include_usage))
        finals = await _collect(streams, request, metrics)
        return _completion_response(state, finals, meta, body, prompts)

    @app.post("/tokenize")
    async def tokenize(body: TokenizeRequest) -> dict:
        state.ready_engine()
        if (body.prompt is None) == (body.messages is None):
            raise APIError(400, "send exactly one of 'prompt' or 'messages'.", param="prompt")
        if body.messages is not None:
            text = state.tokenizer.apply_chat_template(
                [{"role": m.role, "content": m.text()} for m in body.messages], add_generation_prompt=True)
            tokens = state.tokenizer.encode(text, add_special_tokens=False)
        else:
            tokens = state.tokenizer.encode(body.prompt, add_special_tokens=body.add_special_tokens)
        return {"tokens": tokens, "count": len(tokens), "max_model_len": state.engine.engine.max_model_len}

    @app.post("/detokenize")
    async def detokenize(body: DetokenizeRequest) -> dict:
        state.ready_engine()
        vocab = state.tokenizer.vocab_size
        bad = [t for t in body.tokens if not 0 <= t < vocab]
        if bad:
            raise APIError(400, f"token ids {bad[:5]} are outside the vocabulary [0, {vocab}).", param="tokens")
        return {"prompt": state.tokenizer.decode(body.tokens)}

    app.include_router(v1)
    return app


# ----- engine plumbing ---------------------------------------------------------------------


def _submit(state: ServerState, engine: AsyncLLMEngine, request_id: str, prompt, params: SamplingParams
            ) -> RequestStream:
    if state.max_queue is not None and engine.stats.num_waiting >= state.max_queue:
        raise APIError(429, f"the server queue is full ({state.max_queue} requests waiting); retry later.",
                       type="rate_limit_error", code="queue_full", headers={"Retry-After": "1"})
    return engine.add_request(request_id, prompt, params)


async def _collect(streams: list[RequestStream], request: Request, metrics: ServerMetrics) -> list[RequestOutput]:
    """Wait for every stream's whole output; abort them all if the client disconnects meanwhile."""

    async def watch_disconnect() -> None:
        while not await request.is_disconnected():
            await asyncio.sleep(0.1)
        for stream in streams:
            await stream.aclose()

    watcher = asyncio.create_task(watch_disconnect())
    try:
        outputs = []
        for stream in streams:
            outputs.append(_merge([delta async for delta in metrics.track(stream)]))
        return outputs
    finally:
        watcher.cancel()


def _merge(deltas: list[RequestOutput]) -> RequestOutput:
    """The whole output from a stream's deltas."""
    completions: dict[int, CompletionOutput] = {}
    for delta in deltas:
        for part in delta.outputs:
            whole = completions.setdefault(part.index, CompletionOutput(part.index, "", [], None, None,
                                                                        None if part.logprobs is None else []))
            whole.text += part.text
            whole.token_ids += part.token_ids
            whole.finish_reason, whole.stop_reason = part.finish_reason, part.stop_reason
            if part.logprobs is not None:
                whole.logprobs += part.logprobs
    last = deltas[-1]
    return RequestOutput(last.prompt, last.prompt_token_ids, [completions[i] for i in sorted(completions)],
                         last.request_id, last.finished, last.metrics)


def _sse(events: AsyncIterator[dict | str]) -> StreamingResponse:
    async def body() -> AsyncIterator[str]:
        async for event in events:
            yield f"data: {event if isinstance(event, str) else json.dumps(event)}\n\n"

    return StreamingResponse(body(), media_type="text/event-stream", headers={"Cache-Control": "no-cache"})


def _finish_reason(reason: str | None) -> str | None:
    return "stop" if reason == "abort" else reason


async def _chat_prompt(state: ServerState, contexts: ConversationContexts, body: ChatCompletionRequest,
                       params: SamplingParams) -> tuple[str, TokenUsage | None, list[ScoredChunk] | None]:
    """The conversation rendered by the chat template — with a `context` strategy, only the part it selects —,
    the tokens the model spent condensing it (None when no model call was needed) and the retrieved passages
    in it (None without rag)."""
    template_vars = body.template_vars(state.tokenizer)
    if body.context is None:
        return state.tokenizer.apply_chat_template(body.conversation(), add_generation_prompt=True,
                                                   **template_vars), None, None
    history = ChatHistory.from_json(body.conversation(), "messages")
    selected, spent = await contexts.select(history, body.context, params.max_tokens or 0, state.retriever)
    return selected.history.to_prompt(state.tokenizer, **template_vars), spent, getattr(selected, "passages", None)


def _usage(prompt_tokens: int, completion_tokens: int, context: TokenUsage | None = None) -> dict:
    """OpenAI's usage; with a summarize/state context, `context_tokens` adds what condensing it cost."""
    usage = {"prompt_tokens": prompt_tokens, "completion_tokens": completion_tokens,
             "total_tokens": prompt_tokens + completion_tokens}
    if context is not None:
        usage["context_tokens"] = {"prompt_tokens": context.prompt, "completion_tokens": context.generated}
    return usage


def _token_text(state: ServerState, token_id: int) -> str:
    return state.tokenizer.decode([token_id])


# ----- chat completions ----------------------------------------------------------------------


def _chat_logprobs(state: ServerState, completion: CompletionOutput) -> dict | None:
    if completion.logprobs is None:
        return None

    def entry(token_id: int, logprob: float) -> dict:
        text = _token_text(state, token_id)
        return {"token": text, "logprob": logprob, "bytes": list(text.encode())}

    return {"content": [{**entry(lp.token_id, lp.logprob), "top_logprobs": [entry(t, v) for t, v in lp.top]}
                        for lp in completion.logprobs]}


def _assistant_message(text: str, tools: list[Tool]) -> tuple[dict, bool]:
    """The answer as an assistant message — a tool call when it is one — and whether it is."""
    call = parse_tool_call(text, tools) if tools else None
    if call is None:
        return {"role": "assistant", "content": text}, False
    return {"role": "assistant", "content": None, "tool_calls": [call.to_openai()]}, True


def _chat_response(state: ServerState, output: RequestOutput, meta: dict, tools: list[Tool],
                   context_usage: TokenUsage | None) -> dict:
    choices = []
    for c in output.outputs:
        message, called = _assistant_message(c.text, tools)
        choices.append({"index": c.index, "message": message, "logprobs": _chat_logprobs(state, c),
                        "finish_reason": "tool_calls" if called else _finish_reason(c.finish_reason)})
    completion_tokens = sum(len(c.token_ids) for c in output.outputs)
    return {**meta, "object": "chat.completion", "choices": choices,
            "usage": _usage(len(output.prompt_token_ids), completion_tokens, context_usage)}


async def _chat_chunks(state: ServerState, metrics: ServerMetrics, stream: RequestStream, meta: dict, n: int,
                       prompt_tokens: int, include_usage: bool, tools: list[Tool],
                       context_usage: TokenUsage | None, sources: dict) -> AsyncIterator[dict | str]:
    """Stream the answer's text as it comes. With tools, an answer that starts with "{" may be a call: it is
    held back until it is complete and then sent as one `tool_calls` delta (or as text, if it is no call)."""

    def chunk(choices: list[dict], **extra) -> dict:
        return {**meta, "object": "chat.completion.chunk", "choices": choices, **extra}

    completion_tokens = 0
    held: dict[int, str] = {}  # choice index → text of a possible tool call
    streamed: set[int] = set()  # choices whose text has begun to go out: no call any more
    try:
        yield chunk([{"index": i, "delta": {"role": "assistant", "content": ""}, "logprobs": None,
                      "finish_reason": None} for i in range(n)], **sources)
        async for delta in metrics.track(stream):
            for part in delta.outputs:
                completion_tokens += len(part.token_ids)
                text, finish_reason = part.text, _finish_reason(part.finish_reason)
                if tools and (part.index in held or (part.index not in streamed and text.startswith("{"))):
                    held[part.index] = held.get(part.index, "") + text
                    if finish_reason is None:
                        continue
                    message, called = _assistant_message(held[part.index], tools)
                    if called:
                        calls = [{"index": 0, **call} for call in message["tool_calls"]]
                        yield chunk([{"index": part.index, "delta": {"tool_calls": calls}, "logprobs": None,
                                      "finish_reason": "tool_calls"}])
                        continue
                    text = held[part.index]
                if text:
                    streamed.add(part.index)
                yield chunk([{"index": part.index, "delta": {"content": text} if text else {},
                              "logprobs": _chat_logprobs(state, part), "finish_reason": finish_reason}])
        if include_usage:
            yield chunk([], usage=_usage(prompt_tokens, completion_tokens, context_usage))
        yield "[DONE]"
    finally:
        await stream.aclose()  # a client that left mid-stream: free its KV blocks


# ----- text completions ----------------------------------------------------------------------


def _completion_logprobs(state: ServerState, completion: CompletionOutput, offset: int) -> dict | None:
    if completion.logprobs is None:
        return None
    tokens = [_token_text(state, lp.token_id) for lp in completion.logprobs]
    offsets, position = [], offset
    for text in tokens:
        offsets.append(position)
        position += len(text)
    return {"tokens": tokens, "token_logprobs": [lp.logprob for lp in completion.logprobs],
            "top_logprobs": [{_token_text(state, t): v for t, v in lp.top} for lp in completion.logprobs],
            "text_offset": offsets}


def _completion_response(state: ServerState, outputs: list[RequestOutput], meta: dict, body: CompletionRequest,
                         prompts: list[list[int]]) -> dict:
    choices = []
    for p, output in enumerate(outputs):
        echo = state.tokenizer.decode(prompts[p]) if body.echo else ""
        for c in output.outputs:
            choices.append({"index": p * body.n + c.index, "text": echo + c.text,
                            "logprobs": _completion_logprobs(state, c, len(echo)),
                            "finish_reason": _finish_reason(c.finish_reason)})
    completion_tokens = sum(len(c.token_ids) for output in outputs for c in output.outputs)
    return {**meta, "object": "text_completion", "choices": choices,
            "usage": _usage(sum(map(len, prompts)), completion_tokens)}


async def _completion_chunks(state: ServerState, metrics: ServerMetrics, streams: list[RequestStream], meta: dict,
                             body: CompletionRequest, prompts: list[list[int]], include_usage: bool
                             ) -> AsyncIterator[dict | str]:
    queue: asyncio.Queue = asyncio.Queue()

    async def pump(p: int, stream: RequestStream) -> None:
        async for delta in metrics.track(stream):
            await queue.put((p, delta))
        await queue.put((p, None))

    tasks = [asyncio.create_task(pump(p, s)) for p, s in enumerate(streams)]
    completion_tokens, open_streams, echoed = 0, len(streams), set()
    try:
        while open_streams:
            p, delta = await queue.get()
            if delta is None:
                open_streams -= 1
                continue
            for part in delta.outputs:
                index = p * body.n + part.index
                echo = ""
                if body.echo and index not in echoed:
                    echo = state.tokenizer.decode(prompts[p])
                    echoed.add(index)
                completion_tokens += len(part.token_ids)
                yield {**meta, "object": "text_completion",
                       "choices": [{"index": index, "text": echo + part.text,
                                    "logprobs": _completion_logprobs(state, part, 0),
                                    "finish_reason": _finish_reason(part.finish_reason)}]}
        if include_usage:
            yield {**meta, "object": "text_completion", "choices": [],
                   "usage": _usage(sum(map(len, prompts)), completion_tokens)}
        yield "[DONE]"
    finally:
        for task in tasks:
            task.cancel()
        for stream in streams:
            await stream.aclose()
