"""Tensor parallelism on this machine: SmolLM2-135M-Instruct whole (TP=1) and split over 3 processes (TP=3).

Both engines live in this process (TP=3 starts 2 worker processes; gloo over loopback on CPU, NCCL
on CUDA with one GPU per process); runs alternate between them, --repeats times, medians reported:
- the weights each process holds, and the bytes of its KV cache per token;
- single-stream greedy decode tokens/s (a chat prompt, --new-tokens tokens, EOS ignored), from the
  request's first token to its last;
- batched decode: --batch streams at once, output tokens/s over the whole run;
- the time rank 0 spends in collectives (the layers' all-reduces and all-gathers, and the step's
  broadcast) per engine step, which includes waiting for the slowest process.
float32 everywhere. On CPU, TP=1 uses all torch threads and each TP=3 process cores // 3 (at least 1).
Writes the table to docs/benchmarks.md (section "tensor parallel").
Usage: python -m benchmarks.tp [--repeats 5] [--new-tokens 48] [--batch 8]
"""

from __future__ import annotations

import argparse
import os
import statistics
import time
from contextlib import contextmanager

import torch
import torch.distributed as dist

from benchmarks.report import machine_line, markdown_table, write_section
from lmforge import LLM, SamplingParams
from lmforge.nn.paged_kv_cache import PagedKVCache

MODEL = "smollm2-135m-instruct"
COLLECTIVES = ("all_reduce", "all_gather", "broadcast_object_list")


@contextmanager
def collective_seconds(totals: list[float]):
    """Add the wall time this process spends inside torch.distributed's collectives to totals[0]."""
    originals = {name: getattr(dist, name) for name in COLLECTIVES}

    def timed(function):
        def call(*args, **kwargs):
            start = time.perf_counter()
            try:
                return function(*args, **kwargs)
            finally:
                totals[0] += time.perf_counter() - start
        return call

    for name, function in originals.items():
        setattr(dist, name, timed(function))
    try:
        yield
    finally:
        for name, function in originals.items():
            setattr(dist, name, function)


def prompts(llm: LLM, count: int) -> list[list[int]]:
    questions = ["Explain how a bicycle stays upright.", "Write a short story about a lighthouse.",
                 "What are the main causes of inflation?", "Describe the water cycle."]
    tokenizer = llm.tokenizer
    return [tokenizer.encode(tokenizer.apply_chat_template([{"role": "user", "content": questions[i % 4]}],
                                                           add_generation_prompt=True), add_special_tokens=False)
            for i in range(count)]


def measure(llm: LLM, threads: int, new_tokens: int, batch: int) -> dict[str, float]:
    """One single-stream run and one batched run; collective time per step when split."""
    torch.set_num_threads(threads)
    params = SamplingParams(temperature=0, max_tokens=new_tokens, ignore_eos=True)
    runner, steps, totals = llm.engine.runner, [0], [0.0]
    execute = runner.execute

    def counted(out):
        steps[0] += 1
        return execute(out)

    runner.execute = counted
    try:
        with collective_seconds(totals):
            start = time.perf_counter()
            single = llm.generate(prompts(llm, 1), params, use_tqdm=False)[0].metrics
            single_seconds = time.perf_counter() - start
            start = time.perf_counter()
            outputs = llm.generate(prompts(llm, batch), params, use_tqdm=False)
            batch_seconds = time.perf_counter() - start
    finally:
        del runner.execute  # the class's method again
    decoded = sum(len(output.outputs[0].token_ids) for output in outputs)
    return {"single": (new_tokens - 1) / (single.last_token_time - single.first_token_time),
            "batch": decoded / batch_seconds, "collective_ms": 1000 * totals[0] / steps[0],
            "collective_share": totals[0] / (single_seconds + batch_seconds)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--new-tokens", type=int, default=48)
    parser.add_argument("--batch", type=int, default=8)
    args = parser.parse_args()
    load_before = os.getloadavg()[0]
    threads = torch.get_num_threads()
    engine = {"dtype": torch.float32, "kv_cache_tokens": 4096, "max_model_len": 1024}
    systems = {"TP=1": (LLM(MODEL, **engine), threads)}
    systems["TP=3"] = (LLM(MODEL, tensor_parallel_size=3, **engine), torch.get_num_threads())
    runs: dict[str, list[dict[str, float]]] = {name: [] for name in systems}
    try:
        for name, (llm, system_threads) in systems.items():
            measure(llm, system_threads, 4, 2)  # warm-up
        for _ in range(args.repeats):
            for name, (llm, system_threads) in systems.items():
                runs[name].append(measure(llm, system_threads, args.new_tokens, args.batch))
        rows = []
        for name, (llm, system_threads) in systems.items():
            model = llm.engine.model
            weights = sum(p.numel() * p.element_size() for p in model.parameters())
            kv_per_token = PagedKVCache.bytes_per_block(model, 1)
            median = {key: statistics.median(run[key] for run in runs[name]) for key in runs[name][0]}
            split = name != "TP=1"
            rows.append([name, system_threads, f"{weights / 2**20:.0f}", f"{kv_per_token / 1024:.1f}",
                         f"{median['single']:.1f}", f"{median['batch']:.1f}",
                         f"{median['collective_ms']:.2f}" if split else "-",
                         f"{100 * median['collective_share']:.0f}%" if split else "-"])
    finally:
        for llm, _ in systems.values():
            llm.shutdown()
        torch.set_num_threads(threads)
    single_ratio, batch_ratio = (float(rows[1][i]) / float(rows[0][i]) for i in (4, 5))
    table = markdown_table(["system", "threads per process", "weights per process (MiB)", "KV per token (KiB)",
                            "decode tok/s (1 stream)", f"decode tok/s ({args.batch} streams)",
                            "collectives per step (ms, rank 0)", "share of run time"], rows)
    write_section("tensor parallel", f"""## Tensor parallelism (`benchmarks/tp.py`)

SmolLM2-135M-Instruct, float32, through the engine (`LLM(..., tensor_parallel_size=N)`): {args.new_tokens} new
tokens per stream, median of {args.repeats} alternating runs. Each of the 3 processes holds a third of the
split weights (the norms are replicated) and a third of the KV cache (one of the 3 key/value heads).
The collectives column is the time rank 0 spends in all-reduces, all-gathers and the step broadcast per
engine step, waiting for the other processes included. Here TP=3 decodes one stream at {single_ratio:.2f}x and
{args.batch} streams at {batch_ratio:.2f}x the speed of TP=1. On one CPU the processes share its cores and memory
bandwidth and every layer waits for the slowest of them; when other jobs keep the cores busy (see the load
average below), 3 processes also get a larger share of the CPU than one, which these ratios include. The
speed-up tensor parallelism is known for needs one GPU per process (NCCL), which this run did not have.

{table}

Machine: {machine_line()}. 1-minute load average {load_before:.1f} before the runs and {os.getloadavg()[0]:.1f}
after: this benchmark keeps at most 3 processes busy, so a higher load means other jobs shared the cores.
""")
    print(table)


if __name__ == "__main__":
    main()
