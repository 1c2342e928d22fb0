"""Scheduler: a fake model runner drives real steps over a simulated paged KV cache. Each slot holds
the (position, prefix hash) its key/value depends on, so any KV written to the wrong block, lost to
preemption or served stale by the prefix cache is caught; sampling is a deterministic function of
the sequence, so every request must produce exactly what it produces alone."""

import random

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from lmforge.engine.block_manager import BlockManager
from lmforge.engine.scheduler import Scheduler, SchedulerConfig, SchedulerOutput
from lmforge.engine.sequence import Sequence, SequenceStatus
from lmforge.errors import InputError, ValidationError
from lmforge.generation.sampling_params import SamplingParams

VOCAB, EOS = 50, 0


def next_token(tokens: list[int], sibling: int = 0) -> int:
    """A deterministic "model"; parallel samples of one prompt differ in their first token."""
    return (tokens[-1] * 31 + 7 + len(tokens) + sibling) % VOCAB


def prefix_hashes(tokens: list[int]) -> list[int]:
    hashes, h = [], -1
    for t in tokens:
        h = hash((h, t))
        hashes.append(h)
    return hashes


class FakeRunner:
    """Writes and reads back the simulated KV cache, checks the step's budgets, samples next_token."""

    def __init__(self, scheduler: Scheduler):
        self.scheduler = scheduler
        self.kv: dict[tuple[int, int], int] = {}  # (block_id, slot) -> prefix hash of the token there
        self.steps = 0
        self.prefill_tokens: dict[str, int] = {}  # request_id -> prompt tokens computed (cache misses)
        self.siblings: dict[int, int] = {}  # seq_id -> index among the n samples of its request
        self.children: dict[int, list[Sequence]] = {}  # parent seq_id -> its forked siblings, in order

    def step(self) -> tuple[SchedulerOutput, list[Sequence]]:
        sch, bs = self.scheduler, self.scheduler.block_manager.block_size
        out = sch.schedule()
        assert out.num_batched_tokens <= sch.config.max_num_batched_tokens
        assert len(out.scheduled) <= len(sch.running) <= sch.config.max_num_seqs
        assert len({seq.seq_id for seq, _ in out.scheduled}) == len(out.scheduled)
        for src, dst in out.block_copies:
            for slot in range(bs):
                if (src, slot) in self.kv:
                    self.kv[dst, slot] = self.kv[src, slot]
        for seq, n in out.scheduled:
            assert n >= 1 and seq.status is SequenceStatus.RUNNING
            start, hashes = seq.num_computed_tokens, prefix_hashes(seq.token_ids)
            assert start + n <= seq.num_tokens <= len(seq.block_table) * bs  # blocks for every computed token
            self.prefill_tokens[seq.request_id] = self.prefill_tokens.get(seq.request_id, 0) + max(
                0, min(start + n, seq.num_prompt_tokens) - start)
            for p in range(start, start + n):
                self.kv[seq.block_table[p // bs], p % bs] = hashes[p]
            for p in range(start + n):  # attention reads the whole prefix back
                assert self.kv.get((seq.block_table[p // bs], p % bs)) == hashes[p], f"stale KV at {p} of {seq}"
        for parent in out.sampling:  # parallel sampling: siblings fork off at the first token
            if not parent.forked and parent.params.n > 1:
                for k in range(1, parent.params.n):
                    child = sch.fork(parent, out)
                    self.siblings[child.seq_id] = k
                    self.children.setdefault(parent.seq_id, []).append(child)
        sampled = {}
        for seq in out.sampling:
            sibling = 0 if seq.num_output_tokens else self.siblings.get(seq.seq_id, 0)
            sampled[seq.seq_id] = next_token(seq.token_ids, sibling)
        self.steps += 1
        return out, sch.update(out, sampled)

    def run(self, max_steps: int = 10_000) -> None:
        while self.scheduler.has_unfinished():
            self.step()
            assert self.steps < max_steps, "the scheduler stopped making progress"


def alone(prompt: list[int], params: SamplingParams, max_model_len: int = 10_000, sibling: int = 0) -> list[int]:
    """The output a request (or its parallel sample `sibling`) gets by itself: next_token until a stop condition."""
    tokens = list(prompt)
    while True:
        tokens.append(next_token(tokens, sibling if len(tokens) == len(prompt) else 0))
        out = tokens[len(prompt):]
        if out[-1] == EOS and not params.ignore_eos or len(out) == params.max_tokens or len(tokens) >= max_model_len:
            return out


def make(num_blocks=64, block_size=4, prefix_caching=True, eos=(EOS,), **config) -> tuple[Scheduler, FakeRunner]:
    config.setdefault("max_model_len", 256)
    sch = Scheduler(SchedulerConfig(**config), BlockManager(num_blocks, block_size, prefix_caching), eos)
    return sch, FakeRunner(sch)


def random_requests(rng: random.Random, count: int, max_prompt: int = 40, max_tokens: int = 20):
    return [([rng.randrange(1, VOCAB) for _ in range(rng.randint(1, max_prompt))],
             SamplingParams(max_tokens=rng.randint(1, max_tokens), ignore_eos=rng.random() < 0.5)) for _ in range(count)]


def run_all(sch: Scheduler, runner: FakeRunner, requests) -> list[Sequence]:
    seqs = [Sequence(prompt, params) for prompt, params in requests]
    for seq in seqs:
        sch.add(seq)
    runner.run()
    for seq, (prompt, params) in zip(seqs, requests):
        assert seq.is_finished and seq.output_token_ids == alone(prompt, params, sch.config.max_model_len)
    assert sch.block_manager.num_free_blocks == sch.block_manager.num_blocks  # no leaked blocks
    assert not sch.running and not sch.waiting and not sch.unplaced
    return seqs


# ----- whole runs -------------------------------------------------------------------------


def test_mixed_requests_all_finish_with_their_solo_output():
    sch, runner = make(max_num_seqs=6, max_num_batched_tokens=32)
    seqs = run_all(sch, runner, random_requests(random.Random(0), 30))
    assert {seq.status for seq in seqs} == {SequenceStatus.FINISHED_STOPPED, SequenceStatus.FINISHED_LENGTH_CAPPED}
    assert sch.stats.num_preemptions == 0 and sch.stats.kv_usage == 0


def test_tiny_pool_preempts_and_still_finishes_everything():
    sch, runner = make(num_blocks=12, max_num_seqs=8, max_num_batched_tokens=64, prefix_caching=False)
    run_all(sch, runner, random_requests(random.Random(1), 20, max_prompt=20, max_tokens=25))
    assert sch.stats.num_preemptions > 0


def test_preemption_frees_the_newest_and_requeues_it_first():
    sch, runner = make(num_blocks=4, block_size=2, max_num_seqs=4, max_num_batched_tokens=16)
    old, new = Sequence([1, 2, 3], SamplingParams(max_tokens=5)), Sequence([4, 5, 6], SamplingParams(max_tokens=5))
    sch.add(old)
    sch.add(new)
    runner.step()  # both prefill: 2 blocks each, the pool is full
    out, _ = runner.step()  # both decode into their second block's free slot
    assert out.preempted == []
    out, _ = runner.step()  # old needs a third block: new is evicted
    assert out.preempted == [new] and new.status is SequenceStatus.PREEMPTED and not new.block_table
    assert list(sch.waiting) == [new] and [s for s, _ in out.scheduled] == [old]
    runner.run()
    assert old.output_token_ids == alone([1, 2, 3], old.params) and new.output_token_ids == alone([4, 5, 6], new.params)


def test_chunked_prefill_splits_a_long_prompt_while_decodes_continue():
    sch, runner = make(max_num_batched_tokens=16, max_num_seqs=4)
    short = Sequence([1, 2], SamplingParams(max_tokens=30, ignore_eos=True))
    sch.add(short)
    runner.step()
    long = Sequence(list(range(1, 41)), SamplingParams(max_tokens=3, ignore_eos=True))
    sch.add(long)
    chunks = []
    while long.num_computed_tokens < long.num_prompt_tokens:
        out, _ = runner.step()
        batch = {seq.seq_id: n for seq, n in out.scheduled}
        assert batch[short.seq_id] == 1  # the decode is never starved
        chunks.append(batch[long.seq_id])
    assert chunks == [15, 15, 10] and short.num_output_tokens == 4
    runner.run()
    assert long.output_token_ids == alone(long.prompt_token_ids, long.params)


def test_long_prefill_token_threshold_caps_one_prompts_chunk():
    sch, runner = make(max_num_batched_tokens=64, long_prefill_token_threshold=8)
    a, b = Sequence(list(range(1, 21))), Sequence(list(range(21, 41)))
    sch.add(a)
    sch.add(b)
    out, _ = runner.step()
    assert out.scheduled == [(a, 8), (b, 8)]


def test_without_chunked_prefill_prompts_are_whole():
    sch, runner = make(max_num_batched_tokens=256, enable_chunked_prefill=False)
    run_all(sch, runner, random_requests(random.Random(2), 10, max_prompt=100))
    with pytest.raises(ValidationError, match="max_num_batched_tokens"):
        SchedulerConfig(max_num_batched_tokens=64, max_model_len=128, enable_chunked_prefill=False)


def test_max_num_seqs_limits_the_running_set():
    sch, runner = make(max_num_seqs=2)
    for prompt, params in random_requests(random.Random(3), 5):
        sch.add(Sequence(prompt, params))
    out, _ = runner.step()
    assert len(out.scheduled) == 2 and sch.stats.num_waiting == 3
    runner.run()  # FakeRunner asserts the limit every step


def test_prefix_cache_hits_skip_prefill():
    sch, runner = make()
    prompt = list(range(1, 31))
    a, b = (Sequence(prompt, SamplingParams(max_tokens=2), request_id=r) for r in "ab")
    sch.add(a)
    runner.run()
    sch.add(b)
    out, _ = runner.step()
    assert out.scheduled == [(b, 2)]  # 28 of 30 tokens (7 full blocks) came from the cache
    assert runner.prefill_tokens == {"a": 30, "b": 2} and b.num_cached_tokens == 28
    assert sch.stats.prefix_hit_rate == pytest.approx(28 / 60)
    runner.run()
    assert b.output_token_ids == alone(prompt, b.params)


def test_a_prompt_waits_for_a_shared_prefix_being_prefilled():
    sch, runner = make(max_num_batched_tokens=64)
    system = list(range(1, 13))  # three full blocks of 4
    a = Sequence(system + [20, 21], SamplingParams(max_tokens=2), request_id="a")
    b = Sequence(system + [30, 31, 32], SamplingParams(max_tokens=2), request_id="b")
    sch.add(a)
    sch.add(b)
    out, _ = runner.step()
    assert [seq for seq, _ in out.scheduled] == [a]  # b would recompute what a is computing: it waits
    out, _ = runner.step()
    assert (b, 3) in out.scheduled and b.num_cached_tokens == 12
    runner.run()
    assert runner.prefill_tokens == {"a": 14, "b": 3}


def test_prompt_chunks_are_not_cached_before_computed():
    sch, runner = make(long_prefill_token_threshold=4)
    prompt = list(range(1, 13))
    for _ in range(2):
        sch.add(Sequence(prompt, SamplingParams(max_tokens=2)))
    runner.run()  # the second hits the first's blocks 0-1 while only block 0 is computed: stale KV


def test_parallel_sampling_shares_the_prompt_blocks_and_copies_on_write():
    sch, runner = make(num_blocks=64, block_size=4, max_num_seqs=3)
    prompt = list(range(1, 11))  # 10 tokens: 2 full blocks and a partial one, shared by 3 samples
    parent = Sequence(prompt, SamplingParams(n=3, max_tokens=6, ignore_eos=True), request_id="r")
    blocker = Sequence([7, 8], SamplingParams(max_tokens=3, ignore_eos=True))
    sch.add(parent)
    sch.add(blocker)
    out, _ = runner.step()
    assert [s for s, _ in out.scheduled][0] is parent and blocker.status is SequenceStatus.WAITING  # 3 + 1 > 3
    family = [seq for seq in sch.running if seq.request_id == "r"]
    assert len(family) == 3 and runner.prefill_tokens["r"] == 10  # the prompt was computed once
    assert len({tuple(seq.block_table) for seq in family}) == 1
    assert [sch.block_manager.blocks[b].ref_count for b in parent.block_table] == [3, 3, 3]
    out, _ = runner.step()  # each writes its second output token into the shared partial block
    assert len(out.block_copies) == 2 and len({seq.block_table[-1] for seq in family}) == 3
    runner.run()
    outputs = {tuple(seq.output_token_ids) for seq in family}
    expected = set()
    for k in range(3):
        first = next_token(prompt, k)
        expected.add((first, *alone(prompt + [first], SamplingParams(max_tokens=5, ignore_eos=True))))
    assert outputs == expected and len(outputs) == 3
    assert sch.block_manager.num_free_blocks == sch.block_manager.num_blocks


# ----- finishing --------------------------------------------------------------------------


def test_stop_conditions():
    sch, runner = make(eos=(13,))
    eos = Sequence([5], SamplingParams(max_tokens=50))  # 5 -> 13 (EOS)
    ignored = Sequence([5], SamplingParams(max_tokens=3, ignore_eos=True))
    stop_id = Sequence([5], SamplingParams(max_tokens=50, stop_token_ids=[13], ignore_eos=True))
    min_tokens = Sequence([5], SamplingParams(max_tokens=2, min_tokens=2))
    capped = Sequence([1] * 9, SamplingParams(max_tokens=None))
    sch.config.max_model_len = 12
    for seq in (eos, ignored, stop_id, min_tokens, capped):
        sch.add(seq)
    runner.run()
    assert next_token([5]) == 13
    assert (eos.status, eos.output_token_ids) == (SequenceStatus.FINISHED_STOPPED, [13])
    assert (ignored.status, ignored.num_output_tokens) == (SequenceStatus.FINISHED_LENGTH_CAPPED, 3)
    assert (stop_id.status, stop_id.output_token_ids) == (SequenceStatus.FINISHED_STOPPED, [13])
    assert (min_tokens.status, min_tokens.num_output_tokens) == (SequenceStatus.FINISHED_LENGTH_CAPPED, 2)
    assert (capped.status, capped.num_tokens) == (SequenceStatus.FINISHED_LENGTH_CAPPED, 12)
    assert [s.finish_reason for s in (eos, capped)] == ["stop", "length"]


def test_finish_ends_a_sequence_for_a_stop_string():
    sch, runner = make()
    seq = Sequence([1, 2, 3], SamplingParams(max_tokens=20, ignore_eos=True))
    sch.add(seq)
    runner.step()
    runner.step()
    sch.finish(seq.seq_id, SequenceStatus.FINISHED_STOPPED)
    sch.finish(seq.seq_id, SequenceStatus.FINISHED_STOPPED)  # twice is harmless
    assert seq.finish_reason == "stop" and not sch.has_unfinished()
    assert sch.block_manager.num_free_blocks == sch.block_manager.num_blocks
    with pytest.raises(ValidationError, match="FINISHED_"):
        sch.finish(seq.seq_id, SequenceStatus.RUNNING)


def test_abort_running_waiting_unknown_and_mid_step():
    sch, runner = make(max_num_seqs=1)
    running = Sequence([1, 2, 3], SamplingParams(max_tokens=20), request_id="run")
    waiting = Sequence([4, 5], SamplingParams(max_tokens=20), request_id="wait")
    sch.add(running)
    sch.add(waiting)
    runner.step()
    assert sch.abort("wait") == [waiting] and waiting.status is SequenceStatus.FINISHED_ABORTED
    assert sch.abort("nobody") == [] and sch.abort("wait") == []
    out = sch.schedule()
    assert sch.abort("run") == [running]  # between schedule and update: the step's result is dropped
    assert sch.update(out, {running.seq_id: 9}) == [] and running.num_output_tokens == 1
    assert not sch.has_unfinished() and sch.block_manager.num_free_blocks == sch.block_manager.num_blocks


# ----- validation -------------------------------------------------------------------------


def test_requests_that_can_never_run_are_refused_up_front():
    sch, _ = make(num_blocks=4, block_size=4, max_model_len=64)
    with pytest.raises(InputError, match="max_model_len"):
        sch.add(Sequence([1] * 64))
    with pytest.raises(InputError, match="num_blocks"):
        sch.add(Sequence([1] * 10, SamplingParams(max_tokens=8)))  # 17 computed tokens > 16 slots
    with pytest.raises(InputError, match="max_tokens"):
        sch.add(Sequence([1] * 10, SamplingParams(max_tokens=None)))
    fits = Sequence([1] * 10, SamplingParams(max_tokens=7, ignore_eos=True))  # exactly 16 computed tokens
    sch.add(fits)
    FakeRunner(sch).run()
    assert fits.num_output_tokens == 7 and not sch.waiting


@pytest.mark.parametrize("field,value", [("max_num_seqs", 0), ("max_num_batched_tokens", 1.5),
                                         ("max_model_len", True), ("long_prefill_token_threshold", 0)])
def test_config_errors_name_the_field(field, value):
    with pytest.raises(ValidationError, match=field):
        SchedulerConfig(**{field: value})


def test_a_missing_sampled_token_is_reported():
    sch, _ = make()
    seq = Sequence([1, 2])
    sch.add(seq)
    with pytest.raises(InputError, match="sampling"):
        sch.update(sch.schedule(), {})


# ----- property test ----------------------------------------------------------------------


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(seed=st.integers(0, 2**32 - 1), num_blocks=st.integers(8, 40), block_size=st.sampled_from([1, 2, 4, 8]),
       max_num_seqs=st.integers(1, 8), budget=st.integers(1, 48), chunked=st.booleans(),
       prefix_caching=st.booleans(), arrivals=st.lists(st.integers(0, 6), min_size=1, max_size=12))
def test_random_workloads_finish_exactly_within_budgets(seed, num_blocks, block_size, max_num_seqs, budget,
                                                       chunked, prefix_caching, arrivals):
    """Requests arrive over time (arrivals[i] steps apart); shared prefixes make cache hits common."""
    rng = random.Random(seed)
    max_model_len = min(64, num_blocks * block_size)
    if not chunked:
        budget = max(budget, max_model_len)
    sch, runner = make(num_blocks, block_size, prefix_caching, max_num_seqs=max_num_seqs,
                       max_num_batched_tokens=budget, enable_chunked_prefill=chunked, max_model_len=max_model_len)
    shared = [rng.randrange(1, VOCAB) for _ in range(max_model_len)]
    expected = []
    for gap in arrivals:
        for _ in range(gap):
            if sch.has_unfinished():
                runner.step()
        prompt = shared[:rng.randint(0, max_model_len // 2)] + [rng.randrange(1, VOCAB)
                                                                 for _ in range(rng.randint(1, max_model_len // 3))]
        n = rng.choice([1, 1, 2, 3]) if rng.random() < 0.5 else 1  # parallel samples fork at the first token
        params = SamplingParams(max_tokens=rng.randint(1, max_model_len - len(prompt)), ignore_eos=rng.random() < 0.7,
                                n=min(n, max_num_seqs))
        seq = Sequence(prompt, params)
        sch.add(seq)
        expected.append((seq, prompt, params))
    runner.run()
    for seq, prompt, params in expected:
        family = [seq] + runner.children.get(seq.seq_id, [])
        assert len(family) == params.n and all(member.is_finished for member in family)
        assert [m.output_token_ids for m in family] == [alone(prompt, params, max_model_len, k) for k in range(params.n)]
    assert sch.block_manager.num_free_blocks == num_blocks and not sch.unplaced
