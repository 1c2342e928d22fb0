"""`explain`: one prompt through the whole flow, with every stage's real numbers kept for the report.

text → (chat template) → tokens and ids → the model (its components and their sizes; each layer's
hidden state, attention and MLP contributions, attention maps) → logits → logits processors → the
chosen token, step after step; then one training step on the text, and the memory it all takes. `explain` gathers each stage into an
`Explanation` — plain data, so `to_json()` is the machine-readable report and
`lmforge.explain.html.render` the readable one.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from typing import Any

from lmforge.errors import InputError, UnsupportedError, ValidationError
from lmforge.explain.architecture import describe
from lmforge.explain.forward import ForwardTrace, trace_forward
from lmforge.explain.learning import training_step
from lmforge.explain.memory import engine_blocks, memory_section
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
    forward: dict[str, Any] = field(default_factory=dict)
    learning: dict[str, Any] = field(default_factory=dict)
    memory: dict[str, Any] = field(default_factory=dict)
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


def forward_section(trace: ForwardTrace, prompt_length: int, layers: list[int] | None,
                    heads: list[int] | None) -> dict[str, Any]:
    """Per-layer sizes, the attention maps of the chosen `layers` and `heads` (default: first, middle and last
    layer; every head), and what each generated token read most."""
    layers = layers if layers is not None else sorted({0, trace.num_layers // 2, trace.num_layers - 1})
    heads = heads if heads is not None else list(range(trace.num_heads))
    for layer in layers:
        trace.check(layer=layer)
    for head in heads:
        trace.check(head=head)
    reads = [{"position": position, "token": trace.tokens[position],
              "reads": [{"position": p, "token": trace.tokens[p], "weight": round(w, 4)}
                        for p, w in trace.most_read(position)]}
             for position in range(prompt_length, len(trace.tokens))]
    return {"tokens": trace.tokens, "layers": [dataclasses.asdict(stats) for stats in trace.layers],
            "num_heads": trace.num_heads,
            "attention": {str(layer): {str(head): trace.attention[layer][head].numpy().round(4).tolist()
                                       for head in heads} for layer in layers},
            "generated_reads": reads}


def explain(model, tokenizer, prompt: str, params: SamplingParams | None = None, chat: bool = True, top: int = 10,
            model_name: str = "", layers: list[int] | None = None, heads: list[int] | None = None) -> Explanation:
    """Run `prompt` (wrapped in the chat template unless `chat` is False) and keep every stage's numbers;
    each step's `top` candidates are recorded per logits stage, and the attention maps of `layers` x `heads`."""
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
    sequence = (tokens["ids"] + list(output.token_ids))[:model.context_window]
    try:
        forward = forward_section(trace_forward(model, tokenizer, sequence), len(tokens["ids"]), layers, heads)
    except UnsupportedError as exc:  # e.g. an encoder–decoder model: the rest of the report still holds
        forward = {"note": str(exc)}
    learning = training_step(model, sequence) if len(sequence) > 1 else {"note": "one token: nothing to predict."}
    return Explanation(
        model=model_name or model.config.model_type, prompt=prompt, tokenization=tokens,
        architecture=describe(model, tokenizer), sampling=steps,
        output={"text": output.text, "token_ids": list(output.token_ids), "finish_reason": output.finish_reason},
        forward=forward, learning=learning,
        memory={**memory_section(model, len(tokens["ids"]), len(output.token_ids)),
                "engine": engine_blocks(tokens["ids"], list(output.token_ids))},
        params={name: value for name, value in dataclasses.asdict(params).items() if value is not None})
