"""Quantized SmolLM2-135M-Instruct on this CPU: lmforge's formats next to llama.cpp and HF transformers.

For each system, in its own process (so peak RSS is that system's alone):
- single-stream greedy decode of --new-tokens tokens after a short chat prompt (EOS ignored; the prompt's
  prefill included, for every system), tokens/s;
- prefill of a --prefill-tokens prompt, tokens/s;
- bytes of weights in memory and the process's peak RSS;
- sliding-window perplexity (--context, stride = context) on the first --ppl-tokens tokens of --text,
  every system scoring the very same token ids.
Systems: lmforge fp32 (SmolLM2's Q4_1 weights dequantized), int8, int4 (groups of 32), nf4, the GGUF's
own Q4_1/Q8_0 blocks; llama.cpp through its Python binding (`pip install llama-cpp-python`; skipped
when missing) on the same GGUF; HF transformers fp32.
Writes the table to docs/benchmarks.md (section "quant").
Usage: python -m benchmarks.quant [--text /usr/share/common-licenses/GPL-3] [--repeats 3]
"""

from __future__ import annotations

import argparse
import functools
import gc
import json
import math
import os
import resource
import subprocess
import sys
from pathlib import Path

import torch

from benchmarks.report import (
    machine_line,
    markdown_table,
    median_seconds,
    write_section,
)

LMFORGE_SYSTEMS = {"lmforge fp32": None, "lmforge int8": "int8", "lmforge int4-g32": "int4", "lmforge nf4": "nf4",
                   "lmforge GGUF blocks (Q4_1 + Q8_0 head)": "gguf"}
LLAMA_CPP = "llama.cpp Q4_1 (llama-cpp-python)"
HF = "HF transformers fp32"
LLAMA_CPP_SAFE_BATCH = 16


def resident_bytes() -> int:
    """This process's resident memory now (after loading: what the model keeps, not the loading peak)."""
    gc.collect()
    return int(Path("/proc/self/statm").read_text().split()[1]) * os.sysconf("SC_PAGE_SIZE")



@functools.cache
def smollm2_tokenizer():
    from lmforge import AutoTokenizer

    return AutoTokenizer.from_pretrained("smollm2-135m-instruct")


def text_ids(args) -> list[int]:
    return smollm2_tokenizer().encode(Path(args.text).read_text())[:args.ppl_tokens]


def prompt_ids() -> list[int]:
    return smollm2_tokenizer().apply_chat_template([{"role": "user", "content": "Tell me a long story about a robot."}],
                                         tokenize=True)


def windowed_nll(logits_of, ids: list[int], context: int) -> float:
    """Perplexity with stride = context: each window's tokens after its first are scored."""
    nll, scored = 0.0, 0
    for begin in range(0, len(ids) - 1, context):
        window = ids[begin:begin + context]
        if len(window) < 2:
            break
        logits = logits_of(window)[:-1].float()
        nll += float(torch.nn.functional.cross_entropy(logits, torch.tensor(window[1:]), reduction="sum"))
        scored += len(window) - 1
    return math.exp(nll / scored)


def measure_lmforge(method: str | None, args) -> dict:
    from lmforge import generate
    from lmforge.explain.architecture import weight_memory
    from lmforge.generation import SamplingParams
    from lmforge.quant import load_quantized

    tokenizer = smollm2_tokenizer()
    model = load_quantized("smollm2-135m-instruct", quantization=method)  # as LLM(..., quantization=method) loads
    loaded = resident_bytes()
    prompt = prompt_ids()
    params = SamplingParams(temperature=0, max_tokens=args.new_tokens, ignore_eos=True)
    long_ids = torch.randint(0, 49152, (1, args.prefill_tokens), generator=torch.Generator().manual_seed(0))
    with torch.inference_mode():
        decode = median_seconds(lambda: generate(model, tokenizer, prompt, params), args.repeats)
        prefill = median_seconds(lambda: model(long_ids, logits_to_keep=1), args.repeats)
        ppl = windowed_nll(lambda window: model(torch.tensor([window])).logits[0], text_ids(args), args.context)
    return {"decode": args.new_tokens / decode, "prefill": args.prefill_tokens / prefill,
            "weight_bytes": weight_memory(model)[0], "loaded_rss": loaded, "perplexity": ppl}


def measure_llama_cpp(args) -> dict:
    from llama_cpp import Llama

    from lmforge.sources import resolve

    path = str(resolve("smollm2-135m-instruct"))
    threads = torch.get_num_threads()
    llm = Llama(path, n_ctx=max(args.context, args.prefill_tokens + 8, 1024), n_threads=threads,
                n_threads_batch=threads, n_batch=512, logits_all=True, verbose=False)
    loaded = resident_bytes()
    prompt = prompt_ids()

    def decode():
        # reset() first: generate() would otherwise keep the previous run's prompt in its cache and skip
        # the prompt's prefill, which lmforge's and HF's figures include.
        llm.reset()
        for produced, _ in enumerate(llm.generate(prompt, top_k=1, temp=0.0, reset=True), start=1):
            if produced == args.new_tokens:
                break

    long_ids = torch.randint(0, 49152, (args.prefill_tokens,), generator=torch.Generator().manual_seed(0)).tolist()

    def prefill():
        llm.reset()
        llm.eval(long_ids)

    def logits_of(window):
        # Evaluated 16 tokens at a time: on a CPU with AMX, this llama.cpp build's batched path (more than 16
        # tokens per eval) returned logits far from every other implementation's (argmax agreement 23%).
        llm.reset()
        for start in range(0, len(window), LLAMA_CPP_SAFE_BATCH):
            llm.eval(window[start:start + LLAMA_CPP_SAFE_BATCH])
        return torch.from_numpy(llm.scores[:len(window)].copy())

    return {"decode": args.new_tokens / median_seconds(decode, args.repeats),
            "prefill": args.prefill_tokens / median_seconds(prefill, args.repeats),
            "weight_bytes": os.path.getsize(path), "loaded_rss": loaded,
            "perplexity": windowed_nll(logits_of, text_ids(args), args.context)}


def measure_hf(args) -> dict:
    from transformers import AutoModelForCausalLM

    from lmforge.sources import resolve

    path = resolve("smollm2-135m-instruct")
    model = AutoModelForCausalLM.from_pretrained(path.parent, gguf_file=path.name, dtype=torch.float32).eval()
    loaded = resident_bytes()
    prompt = torch.tensor([prompt_ids()])
    long_ids = torch.randint(0, 49152, (1, args.prefill_tokens), generator=torch.Generator().manual_seed(0))

    def decode():
        model.generate(prompt, attention_mask=torch.ones_like(prompt), max_new_tokens=args.new_tokens,
                       min_new_tokens=args.new_tokens, do_sample=False, pad_token_id=2)

    with torch.inference_mode():
        decode_s = median_seconds(decode, args.repeats)
        prefill_s = median_seconds(lambda: model(long_ids, logits_to_keep=1), args.repeats)
        ppl = windowed_nll(lambda window: model(torch.tensor([window])).logits[0], text_ids(args), args.context)
    weight_bytes = sum(p.numel() * p.element_size() for p in model.parameters())
    return {"decode": args.new_tokens / decode_s, "prefill": args.prefill_tokens / prefill_s,
            "weight_bytes": weight_bytes, "loaded_rss": loaded, "perplexity": ppl}


def measure(system: str, args) -> dict:
    if system in LMFORGE_SYSTEMS:
        result = measure_lmforge(LMFORGE_SYSTEMS[system], args)
    elif system == LLAMA_CPP:
        result = measure_llama_cpp(args)
    else:
        result = measure_hf(args)
    result["peak_rss"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    return result


def run_in_child(system: str, argv: list[str]) -> dict | None:
    """One system in a fresh interpreter; None (with the reason printed) when it cannot run here."""
    done = subprocess.run([sys.executable, "-m", "benchmarks.quant", *argv, "--only", system],
                          capture_output=True, text=True)
    if done.returncode != 0:
        print(f"{system}: skipped ({done.stderr.strip().splitlines()[-1] if done.stderr.strip() else 'failed'})")
        return None
    return json.loads(done.stdout.strip().splitlines()[-1])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--text", default="/usr/share/common-licenses/GPL-3", help="natural text for perplexity")
    parser.add_argument("--ppl-tokens", type=int, default=4096, help="score the first N tokens of --text")
    parser.add_argument("--context", type=int, default=512, help="perplexity window (stride = context)")
    parser.add_argument("--new-tokens", type=int, default=128)
    parser.add_argument("--prefill-tokens", type=int, default=512)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--only", help=argparse.SUPPRESS)  # internal: measure one system, print JSON
    args = parser.parse_args()
    if args.only:
        print(json.dumps(measure(args.only, args)))
        return
    if not Path(args.text).is_file():
        parser.error(f"--text {args.text} does not exist; pass any natural-language text file.")
    argv = sys.argv[1:]
    results = {}
    for system in [*LMFORGE_SYSTEMS, LLAMA_CPP, HF]:
        print(f"measuring {system} ...", flush=True)
        result = run_in_child(system, argv)
        if result is not None:
            results[system] = result
            print(f"  {json.dumps(result)}", flush=True)
    write_report(results, args)


def write_report(results: dict[str, dict], args) -> None:
    baseline = results.get("lmforge fp32", {}).get("perplexity")
    rows = []
    for system, r in results.items():
        delta = f"{r['perplexity'] / baseline - 1:+.1%}" if baseline and system != "lmforge fp32" else ""
        rows.append([system, f"{r['decode']:.1f}", f"{r['prefill']:.0f}", f"{r['weight_bytes'] / 1e6:.0f}",
                     f"{r['loaded_rss'] / 1e6:.0f}", f"{r['peak_rss'] / 1e6:.0f}", f"{r['perplexity']:.2f}", delta])
    try:
        import llama_cpp

        peer = f", llama-cpp-python {llama_cpp.__version__}"
    except ImportError:
        peer = ", llama-cpp-python not installed"
    body = (f"## Quantized decode, prefill, memory and quality: SmolLM2-135M-Instruct (`benchmarks/quant.py`)\n\n"
            f"Machine: {machine_line()}{peer}. Median of {args.repeats} runs; each system in its own process. "
            f"Decode: {args.new_tokens} greedy tokens after a short chat prompt, its prefill included (llama.cpp's "
            f"prompt cache reset before each run). Prefill: {args.prefill_tokens} "
            f"tokens. RSS after load: the process once the model is ready (Python, torch and the tokenizer "
            f"included); peak RSS: the whole run (int8/int4/nf4 quantize each layer as the GGUF file is read; GGUF "
            f"blocks load as they are). "
            f"Perplexity: first "
            f"{args.ppl_tokens} tokens of {Path(args.text).name}, windows of {args.context} (the same token ids "
            f"for every system). The fp32 baseline is SmolLM2's Q4_1 GGUF "
            f"dequantized, so int4/nf4 re-quantize already-quantized weights. llama.cpp's perplexity is computed "
            f"{LLAMA_CPP_SAFE_BATCH} tokens per eval: on an AMX CPU its batched path (used by its prefill figure) "
            f"returned logits that disagree with every other implementation.\n\n"
            + markdown_table(["system", "decode tok/s", "prefill tok/s", "weights MB", "RSS after load MB",
                              "peak RSS MB", "perplexity", "vs fp32"], rows))
    write_section("quant", body)
    print(body)


if __name__ == "__main__":
    main()
