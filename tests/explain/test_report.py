"""The explain report's numbers are the real ones: its chosen tokens are generate's (greedy and seeded), each
stage's probabilities are the softmax of that stage's logits, the parameter table adds up to the model, and the
HTML renders in a real headless Chromium without console errors."""

import json

import pytest
import torch

from lmforge import SamplingParams, generate
from lmforge.errors import InputError
from lmforge.explain.html import render
from lmforge.explain.report import explain
from lmforge.quant import parameter_count

PROMPT = "Why is the sky blue?"


def test_greedy_steps_are_generate_and_the_argmax_of_the_model(smollm2, smollm2_tokenizer):
    params = SamplingParams(temperature=0, max_tokens=6)
    report = explain(smollm2, smollm2_tokenizer, PROMPT, params)
    ids = report.tokenization["ids"]
    assert ids == smollm2_tokenizer.apply_chat_template([{"role": "user", "content": PROMPT}], tokenize=True)
    expected = generate(smollm2, smollm2_tokenizer, [ids], params)[0].outputs[0]
    assert [step.chosen.token_id for step in report.sampling] == expected.token_ids
    assert report.output["text"] == expected.text
    with torch.inference_mode():
        logits = smollm2(torch.tensor([ids + expected.token_ids])).logits[0, len(ids) - 1:-1]
    for step, row in zip(report.sampling, logits):
        [model] = step.stages  # greedy with no penalties: no processor runs
        assert model.name == "model" and model.top[0].token_id == step.chosen.token_id
        probabilities = row.double().softmax(-1)
        assert model.chosen_probability == pytest.approx(float(probabilities[step.chosen.token_id]), abs=1e-3)
        assert [c.probability for c in model.top] == sorted((c.probability for c in model.top), reverse=True)


def test_a_seeded_sampled_path_repeats_and_each_processor_is_a_stage(smollm2, smollm2_tokenizer):
    params = SamplingParams(temperature=0.8, top_k=20, repetition_penalty=1.2, seed=3, max_tokens=6)
    report = explain(smollm2, smollm2_tokenizer, PROMPT, params, top=25)
    expected = generate(smollm2, smollm2_tokenizer, [report.tokenization["ids"]], params)[0].outputs[0]
    assert [step.chosen.token_id for step in report.sampling] == expected.token_ids
    for step in report.sampling:
        assert [stage.name for stage in step.stages] == ["model", "repetition_penalty", "temperature", "top_k"]
        top_k = step.stages[-1]
        assert top_k.possible == 20 and step.chosen.token_id in {c.token_id for c in top_k.top}
        assert sum(c.probability for c in top_k.top) == pytest.approx(1.0, abs=1e-6)  # all 20 shown, nothing else
        assert step.chosen.probability == top_k.chosen_probability and not step.greedy


def test_tokens_padding_and_the_parameter_table(smollm2, smollm2_tokenizer):
    report = explain(smollm2, smollm2_tokenizer, PROMPT, SamplingParams(temperature=0, max_tokens=1))
    tokens = report.tokenization
    assert [t["id"] for t in tokens["tokens"]] == tokens["ids"]
    assert [t["special"] for t in tokens["tokens"]].count(True) == tokens["text"].count("<|im_")
    batch = tokens["batch"]
    short_mask = batch["attention_mask"][1]
    assert sum(batch["attention_mask"][0]) == len(tokens["ids"]) and short_mask[0] == 0 and short_mask[-1] == 1
    assert all(i == batch["pad_token_id"] for i, m in zip(batch["input_ids"][1], short_mask) if m == 0)
    components = report.architecture["components"]
    assert sum(c["parameters"] for c in components.values()) == parameter_count(smollm2) == \
        report.architecture["parameters"]
    assert "grouped-query attention (GQA), 9 query heads in 3 groups" in report.architecture["diagram"][2]
    json.dumps(report.to_json())  # plain data all through


def test_the_html_report_renders_in_chromium_without_console_errors(smollm2, smollm2_tokenizer, browser, tmp_path):
    from selenium.webdriver.common.by import By

    params = SamplingParams(temperature=0.7, top_p=0.9, seed=1, max_tokens=4)
    report = explain(smollm2, smollm2_tokenizer, "Tell me <b>something</b> & more", params)
    page = tmp_path / "report.html"
    page.write_text(render(report), encoding="utf-8")
    browser.get_log("browser")  # the browser is shared: forget what earlier pages logged
    browser.get(page.as_uri())
    assert browser.find_element(By.TAG_NAME, "h1").text.startswith("How")
    steps = [h.text for h in browser.find_elements(By.TAG_NAME, "h3") if h.text.startswith("Step")]
    assert len(steps) == len(report.sampling)
    maps = browser.find_elements(By.CSS_SELECTOR, "figure img")
    assert len(maps) == 3 * 9 and all(int(m.get_property("naturalWidth")) > 0 for m in maps)  # the PNGs decode
    assert "<b>something</b>" in browser.find_element(By.TAG_NAME, "body").text  # escaped, shown as text
    assert [entry for entry in browser.get_log("browser") if entry["level"] == "SEVERE"] == []
    assert browser.save_screenshot(str(tmp_path / "report.png")) and (tmp_path / "report.png").stat().st_size > 10_000


def test_the_forward_pass_keeps_real_attention_and_restores_the_kernels(smollm2, smollm2_tokenizer):
    from lmforge.explain.forward import trace_forward
    from lmforge.nn import Attention

    ids = smollm2_tokenizer.encode("The quick brown fox jumps over the lazy dog", add_special_tokens=False)
    with torch.inference_mode():
        expected = smollm2(torch.tensor([ids])).logits
    trace = trace_forward(smollm2, smollm2_tokenizer, ids)
    assert trace.num_layers == 30 and trace.num_heads == 9  # GQA: 3 key/value heads shared by 9 query heads
    for weights in trace.attention:
        assert weights.shape == (9, len(ids), len(ids))
        torch.testing.assert_close(weights.sum(-1), torch.ones(9, len(ids)))  # every row sums to 1
        assert float(weights.triu(1).abs().max()) == 0.0  # nothing reads the future
    assert all(stats.hidden_norm > 0 and stats.attention_norm > 0 and stats.mlp_norm > 0 for stats in trace.layers)
    assert all(a.implementation == "sdpa" and a.kernel.__name__ != "kernel" for a in smollm2.modules()
               if isinstance(a, Attention))
    with torch.inference_mode():
        torch.testing.assert_close(smollm2(torch.tensor([ids])).logits, expected)  # the model is unchanged
    reads = trace.most_read(len(ids) - 1)
    assert len(reads) == 3 and all(0 <= p < len(ids) and 0 < w <= 1 for p, w in reads)
    with pytest.raises(InputError, match="layer 30 is out of range: this model has layers 0..29"):
        trace.check(layer=30)
    with pytest.raises(InputError, match="head -1 is out of range"):
        trace.check(head=-1)


def test_the_report_keeps_the_chosen_layers_and_heads(smollm2, smollm2_tokenizer):
    report = explain(smollm2, smollm2_tokenizer, PROMPT, SamplingParams(temperature=0, max_tokens=2), layers=[3],
                     heads=[0, 8])
    forward = report.forward
    assert list(forward["attention"]) == ["3"] and list(forward["attention"]["3"]) == ["0", "8"]
    assert len(forward["tokens"]) == len(report.tokenization["ids"]) + 2 == len(forward["attention"]["3"]["0"])
    assert [r["token"] for r in forward["generated_reads"]] == [s.chosen.token for s in report.sampling]
    with pytest.raises(InputError, match="head 9 is out of range"):
        explain(smollm2, smollm2_tokenizer, PROMPT, SamplingParams(temperature=0, max_tokens=1), heads=[9])


def test_one_training_step_reports_the_real_loss_and_leaves_the_weights(smollm2, smollm2_tokenizer):
    from lmforge.explain.learning import training_step
    from lmforge.train.metrics import count_targets, loss_sum

    ids = smollm2_tokenizer.encode("The quick brown fox jumps over the lazy dog", add_special_tokens=False)
    before = {name: p.detach().clone() for name, p in list(smollm2.named_parameters())[:5]}
    step = training_step(smollm2, ids, learning_rate=1e-3)
    with torch.no_grad():
        batch = torch.tensor([ids])
        expected = loss_sum("causal-lm", smollm2(batch).logits, batch) / count_targets("causal-lm", batch)
    assert step["loss"] == pytest.approx(float(expected), rel=1e-5) and step["tokens"] == len(ids) - 1
    assert len(step["blocks"]) == 30 and all(b["gradient_norm"] > 0 for b in step["blocks"])
    assert all(0 < b["relative_update"] < 1 for b in step["blocks"])
    norms = [g["gradient_norm"] for g in step["largest_gradients"]]
    assert len(norms) == 5 and norms == sorted(norms, reverse=True)
    assert all(torch.equal(p, before[name]) for name, p in smollm2.named_parameters() if name in before)
    assert all(p.grad is None for p in smollm2.parameters())


def test_the_kv_cache_figures_match_a_real_cache(smollm2, smollm2_tokenizer):
    from lmforge.explain.memory import kv_bytes_per_token, memory_section
    from lmforge.nn.kv_cache import KVCache

    cache = KVCache.for_model(smollm2, 1, 100)
    held = sum(t.numel() * t.element_size() for t in [*cache.keys, *cache.values])
    assert kv_bytes_per_token(smollm2) * 100 == held
    memory = memory_section(smollm2, 20, 3)
    assert memory["kv_cache_bytes"] == [kv_bytes_per_token(smollm2) * n for n in (20, 21, 22, 23)]
    assert memory["attention_type"].startswith("GQA (3 query heads") and memory["kv_bytes_if_mha"] == \
        3 * memory["kv_bytes_per_token"]
    assert memory["explicit_scores_bytes"] == 9 * 20 * 20 * 4 >= memory["flash_scores_bytes"]


def test_a_lora_model_shows_trainable_and_frozen_parameters_and_its_diagram(smollm2_tokenizer):
    from lmforge.peft import LoraConfig, add_lora
    from tests.models.test_llama import hf_llama
    from tests.parity import ours_from_hf

    model = ours_from_hf(hf_llama(vocab_size=smollm2_tokenizer.vocab_size, max_position_embeddings=256), "causal-lm")
    total = parameter_count(model)
    add_lora(model, LoraConfig(r=4, target_modules=["q_proj", "v_proj"]))
    report = explain(model, smollm2_tokenizer, "Hi there", SamplingParams(temperature=0, max_tokens=2))
    architecture = report.architecture
    lora = 2 * 2 * 4 * (64 + 64)  # 2 layers x (q, v) x r x (in + out)
    assert architecture["trainable_parameters"] == lora and architecture["frozen_parameters"] == total
    assert architecture["positional_encoding"].startswith("rotary (RoPE)")
    assert "2 × transformer block" in architecture["diagram"][1]
    assert "multi-head attention (MHA), 4 heads of 16" in architecture["diagram"][2]
    assert "learning" in report.to_json() and report.learning["loss"] > 0  # the LoRA weights get the gradients


def test_the_engine_block_table_grows_by_blocks_and_a_same_prompt_shares_its_prefix():
    from lmforge.explain.memory import engine_blocks

    blocks = engine_blocks(list(range(1, 41)), [7, 8, 9, 10, 11, 12, 13, 14, 15], block_size=16)
    tables = blocks["tables"]
    assert [len(t) for t in tables] == [-(-(40 + step) // 16) for step in range(10)]  # ceil(tokens / 16)
    assert all(t[:len(tables[0])] == tables[0] for t in tables)  # earlier blocks never move
    assert blocks["shared_blocks"] == tables[0][:2] and blocks["second_request_cached_tokens"] == 32
    assert blocks["second_request_table"][2] not in tables[-1]  # the partly filled block is not shared
