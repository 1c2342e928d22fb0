"""Sequence: one generation stream inside the engine (a prompt plus the tokens sampled so far).

The engine never stores a sequence's KV cache contiguously: `block_table[i]` names the physical
KV-cache block holding its tokens [i * block_size, (i + 1) * block_size). The scheduler moves a
sequence through `SequenceStatus`; the block manager fills its block table and prefix-cache counts.
"""

from __future__ import annotations

from collections.abc import Iterable
from enum import Enum, auto
from itertools import count
from typing import TYPE_CHECKING

from lmforge.errors import InputError
from lmforge.generation.sampling_params import SamplingParams

if TYPE_CHECKING:
    from lmforge.generation.processors import LogitsPipeline, SequenceState
    from lmforge.generation.sampler import Sampler, TokenLogprob
    from lmforge.generation.stopping import OutputStream


class SequenceStatus(Enum):
    WAITING = auto()  # queued; holds no KV blocks
    RUNNING = auto()  # scheduled; holds KV blocks for all its tokens
    PREEMPTED = auto()  # evicted to free blocks; waits again and recomputes its KV when resumed
    FINISHED_STOPPED = auto()  # EOS, a stop token or a stop string
    FINISHED_LENGTH_CAPPED = auto()  # max_tokens or the context window reached
    FINISHED_ABORTED = auto()  # cancelled by the client

    @property
    def is_finished(self) -> bool:
        return self in _FINISH_REASONS


_FINISH_REASONS = {  # OpenAI `finish_reason` of each finished status
    SequenceStatus.FINISHED_STOPPED: "stop",
    SequenceStatus.FINISHED_LENGTH_CAPPED: "length",
    SequenceStatus.FINISHED_ABORTED: "abort",
}


class Sequence:
    _next_id = count()

    def __init__(self, prompt_token_ids: Iterable[int], params: SamplingParams | None = None,
                 request_id: str | None = None):
        token_ids = list(prompt_token_ids)
        if not token_ids:
            raise InputError("The prompt has no tokens; a sequence needs at least one prompt token to "
                             "condition on (add a BOS token or some text).")
        self.seq_id = next(Sequence._next_id)  # unique per sequence; n > 1 forks share a request_id
        self.request_id = request_id if request_id is not None else str(self.seq_id)
        self.params = params if params is not None else SamplingParams()
        self.status = SequenceStatus.WAITING
        self.token_ids = token_ids  # prompt + output
        self.num_prompt_tokens = len(token_ids)
        self.block_table: list[int] = []  # physical KV block ids, in token order
        self.num_cached_tokens = 0  # leading tokens whose KV came from the prefix cache
        self.num_computed_tokens = 0  # leading tokens whose KV is (or is being) written
        self.forked = False  # whether its n - 1 siblings exist (they fork off at the first sampled token)
        # The stop rules and detokenized text; the scheduler gives a token-only stream if none is set.
        self.output: OutputStream | None = None
        # What the engine samples with: the request's logits pipeline, this sequence's processor
        # state and seeded sampler, and the logprobs it asked for.
        self.pipeline: LogitsPipeline | None = None
        self.sampling_state: SequenceState | None = None
        self.sampler: Sampler | None = None
        self.logprobs: list[TokenLogprob] | None = None

    def __len__(self) -> int:
        return len(self.token_ids)

    def __repr__(self) -> str:
        return (f"Sequence(seq_id={self.seq_id}, request_id={self.request_id!r}, status={self.status.name}, "
                f"prompt={self.num_prompt_tokens}, output={self.num_output_tokens}, blocks={self.block_table})")

    @property
    def num_tokens(self) -> int:
        return len(self.token_ids)

    @property
    def num_output_tokens(self) -> int:
        return len(self.token_ids) - self.num_prompt_tokens

    @property
    def prompt_token_ids(self) -> list[int]:
        return self.token_ids[:self.num_prompt_tokens]

    @property
    def output_token_ids(self) -> list[int]:
        return self.token_ids[self.num_prompt_tokens:]

    @property
    def last_token(self) -> int:
        return self.token_ids[-1]

    @property
    def is_finished(self) -> bool:
        return self.status.is_finished

    @property
    def finish_reason(self) -> str | None:
        """"stop", "length" or "abort" once finished (the OpenAI field), else None."""
        return _FINISH_REASONS.get(self.status)

    def num_blocks(self, block_size: int) -> int:
        """KV blocks needed to hold every token: ceil(num_tokens / block_size)."""
        return (self.num_tokens + block_size - 1) // block_size

    def last_block_num_tokens(self, block_size: int) -> int:
        """Tokens in the last block (1..block_size)."""
        return self.num_tokens - (self.num_blocks(block_size) - 1) * block_size

    def block_tokens(self, i: int, block_size: int) -> tuple[int, ...]:
        """The token ids that block i holds (fewer than block_size for a partial last block)."""
        return tuple(self.token_ids[i * block_size:(i + 1) * block_size])

    def append_token(self, token_id: int) -> None:
        self.token_ids.append(token_id)

    @property
    def running_slots(self) -> int:
        """Places in the running set this sequence takes once sampled: n for a parent yet to fork."""
        return 1 if self.forked else self.params.n

    def fork(self) -> Sequence:
        """A copy with a new seq_id and no blocks, for parallel sampling (n > 1); pair it with
        `BlockManager.fork(parent, child)` so the child shares the parent's KV blocks."""
        child = Sequence(self.token_ids, self.params, self.request_id)
        child.num_prompt_tokens = self.num_prompt_tokens
        child.status = self.status
        child.forked = True
        return child
