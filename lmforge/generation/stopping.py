"""Stop criteria and safe streaming: when does an output end, and which text may be shown now.

An output ends on EOS or a stop token id ("stop"), on a stop string ("stop": the text is cut
before it), or when max_tokens or the context window is used up ("length"). Stop strings can
span tokens, so a stream holds back the longest tail of its text that could still grow into
one, and releases it once it cannot: a client never sees half a stop string. The streamed
deltas always add up to the final text.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

from lmforge.errors import InputError
from lmforge.generation.detokenizer import IncrementalDetokenizer
from lmforge.generation.sampling_params import SamplingParams
from lmforge.tokenizer import Tokenizer

FinishReason = Literal["stop", "length"]


@dataclass
class StepResult:
    """What one new token changed: the text safe to emit now, and whether the output ended."""

    delta: str
    finished: bool = False
    finish_reason: FinishReason | None = None
    stop_reason: str | int | None = None  # the stop string or stop token id; None for EOS and length


class OutputStream:
    """Assembles one output token by token: detokenizes, applies the stop rules, and streams safe text.

    `token_ids` holds every generated id, including a final EOS or stop token; `text` holds the
    emitted text, which excludes that token and everything from a matched stop string on (unless
    `include_stop_str_in_output`). Stop strings and stop tokens count only once more than
    `min_tokens` tokens exist, matching the logits processor that bans EOS until then.
    When a stop condition and a length limit hit on the same token, "stop" wins.
    """

    def __init__(self, tokenizer: Tokenizer | None, params: SamplingParams, eos_token_ids: list[int],
                 prompt_length: int, max_model_len: int | None = None,
                 prompt_token_ids: list[int] | None = None):
        self._arguments = (tokenizer, params, eos_token_ids, prompt_length, max_model_len, prompt_token_ids)
        self.params = params
        self.eos_token_ids = frozenset(eos_token_ids)
        self.stop_token_ids = frozenset(params.stop_token_ids or ())
        self.prompt_length = prompt_length
        self.max_model_len = max_model_len
        if tokenizer is None and params.stop:
            raise InputError("stop strings need a tokenizer to detokenize the output; pass one, or use "
                             "stop_token_ids instead.")
        # Without a tokenizer the stream applies the token rules only and produces no text.
        self.detokenizer = (IncrementalDetokenizer(tokenizer, prompt_token_ids, params.skip_special_tokens)
                            if tokenizer is not None else None)
        self.stop_strings = list(params.stop or ())
        self._max_stop_len = max((len(s) for s in self.stop_strings), default=0)
        self._stop_prefixes = {s[:k] for s in self.stop_strings for k in range(1, len(s))}
        self._tail = ""  # the last max_stop_len - 1 characters of the detokenized text
        self._held = ""  # the suffix of _tail not emitted yet, because it may start a stop string
        self.token_ids: list[int] = []
        self._chunks: list[str] = []
        self.finish_reason: FinishReason | None = None
        self.stop_reason: str | int | None = None

    def fresh(self) -> OutputStream:
        """A new, empty stream with the same settings (for a sibling completion of the same prompt)."""
        return OutputStream(*self._arguments)

    @property
    def finished(self) -> bool:
        return self.finish_reason is not None

    @property
    def text(self) -> str:
        """The text emitted so far; once finished, the whole output."""
        if len(self._chunks) > 1:
            self._chunks = ["".join(self._chunks)]
        return self._chunks[0] if self._chunks else ""

    def append(self, token_id: int) -> StepResult:
        """Add one generated token and return the text it releases and whether the output is done."""
        if self.finished:
            raise InputError(f"this output already finished ({self.finish_reason!r}); "
                             "start a new OutputStream for a new generation.")
        self.token_ids.append(token_id)
        may_stop = len(self.token_ids) > self.params.min_tokens
        stop_token = may_stop and self._is_stop_token(token_id)
        at_length = self._at_length()

        new_text = ""
        if self.detokenizer is not None:
            if not stop_token or self.params.include_stop_str_in_output:
                new_text = self.detokenizer.add(token_id)
            if stop_token or at_length:
                new_text += self.detokenizer.flush()

        delta, stop_string = self._scan(new_text, may_stop)
        if stop_string is not None:
            self.finish_reason, self.stop_reason = "stop", stop_string
        elif stop_token:
            is_eos = token_id in self.eos_token_ids and not self.params.ignore_eos
            self.finish_reason, self.stop_reason = "stop", None if is_eos else token_id
        elif at_length:
            self.finish_reason = "length"
        if self.finished and stop_string is None:
            delta += self._held  # nothing more can complete a stop string
            self._held = ""
        self._chunks.append(delta)
        return StepResult(delta, self.finished, self.finish_reason, self.stop_reason)

    def _is_stop_token(self, token_id: int) -> bool:
        return (token_id in self.eos_token_ids and not self.params.ignore_eos) or token_id in self.stop_token_ids

    def _at_length(self) -> bool:
        generated = len(self.token_ids)
        if self.params.max_tokens is not None and generated >= self.params.max_tokens:
            return True
        return self.max_model_len is not None and self.prompt_length + generated >= self.max_model_len

    def _scan(self, new_text: str, may_stop: bool) -> tuple[str, str | None]:
        """Look for a stop string ending in `new_text`; return the releasable text and the match.

        Only `new_text` and the tail before it are searched: an earlier match would have ended
        the output already. The first stop string to complete wins (ties: the longest).
        """
        if not self.stop_strings:
            return new_text, None
        window = self._tail + new_text
        unemitted = len(self._tail) - len(self._held)  # window[unemitted:] has not been emitted
        if may_stop:
            match = self._first_match(window, len(self._tail))
            if match is not None:
                start, stop = match
                end = start + len(stop) if self.params.include_stop_str_in_output else start
                return window[unemitted:end], stop
        held = self._longest_stop_prefix_suffix(window[unemitted:])
        self._held = window[len(window) - held:] if held else ""
        keep = min(len(window), self._max_stop_len - 1)
        self._tail = window[len(window) - keep:]
        return window[unemitted:len(window) - held], None

    def _first_match(self, window: str, new_from: int) -> tuple[int, str] | None:
        """The (start, stop string) that ends first in `window` among those ending after `new_from`."""
        best: tuple[int, int, str] | None = None  # (end, start, stop string)
        for stop in self.stop_strings:
            start = window.find(stop, max(0, new_from - len(stop) + 1))
            if start != -1:
                candidate = (start + len(stop), start, stop)
                best = candidate if best is None else min(best, candidate)
        return None if best is None else (best[1], best[2])

    def _longest_stop_prefix_suffix(self, text: str) -> int:
        """Length of the longest suffix of `text` that is a proper prefix of a stop string."""
        for length in range(min(len(text), self._max_stop_len - 1), 0, -1):
            if text[-length:] in self._stop_prefixes:
                return length
        return 0
