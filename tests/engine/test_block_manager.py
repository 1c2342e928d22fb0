"""Block manager: unit tests of paging, prefix caching, LRU eviction and copy-on-write forks,
then a hypothesis state machine that runs random allocate/append/fork/free/preempt schedules
against a simulated KV cache and checks the bookkeeping after every step."""

import pytest
from hypothesis import HealthCheck, settings
from hypothesis import strategies as st
from hypothesis.stateful import (
    RuleBasedStateMachine,
    invariant,
    precondition,
    rule,
    run_state_machine_as_test,
)

from lmforge.engine import block_manager as bm_module
from lmforge.engine.block_manager import BlockManager
from lmforge.engine.sequence import Sequence
from lmforge.errors import InputError, KVCacheError, ValidationError


def computed(bm: BlockManager, seq: Sequence) -> None:
    """What the engine does after a forward step: every token's KV exists, full blocks become findable."""
    seq.num_computed_tokens = seq.num_tokens
    bm.cache_computed(seq)


def allocate(bm: BlockManager, seq: Sequence) -> None:
    """Allocate a prompt and compute it."""
    bm.allocate(seq)
    computed(bm, seq)


def grow(bm: BlockManager, seq: Sequence, token: int) -> list[tuple[int, int]]:
    """Append a token, make room for it and compute it."""
    assert bm.can_append(seq)
    seq.append_token(token)
    copies = bm.may_append(seq)
    computed(bm, seq)
    return copies


def ref_counts(bm: BlockManager) -> list[int]:
    return [block.ref_count for block in bm.blocks]


# ----- paging ---------------------------------------------------------------------------


def test_allocate_and_append_across_block_boundaries():
    bm = BlockManager(num_blocks=8, block_size=4)
    seq = Sequence(range(6))
    assert bm.can_allocate(seq)
    allocate(bm, seq)
    assert len(seq.block_table) == 2 and bm.num_free_blocks == 6 and bm.usage == 2 / 8
    assert grow(bm, seq, 6) == [] and len(seq.block_table) == 2  # fills position 6 of block 1
    assert grow(bm, seq, 7) == [] and len(seq.block_table) == 2  # block 1 is now full
    assert bm.blocks[seq.block_table[1]].hash is not None  # ... and registered for prefix caching
    assert grow(bm, seq, 8) == [] and len(seq.block_table) == 3  # token 8 opens block 2
    assert bm.num_used_blocks == 3 and len(set(seq.block_table)) == 3
    bm.deallocate(seq)
    assert seq.block_table == [] and bm.num_free_blocks == 8 and ref_counts(bm) == [0] * 8


def test_shared_prefix_reuses_exactly_the_full_blocks():
    bm = BlockManager(num_blocks=32, block_size=16)
    prefix = list(range(1000, 1040))  # 40 tokens: 2 full blocks + 8 tokens
    a, b = Sequence(prefix + list(range(10))), Sequence(prefix + list(range(50, 60)))
    c = Sequence(list(range(2000, 2050)))
    allocate(bm, a)
    bm.allocate(b)
    assert b.num_computed_tokens == 32  # cache hits count as computed: only the rest is prefilled
    computed(bm, b)
    allocate(bm, c)
    assert b.block_table[:2] == a.block_table[:2] and not set(b.block_table[2:]) & set(a.block_table)
    assert not set(c.block_table) & (set(a.block_table) | set(b.block_table))
    assert (a.num_cached_tokens, b.num_cached_tokens, c.num_cached_tokens) == (0, 32, 0)
    assert [bm.blocks[i].ref_count for i in a.block_table] == [2, 2, 1, 1]
    assert bm.num_used_blocks == 4 + 2 + 4
    assert (bm.hits, bm.queries) == (32, 150) and bm.hit_rate == pytest.approx(32 / 150)


def test_the_last_prompt_token_is_always_recomputed():
    bm = BlockManager(num_blocks=8, block_size=4)
    a, b = Sequence(range(8)), Sequence(range(8))  # block-aligned identical prompts
    allocate(bm, a)
    allocate(bm, b)
    assert b.num_cached_tokens == 4 and b.block_table[0] == a.block_table[0]
    assert b.block_table[1] != a.block_table[1]  # needed to produce the first output token's logits


def test_blocks_filled_during_decoding_become_cached():
    bm = BlockManager(num_blocks=8, block_size=4)
    a = Sequence([5, 6, 7])
    allocate(bm, a)
    grow(bm, a, 8)
    b = Sequence([5, 6, 7, 8, 9])
    allocate(bm, b)
    assert b.block_table[0] == a.block_table[0] and b.num_cached_tokens == 4


def test_freed_blocks_stay_cached_until_reallocated():
    bm = BlockManager(num_blocks=4, block_size=4)
    a = Sequence(range(9))
    allocate(bm, a)
    old = list(a.block_table)
    bm.deallocate(a)
    assert bm.num_free_blocks == 4
    again = Sequence(range(9))
    assert bm.can_allocate(again)
    allocate(bm, again)
    assert again.block_table[:2] == old[:2] and again.num_cached_tokens == 8
    assert bm.num_free_blocks == 1


def test_prefix_caching_disabled_never_shares():
    bm = BlockManager(num_blocks=8, block_size=4, enable_prefix_caching=False)
    a, b = Sequence(range(9)), Sequence(range(9))
    allocate(bm, a)
    allocate(bm, b)
    assert not set(a.block_table) & set(b.block_table)
    assert (b.num_cached_tokens, bm.hits, bm.queries, bm.hit_rate) == (0, 0, 0, 0.0)
    assert all(block.hash is None for block in bm.blocks)


def test_hash_collisions_are_caught_by_comparing_tokens(monkeypatch):
    monkeypatch.setattr(bm_module, "hash_block", lambda parent_hash, token_ids: 7)  # every block collides
    bm = BlockManager(num_blocks=16, block_size=4)
    x, y = [1, 2, 3, 4], [5, 6, 7, 8]
    a = Sequence(x + y + [0])  # registers X then Y under the same hash
    allocate(bm, a)
    same_tokens_other_prefix = Sequence(y + [0])  # Y's tokens match, but Y's KV was computed after X
    other_tokens = Sequence([9, 9, 9, 9, 0])
    for seq in (same_tokens_other_prefix, other_tokens):
        allocate(bm, seq)
        assert seq.num_cached_tokens == 0 and not set(seq.block_table) & set(a.block_table)
    assert bm.hits == 0


def test_a_reused_parent_block_does_not_revive_its_old_children(monkeypatch):
    monkeypatch.setattr(bm_module, "hash_block", lambda parent_hash, token_ids: hash(token_ids))  # ignores the prefix
    bm = BlockManager(num_blocks=8, block_size=4)
    x, y, w = [1] * 4, [2] * 4, [3] * 4
    a = Sequence(x)
    allocate(bm, a)
    allocate(bm, Sequence(x))  # the last prompt token is recomputed: a newer copy of X takes over X's cache entry
    for token in y:
        grow(bm, a, token)  # a = X Y, and Y's block records X's block as its parent
    p, c = a.block_table
    bm.deallocate(a)  # Y's block stays cached; X's old block, no longer findable, is reused first
    z = Sequence(w)
    allocate(bm, z)
    assert z.block_table == [p]
    probe = Sequence(w + y + [0])
    allocate(bm, probe)
    assert probe.block_table[0] == p and probe.num_cached_tokens == 4 and probe.block_table[1] != c


def test_least_recently_freed_cached_block_is_evicted_first():
    bm = BlockManager(num_blocks=4, block_size=4)
    a, b, c = Sequence([1] * 4), Sequence([2] * 4), Sequence([3] * 4)
    for seq in (a, b, c):
        allocate(bm, seq)
    blocks = {name: seq.block_table[0] for name, seq in zip("abc", (a, b, c), strict=True)}
    for seq in (b, a, c):  # free order b, a, c: b is the least recently freed
        bm.deallocate(seq)

    def cached() -> set[int]:
        return set(bm.hash_to_block_id.values())

    d = Sequence([4] * 8)  # the never-used block first, then the least recently freed one (b)
    allocate(bm, d)
    assert d.block_table[1] == blocks["b"] and cached() == {blocks["a"], blocks["c"], *d.block_table}
    e = Sequence([5] * 3)
    allocate(bm, e)
    assert e.block_table == [blocks["a"]] and blocks["c"] in cached()
    probe = Sequence([3] * 4 + [0])  # c survived: a hit revives it
    bm.deallocate(e)
    allocate(bm, probe)
    assert probe.block_table[0] == blocks["c"] and probe.num_cached_tokens == 4


def test_a_freed_sequence_loses_its_tail_before_its_prefix():
    bm = BlockManager(num_blocks=2, block_size=4)
    a = Sequence(range(8))
    allocate(bm, a)
    first, last = a.block_table
    bm.deallocate(a)
    other = Sequence([9] * 3)
    allocate(bm, other)
    assert other.block_table == [last]  # a shared prompt prefix is worth more than its tail
    bm.deallocate(other)
    probe = Sequence([0, 1, 2, 3, 0])
    allocate(bm, probe)
    assert probe.block_table[0] == first and probe.num_cached_tokens == 4


def test_uncached_blocks_are_reused_before_cached_ones():
    bm = BlockManager(num_blocks=3, block_size=4)
    full, partial = Sequence([1] * 4), Sequence([2, 2])
    allocate(bm, full)
    allocate(bm, partial)
    partial_blocks = list(partial.block_table)
    bm.deallocate(full)
    bm.deallocate(partial)  # freed later, but holds nothing worth keeping
    fresh = Sequence([3])
    allocate(bm, fresh)
    assert fresh.block_table == partial_blocks
    cached = Sequence([1] * 4 + [0])
    allocate(bm, cached)
    assert cached.num_cached_tokens == 4


def test_fork_shares_blocks_and_copies_on_write():
    bm = BlockManager(num_blocks=8, block_size=4)
    parent = Sequence(range(6))  # block 0 full, block 1 holds 2 tokens
    allocate(bm, parent)
    b0, b1 = parent.block_table
    child = parent.fork()
    bm.fork(parent, child)
    assert child.block_table == [b0, b1] and ref_counts(bm)[b0] == ref_counts(bm)[b1] == 2
    assert bm.num_used_blocks == 2
    copies = grow(bm, parent, 100)  # writes into the shared partial block
    (src, dst), = copies
    assert src == b1 and parent.block_table == [b0, dst] and dst not in (b0, b1)
    assert child.block_table == [b0, b1] and ref_counts(bm)[b1] == 1 and ref_counts(bm)[b0] == 2
    assert grow(bm, child, 200) == []  # the child now owns b1 alone: no copy
    assert grow(bm, parent, 101) == [] and grow(bm, child, 201) == []  # both blocks fill up
    assert bm.blocks[dst].hash != bm.blocks[b1].hash  # different tokens, different cache entries
    for seq in (parent, child):
        bm.deallocate(seq)
    assert bm.num_free_blocks == 8 and ref_counts(bm) == [0] * 8


def test_fork_of_a_full_last_block_needs_no_copy():
    bm = BlockManager(num_blocks=8, block_size=4)
    parent = Sequence(range(4))
    allocate(bm, parent)
    child = parent.fork()
    bm.fork(parent, child)
    assert grow(bm, parent, 9) == [] and len(parent.block_table) == 2
    assert grow(bm, child, 9) == [] and parent.block_table[1] != child.block_table[1]


def test_can_allocate_and_can_append_count_free_blocks():
    bm = BlockManager(num_blocks=2, block_size=4)
    a = Sequence(range(4))
    allocate(bm, a)
    b = Sequence(range(5, 9))
    allocate(bm, b)
    assert not bm.can_append(a) and not bm.can_allocate(Sequence([1]))
    with pytest.raises(KVCacheError, match="can_allocate"):
        bm.allocate(Sequence([1]))


def test_cache_hits_on_blocks_in_use_need_no_free_block():
    bm = BlockManager(num_blocks=3, block_size=4)
    allocate(bm, Sequence(range(5)))  # a cached full block + a partial block
    assert bm.num_free_blocks == 1
    assert bm.can_allocate(Sequence(range(6)))  # 2 blocks, one a hit on a block in use
    assert not bm.can_allocate(Sequence(range(10, 16)))  # 2 fresh blocks


def test_errors_name_the_problem_and_the_fix():
    bm = BlockManager(num_blocks=2, block_size=4)
    with pytest.raises(InputError, match="kv-cache-tokens"):
        bm.can_allocate(Sequence(range(9)))
    seq = Sequence(range(8))
    allocate(bm, seq)
    with pytest.raises(InputError, match="needs 3 KV blocks"):
        bm.can_append(seq)
    with pytest.raises(KVCacheError, match="already holds"):
        bm.allocate(seq)
    stale = list(seq.block_table)
    bm.deallocate(seq)
    with pytest.raises(KVCacheError, match="Double free"):
        bm.deallocate(seq)
    seq.block_table = stale
    with pytest.raises(KVCacheError, match="Double free"):
        bm.deallocate(seq)
    with pytest.raises(KVCacheError, match="may_append"):
        bm.may_append(Sequence([1]))
    with pytest.raises(ValidationError, match="num_blocks"):
        BlockManager(num_blocks=0)
    with pytest.raises(ValidationError, match="block_size"):
        BlockManager(num_blocks=4, block_size=2.5)


# ----- property tests: random schedules against a simulated KV cache --------------------

BLOCK_SIZE, NUM_BLOCKS = 4, 12
# Short prompts over a 2-token alphabet, many starting with one of two shared prefixes:
# content repeats often, so prefix hits, forks and collisions of the parent chain are common.
PROMPTS = st.tuples(st.sampled_from([[], [0, 1, 1, 0, 1, 0, 0, 1], [0, 1, 1, 0, 0]]),
                    st.lists(st.integers(0, 1), max_size=10)).map(lambda t: t[0] + t[1]).filter(bool)


class BlockManagerMachine(RuleBasedStateMachine):
    """A scheduler in miniature. `kv` simulates the KV cache: slot p of a sequence holds the
    prefix tokens[:p + 1] that its key/value depends on, written at prefill and on each append,
    copied by the copy-on-write pairs; reading it back checks that no sequence ever sees KV
    computed for another prefix (false sharing) or that another sequence overwrote."""

    enable_prefix_caching = True

    def __init__(self):
        super().__init__()
        self.bm = BlockManager(NUM_BLOCKS, BLOCK_SIZE, self.enable_prefix_caching)
        self.kv: dict[int, list[tuple[int, ...] | None]] = {}
        self.running: list[Sequence] = []
        self.waiting: list[Sequence] = []  # new or preempted; they hold no blocks

    def write(self, seq: Sequence, start: int) -> None:
        for p in range(start, seq.num_tokens):
            block_id = seq.block_table[p // BLOCK_SIZE]
            self.kv.setdefault(block_id, [None] * BLOCK_SIZE)[p % BLOCK_SIZE] = tuple(seq.token_ids[:p + 1])

    def schedule(self, seq: Sequence) -> None:
        if self.bm.can_allocate(seq):
            self.bm.allocate(seq)
            self.write(seq, seq.num_cached_tokens)
            computed(self.bm, seq)
            self.running.append(seq)
        else:
            self.waiting.append(seq)

    @rule(prompt=PROMPTS)
    def add(self, prompt):
        self.schedule(Sequence(prompt))

    @precondition(lambda self: self.waiting)
    @rule(data=st.data())
    def resume(self, data):
        self.schedule(self.waiting.pop(data.draw(st.integers(0, len(self.waiting) - 1))))

    @precondition(lambda self: self.running)
    @rule(data=st.data(), token=st.integers(0, 1))
    def append(self, data, token):
        seq = self.running[data.draw(st.integers(0, len(self.running) - 1))]
        if seq.num_tokens + 1 > NUM_BLOCKS * BLOCK_SIZE:
            with pytest.raises(InputError):
                self.bm.can_append(seq)
            return
        while not self.bm.can_append(seq):  # preempt the newest other sequence, as a scheduler would
            victim = next(s for s in reversed(self.running) if s is not seq)
            self.preempt_seq(victim)
        seq.append_token(token)
        for src, dst in self.bm.may_append(seq):
            self.kv[dst] = list(self.kv[src])
        self.write(seq, seq.num_tokens - 1)
        computed(self.bm, seq)

    @precondition(lambda self: self.running)
    @rule(data=st.data())
    def fork(self, data):
        parent = self.running[data.draw(st.integers(0, len(self.running) - 1))]
        child = parent.fork()
        self.bm.fork(parent, child)
        self.running.append(child)

    @precondition(lambda self: self.running)
    @rule(data=st.data())
    def free(self, data):
        self.bm.deallocate(self.running.pop(data.draw(st.integers(0, len(self.running) - 1))))

    @precondition(lambda self: self.running)
    @rule(data=st.data())
    def preempt(self, data):
        self.preempt_seq(self.running[data.draw(st.integers(0, len(self.running) - 1))])

    def preempt_seq(self, seq: Sequence) -> None:
        self.running.remove(seq)
        self.bm.deallocate(seq)
        self.waiting.append(seq)

    @invariant()
    def ref_counts_match_tables(self):
        holders = [0] * NUM_BLOCKS
        for seq in self.running:
            assert len(seq.block_table) == seq.num_blocks(BLOCK_SIZE) == len(set(seq.block_table))
            for block_id in seq.block_table:
                holders[block_id] += 1
        assert ref_counts(self.bm) == holders
        assert set(self.bm.free_block_ids) == {i for i, n in enumerate(holders) if n == 0}
        assert all(not seq.block_table for seq in self.waiting)

    @invariant()
    def every_sequence_reads_its_own_kv(self):
        for seq in self.running:
            for p in range(seq.num_tokens):
                assert self.kv[seq.block_table[p // BLOCK_SIZE]][p % BLOCK_SIZE] == tuple(seq.token_ids[:p + 1])

    @invariant()
    def hashes_match_tokens(self):
        for h, block_id in self.bm.hash_to_block_id.items():
            block = self.bm.blocks[block_id]
            assert block.hash == h and len(block.token_ids) == BLOCK_SIZE
        for seq in self.running:
            parent_hash = -1
            for i in range(seq.num_tokens // BLOCK_SIZE):  # the full blocks
                block = self.bm.blocks[seq.block_table[i]]
                if self.enable_prefix_caching:
                    assert block.token_ids == seq.block_tokens(i, BLOCK_SIZE)
                    assert block.hash == bm_module.hash_block(parent_hash, block.token_ids)  # patchable
                    parent_hash = block.hash
                else:
                    assert block.hash is None

    def teardown(self):
        for seq in self.running:
            self.bm.deallocate(seq)
        assert self.bm.num_free_blocks == NUM_BLOCKS and ref_counts(self.bm) == [0] * NUM_BLOCKS
        assert 0 <= self.bm.hits <= self.bm.queries


class NoPrefixCachingMachine(BlockManagerMachine):
    enable_prefix_caching = False


PROPERTY_SETTINGS = settings(max_examples=120, stateful_step_count=40, deadline=None,
                             suppress_health_check=[HealthCheck.too_slow, HealthCheck.filter_too_much])
TestBlockManagerMachine = BlockManagerMachine.TestCase
TestBlockManagerMachine.settings = PROPERTY_SETTINGS
TestNoPrefixCachingMachine = NoPrefixCachingMachine.TestCase
TestNoPrefixCachingMachine.settings = settings(PROPERTY_SETTINGS, max_examples=50)


@pytest.mark.parametrize("colliding_hash", [lambda parent_hash, token_ids: 7,
                                            lambda parent_hash, token_ids: hash(token_ids)],
                         ids=["constant", "ignores-prefix"])
def test_machine_survives_colliding_hashes(monkeypatch, colliding_hash):
    """Blocks hash alike: only the token + parent check stands between sequences and wrong KV."""
    monkeypatch.setattr(bm_module, "hash_block", colliding_hash)
    run_state_machine_as_test(BlockManagerMachine, settings=settings(PROPERTY_SETTINGS, max_examples=60))
