"""The explain report as one self-contained HTML page: inline CSS, no scripts, nothing fetched from elsewhere."""

from __future__ import annotations

from html import escape

import numpy as np

from lmforge.explain.images import data_uri, heat_map_png
from lmforge.explain.report import Explanation

STYLE = """
body { font: 15px/1.45 system-ui, sans-serif; margin: 2em auto; max-width: 70em; color: #222; padding: 0 1em; }
h1 { font-size: 1.6em; } h2 { border-bottom: 2px solid #ddd; padding-bottom: .2em; margin-top: 2em; }
table { border-collapse: collapse; margin: .6em 0; } td, th { border: 1px solid #ddd; padding: .25em .5em; }
th { background: #f5f5f5; text-align: left; } td.n { text-align: right; font-variant-numeric: tabular-nums; }
.tok { display: inline-block; margin: 2px; padding: 1px 5px; border-radius: 4px; background: #e8f0fe;
       font-family: ui-monospace, monospace; white-space: pre; }
.tok.special { background: #fde7e9; } .tok small { color: #666; margin-left: 4px; }
.chosen { background: #d7f5dd; font-weight: 600; } .bar { background: #8fb3de; height: .8em; display: inline-block; }
figure { display: inline-block; margin: 4px; text-align: center; font-size: 12px; } figure img { border: 1px solid #ccc; }
.mono { font-family: ui-monospace, monospace; white-space: pre-wrap; overflow-wrap: anywhere; }
p.note { color: #555; }
"""


def _token(text: str) -> str:
    return escape(text.replace("\n", "\\n"))


def _tokenization(data: dict) -> str:
    chips = "".join(f'<span class="tok{" special" if t["special"] else ""}" title="{escape(t["piece"])}">'
                    f'{_token(t["text"])}<small>{t["id"]}</small></span>' for t in data["tokens"])
    batch = data["batch"]
    rows = "".join(f"<tr><td>{escape(text)}</td><td class='mono'>{ids}</td><td class='mono'>{mask}</td></tr>"
                   for text, ids, mask in zip(batch["texts"], batch["input_ids"], batch["attention_mask"]))
    wrapping = (f"<p>The chat template wraps the message:</p><pre class='mono'>{escape(data['text'])}</pre>"
                if data["chat_template"] else "<p>Raw text: no chat template.</p>")
    return (f"{wrapping}<p>{len(data['ids'])} tokens (special tokens in red; hover for the vocabulary piece):</p>"
            f"<div>{chips}</div><p>A batch pads short prompts on the {batch['padding_side']} with id "
            f"{batch['pad_token_id']}; the attention mask is 0 on padding, so no token attends to it:</p>"
            f"<table><tr><th>prompt</th><th>input ids</th><th>attention mask</th></tr>{rows}</table>")


def _architecture(data: dict) -> str:
    facts = "".join(f"<tr><th>{escape(name)}</th><td>{escape(str(data[key]))}</td></tr>" for name, key in
                    [("architecture", "architecture"), ("class", "class"), ("dtype", "dtype"),
                     ("transformer blocks", "blocks"), ("context length", "context_length"),
                     ("positions", "positional_encoding"), ("vocabulary", "vocab_size"), ("parameters", "parameters"),
                     ("trainable", "trainable_parameters"), ("frozen", "frozen_parameters")])
    components = "".join(f"<tr><td>{escape(name)}</td><td class='n'>{c['parameters']:,}</td>"
                         f"<td class='n'>{c['share']:.1%}</td><td>{escape(str(c['modules']))}</td></tr>"
                         for name, c in data["components"].items())
    diagram = escape("\n".join(data["diagram"]))
    return (f"<pre class='mono'>{diagram}</pre><table>{facts}</table><table><tr><th>component</th><th>parameters</th>"
            f"<th>share</th>"
            f"<th>modules</th></tr>{components}</table>")


def _sampling(steps: list, shown: int = 5) -> str:
    parts = []
    for step in steps:
        rows = []
        for stage in step["stages"]:
            cells = "".join(f"<td class='{'chosen' if c['token_id'] == step['chosen']['token_id'] else ''}'>"
                            f"{_token(c['token'])} <small>{c['probability']:.3f}</small></td>"
                            for c in stage["top"][:shown])
            rows.append(f"<tr><th>{escape(stage['name'])}</th><td class='n'>{stage['possible']:,}</td>"
                        f"<td class='n'>{stage['chosen_probability']:.4f}</td>{cells}</tr>")
        how = "argmax" if step["greedy"] else "seeded draw"
        parts.append(f"<h3>Step {step['position'] + 1}: <span class='tok chosen'>{_token(step['chosen']['token'])}"
                     f"</span> ({how}, p = {step['chosen']['probability']:.4f})</h3><table><tr><th>stage</th>"
                     f"<th>possible tokens</th><th>p(chosen)</th><th colspan='{shown}'>top candidates (p)</th></tr>"
                     f"{''.join(rows)}</table>")
    return "".join(parts)


def _forward(data: dict) -> str:
    if "note" in data:
        return f"<p>{escape(data['note'])}</p>"
    largest = max(max(layer["hidden_norm"], layer["attention_norm"], layer["mlp_norm"]) for layer in data["layers"])
    rows = "".join(
        f"<tr><td class='n'>{layer['layer']}</td>" + "".join(
            f"<td class='n'>{layer[key]:.1f} <span class='bar' style='width:{6 * layer[key] / largest:.2f}em'>"
            f"</span></td>" for key in ("hidden_norm", "attention_norm", "mlp_norm")) + "</tr>"
        for layer in data["layers"])
    tokens = data["tokens"]
    maps = []
    for layer, heads in data["attention"].items():
        cell = max(1, min(4, 160 // len(tokens)))
        figures = "".join(f"<figure><img alt='layer {layer} head {head}' src='"
                          f"{data_uri(heat_map_png(np.array(weights), cell))}'><figcaption>head {head}</figcaption>"
                          f"</figure>" for head, weights in heads.items())
        maps.append(f"<h3>Layer {layer}</h3><div>{figures}</div>")
    reads = "".join(f"<tr><td>{_token(r['token'])}</td><td>" + ", ".join(
        f"{_token(read['token'])} <small>(#{read['position']}, {read['weight']:.2f})</small>" for read in r["reads"])
                    + "</td></tr>" for r in data["generated_reads"])
    return (f"<p>Mean size (L2 norm) of the hidden state after each block, and of what its attention and MLP "
            f"add to the residual stream:</p><table><tr><th>layer</th><th>hidden state</th><th>attention adds</th>"
            f"<th>MLP adds</th></tr>{rows}</table><p>Attention maps: row i is what token i reads (darker = more "
            f"weight; each row sums to 1; the upper triangle is the future, masked). {len(tokens)} tokens, "
            f"{data['num_heads']} heads per layer.</p>{''.join(maps)}<p>What each generated token read most "
            f"(weights averaged over every layer and head):</p><table><tr><th>generated</th><th>reads most</th></tr>"
            f"{reads}</table>")


def _size(count: float) -> str:
    for unit in ("B", "KiB", "MiB", "GiB"):
        if count < 1024 or unit == "GiB":
            return f"{count:.0f} {unit}" if unit == "B" else f"{count:.1f} {unit}"
        count /= 1024
    return ""


def _learning(data: dict) -> str:
    if "note" in data:
        return f"<p>{escape(data['note'])}</p>"
    largest = max((b["gradient_norm"] for b in data["blocks"]), default=1.0) or 1.0
    rows = "".join(f"<tr><td class='n'>{b['layer']}</td><td class='n'>{b['gradient_norm']:.3g} <span class='bar' "
                   f"style='width:{6 * b['gradient_norm'] / largest:.2f}em'></span></td>"
                   f"<td class='n'>{b['relative_update']:.2e}</td></tr>" for b in data["blocks"])
    top = "".join(f"<tr><td class='mono'>{escape(g['parameter'])}</td><td class='n'>{g['gradient_norm']:.3g}</td>"
                  f"</tr>" for g in data["largest_gradients"])
    return (f"<p>Loss (mean cross-entropy of the next token over the {data['tokens']} predictions in the text): "
            f"<b>{data['loss']:.3f}</b> (perplexity {data['perplexity']:.1f}). Backpropagation gives every weight a "
            f"gradient; one SGD step of learning rate {data['learning_rate']:g} would move each block's weights "
            f"by the fraction shown (the weights are left unchanged).</p><table><tr><th>layer</th><th>gradient "
            f"norm</th><th>update / weights</th></tr>{rows}</table><p>Largest gradients:</p><table>{top}</table>")


def _memory(data: dict) -> str:
    growth = data["kv_cache_bytes"]
    steps = "".join(f"<tr><td class='n'>{data['prompt_tokens'] + i}</td><td class='n'>{_size(b)}</td></tr>"
                    for i, b in enumerate(growth))
    return (f"<p>{escape(data['attention_type'])}: {data['layers']} layers, {data['heads']} query heads, "
            f"{data['kv_heads']} key/value heads of {data['head_dim']} numbers. The KV cache keeps "
            f"{_size(data['kv_bytes_per_token'])} per token ({_size(data['kv_bytes_if_mha'])} if every query head "
            f"had its own keys and values):</p><table><tr><th>tokens in the sequence</th><th>KV cache</th></tr>"
            f"{steps}</table><p>Attention scores of one layer at the prompt's {data['prompt_tokens']} tokens: "
            f"explicit (the whole [heads, T, T] matrix) {_size(data['explicit_scores_bytes'])}; flash (one "
            f"[heads, T, tile] slice at a time) {_size(data['flash_scores_bytes'])}.</p>{_engine(data['engine'])}")


def _engine(data: dict) -> str:
    """The paged cache: the block table whenever it changes, and what a second identical prompt shares."""
    size, rows, previous = data["block_size"], [], None
    for step, table in enumerate(data["tables"]):
        if table != previous:
            tokens = data["prompt_tokens"] + step
            rows.append(f"<tr><td class='n'>{tokens}</td><td class='mono'>{table}</td></tr>")
            previous = table
    return (f"<p>In the serving engine the cache is paged: blocks of {size} tokens anywhere in one pool, listed "
            f"per sequence in its block table (a new block opens when the last one is full):</p><table><tr><th>"
            f"tokens</th><th>block table</th></tr>{''.join(rows)}</table><p>A second request with the same "
            f"prompt gets blocks {data['second_request_table']}: it shares {data['shared_blocks']} (prefix caching; "
            f"{data['second_request_cached_tokens']} prompt tokens not computed again).</p>")


def render(explanation: Explanation) -> str:
    """The whole report as an HTML document."""
    data = explanation.to_json()
    output = data["output"]
    return f"""<!DOCTYPE html>
<html lang="en"><head><meta charset="utf-8"><title>lmforge explain: {escape(data['prompt'][:60])}</title>
<style>{STYLE}</style></head><body>
<h1>How {escape(data['model'])} answers</h1>
<p><b>Prompt:</b> {escape(data['prompt'])}</p>
<p><b>Answer:</b> {escape(output['text'])} <small>({len(output['token_ids'])} tokens, finish reason
{escape(str(output['finish_reason']))})</small></p>
<h2>1. Tokenization</h2>{_tokenization(data['tokenization'])}
<h2>2. Architecture</h2>{_architecture(data['architecture'])}
<h2>3. Forward pass</h2>{_forward(data['forward'])}
<h2>4. Sampling decisions</h2>
<p class="note">At every step the model scores all tokens (stage "model"); each logits processor then reshapes the
scores, and the sampler picks from the last stage. Each row: how many tokens remain possible, the chosen token's
probability at that stage, and the most likely candidates (the chosen one in green). Settings:
<span class="mono">{escape(str(data['params']))}</span></p>
{_sampling(data['sampling'])}
<h2>5. Learning: one training step on this text</h2>{_learning(data['learning'])}
<h2>6. Memory</h2>{_memory(data['memory'])}
</body></html>
"""
