"""Single-stream decode and prefill speed: lmforge vs HF transformers, SmolLM2-135M-Instruct, fp32, CPU.

Measures, interleaved and repeated (median of --repeats):
- greedy decode of --new-tokens tokens (EOS ignored) after a short chat prompt, in tokens/s;
- prefill of a --prefill-tokens prompt, in tokens/s;
- the fp32 ceiling: one sweep of exactly the model's matrix-vector products per token
  (every weight read once), the most tokens/s a memory-bound decode can reach here.
Writes the table to docs/benchmarks.md (section "decode").
Usage: python -m benchmarks.decode [--repeats 5] [--new-tokens 128] [--prefill-tokens 512]
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch
import torch.nn.functional as F

from benchmarks.report import machine_line, markdown_table, write_section


def timed(fn) -> float:
    start = time.perf_counter()
    fn()
    return time.perf_counter() - start


def weight_sweep_seconds(model, repeats: int) -> float:
    """Time of x @ W^T for every Linear weight once (the bytes a decode step must read)."""
    weights = [m.weight for m in model.modules() if isinstance(m, torch.nn.Linear)]
    vectors = [torch.randn(1, w.shape[1]) for w in weights]

    def sweep():
        for w, x in zip(weights, vectors):
            F.linear(x, w)

    sweep()
    return statistics.median(timed(sweep) for _ in range(repeats))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--new-tokens", type=int, default=128)
    parser.add_argument("--prefill-tokens", type=int, default=512)
    args = parser.parse_args()

    from transformers import AutoModelForCausalLM as HFCausalLM

    from lmforge import AutoModelForCausalLM, AutoTokenizer
    from lmforge.generation.generate import generate
    from lmforge.generation.sampling_params import SamplingParams
    from lmforge.sources import resolve

    path = resolve("smollm2-135m-instruct")
    tokenizer = AutoTokenizer.from_pretrained("smollm2-135m-instruct")
    ours = AutoModelForCausalLM.from_pretrained("smollm2-135m-instruct")
    hf = HFCausalLM.from_pretrained(path.parent, gguf_file=path.name, dtype=torch.float32).eval()
    prompt = tokenizer.apply_chat_template([{"role": "user", "content": "Tell me a long story about a robot."}],
                                           tokenize=True)
    params = SamplingParams(temperature=0, max_tokens=args.new_tokens, ignore_eos=True)
    hf_ids = torch.tensor([prompt])

    def ours_decode():
        generate(ours, tokenizer, prompt, params)

    def hf_decode():
        hf.generate(hf_ids, attention_mask=torch.ones_like(hf_ids), max_new_tokens=args.new_tokens,
                    min_new_tokens=args.new_tokens, do_sample=False, pad_token_id=2)

    long_ids = torch.randint(0, 49152, (1, args.prefill_tokens), generator=torch.Generator().manual_seed(0))

    def ours_prefill():
        ours(long_ids, logits_to_keep=1)

    def hf_prefill():
        hf(long_ids, logits_to_keep=1)

    results: dict[str, list[float]] = {name: [] for name in ("ours_decode", "hf_decode", "ours_prefill", "hf_prefill")}
    with torch.inference_mode():
        for fn in (ours_decode, hf_decode, ours_prefill, hf_prefill):
            fn()  # warm-up
        for _ in range(args.repeats):  # interleave the systems
            results["ours_decode"].append(timed(ours_decode))
            results["hf_decode"].append(timed(hf_decode))
            results["ours_prefill"].append(timed(ours_prefill))
            results["hf_prefill"].append(timed(hf_prefill))
        sweep = weight_sweep_seconds(ours, args.repeats)
    med = {name: statistics.median(values) for name, values in results.items()}
    # Decode time includes the prompt's prefill; subtract neither side's (both pay it equally and it is small).
    ours_tps, hf_tps = args.new_tokens / med["ours_decode"], args.new_tokens / med["hf_decode"]
    ours_pre, hf_pre = args.prefill_tokens / med["ours_prefill"], args.prefill_tokens / med["hf_prefill"]
    weight_bytes = sum(m.weight.numel() * 4 for m in ours.modules() if isinstance(m, torch.nn.Linear))
    ceiling = 1 / sweep
    rows = [
        [f"greedy decode, {args.new_tokens} tokens", f"{ours_tps:.1f} tok/s", f"{hf_tps:.1f} tok/s",
         f"{ours_tps / hf_tps:.2f}x", f"{ours_tps / ceiling:.0%}"],
        [f"prefill, {args.prefill_tokens} tokens", f"{ours_pre:.0f} tok/s", f"{hf_pre:.0f} tok/s",
         f"{ours_pre / hf_pre:.2f}x", ""],
    ]
    body = (f"## Single-stream decode and prefill: SmolLM2-135M-Instruct, fp32 (`benchmarks/decode.py`)\n\n"
            f"Machine: {machine_line()}. Median of {args.repeats} interleaved runs.\n"
            f"fp32 ceiling here: one sweep of the {weight_bytes / 1e6:.0f} MB of weight matrices takes "
            f"{sweep * 1e3:.1f} ms ({weight_bytes / sweep / 1e9:.1f} GB/s), i.e. at most {ceiling:.1f} tokens/s.\n\n"
            + markdown_table(["measure", "lmforge", "HF transformers", "lmforge / HF", "of fp32 ceiling"], rows))
    write_section("decode", body)
    print(body)


if __name__ == "__main__":
    main()
