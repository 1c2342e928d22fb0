"""Load test of `lmforge serve`: concurrent streaming clients against the offline engine's throughput.

The request mix is benchmarks/throughput.py's (64 requests, random prompt token ids of 32-512
tokens, 16-128 output tokens, seed 0, EOS ignored, SmolLM2-135M-Instruct). The server runs
in its own process (`lmforge serve`, same engine settings as the offline run); this process is
the client: for each concurrency level, all 64 requests go to /v1/completions as SSE streams
with at most that many in flight. Reported: requests/s, output tokens/s, time to first token and
inter-token latency (p50/p99) and failures, next to `LLM.generate` on the same mix. Both use
dtype "auto" (bfloat16 where this machine multiplies it natively, else float32).
Usage: python -m benchmarks.serve_load [--concurrency 16 32 64] [--requests 64]
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import signal
import socket
import subprocess
import sys
import time

import httpx

from benchmarks.report import machine_line, markdown_table, write_section
from benchmarks.throughput import MODEL, workload
from lmforge import LLM, SamplingParams

ENGINE = dict(max_num_seqs=64, max_num_batched_tokens=512, kv_cache_tokens=64 * 1024, max_model_len=1024)


def percentile(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(q * len(ordered)))] if ordered else float("nan")


async def one_request(client: httpx.AsyncClient, prompt: list[int], max_tokens: int, record: dict) -> None:
    body = {"prompt": prompt, "max_tokens": max_tokens, "temperature": 0, "ignore_eos": True, "stream": True}
    sent = time.perf_counter()
    stamps = []
    async with client.stream("POST", "/v1/completions", json=body) as response:
        if response.status_code != 200:
            record["failures"] += 1
            return
        async for line in response.aiter_lines():
            if line.startswith("data: ") and line != "data: [DONE]":
                if json.loads(line[6:])["choices"]:
                    stamps.append(time.perf_counter())
    if not stamps:
        record["failures"] += 1
        return
    record["ttft"].append(stamps[0] - sent)
    record["itl"] += [b - a for a, b in zip(stamps, stamps[1:])]
    record["tokens"] += max_tokens


async def load(url: str, prompts, outputs, concurrency: int) -> dict:
    record = {"ttft": [], "itl": [], "tokens": 0, "failures": 0}
    gate = asyncio.Semaphore(concurrency)
    limits = httpx.Limits(max_connections=concurrency, max_keepalive_connections=concurrency)
    async with httpx.AsyncClient(base_url=url, timeout=600, limits=limits) as client:

        async def gated(prompt, n):
            async with gate:
                try:
                    await one_request(client, prompt, n, record)
                except httpx.HTTPError:
                    record["failures"] += 1

        start = time.perf_counter()
        await asyncio.gather(*(gated(p, n) for p, n in zip(prompts, outputs)))
        record["seconds"] = time.perf_counter() - start
    return record


def start_server(port: int) -> subprocess.Popen:
    command = [sys.executable, "-m", "lmforge.cli", "serve", "--port", str(port), "--embedding-model", "none",
               "--max-num-seqs", str(ENGINE["max_num_seqs"]),
               "--max-num-batched-tokens", str(ENGINE["max_num_batched_tokens"]),
               "--kv-cache-tokens", str(ENGINE["kv_cache_tokens"]), "--max-model-len", str(ENGINE["max_model_len"])]
    server = subprocess.Popen(command, stderr=subprocess.DEVNULL, stdout=subprocess.DEVNULL, env=os.environ.copy())
    deadline = time.time() + 300
    while time.time() < deadline:
        try:
            if httpx.get(f"http://127.0.0.1:{port}/health", timeout=2).status_code == 200:
                return server
        except httpx.TransportError:
            pass
        time.sleep(0.2)
    server.kill()
    raise RuntimeError("the server did not become ready within 300 s")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--concurrency", type=int, nargs="+", default=[16, 32, 64])
    parser.add_argument("--requests", type=int, default=64)
    args = parser.parse_args()

    llm = LLM(MODEL, enable_prefix_caching=False, **ENGINE)  # dtype "auto", as the server
    dtype = str(llm.engine.model.dtype).removeprefix("torch.")
    prompts, outputs = workload(args.requests, 0, llm.engine.model.config.vocab_size)
    llm.generate([[1, 2, 3]], SamplingParams(max_tokens=2), use_tqdm=False)
    start = time.perf_counter()
    llm.generate(prompts, [SamplingParams(temperature=0, max_tokens=n, ignore_eos=True) for n in outputs],
                 use_tqdm=False)
    offline = sum(outputs) / (time.perf_counter() - start)
    del llm
    print(f"offline LLM.generate: {offline:.1f} output tok/s", flush=True)

    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    server = start_server(port)
    rows = []
    try:
        url = f"http://127.0.0.1:{port}"
        asyncio.run(load(url, [[1, 2, 3]], [2], 1))  # warm up
        for concurrency in args.concurrency:
            # A fresh prefix cache per level: shift every prompt by one token id.
            shifted = [[(t + concurrency) % 49152 for t in p] for p in prompts]
            record = asyncio.run(load(url, shifted, outputs, concurrency))
            rate = record["tokens"] / record["seconds"]
            rows.append([concurrency, f"{args.requests / record['seconds']:.2f}", f"{rate:.1f}",
                         f"{rate / offline:.0%}", f"{percentile(record['ttft'], 0.5):.2f}",
                         f"{percentile(record['ttft'], 0.99):.2f}", f"{1000 * percentile(record['itl'], 0.5):.0f}",
                         f"{1000 * percentile(record['itl'], 0.99):.0f}", record["failures"]])
            print(rows[-1], flush=True)
    finally:
        server.send_signal(signal.SIGTERM)
        server.wait(timeout=60)
    table = markdown_table(["clients", "requests/s", "output tok/s", "of offline", "TTFT p50 (s)", "TTFT p99 (s)",
                            "ITL p50 (ms)", "ITL p99 (ms)", "failures"], rows)
    write_section("serve_load", f"""## Serving under load (`benchmarks/serve_load.py`)

{machine_line()}. `lmforge serve` in its own process ({dtype}, what `--dtype auto` picks on this machine;
max_num_seqs {ENGINE['max_num_seqs']},
max_num_batched_tokens {ENGINE['max_num_batched_tokens']}), clients in another: the throughput mix
({args.requests} requests, prompts of 32-512 random token ids, 16-128 output tokens, EOS ignored) sent to
/v1/completions as SSE streams with at most N in flight. Offline `LLM.generate` on the same mix:
{offline:.1f} output tokens/s. ITL is the time between consecutive streamed chunks.

{table}
""")


if __name__ == "__main__":
    main()
