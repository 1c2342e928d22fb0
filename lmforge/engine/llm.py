"""LLM: offline batch inference with vLLM's interface.

    from lmforge import LLM, SamplingParams
    llm = LLM("smollm2-135m-instruct")
    outputs = llm.generate(["The capital of France is"], SamplingParams(temperature=0, max_tokens=16))
    print(outputs[0].outputs[0].text)

Every prompt becomes a request of one `LLMEngine`, which runs them all with continuous batching
over a paged KV cache; results come back in prompt order.
"""

from __future__ import annotations

from collections.abc import Sequence
from itertools import count
from pathlib import Path
from typing import Any

import torch
from tqdm.auto import tqdm

from lmforge.engine.config import EngineConfig
from lmforge.engine.llm_engine import LLMEngine
from lmforge.engine.tensor_parallel import start_tensor_parallel_engine
from lmforge.errors import InputError
from lmforge.generation.chat import ROLES
from lmforge.generation.generate import RequestOutput, prompt_list
from lmforge.generation.sampling_params import SamplingParams
from lmforge.hardware import resolve_dtype
from lmforge.quant import load_quantized, quantize_loaded

Prompt = str | Sequence[int]
Conversation = list[dict[str, Any]]


class LLM:
    """A model, its tokenizer and a serving engine. Extra keyword arguments are `EngineConfig` fields."""

    def __init__(self, model: Any = "smollm2-135m-instruct", tokenizer=None, dtype: str | torch.dtype = "auto",
                 quantization: str | None = None, tensor_parallel_size: int = 1, **engine_options: Any):
        """`model`: a name/folder/GGUF to load (in `dtype`; "auto" = bfloat16 where this machine multiplies
        it natively, else float32), or a loaded model with its `tokenizer`. `quantization` ("int8", "int4",
        "nf4") quantizes its Linear layers at load time; "gguf" keeps a GGUF file's own 4-/8-bit blocks.
        `tensor_parallel_size` N > 1 splits the model over N processes (this one and N - 1 it starts; see
        lmforge.engine.tensor_parallel): a script doing so must guard its top level with
        `if __name__ == "__main__":`, as any program that spawns processes; `shutdown()` stops them. In a
        torchrun job of N processes, rank 0 builds the LLM and the other ranks call
        `lmforge.engine.run_tensor_parallel_worker()` instead of starting any."""
        config = EngineConfig(**engine_options)
        if tensor_parallel_size != 1:
            self.engine = start_tensor_parallel_engine(model, tensor_parallel_size, tokenizer, config, dtype,
                                                       quantization)
        else:
            if isinstance(model, (str, Path)):
                from lmforge.registry import AutoTokenizer

                tokenizer = tokenizer or AutoTokenizer.from_pretrained(model)
                model = load_quantized(model, resolve_dtype(dtype), quantization)
            elif tokenizer is None:
                raise InputError("LLM(model) with a model object needs its tokenizer too: LLM(model, tokenizer).")
            else:
                quantize_loaded(model, quantization)
            self.engine = LLMEngine(model, tokenizer, config)
        self.tokenizer = self.engine.tokenizer
        self._ids = count()

    def shutdown(self) -> None:
        """Stop the tensor-parallel worker processes (nothing to do for a one-process LLM)."""
        self.engine.shutdown()

    def generate(self, prompts: Prompt | Sequence[Prompt], sampling_params: SamplingParams
                 | Sequence[SamplingParams] | None = None, use_tqdm: bool = True) -> list[RequestOutput]:
        """Complete one prompt or many (text or token ids); one RequestOutput per prompt, in order."""
        prompts = prompt_list(prompts)
        if isinstance(sampling_params, Sequence):
            if len(sampling_params) != len(prompts):
                raise InputError(f"got {len(sampling_params)} SamplingParams for {len(prompts)} prompts; pass "
                                 "one per prompt or a single one for all.")
            params_list = list(sampling_params)
        else:
            params_list = [sampling_params or SamplingParams()] * len(prompts)
        return self._run(prompts, params_list, use_tqdm)

    def chat(self, messages: Conversation | Sequence[Conversation], sampling_params: SamplingParams | None = None,
             use_tqdm: bool = True, add_generation_prompt: bool = True) -> list[RequestOutput]:
        """Answer one conversation or many ([{"role": ..., "content": ...}, ...]) with the chat template."""
        conversations = [messages] if messages and isinstance(messages[0], dict) else list(messages)
        prompts = []
        for conversation in conversations:
            for message in conversation:
                if not isinstance(message, dict) or message.get("role") not in ROLES:
                    raise InputError(f"each chat message needs a 'role' in {ROLES} and a 'content'; got {message!r}.")
            text = self.tokenizer.apply_chat_template(conversation, add_generation_prompt=add_generation_prompt)
            prompts.append(self.tokenizer.encode(text, add_special_tokens=False))
        return self.generate(prompts, sampling_params, use_tqdm)

    def _run(self, prompts: list[Prompt], params: list[SamplingParams], use_tqdm: bool) -> list[RequestOutput]:
        engine = self.engine
        order = {}
        try:
            for prompt, request_params in zip(prompts, params):
                request_id = str(next(self._ids))
                engine.add_request(request_id, prompt, request_params)
                order[request_id] = len(order)
        except Exception:
            for request_id in order:  # nothing half-queued stays behind
                engine.abort_request(request_id)
            raise
        results: list[RequestOutput | None] = [None] * len(order)
        try:
            with tqdm(total=len(order), desc="Generating", unit="req", disable=not use_tqdm) as progress:
                while engine.has_unfinished_requests():
                    for output in engine.step():
                        if output.finished:
                            results[order[output.request_id]] = output
                            progress.update(1)
                    stats = engine.stats
                    progress.set_postfix_str(f"{stats.tokens_per_second:.0f} tok/s, running {stats.num_running}, "
                                             f"kv {stats.kv_blocks_used}/{stats.kv_blocks_total} blocks",
                                             refresh=False)
        except BaseException:  # Ctrl-C or an error: free what is still queued, so the engine stays usable
            for request_id in order:
                engine.abort_request(request_id)
            raise
        return results

