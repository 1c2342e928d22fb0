"""Incremental detokenization: turn a stream of token ids into a stream of text deltas.

Decoding one token at a time is wrong: byte-level BPE splits an emoji into tokens
whose bytes are not valid UTF-8 alone, WordPiece glues "##" pieces to the previous
word, and SentencePiece decoders drop the leading space of the first token. So, as
vLLM and TGI do, we decode a short sliding window (the previous step's tokens + the
new ones) and emit what it adds beyond the previous tokens' text; a window whose text
ends in U+FFFD waits for the bytes that complete the character. Each step decodes a
handful of tokens, whatever the length of the output.
"""

from __future__ import annotations

from lmforge.tokenizer import Tokenizer

REPLACEMENT_CHAR = "\ufffd"  # what decoding an incomplete UTF-8 sequence produces
PROMPT_CONTEXT_TOKENS = 5  # prompt tokens decoded before the first output token (vLLM's choice)


class IncrementalDetokenizer:
    """Detokenizes generated token ids one at a time; the deltas add up to `tokenizer.decode(token_ids)`.

    With `prompt_token_ids`, the end of the prompt is decoded as context, so the first
    token's text is the continuation of the prompt (a SentencePiece leading space is kept).
    """

    def __init__(self, tokenizer: Tokenizer, prompt_token_ids: list[int] | None = None,
                 skip_special_tokens: bool = True):
        self.tokenizer = tokenizer
        self.skip_special_tokens = skip_special_tokens
        # Skipped ids are dropped before decoding (decode would drop them anyway), so a run of
        # them, e.g. EOS repeated under ignore_eos, never widens the window.
        self._skipped_ids = special_token_ids(tokenizer) if skip_special_tokens else frozenset()
        context = [t for t in prompt_token_ids or [] if t not in self._skipped_ids][-PROMPT_CONTEXT_TOKENS:]
        self._window: list[int] = context  # [already emitted ids | ids still to emit]
        self._emitted_in_window = len(context)
        self._emitted_text = self._decode(context)  # the text of window[:_emitted_in_window]
        self.token_ids: list[int] = []
        self._chunks: list[str] = []

    @property
    def text(self) -> str:
        """All text emitted so far (the concatenation of the deltas)."""
        if len(self._chunks) > 1:
            self._chunks = ["".join(self._chunks)]
        return self._chunks[0] if self._chunks else ""

    def add(self, token_id: int) -> str:
        """Take one generated token; return the text it completes ("" while a character is incomplete)."""
        self.token_ids.append(token_id)
        if token_id in self._skipped_ids:
            return ""
        self._window.append(token_id)
        return self._emit(final=False)

    def flush(self) -> str:
        """Emit what is still held back (an incomplete character decodes to U+FFFD, as in `decode`)."""
        return self._emit(final=True)

    def _emit(self, final: bool) -> str:
        text = self._decode(self._window)
        if len(text) <= len(self._emitted_text) or (text.endswith(REPLACEMENT_CHAR) and not final):
            return ""
        delta = text[len(self._emitted_text):]
        # The tokens just emitted become the context of the next step's window.
        self._window = self._window[self._emitted_in_window:]
        self._emitted_in_window = len(self._window)
        self._emitted_text = self._decode(self._window)
        self._chunks.append(delta)
        return delta

    def _decode(self, ids: list[int]) -> str:
        return self.tokenizer.decode(ids, skip_special_tokens=self.skip_special_tokens) if ids else ""


def special_token_ids(tokenizer: Tokenizer) -> frozenset[int]:
    """The ids that `decode(..., skip_special_tokens=True)` leaves out."""
    added = tokenizer.backend.get_added_tokens_decoder()
    return frozenset(token_id for token_id, token in added.items() if token.special)
