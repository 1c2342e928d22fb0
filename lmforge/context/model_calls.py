"""Model calls made by the context strategies themselves (summaries, fact states), with their tokens counted.

Keeping context small is not free when the model does the keeping: every summary or state update is one
more prompt and answer. `ask` sends one instruction as a user turn and adds what it cost to a
`TokenUsage`. The call goes through a `Complete` function, so the same strategy runs on a local model
(`local_completion`) or through the serving engine.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

from lmforge.generation.chat import ChatHistory
from lmforge.generation.sampling_params import SamplingParams

Complete = Callable[[list[int], SamplingParams], tuple[str, int]]
"""complete(prompt token ids, params) -> (generated text, number of generated tokens)."""


@dataclass
class TokenUsage:
    """Tokens the helper calls cost: their prompts and what they generated."""

    prompt: int = 0
    generated: int = 0


def local_completion(model, tokenizer) -> Complete:
    """Helper calls answered by `generate` on a model in this process."""
    from lmforge.generation.generate import generate

    def complete(prompt_ids: list[int], params: SamplingParams) -> tuple[str, int]:
        output = generate(model, tokenizer, [prompt_ids], params)[0].outputs[0]
        return output.text, len(output.token_ids)

    return complete


def ask(complete: Complete, tokenizer, instruction: str, params: SamplingParams, spent: TokenUsage) -> str:
    """The model's answer to `instruction` (one user turn in the chat template); its tokens go to `spent`."""
    prompt = ChatHistory(None, [{"role": "user", "content": instruction}]).to_prompt(tokenizer)
    prompt_ids = tokenizer.encode(prompt, add_special_tokens=False)
    text, generated = complete(prompt_ids, params)
    spent.prompt += len(prompt_ids)
    spent.generated += generated
    return text.strip()
