"""Run by torchrun in tests/distributed/test_tensor_parallel.py; rank 0 writes what it measured as JSON:
each parallel layer against its one-process counterpart, and tiny random models (Llama with split
and with replicated key/value heads, GPT-2) sharded over the processes against themselves whole:
logits, and greedy tokens through lmforge.generate; and the serving engine with the job's ranks as its
tensor-parallel workers (rank 0 runs LLM(..., tensor_parallel_size=2), rank 1 run_tensor_parallel_worker()).

Usage: torchrun --nproc_per_node 2 -m tests.distributed.tensor_parallel_worker OUTPUT_DIR
"""

import copy
import json
import sys
from pathlib import Path

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import nn

from lmforge import LLM, SamplingParams, generate
from lmforge.config import GPT2Config, LlamaConfig
from lmforge.distributed import destroy_distributed, init_distributed
from lmforge.distributed.parallel_layers import (
    RowParallelLinear,
    VocabParallelEmbedding,
    VocabParallelHead,
)
from lmforge.distributed.tensor_parallel import shard_model
from lmforge.engine import run_tensor_parallel_worker
from lmforge.models.gpt2 import GPT2LMHeadModel
from lmforge.models.llama import LlamaForCausalLM
from tests.parity import id_tokenizer

TINY_LLAMA = {"vocab_size": 64, "hidden_size": 32, "intermediate_size": 64, "num_hidden_layers": 2,
              "num_attention_heads": 4, "num_key_value_heads": 2, "max_position_embeddings": 64,
              "tie_word_embeddings": False}
TINY_GPT2 = {"vocab_size": 64, "n_embd": 32, "n_layer": 2, "n_head": 4, "n_positions": 64,
             "resid_pdrop": 0.0, "embd_pdrop": 0.0, "attn_pdrop": 0.0}
PROMPTS = [[5, 17, 33, 2], [60, 1], [9, 9, 41, 7, 12, 30, 3], [44]]
GREEDY = SamplingParams(temperature=0, max_tokens=12, ignore_eos=True)


def max_diff(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a - b).abs().max())


def layer_differences(rank: int, world: int) -> dict[str, float]:
    """Each parallel layer, built from a slice of a random full layer, against the full layer."""
    torch.manual_seed(0)  # the same full layers and inputs in every process
    x, ids = torch.randn(2, 5, 32), torch.randint(0, 64, (2, 7))
    full, embedding, head = nn.Linear(32, 48), nn.Embedding(64, 32), nn.Linear(32, 64)
    rows, cols, vocab = (slice(rank * size, (rank + 1) * size) for size in (48 // world, 32 // world, 64 // world))
    with torch.no_grad():
        expected = full(x)
        column = F.linear(x, full.weight[rows], full.bias[rows])  # a column-parallel shard: plain Linear
        gathered = [torch.empty_like(column) for _ in range(world)]
        dist.all_gather(gathered, column.contiguous())
        row = RowParallelLinear(full.weight[:, cols].clone(), full.bias.clone())(x[..., cols])
        embedded = VocabParallelEmbedding(embedding.weight[vocab].clone(), vocab.start, 64, scale=2.0)(ids)
        logits = VocabParallelHead(head.weight[vocab].clone(), head.bias[vocab].clone(), world)(x)
        return {"column": max_diff(torch.cat(gathered, dim=-1), expected),
                "row": max_diff(row, expected),
                "embedding": max_diff(embedded, 2.0 * embedding(ids)),
                "head": max_diff(logits, head(x))}


def randomized(model: nn.Module) -> nn.Module:
    """Weights far from their small initial values, so greedy choices are not near-ties."""
    with torch.no_grad():
        for name, parameter in model.named_parameters():
            parameter.normal_(0, parameter.shape[1] ** -0.5 if parameter.dim() > 1 else 0.1)
            if "norm" in name and name.endswith("weight"):
                parameter.add_(1.0)
    return model.eval()


def tiny_model_results(kind: str, rank: int, world: int) -> dict:
    torch.manual_seed(1)
    if kind == "gpt2":
        whole = randomized(GPT2LMHeadModel(GPT2Config(**TINY_GPT2)))
    else:
        kv_heads = {"llama-gqa": 2, "llama-mqa": 1}[kind]
        whole = randomized(LlamaForCausalLM(LlamaConfig(**{**TINY_LLAMA, "num_key_value_heads": kv_heads})))
    tokenizer = id_tokenizer(64)
    shard = copy.deepcopy(whole)
    shard_model(shard, rank, world)
    ids = torch.tensor([p + [1] * (7 - len(p)) for p in PROMPTS])
    with torch.no_grad():
        logits_diff = max_diff(shard(ids).logits, whole(ids).logits)
    tokens = lambda model: [out.outputs[0].token_ids for out in generate(model, tokenizer, PROMPTS, GREEDY)]
    return {"logits": logits_diff, "alone": tokens(whole), "sharded": tokens(shard),
            "kv_heads": shard.decoder_attention_layers()[0].num_kv_heads}


def engine_results(context, folder: Path) -> dict | None:
    """Rank 0: greedy tokens of the engine alone and split over the job's ranks (no process spawned)."""
    if context.rank != 0:
        run_tensor_parallel_worker()  # until rank 0 shuts its engine down
        return None
    torch.manual_seed(2)
    randomized(LlamaForCausalLM(LlamaConfig(**TINY_LLAMA))).save_pretrained(folder)
    engine = {"dtype": torch.float32, "kv_cache_tokens": 256, "block_size": 4, "max_num_batched_tokens": 16}
    tokens = lambda llm: [out.outputs[0].token_ids for out in llm.generate(PROMPTS, GREEDY, use_tqdm=False)]
    alone = tokens(LLM(folder, id_tokenizer(64), **engine))
    llm = LLM(folder, id_tokenizer(64), tensor_parallel_size=context.world_size, **engine)
    split, spawned = tokens(llm), len(llm.engine.runner.workers.processes)
    llm.shutdown()
    return {"alone": alone, "split": split, "spawned": spawned}


def main() -> None:
    output_dir = Path(sys.argv[1])
    context = init_distributed()
    rank, world = context.rank, context.world_size
    result = {"world": world, "layers": layer_differences(rank, world),
              "models": {kind: tiny_model_results(kind, rank, world) for kind in ("llama-gqa", "llama-mqa", "gpt2")},
              "engine": engine_results(context, output_dir / "tiny-llama")}
    if context.is_main:
        (output_dir / "result.json").write_text(json.dumps(result))
    destroy_distributed()


if __name__ == "__main__":
    main()
