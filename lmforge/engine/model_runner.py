"""ModelRunner: turns one scheduled step into one forward pass over a packed batch.

Every scheduled sequence contributes its new tokens — one for a decode, a chunk for a prompt —
to a single row of tokens, so no compute is spent on padding. The paged KV cache plans where
each token's key/value goes and what each query reads; only the last token of a sequence that
samples this step goes through the LM head.
"""

from __future__ import annotations

import torch

from lmforge.engine.scheduler import SchedulerOutput
from lmforge.nn.fusion import fuse_projections
from lmforge.nn.paged_kv_cache import PagedKVCache, Span


class ModelRunner:
    def __init__(self, model, num_blocks: int, block_size: int):
        fuse_projections(model)  # one matmul for q/k/v and for gate/up
        self.model = model.eval()
        self.cache = PagedKVCache.for_model(model, num_blocks, block_size)
        self.device = model.device

    @torch.inference_mode()
    def execute(self, out: SchedulerOutput) -> torch.Tensor:
        """Run the step; float32 next-token logits [len(out.sampling), vocab], in `out.sampling` order."""
        self.cache.copy_blocks(out.block_copies)  # copy-on-write before anything is written
        scheduled = sorted(out.scheduled, key=_packing_order)
        spans, token_ids, sampled_rows = [], [], {}
        for seq, n in scheduled:
            start = seq.num_computed_tokens
            spans.append(Span(seq.block_table, start, n))
            token_ids.extend(seq.token_ids[start:start + n])
            if start + n == seq.num_tokens:
                sampled_rows[seq.seq_id] = len(token_ids) - 1  # its last token predicts the next one
        positions = self.cache.prepare(spans)
        keep = torch.tensor([sampled_rows[seq.seq_id] for seq in out.sampling], dtype=torch.long, device=self.device)
        ids = torch.tensor([token_ids], device=self.device)
        logits = self.model(ids, position_ids=positions[None], kv_cache=self.cache, logits_to_keep=keep).logits
        return logits[0].float()


def _packing_order(item: tuple) -> tuple[bool, int]:
    """Single-token spans (decodes) first, shortest context first: the paged cache attends them in a
    few batched calls over contexts of similar length. Prompt chunks follow in scheduling order."""
    seq, n = item
    return (n != 1, seq.num_computed_tokens if n == 1 else 0)
