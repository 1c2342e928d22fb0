"""Forward-pass speed of lmforge vs HF transformers on the embedded SmolLM2-135M-Instruct (fp32, CPU).

Both run the same dequantized weights on the same prompt lengths; runs are
interleaved and repeated, and the table quotes medians and the ratio.
Usage: python benchmarks/forward.py [--repeats 7] [--lengths 1 64 256]
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch

from benchmarks.report import (
    machine_line,
    markdown_table,
    median_seconds,
    write_section,
)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--repeats", type=int, default=7)
    parser.add_argument("--lengths", type=int, nargs="+", default=[1, 64, 256])
    args = parser.parse_args()

    from transformers import AutoModelForCausalLM as HFCausalLM

    from lmforge import AutoModelForCausalLM
    from lmforge.sources import resolve

    path = resolve("smollm2-135m-instruct")
    start = time.perf_counter()
    ours = AutoModelForCausalLM.from_pretrained("smollm2-135m-instruct")
    ours_load = time.perf_counter() - start
    start = time.perf_counter()
    hf = HFCausalLM.from_pretrained(path.parent, gguf_file=path.name, dtype=torch.float32).eval()
    hf_load = time.perf_counter() - start

    rows = [["load the Q4_1 GGUF → fp32", f"{ours_load:.2f} s", f"{hf_load:.2f} s", f"{hf_load / ours_load:.1f}x"]]
    generator = torch.Generator().manual_seed(0)
    with torch.inference_mode():
        for length in args.lengths:
            ids = torch.randint(0, 49152, (1, length), generator=generator)
            timings = {"ours": [], "hf": []}
            for _ in range(args.repeats):  # interleave the two systems
                timings["ours"].append(median_seconds(lambda: ours(ids), 1))
                timings["hf"].append(median_seconds(lambda: hf(ids), 1))
            o, h = statistics.median(timings["ours"]), statistics.median(timings["hf"])
            rows.append([f"forward, {length} tokens", f"{o * 1e3:.1f} ms", f"{h * 1e3:.1f} ms", f"{h / o:.2f}x"])
            print(rows[-1])
    body = (f"## Forward pass: SmolLM2-135M-Instruct, fp32 (`benchmarks/forward.py`)\n\n"
            f"Machine: {machine_line()}. Median of {args.repeats} interleaved runs; "
            "speed-up > 1 means lmforge is faster.\n\n"
            + markdown_table(["step", "lmforge", "HF transformers", "lmforge speed-up"], rows))
    write_section("forward", body)
    print(body)


if __name__ == "__main__":
    main()
