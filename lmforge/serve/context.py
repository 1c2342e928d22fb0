"""The `context` extension of chat completions: which part of `messages` the model is sent.

`full`, `truncate` and `window` only choose messages; with `rag`, passages retrieved from the server's
document index go into the latest message as numbered sources. `summarize` and `state` ask the model itself to
condense older exchanges (lmforge.context.summary / .state); here those calls go through the serving
engine like any request (counted in /metrics and the usage log). The server keeps no sessions: each
request carries the whole conversation. So that a growing conversation pays for each exchange once,
the summary or state reached for a prefix of the messages is cached, keyed by a digest of that prefix,
and the next request of the same conversation starts from it.
"""

from __future__ import annotations

import asyncio
import functools
import hashlib
import json
import uuid
from collections import OrderedDict

from lmforge.context import CONDENSING
from lmforge.context.model_calls import TokenUsage
from lmforge.context.rag import RetrievedContext, Retriever
from lmforge.context.strategies import (
    STRATEGIES,
    ContextPolicy,
    SelectedContext,
    select_context,
)
from lmforge.engine.async_engine import AsyncLLMEngine
from lmforge.errors import UnsupportedError, ValidationError
from lmforge.generation.chat import ChatHistory
from lmforge.generation.sampling_params import SamplingParams
from lmforge.serve.metrics import ServerMetrics

SERVER_STRATEGIES = (*STRATEGIES, *CONDENSING)


def _prefix_digests(strategy: str, history: ChatHistory) -> list[str]:
    """digests[k] names the conversation's first k messages (with the strategy and system prompt): a hash
    chain, so every prefix is named in one pass over the messages."""
    digest = hashlib.sha256(json.dumps([strategy, history.system], ensure_ascii=False).encode()).hexdigest()
    digests = [digest]
    for message in history.messages:
        text = digest + json.dumps(message, ensure_ascii=False, sort_keys=True)
        digest = hashlib.sha256(text.encode()).hexdigest()
        digests.append(digest)
    return digests


class ConversationContexts:
    """Selects the context of each request; remembers condensed prefixes (least recently used go first)."""

    def __init__(self, engine: AsyncLLMEngine, metrics: ServerMetrics, max_entries: int = 1024):
        self.engine, self.metrics, self.max_entries = engine, metrics, max_entries
        self._cache: OrderedDict[str, tuple[int, object]] = OrderedDict()  # digest → CondensedContext.snapshot()

    async def select(self, history: ChatHistory, options, reserve_output: int, retriever: Retriever | None = None
                     ) -> tuple[SelectedContext, TokenUsage | None]:
        """What to send for `history` under `options` (the request's ContextOptions), and the tokens the model
        spent condensing it (None: no model call). With `options.rag`, passages from `retriever` go into the
        latest message as numbered sources (the result is then an AugmentedContext)."""
        tokenizer, window = self.engine.engine.tokenizer, self.engine.engine.max_model_len
        strategy, keep_turns = options.strategy, options.keep_turns
        if (strategy in CONDENSING) == (keep_turns is None) and (keep_turns or options.max_turns or options.max_tokens):
            raise ValidationError(f"context: keep_turns applies to {' and '.join(CONDENSING)}, max_turns and "
                                  f"max_tokens to {', '.join(STRATEGIES)}; got them with {strategy!r}.")
        if options.rag and retriever is None:
            raise UnsupportedError("context: this server has no document index; start it with "
                                   "`lmforge serve --rag-index INDEX` to use rag.")
        context = digests = None
        if strategy in CONDENSING:
            digests = _prefix_digests(strategy, history)
            context = self._condensing_context(digests, strategy, keep_turns, reserve_output)
            choose = functools.partial(context.select, context_window=window)
        else:
            policy = ContextPolicy(strategy, options.max_turns, options.max_tokens, reserve_output)
            choose = functools.partial(select_context, tokenizer=tokenizer, context_window=window, policy=policy)
        if options.rag:
            choose = RetrievedContext(retriever, choose, options.rag_top_k).select
        selected = await asyncio.to_thread(choose, history)
        if context is None:
            return selected, None
        if context.covered:
            key = digests[context.covered]
            self._cache[key] = context.snapshot()
            self._cache.move_to_end(key)
            while len(self._cache) > self.max_entries:
                self._cache.popitem(last=False)
        return selected, context.spent

    def _condensing_context(self, digests: list[str], strategy: str, keep_turns: int | None, reserve_output: int):
        """A summarize / state context whose model calls run through the engine, resumed from the longest
        condensed prefix in the cache (`digests`: the conversation's prefix digests)."""
        loop = asyncio.get_running_loop()

        def complete(prompt_ids: list[int], params: SamplingParams) -> tuple[str, int]:
            return asyncio.run_coroutine_threadsafe(self._complete(prompt_ids, params), loop).result()

        context = CONDENSING[strategy](None, self.engine.engine.tokenizer, reserve_output,
                                       **({"keep_turns": keep_turns} if keep_turns else {}), complete=complete)
        cached = next((self._cache[d] for d in reversed(digests[1:]) if d in self._cache), None)
        if cached is not None:
            context.restore(cached)
        return context

    async def _complete(self, prompt_ids: list[int], params: SamplingParams) -> tuple[str, int]:
        stream = self.engine.add_request(f"context-{uuid.uuid4().hex}", prompt_ids, params)
        text, tokens = "", 0
        async for delta in self.metrics.track(stream):
            for part in delta.outputs:
                text, tokens = text + part.text, tokens + len(part.token_ids)
        return text, tokens
