"""Offline serving throughput, KV-cache memory use and prefix caching: lmforge's engine vs HF transformers.

Protocol (nano-vllm's, scaled to a small CPU): 64 requests of random prompt token ids with lengths
uniform in [32, 512] and output lengths uniform in [16, 128], seed 0, EOS ignored, SmolLM2-135M-Instruct
in fp32. Reported: output tokens/s and useful tokens/s (prompt + requested output) for
- lmforge: `LLM.generate` (continuous batching, chunked prefill, paged KV cache);
- HF static batches: `generate` on left-padded batches in arrival order, each to its longest output;
- HF continuous batching: transformers' ContinuousBatchingManager with per-request max_new_tokens.
The fp32 ceiling is measured here: the model's own weight matrices multiplied by a 256-token batch
give this machine's matmul rate; a token costs 2 FLOPs per weight of the transformer layers, plus the
LM head for sampled tokens only.

Also: KV memory utilisation at the engine's peak (token slots used / slots held) against contiguous
per-request caches, and 64 requests sharing a 256-token system prompt with and without prefix caching.
Usage: python -m benchmarks.throughput [--requests 64] [--hf-batch-sizes 16] [--skip-hf]
"""

from __future__ import annotations

import argparse
import random
import statistics
import time

import torch
import torch.nn.functional as F

from benchmarks.report import machine_line, markdown_table, write_section
from lmforge import LLM, AutoModelForCausalLM, AutoTokenizer, LLMEngine, SamplingParams
from lmforge.engine import EngineConfig
from lmforge.generation.session import left_pad
from lmforge.hardware import fast_batched_dtype
from lmforge.sources import resolve

MODEL = "smollm2-135m-instruct"


def workload(count: int, seed: int, vocab: int) -> tuple[list[list[int]], list[int]]:
    rng = random.Random(seed)
    prompts = [[rng.randrange(vocab) for _ in range(rng.randint(32, 512))] for _ in range(count)]
    return prompts, [rng.randint(16, 128) for _ in range(count)]


def ceiling_tokens_per_second(model, prompts: list[list[int]], outputs: list[int]) -> tuple[float, float]:
    """(matmul GFLOP/s measured with the model's layer weights, useful tokens/s that rate allows)."""
    weights = [m.weight for m in model.model.layers.modules() if isinstance(m, torch.nn.Linear)]
    x = {w.shape[1]: torch.randn(256, w.shape[1]) for w in weights}
    with torch.inference_mode():
        for w in weights:  # warm up
            F.linear(x[w.shape[1]], w)
        runs = []
        for _ in range(10):
            start = time.perf_counter()
            for w in weights:
                F.linear(x[w.shape[1]], w)
            runs.append(time.perf_counter() - start)
    layer_params = sum(w.numel() for w in weights)
    gflops = 2 * 256 * layer_params / min(runs) / 1e9
    head_params = model.lm_head.weight.numel()
    total_flops = 2 * layer_params * (sum(map(len, prompts)) + sum(outputs)) + 2 * head_params * sum(outputs)
    useful = sum(map(len, prompts)) + sum(outputs)
    return gflops, useful / (total_flops / (gflops * 1e9))


def run_lmforge(model, tokenizer, prompts, outputs, args) -> tuple[float, dict]:
    """Seconds for the whole workload, and the engine's peak KV utilisation."""
    config = EngineConfig(kv_cache_tokens=args.kv_cache_tokens, max_model_len=1024, max_num_seqs=args.max_num_seqs,
                          max_num_batched_tokens=args.max_num_batched_tokens)
    engine = LLMEngine(model, tokenizer, config)
    engine.add_request("warmup", [1, 2, 3], SamplingParams(max_tokens=2))
    while engine.has_unfinished_requests():
        engine.step()
    start = time.perf_counter()
    for i, (prompt, n) in enumerate(zip(prompts, outputs)):
        engine.add_request(str(i), prompt, SamplingParams(temperature=0, max_tokens=n, ignore_eos=True))
    peak = {"used": 0, "held": 1, "contiguous": 1}
    while engine.has_unfinished_requests():
        engine.step()
        running = engine.scheduler.running
        held = engine.block_manager.num_used_blocks * engine.block_manager.block_size
        used = sum(seq.num_tokens for seq in running)
        if used > peak["used"]:  # a per-request cache reserves prompt + max_tokens for each running sequence
            contiguous = sum(seq.num_prompt_tokens + seq.params.max_tokens for seq in running)
            peak = {"used": used, "held": held, "contiguous": contiguous}
    return time.perf_counter() - start, peak


def run_hf_static(hf_model, prompts, outputs, batch_size: int) -> float:
    start = time.perf_counter()
    for first in range(0, len(prompts), batch_size):
        batch, wanted = prompts[first:first + batch_size], outputs[first:first + batch_size]
        ids, mask = left_pad(batch, pad_id=0)
        with torch.inference_mode():
            hf_model.generate(ids, attention_mask=mask, max_new_tokens=max(wanted), min_new_tokens=max(wanted),
                              do_sample=False, eos_token_id=None, pad_token_id=0)
    return time.perf_counter() - start


def run_hf_continuous(hf_model, prompts, outputs) -> float:
    from transformers import GenerationConfig

    config = GenerationConfig(do_sample=False, eos_token_id=None, pad_token_id=0, max_new_tokens=max(outputs))
    manager = hf_model.init_continuous_batching(generation_config=config)
    manager.start()
    start = time.perf_counter()
    try:
        for i, (prompt, n) in enumerate(zip(prompts, outputs)):
            manager.add_request(prompt, request_id=str(i), max_new_tokens=n)
        done = set()
        while len(done) < len(prompts):
            result = manager.get_result(timeout=600)
            if result is None:
                raise RuntimeError("the continuous batching manager stopped before finishing every request")
            if result.is_finished():
                done.add(result.request_id)
        return time.perf_counter() - start
    finally:
        manager.stop(block=True)


def shared_prefix(model, tokenizer, args) -> list[list[str]]:
    """64 requests = one 256-token system prompt + a 16-64 token question; 16 output tokens each."""
    rng = random.Random(1)
    system = [rng.randrange(1000, 40000) for _ in range(256)]
    prompts = [system + [rng.randrange(1000, 40000) for _ in range(rng.randint(16, 64))] for _ in range(64)]
    params = SamplingParams(temperature=0, max_tokens=16, ignore_eos=True)
    questions = sum(len(p) - len(system) for p in prompts)  # always computed: they differ per request
    rows = []
    for caching in (False, True):
        llm = LLM(model, tokenizer, kv_cache_tokens=args.kv_cache_tokens, max_model_len=1024,
                  max_num_seqs=args.max_num_seqs, max_num_batched_tokens=args.max_num_batched_tokens,
                  enable_prefix_caching=caching)
        start = time.perf_counter()
        outputs = llm.generate(prompts, params, use_tqdm=False)
        seconds = time.perf_counter() - start
        stats = llm.engine.stats
        ttft = statistics.mean(out.metrics.time_to_first_token for out in outputs)
        computed = stats.prompt_tokens_computed
        rows.append(["on" if caching else "off", f"{computed} / {sum(map(len, prompts))}",
                     f"{computed - questions} / {64 * len(system)}", f"{stats.prefix_cache_hit_rate:.0%}",
                     f"{ttft:.2f}", f"{seconds:.1f}"])
    (off, off_system), (on, on_system) = [[int(cell.split(" / ")[0]) for cell in row[1:3]] for row in rows]
    rows.append(["saving", f"{1 - on / off:.0%} fewer", f"{1 - on_system / off_system:.0%} fewer", "",
                 f"{1 - float(rows[1][4]) / float(rows[0][4]):.0%} lower", ""])
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--requests", type=int, default=64)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--hf-batch-sizes", type=int, nargs="*", default=[16])
    parser.add_argument("--skip-hf", action="store_true", help="run lmforge only (no table is written)")
    parser.add_argument("--max-num-seqs", type=int, default=64)
    parser.add_argument("--max-num-batched-tokens", type=int, default=512)
    parser.add_argument("--kv-cache-tokens", type=int, default=64 * 1024)
    args = parser.parse_args()

    model, tokenizer = AutoModelForCausalLM.from_pretrained(MODEL), AutoTokenizer.from_pretrained(MODEL)
    prompts, outputs = workload(args.requests, args.seed, model.config.vocab_size)
    useful = sum(map(len, prompts)) + sum(outputs)
    gflops, ceiling = ceiling_tokens_per_second(model, prompts, outputs)
    print(f"{args.requests} requests, {sum(map(len, prompts))} prompt + {sum(outputs)} output tokens; "
          f"matmul {gflops:.1f} GFLOP/s -> ceiling {ceiling:.0f} useful tok/s", flush=True)

    results = {}
    seconds, peak = run_lmforge(model, tokenizer, prompts, outputs, args)
    results["lmforge LLM.generate (continuous batching, paged KV)"] = seconds
    print(f"lmforge: {seconds:.1f} s, {sum(outputs) / seconds:.1f} output tok/s", flush=True)
    if args.skip_hf:
        return

    from transformers import AutoModelForCausalLM as HFAutoModel

    path = resolve(MODEL)
    hf_model = HFAutoModel.from_pretrained(path.parent, gguf_file=path.name, dtype=torch.float32).eval()
    for batch_size in args.hf_batch_sizes:
        seconds = run_hf_static(hf_model, prompts, outputs, batch_size)
        results[f"HF generate, static batches of {batch_size}"] = seconds
        print(f"HF static {batch_size}: {seconds:.1f} s", flush=True)
    try:
        seconds = run_hf_continuous(hf_model, prompts, outputs)
        results["HF continuous batching (ContinuousBatchingManager)"] = seconds
        print(f"HF continuous batching: {seconds:.1f} s", flush=True)
    except Exception as exc:  # report, do not hide: the table says it failed
        print(f"HF continuous batching failed: {exc}", flush=True)

    best_hf = min(s for name, s in results.items() if name.startswith("HF"))
    rows = [[name, f"{s:.1f}", f"{sum(outputs) / s:.1f}", f"{useful / s:.1f}", f"{useful / s / ceiling:.0%}",
             f"{best_hf / s:.2f}x"] for name, s in results.items()]
    table = markdown_table(["system", "seconds", "output tok/s", "useful tok/s", "of ceiling", "vs best HF"], rows)
    bf16_section = ""
    if fast_batched_dtype("cpu") == torch.bfloat16:  # this CPU multiplies bf16 natively: what dtype="auto" picks
        low = {"lmforge LLM.generate, bfloat16": run_lmforge(model.to(torch.bfloat16), tokenizer, prompts, outputs,
                                                               args)[0],
               f"HF generate, bfloat16, static batches of {args.hf_batch_sizes[0]}": run_hf_static(
                   hf_model.to(torch.bfloat16), prompts, outputs, args.hf_batch_sizes[0])}
        model.to(torch.float32)
        hf_low = low[f"HF generate, bfloat16, static batches of {args.hf_batch_sizes[0]}"]
        bf16_rows = [[name, f"{s:.1f}", f"{sum(outputs) / s:.1f}", f"{useful / s:.1f}", f"{hf_low / s:.2f}x",
                      f"{best_hf / s:.2f}x"] for name, s in low.items()]
        bf16_section = ("This CPU multiplies bfloat16 natively (a batched bf16 matmul measured >= 1.5x faster than "
                        "fp32), so `dtype=\"auto\"` (the default of `LLM` and `lmforge serve`) loads the model in "
                        "bf16. The same workload in bf16:\n\n" + markdown_table(
                            ["system", "seconds", "output tok/s", "useful tok/s", "vs HF bf16", "vs best HF fp32"],
                            bf16_rows) + "\n")
        print(bf16_section, flush=True)
    memory = markdown_table(
        ["KV cache", "token slots used at peak", "slots allocated", "utilisation"],
        [["lmforge paged (block 16)", peak["used"], peak["held"], f"{peak['used'] / peak['held']:.1%}"],
         ["contiguous per request (prompt + max_tokens)", peak["used"], peak["contiguous"],
          f"{peak['used'] / peak['contiguous']:.1%}"]])
    prefix = markdown_table(["prefix caching", "prefill tokens computed", "of them system prompt", "hit rate",
                             "mean TTFT (s)", "seconds"], shared_prefix(model, tokenizer, args))
    write_section("throughput", f"""## Offline throughput (`benchmarks/throughput.py`)

{machine_line()}. SmolLM2-135M-Instruct fp32; {args.requests} requests, prompts of 32-512 random tokens,
outputs of 16-128 tokens (seed {args.seed}, EOS ignored): {sum(map(len, prompts))} prompt + {sum(outputs)} output
tokens. lmforge: max_num_seqs {args.max_num_seqs}, max_num_batched_tokens {args.max_num_batched_tokens}, block
size 16. Ceiling: {gflops:.1f} GFLOP/s measured with the model's own weight matrices on a 256-token batch, i.e.
{ceiling:.0f} useful tokens/s.

{table}

{bf16_section}
KV memory at the engine's busiest step (most tokens held), against a contiguous cache that reserves
prompt + max_tokens per request (the most favourable contiguous sizing; max_model_len would waste more):

{memory}

64 requests sharing a 256-token system prompt (+ 16-64 token questions, 16 output tokens), all queued at once.
The questions differ per request and are always computed, so the total saving is bounded by the share of
system-prompt tokens (85% here). A request whose prefix another request is prefilling right now waits for
those blocks instead of computing them again, so the system prompt is computed once:

{prefix}
""")


if __name__ == "__main__":
    main()
