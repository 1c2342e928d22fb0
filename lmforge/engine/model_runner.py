"""ModelRunner: turns one scheduled step into one forward pass over a packed batch.

Every scheduled sequence contributes its new tokens — one for a decode, a chunk for a prompt —
to a single row of tokens, so no compute is spent on padding. The paged KV cache plans where
each token's key/value goes and what each query reads; only the last token of a sequence that
samples this step goes through the LM head.

Under tensor parallelism (`workers`) the step's plan, plain data, goes to every worker process
first; each runs the same forward pass over its shard of the model and of the KV cache.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from lmforge.engine.scheduler import SchedulerOutput
from lmforge.nn.fusion import fuse_projections
from lmforge.nn.paged_kv_cache import PagedKVCache, Span


@dataclass
class StepInputs:
    """One step as plain data: the KV blocks to copy first, then the packed tokens and their spans."""

    block_copies: list[tuple[int, int]]
    spans: list[Span]
    token_ids: list[int]
    sampled_rows: list[int]  # the rows of the packed batch whose logits are sampled, in `out.sampling` order


class ModelRunner:
    def __init__(self, model, num_blocks: int, block_size: int, workers=None):
        """`workers`: a tensor-parallel group (lmforge.engine.tensor_parallel) that runs every step too."""
        fuse_projections(model)  # one matmul for q/k/v and for gate/up
        self.model = model.eval()
        self.cache = PagedKVCache.for_model(model, num_blocks, block_size)
        self.device = model.device
        self.workers = workers
        if workers is not None:
            workers.start_runners(num_blocks, block_size)

    def execute(self, out: SchedulerOutput) -> torch.Tensor:
        """Run the step; float32 next-token logits [len(out.sampling), vocab], in `out.sampling` order."""
        step = plan_step(out)
        if self.workers is None:
            return self.run(step)
        return self.workers.run(step, self.run)

    @torch.inference_mode()
    def run(self, step: StepInputs) -> torch.Tensor:
        self.cache.copy_blocks(step.block_copies)  # copy-on-write before anything is written
        positions = self.cache.prepare(step.spans)
        keep = torch.tensor(step.sampled_rows, dtype=torch.long, device=self.device)
        ids = torch.tensor([step.token_ids], device=self.device)
        logits = self.model(ids, position_ids=positions[None], kv_cache=self.cache, logits_to_keep=keep).logits
        return logits[0].float()


def plan_step(out: SchedulerOutput) -> StepInputs:
    """Pack the scheduled sequences' new tokens into one row, decodes first."""
    spans, token_ids, sampled_rows = [], [], {}
    for seq, n in sorted(out.scheduled, key=_packing_order):
        start = seq.num_computed_tokens
        spans.append(Span(seq.block_table, start, n))
        token_ids.extend(seq.token_ids[start:start + n])
        if start + n == seq.num_tokens:
            sampled_rows[seq.seq_id] = len(token_ids) - 1  # its last token predicts the next one
    return StepInputs(out.block_copies, spans, token_ids, [sampled_rows[seq.seq_id] for seq in out.sampling])


def _packing_order(item: tuple) -> tuple[bool, int]:
    """Single-token spans (decodes) first, shortest context first: the paged cache attends them in a
    few batched calls over contexts of similar length. Prompt chunks follow in scheduling order."""
    seq, n = item
    return (n != 1, seq.num_computed_tokens if n == 1 else 0)
