"""`explain`: one prompt through the whole flow, with every stage's real numbers kept for the report.

text → (chat template) → tokens and ids → the model (its components and their sizes) → logits →
logits processors → the chosen token, step after step. `explain` gathers each stage into an
`Explanation` — plain data, so `to_json()` is the machine-readable report and
`lmforge.explain.html.render` the readable one.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from typing import Any

from lmforge.errors import InputError, ValidationError
from lmforge.explain.architecture import describe
from lmforge.explain.sampling import SamplingStep, trace_generation
from lmforge.generation.sampling_params import SamplingParams

PADDING_EXAMPLE = "Hi!"  # the short prompt batched with the user's to show padding and the attention mask


@dataclass
class Explanation:
    model: str
    prompt: str
    tokenization: dict[str, Any]
    architecture: dict[str, Any]
    sampling: list[SamplingStep]
    output: dict[str, Any]
    params: dict[str, Any] = field(default_factory=dict)

    def to_json(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


def tokenization(tokenizer, prompt: str, chat: bool) -> dict[str, Any]:
    """The prompt as the model receives it: template wrapping, pieces and ids (special ones marked), and a
    two-prompt batch padded on the left as the generation loop pads it, with its attention mask."""
    text = prompt
    if chat:
        if not tokenizer.chat_template:
            raise InputError("this model's tokenizer has no chat template; explain the prompt as raw text (--raw).")
        text = tokenizer.apply_chat_template([{"role": "user", "content": prompt}])
    ids = tokenizer.encode(text, add_special_tokens=not chat)
    special = {token_id for token_id, token in tokenizer.backend.get_added_tokens_decoder().items() if token.special}
    tokens = [{"id": token_id, "piece": tokenizer.backend.id_to_token(token_id),
               "text": tokenizer.decode([token_id]), "special": token_id in special} for token_id in ids]
    short = (tokenizer.apply_chat_template([{"role": "user", "content": PADDING_EXAMPLE}]) if chat
             else PADDING_EXAMPLE)
    batch = tokenizer([text, short], padding_side="left", add_special_tokens=not chat)
    return {"chat_template": chat, "text": text, "tokens": tokens, "ids": ids,
            "batch": {"texts": [prompt, PADDING_EXAMPLE], "padding_side": "left",
                      "pad_token_id": tokenizer.pad_token_id,
                      "input_ids": batch["input_ids"].tolist(), "attention_mask": batch["attention_mask"].tolist()}}


def explain(model, tokenizer, prompt: str, params: SamplingParams | None = None, chat: bool = True, top: int = 10,
            model_name: str = "") -> Explanation:
    """Run `prompt` (wrapped in the chat template unless `chat` is False) and keep every stage's numbers;
    each step's `top` candidates are recorded per logits stage."""
    if not prompt.strip():
        raise InputError("the prompt is empty; give the text to explain.")
    if top < 1:
        raise ValidationError(f"top (candidates shown per step) must be >= 1, got {top}.")
    params = params or SamplingParams(temperature=0.0, max_tokens=16)
    tokens = tokenization(tokenizer, prompt, chat)
    room = model.context_window - len(tokens["ids"])
    if room < 1:
        raise InputError(f"the prompt is {len(tokens['ids'])} tokens but the model's context holds "
                         f"{model.context_window}; shorten it.")
    steps, output = trace_generation(model, tokenizer, tokens["ids"], params, top)
    return Explanation(
        model=model_name or model.config.model_type, prompt=prompt, tokenization=tokens,
        architecture=describe(model, tokenizer), sampling=steps,
        output={"text": output.text, "token_ids": list(output.token_ids), "finish_reason": output.finish_reason},
        params={name: value for name, value in dataclasses.asdict(params).items() if value is not None})
