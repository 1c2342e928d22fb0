"""GPU check: lmforge models, generation and the engine on CUDA against HF transformers and against CPU.

Run on a machine with a CUDA GPU: `python scripts/gpu_check.py`. Uses tiny random models only.
"""

from __future__ import annotations

import sys
import time

import torch
import transformers

from lmforge import LLM
from lmforge.generation import SamplingParams, generate
from lmforge.nn.kv_cache import KVCache
from tests.models.test_llama import hf_llama
from tests.parity import id_tokenizer, max_abs_diff, ours_from_hf, padded_batch


def check(name: str, ok: bool, detail: str = "") -> bool:
    print(f"{'PASS' if ok else 'FAIL'} {name} {detail}", flush=True)
    return ok


def main() -> int:
    assert torch.cuda.is_available(), "no CUDA device"
    print(torch.__version__, transformers.__version__, torch.cuda.get_device_name(), flush=True)
    results = []
    hf = hf_llama(num_key_value_heads=2, attention_bias=True, max_position_embeddings=256)
    cpu_model = ours_from_hf(hf, "causal-lm")
    gpu_model = ours_from_hf(hf, "causal-lm").to("cuda")
    hf_gpu = hf.to("cuda")
    ids, mask = padded_batch(97, [30, 12, 21], left=True)
    with torch.inference_mode():
        theirs = hf_gpu(ids.cuda(), attention_mask=mask.cuda()).logits
        ours = gpu_model(ids.cuda(), attention_mask=mask.cuda()).logits
        real = mask.bool().cuda()
        diff = max_abs_diff(ours[real], theirs[real])
        results.append(check("cuda fp32 logits vs HF (padded batch)", diff <= 1e-4, f"max diff {diff:.2e}"))
        for impl in ("eager", "sdpa"):
            gpu_model.set_attention_implementation(impl)
            diff = max_abs_diff(gpu_model(ids.cuda(), mask.cuda()).logits[real], theirs[real])
            results.append(check(f"cuda {impl} kernel", diff <= 1e-4, f"max diff {diff:.2e}"))
        # KV cache on the GPU: stepwise == full.
        cache = KVCache.for_model(gpu_model, 3, ids.shape[1])
        steps = [gpu_model(ids[:, :10].cuda(), mask[:, :10].cuda(), kv_cache=cache).logits]
        for t in range(10, ids.shape[1]):
            steps.append(gpu_model(ids[:, t:t + 1].cuda(), mask[:, :t + 1].cuda(), kv_cache=cache).logits)
        diff = max_abs_diff(torch.cat(steps, 1)[real], ours[real])
        results.append(check("cuda KV cache stepwise == full", diff <= 1e-4, f"max diff {diff:.2e}"))

    tokenizer = id_tokenizer(97)
    prompts = [[5, 17, 3, 42, 8], [7, 7], [11, 2, 33, 9]]
    greedy = SamplingParams(temperature=0, max_tokens=24, ignore_eos=True)
    on_cpu = [r.outputs[0].token_ids for r in generate(cpu_model, tokenizer, prompts, greedy)]
    on_gpu = [r.outputs[0].token_ids for r in generate(gpu_model, tokenizer, prompts, greedy)]
    same = sum(a == b for a, b in zip(on_cpu, on_gpu))
    results.append(check("cuda greedy batch == cpu greedy batch", same == len(prompts), f"{same}/{len(prompts)} equal"))
    sampled = SamplingParams(temperature=0.8, top_p=0.9, top_k=20, seed=3, max_tokens=16, n=2, ignore_eos=True)
    first = [o.token_ids for o in generate(gpu_model, tokenizer, prompts[0], sampled)[0].outputs]
    second = [o.token_ids for o in generate(gpu_model, tokenizer, prompts[0], sampled)[0].outputs]
    results.append(check("cuda seeded sampling reproducible", first == second))
    beams = generate(gpu_model, tokenizer, prompts[0], SamplingParams(num_beams=3, n=2, max_tokens=10))
    hf_beams = hf_gpu.generate(torch.tensor([prompts[0]], device="cuda"), num_beams=3, num_return_sequences=2,
                               do_sample=False, max_new_tokens=10, min_new_tokens=10, early_stopping=False,
                               pad_token_id=0, eos_token_id=None)[:, 5:].tolist()
    results.append(check("cuda beam search == HF", [o.token_ids for o in beams[0].outputs] == hf_beams))

    # The engine on the GPU (paged KV cache, chunked prefill, batched decodes): greedy == generate() alone.
    engine_prompts = [[(i * 7 + j) % 90 + 1 for j in range(3 + i % 20)] for i in range(24)]
    llm = LLM(gpu_model, tokenizer, kv_cache_tokens=2048, block_size=4, max_num_seqs=8, max_num_batched_tokens=32,
              max_model_len=128)
    served = [r.outputs[0].token_ids for r in llm.generate(engine_prompts, greedy, use_tqdm=False)]
    alone = [generate(gpu_model, tokenizer, p, greedy)[0].outputs[0].token_ids for p in engine_prompts]
    same = sum(a == b for a, b in zip(served, alone))
    results.append(check("cuda engine greedy == generate alone", same == len(alone), f"{same}/{len(alone)} equal"))
    results.append(check("cuda engine frees every block", llm.engine.block_manager.num_used_blocks == 0))

    bf16 = ours_from_hf(hf, "causal-lm").to("cuda", torch.bfloat16)
    with torch.inference_mode():
        low = bf16(ids.cuda(), mask.cuda()).logits.float()
    diff = max_abs_diff(low[real], ours[real])
    results.append(check("cuda bf16 forward close to fp32", diff < 0.1, f"max diff {diff:.3f}"))
    out = generate(bf16, tokenizer, prompts, greedy)
    results.append(check("cuda bf16 generation runs", all(len(r.outputs[0].token_ids) == 24 for r in out)))

    # Quantized layers on the GPU take the dequantize + matmul path: same logits as on the CPU's reference path.
    from lmforge.quant import quantize_model

    for method in ("int8", "int4", "nf4"):
        quantized = ours_from_hf(hf, "causal-lm")
        quantize_model(quantized, method)
        with torch.inference_mode():
            cpu_logits = quantized(ids, mask).logits
            gpu_logits = quantized.to("cuda")(ids.cuda(), mask.cuda()).logits.cpu()
        diff = max_abs_diff(gpu_logits[mask.bool()], cpu_logits[mask.bool()])
        results.append(check(f"cuda {method} quantized logits == cpu", diff <= 1e-4, f"max diff {diff:.2e}"))
        out = generate(quantized, tokenizer, prompts, greedy)
        results.append(check(f"cuda {method} quantized generation runs",
                             all(len(r.outputs[0].token_ids) == 24 for r in out)))

    # Decode speed of a mid-size random model (no real weights travel to this machine).
    config = transformers.LlamaConfig(vocab_size=49152, hidden_size=576, intermediate_size=1536, num_hidden_layers=30,
                                      num_attention_heads=9, num_key_value_heads=3, max_position_embeddings=2048,
                                      tie_word_embeddings=True)
    big = ours_from_hf(transformers.LlamaForCausalLM(config).eval(), "causal-lm").to("cuda", torch.bfloat16)
    params = SamplingParams(temperature=0, max_tokens=128, ignore_eos=True)
    generate(big, tokenizer, [list(range(1, 30))], params)
    torch.cuda.synchronize()
    start = time.perf_counter()
    generate(big, tokenizer, [list(range(1, 30))], params)
    torch.cuda.synchronize()
    print(f"INFO SmolLM2-shaped random model, bf16, greedy decode: {128 / (time.perf_counter() - start):.1f} tok/s",
          flush=True)
    return 0 if all(results) else 1


if __name__ == "__main__":
    sys.exit(main())
