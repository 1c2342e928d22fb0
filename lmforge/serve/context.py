"""The `context` extension of chat completions: which part of `messages` the model is sent.

`full`, `truncate` and `window` only choose messages. `summarize` and `state` ask the model itself to
condense older exchanges (lmforge.context.summary / .state); here those calls go through the serving
engine like any request (counted in /metrics and the usage log). The server keeps no sessions: each
request carries the whole conversation. So that a growing conversation pays for each exchange once,
the summary or state reached for a prefix of the messages is cached, keyed by a digest of that prefix,
and the next request of the same conversation starts from it.
"""

from __future__ import annotations

import asyncio
import copy
import hashlib
import json
import uuid
from collections import OrderedDict

from lmforge.context.model_calls import TokenUsage
from lmforge.context.state import StatefulContext
from lmforge.context.strategies import (
    STRATEGIES,
    ContextPolicy,
    SelectedContext,
    select_context,
)
from lmforge.context.summary import SummarizedContext
from lmforge.engine.async_engine import AsyncLLMEngine
from lmforge.errors import ValidationError
from lmforge.generation.chat import ChatHistory
from lmforge.generation.sampling_params import SamplingParams
from lmforge.serve.metrics import ServerMetrics

CONDENSING = {"summarize": (SummarizedContext, "summary"), "state": (StatefulContext, "state")}
"""strategy → (the class that condenses older exchanges, the attribute holding what it condensed them to)."""
SERVER_STRATEGIES = (*STRATEGIES, *CONDENSING)


def _digest(strategy: str, system: str | None, messages: list[dict]) -> str:
    text = json.dumps([strategy, system, messages], ensure_ascii=False, sort_keys=True)
    return hashlib.sha256(text.encode()).hexdigest()


class ConversationContexts:
    """Selects the context of each request; remembers condensed prefixes (least recently used go first)."""

    def __init__(self, engine: AsyncLLMEngine, metrics: ServerMetrics, max_entries: int = 1024):
        self.engine, self.metrics, self.max_entries = engine, metrics, max_entries
        self._cache: OrderedDict[str, tuple[int, object]] = OrderedDict()  # digest → (messages covered, memory)

    async def select(self, history: ChatHistory, strategy: str, max_turns: int | None, max_tokens: int | None,
                     keep_turns: int | None, reserve_output: int) -> tuple[SelectedContext, TokenUsage | None]:
        """What to send for `history`, and the tokens the model spent condensing it (None: no model call)."""
        tokenizer, window = self.engine.engine.tokenizer, self.engine.engine.max_model_len
        if (strategy in CONDENSING) == (keep_turns is None) and (keep_turns is not None or max_turns or max_tokens):
            raise ValidationError(f"context: keep_turns applies to {' and '.join(CONDENSING)}, max_turns and "
                                  f"max_tokens to {', '.join(STRATEGIES)}; got them with {strategy!r}.")
        if strategy not in CONDENSING:
            policy = ContextPolicy(strategy, max_turns, max_tokens, reserve_output)
            return select_context(history, tokenizer, window, policy), None
        cls, memory = CONDENSING[strategy]
        loop = asyncio.get_running_loop()

        def complete(prompt_ids: list[int], params: SamplingParams) -> tuple[str, int]:
            return asyncio.run_coroutine_threadsafe(self._complete(prompt_ids, params), loop).result()

        context = cls(None, tokenizer, reserve_output, **({"keep_turns": keep_turns} if keep_turns else {}),
                      complete=complete)
        for covered in range(len(history.messages), 0, -1):  # resume from the longest condensed prefix
            cached = self._cache.get(_digest(strategy, history.system, history.messages[:covered]))
            if cached is not None:
                context.covered, value = cached
                setattr(context, memory, copy.deepcopy(value))
                break
        selected = await asyncio.to_thread(context.select, history, window)
        if context.covered:
            key = _digest(strategy, history.system, history.messages[:context.covered])
            self._cache[key] = (context.covered, copy.deepcopy(getattr(context, memory)))
            self._cache.move_to_end(key)
            while len(self._cache) > self.max_entries:
                self._cache.popitem(last=False)
        return selected, context.spent

    async def _complete(self, prompt_ids: list[int], params: SamplingParams) -> tuple[str, int]:
        stream = self.engine.add_request(f"context-{uuid.uuid4().hex}", prompt_ids, params)
        text, tokens = "", 0
        async for delta in self.metrics.track(stream):
            for part in delta.outputs:
                text, tokens = text + part.text, tokens + len(part.token_ids)
        return text, tokens
