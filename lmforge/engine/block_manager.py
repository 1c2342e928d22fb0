"""BlockManager: paged KV-cache bookkeeping (vLLM's PagedAttention), with prefix caching and copy-on-write.

A contiguous KV cache per request must reserve room for the longest possible output; vLLM measured
60-80% of KV memory wasted that way. Paging hands out fixed-size blocks on demand through a per-sequence
block table, like virtual memory, and wastes < 4% (only each sequence's last, partly filled block).
Full blocks are content-addressed, so requests with a common prefix (a system prompt) share its KV.
"""

from __future__ import annotations

from collections import OrderedDict

from lmforge.engine.sequence import Sequence
from lmforge.errors import InputError, KVCacheError, require_counts

Parent = tuple[int, int]  # (block_id, version): one incarnation of the previous block of a chain


def hash_block(parent_hash: int, token_ids: tuple[int, ...]) -> int:
    """Hash of a full block, chained over its parent's hash, so it identifies the whole prefix.

    Python's tuple-of-int hash is not salted by PYTHONHASHSEED, so it is stable across processes;
    it is 64-bit, not collision-free, which is why a hit is also checked against the stored tokens
    and parent (`BlockManager._match_prefix`) and a collision can only cost a cache miss.
    """
    return hash((parent_hash, token_ids))


class Block:
    __slots__ = ("block_id", "hash", "parent", "ref_count", "token_ids", "version")

    def __init__(self, block_id: int):
        self.block_id = block_id
        self.ref_count = 0  # sequences whose block table holds this block
        self.hash: int | None = None  # set once the block is full and computed (with prefix caching)
        self.token_ids: tuple[int, ...] = ()  # the tokens of a hashed block, to verify cache hits
        self.parent: Parent | None = None  # previous block of the hashed chain; None for the first block
        self.version = 0  # bumped whenever the block is handed out for new content

    def __repr__(self) -> str:
        return f"Block({self.block_id}, ref_count={self.ref_count}, hash={self.hash})"


class BlockManager:
    def __init__(self, num_blocks: int, block_size: int = 16, enable_prefix_caching: bool = True):
        require_counts("BlockManager", {"num_blocks": num_blocks, "block_size": block_size})
        self.num_blocks = num_blocks
        self.block_size = block_size
        self.enable_prefix_caching = enable_prefix_caching
        self.blocks = [Block(i) for i in range(num_blocks)]
        # Free blocks in eviction order (head first). Freed blocks with cached content go to the tail
        # and stay findable through hash_to_block_id until reallocated, so the least recently freed
        # cached block is evicted first; blocks with nothing worth keeping go to the head.
        self.free_block_ids: OrderedDict[int, None] = OrderedDict.fromkeys(range(num_blocks))
        self.hash_to_block_id: dict[int, int] = {}
        self.hits = 0  # prompt tokens served from the prefix cache
        self.queries = 0  # prompt tokens looked up in the prefix cache

    # ----- stats -------------------------------------------------------------------------

    @property
    def num_free_blocks(self) -> int:
        """Blocks with no sequence (some still hold cached prefixes that a hit can revive)."""
        return len(self.free_block_ids)

    @property
    def num_used_blocks(self) -> int:
        return self.num_blocks - self.num_free_blocks

    @property
    def usage(self) -> float:
        return self.num_used_blocks / self.num_blocks

    @property
    def hit_rate(self) -> float:
        return self.hits / self.queries if self.queries else 0.0

    # ----- allocation of a whole prompt --------------------------------------------------

    def can_allocate(self, seq: Sequence) -> bool:
        """Whether `allocate(seq)` would find enough free blocks now (cache hits on blocks in use are free)."""
        self._check_fits(seq, seq.num_tokens)
        shared = sum(self.blocks[i].ref_count > 0 for i in self._match_prefix(seq))
        return self.num_free_blocks >= seq.num_blocks(self.block_size) - shared

    def allocate(self, seq: Sequence) -> None:
        """Give `seq` blocks for all its tokens, reusing cached blocks of an identical prefix."""
        if seq.block_table:
            raise KVCacheError(f"Sequence {seq.seq_id} already holds blocks {seq.block_table}; "
                               "deallocate it before allocating again.")
        if not self.can_allocate(seq):
            raise KVCacheError(f"Not enough free KV blocks for sequence {seq.seq_id} "
                               f"({self.num_free_blocks} free); check can_allocate() first.")
        cached = self._match_prefix(seq)
        for i in range(seq.num_blocks(self.block_size)):
            if i < len(cached):
                block = self.blocks[cached[i]]
                if block.ref_count == 0:
                    del self.free_block_ids[block.block_id]  # revive a freed cached block
                block.ref_count += 1
                seq.block_table.append(block.block_id)
            else:
                seq.block_table.append(self._allocate_block().block_id)
        seq.num_cached_tokens = seq.num_computed_tokens = len(cached) * self.block_size
        if self.enable_prefix_caching:
            self.queries += seq.num_tokens
            self.hits += seq.num_cached_tokens

    def num_cached_prefix_tokens(self, seq: Sequence) -> int:
        """Leading tokens of `seq` whose KV the prefix cache holds now (what `allocate` would reuse)."""
        return len(self._match_prefix(seq)) * self.block_size

    def _check_fits(self, seq: Sequence, num_tokens: int) -> None:
        needed = (num_tokens + self.block_size - 1) // self.block_size
        if needed > self.num_blocks:
            raise InputError(
                f"Sequence {seq.request_id!r} needs {needed} KV blocks for {num_tokens} tokens (block size "
                f"{self.block_size}) but the whole KV cache has {self.num_blocks} blocks "
                f"({self.num_blocks * self.block_size} tokens); shorten the prompt, lower max_tokens, or give "
                "the cache more memory (kv-cache-tokens / num_blocks).")

    def _match_prefix(self, seq: Sequence) -> list[int]:
        """Ids of the cached blocks that hold seq's leading full blocks, verified token by token.

        The last prompt token is never taken from the cache: its forward pass yields the logits
        of the first output token. A hit needs equal tokens *and* the same parent incarnation, so
        by induction the whole prefix matches even if two different prefixes share a hash.
        """
        if not self.enable_prefix_caching:
            return []
        ids: list[int] = []
        parent_hash, parent = -1, None
        for i in range((seq.num_tokens - 1) // self.block_size):
            tokens = seq.block_tokens(i, self.block_size)
            h = hash_block(parent_hash, tokens)
            block_id = self.hash_to_block_id.get(h)
            if block_id is None:
                break
            block = self.blocks[block_id]
            if block.token_ids != tokens or block.parent != parent:
                break
            ids.append(block_id)
            parent_hash, parent = h, (block_id, block.version)
        return ids

    # ----- decoding ----------------------------------------------------------------------

    def can_append(self, seq: Sequence) -> bool:
        """Whether `may_append(seq)` after one more token finds the free block it may need."""
        self._check_fits(seq, seq.num_tokens + 1)
        return self.num_free_blocks >= self.needs_block(seq, seq.num_tokens + 1)

    def may_append(self, seq: Sequence) -> list[tuple[int, int]]:
        """Make room for the token just appended to `seq`; returns the (src, dst) block copies to do.

        A new block is opened when the token starts one. A token landing in a block shared with a
        fork gets a private copy first (copy-on-write): the model runner must copy the KV of every
        (src, dst) pair before writing. Blocks become findable only once computed (`cache_computed`).
        """
        if not seq.block_table or len(seq.block_table) < seq.num_blocks(self.block_size) - 1:
            raise KVCacheError(f"Sequence {seq.seq_id} has {seq.num_tokens} tokens but only "
                               f"{len(seq.block_table)} blocks; call may_append after every append_token.")
        copies: list[tuple[int, int]] = []
        if self.needs_block(seq, seq.num_tokens):
            if len(seq.block_table) < seq.num_blocks(self.block_size):
                seq.block_table.append(self._allocate_block().block_id)
            else:  # copy-on-write of the shared last block
                shared = self.blocks[seq.block_table[-1]]
                shared.ref_count -= 1
                copy = self._allocate_block()
                seq.block_table[-1] = copy.block_id
                copies.append((shared.block_id, copy.block_id))
        return copies

    def cache_computed(self, seq: Sequence) -> None:
        """Make seq's full blocks whose KV is computed (`seq.num_computed_tokens`) findable by later prompts.

        Called after every forward step. A block is never offered to another request before its
        keys and values exist: a prompt prefilled in chunks, or a sequence preempted mid-prefill,
        must not hand out blocks that were only reserved.
        """
        if not self.enable_prefix_caching:
            return
        computed_blocks = min(seq.num_computed_tokens // self.block_size, len(seq.block_table))
        first = computed_blocks
        while first > 0 and self.blocks[seq.block_table[first - 1]].hash is None:
            first -= 1  # blocks are registered in order: find where the unregistered run starts
        for i in range(first, computed_blocks):
            self._register_if_full(seq, i)

    def needs_block(self, seq: Sequence, num_tokens: int) -> bool:
        """Whether the token at position num_tokens - 1 needs a new block or a private copy."""
        if (num_tokens - 1) // self.block_size >= len(seq.block_table):
            return True
        return self.blocks[seq.block_table[-1]].ref_count > 1

    # ----- forks and freeing -------------------------------------------------------------

    def fork(self, parent: Sequence, child: Sequence) -> None:
        """Let `child` (from `parent.fork()`) share every block of `parent`; writes copy lazily."""
        if child.block_table or child.token_ids != parent.token_ids:
            raise KVCacheError(f"Sequence {child.seq_id} cannot fork {parent.seq_id}: the child must come "
                               "from parent.fork() and hold no blocks yet.")
        for block_id in parent.block_table:
            self.blocks[block_id].ref_count += 1
        child.block_table = list(parent.block_table)
        child.num_cached_tokens = parent.num_cached_tokens
        child.num_computed_tokens = parent.num_computed_tokens

    def deallocate(self, seq: Sequence) -> None:
        """Release seq's blocks (finish or preemption), last block first so prefixes stay cached longest."""
        if not seq.block_table or any(self.blocks[i].ref_count < 1 for i in seq.block_table):
            raise KVCacheError(f"Double free: sequence {seq.seq_id} holds no live blocks {seq.block_table}; "
                               "deallocate each sequence once, after allocate or fork.")
        for block_id in reversed(seq.block_table):
            block = self.blocks[block_id]
            block.ref_count -= 1
            if block.ref_count == 0:
                self._free_block(block)
        seq.block_table = []
        seq.num_cached_tokens = seq.num_computed_tokens = 0

    # ----- single blocks -----------------------------------------------------------------

    def _allocate_block(self) -> Block:
        if not self.free_block_ids:
            raise KVCacheError("No free KV blocks; check can_allocate/can_append and preempt a sequence first.")
        block = self.blocks[self.free_block_ids.popitem(last=False)[0]]
        if block.hash is not None and self.hash_to_block_id.get(block.hash) == block.block_id:
            del self.hash_to_block_id[block.hash]  # evict its cached content
        block.hash, block.token_ids, block.parent = None, (), None
        block.version += 1
        block.ref_count = 1
        return block

    def _free_block(self, block: Block) -> None:
        self.free_block_ids[block.block_id] = None  # tail: evicted last
        if block.hash is None or self.hash_to_block_id.get(block.hash) != block.block_id:
            block.hash = None  # nothing findable in it: reuse it first
            self.free_block_ids.move_to_end(block.block_id, last=False)

    def _register_if_full(self, seq: Sequence, i: int) -> None:
        """Hash seq's block i if it is full, chained over block i - 1, and make it findable."""
        tokens = seq.block_tokens(i, self.block_size)
        if not self.enable_prefix_caching or len(tokens) < self.block_size:
            return
        block = self.blocks[seq.block_table[i]]
        previous = self.blocks[seq.block_table[i - 1]] if i > 0 else None  # full, so hashed already
        block.hash = hash_block(previous.hash if previous else -1, tokens)
        block.token_ids = tokens
        block.parent = (previous.block_id, previous.version) if previous else None
        self.hash_to_block_id[block.hash] = block.block_id  # the newest copy wins
