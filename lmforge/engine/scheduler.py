"""Scheduler: continuous batching over a paged KV cache (vLLM v1 / nano-vllm style).

A static batch waits for its slowest member; a continuous batch admits and retires sequences every
step, so the GPU always works on as many tokens as the budget allows. Each step runs the decodes
first, then prompt chunks (chunked prefill); when KV blocks run out, the newest running sequence
is preempted: its blocks are freed and it waits at the front of the queue to be recomputed.
"""

from __future__ import annotations

from collections import deque
from collections.abc import Iterable
from dataclasses import dataclass, field

from lmforge.engine.block_manager import BlockManager
from lmforge.engine.sequence import Sequence, SequenceStatus
from lmforge.errors import InputError, KVCacheError, ValidationError, require_counts
from lmforge.generation.stopping import OutputStream


@dataclass
class SchedulerConfig:
    max_num_seqs: int = 16  # running sequences at most
    max_num_batched_tokens: int = 512  # tokens computed per step (the forward pass's batch)
    max_model_len: int = 2048  # prompt + output tokens of one sequence
    enable_chunked_prefill: bool = True  # split long prompts over several steps
    long_prefill_token_threshold: int | None = None  # cap one prompt's chunk so others get budget

    def __post_init__(self) -> None:
        counts = ("max_num_seqs", "max_num_batched_tokens", "max_model_len", "long_prefill_token_threshold")
        require_counts("SchedulerConfig", {name: getattr(self, name) for name in counts
                                           if name != "long_prefill_token_threshold" or getattr(self, name) is not None})
        if not self.enable_chunked_prefill and self.max_num_batched_tokens < self.max_model_len:
            raise ValidationError(
                f"SchedulerConfig.max_num_batched_tokens={self.max_num_batched_tokens} is below max_model_len="
                f"{self.max_model_len}: without chunked prefill a long prompt could never be scheduled; raise "
                "max_num_batched_tokens or set enable_chunked_prefill=True.")


@dataclass
class SchedulerOutput:
    """One step's work. The runner copies the KV of every (src, dst) block pair first, then computes
    tokens [num_computed_tokens, num_computed_tokens + n) of each scheduled (seq, n), and samples
    one token for each sequence in `sampling` (its last chunk reaches its last token)."""

    scheduled: list[tuple[Sequence, int]] = field(default_factory=list)
    block_copies: list[tuple[int, int]] = field(default_factory=list)
    preempted: list[Sequence] = field(default_factory=list)

    @property
    def num_batched_tokens(self) -> int:
        return sum(n for _, n in self.scheduled)

    @property
    def sampling(self) -> list[Sequence]:
        return [seq for seq, n in self.scheduled if seq.num_computed_tokens + n == seq.num_tokens]

    @property
    def is_empty(self) -> bool:
        return not self.scheduled


@dataclass
class SchedulerStats:
    num_running: int
    num_waiting: int
    kv_usage: float  # fraction of KV blocks held by sequences
    prefix_hit_rate: float  # prompt tokens served from the prefix cache / prompt tokens looked up
    num_preemptions: int


class Scheduler:
    def __init__(self, config: SchedulerConfig, block_manager: BlockManager, eos_token_ids: Iterable[int] = ()):
        self.config = config
        self.block_manager = block_manager
        self.eos_token_ids = frozenset(eos_token_ids)
        self.waiting: deque[Sequence] = deque()  # new and preempted sequences, FCFS; they hold no blocks
        self.running: list[Sequence] = []  # in admission order; the newest is preempted first
        self.seqs: dict[int, Sequence] = {}  # every unfinished sequence by seq_id
        self.unplaced: set[int] = set()  # running seq_ids whose last (sampled) token has no KV slot yet
        self.num_preemptions = 0

    # ----- requests ----------------------------------------------------------------------

    def add(self, seq: Sequence) -> None:
        """Queue a new sequence; refuse up front one that could never run to its end."""
        self.check(seq)
        if seq.output is None:
            seq.output = OutputStream(None, seq.params, sorted(self.eos_token_ids), seq.num_prompt_tokens,
                                      self.config.max_model_len)
        seq.status = SequenceStatus.WAITING
        self.waiting.append(seq)
        self.seqs[seq.seq_id] = seq

    def check(self, seq: Sequence) -> None:
        """Raise if `seq` could never run to its end (too long for max_model_len or for the whole pool).

        Reads only the configuration: safe to call from any thread while the engine steps.
        """
        limit = self.config.max_model_len
        if seq.num_tokens >= limit:
            raise InputError(f"Request {seq.request_id!r} has a {seq.num_tokens}-token prompt but max_model_len="
                             f"{limit} leaves no room for an output token; shorten the prompt below {limit} "
                             "tokens or raise max_model_len.")
        max_tokens = seq.params.max_tokens
        longest = min(seq.num_tokens + max_tokens, limit) if max_tokens is not None else limit
        bm = self.block_manager
        needed = (longest - 1 + bm.block_size - 1) // bm.block_size  # the last token's KV is never computed
        if needed > bm.num_blocks:
            raise InputError(f"Request {seq.request_id!r} may grow to {longest} tokens, needing {needed} KV blocks, "
                             f"but the whole KV cache has {bm.num_blocks} blocks of {bm.block_size} tokens; lower "
                             "max_tokens or max_model_len, or give the cache more blocks (num_blocks).")

    def abort(self, request_id: str) -> list[Sequence]:
        """End every unfinished sequence of `request_id` and free its blocks; unknown ids are ignored."""
        aborted = [seq for seq in self.seqs.values() if seq.request_id == request_id]
        for seq in aborted:
            self.finish(seq.seq_id, SequenceStatus.FINISHED_ABORTED)
        return aborted

    def finish(self, seq_id: int, status: SequenceStatus) -> None:
        """End a sequence (e.g. the detokenizer found a stop string); finished or unknown ids are ignored."""
        if not status.is_finished:
            raise ValidationError(f"finish() needs a FINISHED_* status, got {status.name}.")
        seq = self.seqs.pop(seq_id, None)
        if seq is None:
            return
        if seq in self.running:
            self.running.remove(seq)
            self.block_manager.deallocate(seq)
        else:
            self.waiting.remove(seq)
        self.unplaced.discard(seq_id)
        seq.status = status

    def has_unfinished(self) -> bool:
        return bool(self.seqs)

    @property
    def stats(self) -> SchedulerStats:
        bm = self.block_manager
        return SchedulerStats(len(self.running), len(self.waiting), bm.usage, bm.hit_rate, self.num_preemptions)

    # ----- one step ----------------------------------------------------------------------

    def schedule(self) -> SchedulerOutput:
        """Pick this step's batch; on return every scheduled token has a KV slot in its block table."""
        out = SchedulerOutput()
        budget = self.config.max_num_batched_tokens
        i = 0
        while i < len(self.running) and budget > 0:  # running sequences first: decodes and prompt chunks
            seq = self.running[i]
            if seq.seq_id in self.unplaced:
                while not self._can_place_last_token(seq):
                    victim = self.running[-1]  # the newest; never one scheduled earlier in this step
                    out.preempted.append(self._preempt(victim))
                    if victim is seq:  # it was the newest: it preempted itself (freeing a fork frees no block)
                        break
                if seq.status is SequenceStatus.PREEMPTED:
                    break
                out.block_copies += self.block_manager.may_append(seq)
                self.unplaced.discard(seq.seq_id)
            n = self._chunk(seq, budget)
            out.scheduled.append((seq, n))
            budget -= n
            i += 1
        while self.waiting and budget > 0 and not out.preempted:  # then admit waiting ones, FCFS
            seq = self.waiting[0]
            if self._running_slots() + seq.running_slots > self.config.max_num_seqs:
                break
            if not self.config.enable_chunked_prefill and seq.num_tokens > budget:
                break
            if self._prefix_in_flight(seq) or not self.block_manager.can_allocate(seq):
                break
            self.block_manager.allocate(seq)  # prefix-cache hits count as computed
            self.waiting.popleft()
            seq.status = SequenceStatus.RUNNING
            self.running.append(seq)
            n = self._chunk(seq, budget)
            out.scheduled.append((seq, n))
            budget -= n
        return out

    def update(self, out: SchedulerOutput, sampled_tokens: dict[int, int]) -> list[Sequence]:
        """Record a computed step: advance each sequence, append the sampled tokens of those in
        `out.sampling`, and retire the finished ones (returned, blocks freed)."""
        finished = []
        for seq, n in out.scheduled:
            if seq.status is not SequenceStatus.RUNNING:  # aborted or finished since schedule()
                continue
            seq.num_computed_tokens += n
            self.block_manager.cache_computed(seq)  # its full, computed blocks may now serve other prompts
            if seq.num_computed_tokens < seq.num_tokens:  # a prompt chunk: nothing sampled yet
                continue
            if seq.seq_id not in sampled_tokens:
                raise InputError(f"No sampled token for sequence {seq.seq_id}, which computed its last token this "
                                 "step; pass a token for every sequence in SchedulerOutput.sampling.")
            token = sampled_tokens[seq.seq_id]
            seq.append_token(token)
            step = seq.output.append(token)
            if step.finished:
                status = (SequenceStatus.FINISHED_STOPPED if step.finish_reason == "stop"
                          else SequenceStatus.FINISHED_LENGTH_CAPPED)
                self.finish(seq.seq_id, status)
                finished.append(seq)
            else:
                self.unplaced.add(seq.seq_id)  # its KV slot is placed by the next schedule()
        return finished

    def fork(self, parent: Sequence, out: SchedulerOutput) -> Sequence:
        """Parallel sampling: a sibling of `parent`, which samples its first token in step `out`.

        The child shares every KV block of the parent (the prompt is computed once) and takes part
        in this step's `update` with its own sampled token; the first write to a shared partial
        block copies it (copy-on-write).
        """
        if parent not in out.sampling or parent.num_output_tokens:
            raise KVCacheError(f"Sequence {parent.seq_id} can only fork in the step that samples its first "
                               "token; fork between schedule() and update() of that step.")
        child = parent.fork()
        child.output = parent.output.fresh()
        self.block_manager.fork(parent, child)
        self.running.insert(self.running.index(parent) + 1, child)
        self.seqs[child.seq_id] = child
        out.scheduled.append((child, dict((seq.seq_id, n) for seq, n in out.scheduled)[parent.seq_id]))
        parent.forked = True
        return child

    # ----- helpers -----------------------------------------------------------------------

    def _prefix_in_flight(self, seq: Sequence) -> bool:
        """Whether a running sequence is prefilling the next block of `seq`'s prompt right now.

        Then `seq` waits: once that block is computed it comes from the prefix cache, instead of
        being computed twice (many clients sending one system prompt at the same time).
        """
        bm = self.block_manager
        if not bm.enable_prefix_caching:
            return False
        end = bm.num_cached_prefix_tokens(seq) + bm.block_size  # the first block a cache hit cannot cover
        if end > seq.num_tokens - 1:  # the last prompt token is always computed, never shared
            return False
        prefix = seq.token_ids[:end]
        return any(other.num_computed_tokens < end <= other.num_prompt_tokens and other.token_ids[:end] == prefix
                   for other in self.running)

    def _running_slots(self) -> int:
        return sum(seq.running_slots for seq in self.running)

    def _chunk(self, seq: Sequence, budget: int) -> int:
        n = seq.num_tokens - seq.num_computed_tokens
        if self.config.enable_chunked_prefill:
            n = min(n, budget, self.config.long_prefill_token_threshold or n)
        return n

    def _can_place_last_token(self, seq: Sequence) -> bool:
        """Whether `may_append(seq)` for its already appended last token finds the free block it needs."""
        return self.block_manager.num_free_blocks >= self.block_manager.needs_block(seq, seq.num_tokens)

    def _preempt(self, seq: Sequence) -> Sequence:
        self.running.remove(seq)
        self.block_manager.deallocate(seq)  # also resets num_computed_tokens: recompute from scratch
        self.unplaced.discard(seq.seq_id)
        seq.status = SequenceStatus.PREEMPTED
        self.waiting.appendleft(seq)
        self.num_preemptions += 1
        return seq
