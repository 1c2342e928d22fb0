"""LoRA and QLoRA: an unchanged model at init, only adapters learn, merge/unmerge, the on/off switch,
PEFT-format files both ways (against the `peft` library on the HF model), and bad input."""

import logging

import pytest
import torch
from torch import nn

from lmforge.errors import CheckpointError, UnsupportedError, ValidationError
from lmforge.generation import SamplingParams, generate
from lmforge.peft import (
    LoraConfig,
    add_lora,
    load_lora,
    lora_disabled,
    merge_and_unload,
    merge_lora,
    save_lora,
    set_lora_enabled,
    trainable_summary,
    unmerge_lora,
)
from lmforge.peft.lora import LoraLayer
from lmforge.quant import quantize_model
from lmforge.train import PaddingCollator, Trainer, TrainingArguments
from tests.peft.tiny import tiny, token_ids

ARCHITECTURES = [("bert", "sequence-classification"), ("llama", "causal-lm"), ("gpt2", "causal-lm"),
                 ("bart", "seq2seq-lm")]


def logits(model, ids):
    with torch.no_grad():
        if model.config.model_type == "bart":
            return model(input_ids=ids, decoder_input_ids=ids).logits
        return model(input_ids=ids).logits


def randomize_lora(model, seed=1):
    """Non-zero B matrices (and heads to save), so a mix-up of A, B, scaling or names would show."""
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, parameter in model.named_parameters():
            if parameter.requires_grad:
                parameter.copy_(torch.randn(parameter.shape, generator=generator) * 0.1)


@pytest.mark.parametrize("model_type,task", ARCHITECTURES)
def test_lora_leaves_the_model_unchanged_at_init_and_keeps_base_names(model_type, task):
    model, ids = tiny(model_type, task), token_ids()
    before, names_before = logits(model, ids), set(model.state_dict())
    adapted = add_lora(model, LoraConfig(r=4, target_modules="all-linear"))
    assert adapted and all(isinstance(model.get_submodule(name), LoraLayer) for name in adapted)
    assert torch.equal(logits(model, ids), before)
    state = set(model.state_dict())
    assert names_before <= state  # base weights keep their names: base checkpoints load unchanged
    assert all(".lora_A." in name or ".lora_B." in name for name in state - names_before)
    assert {name for name, p in model.named_parameters() if p.requires_grad} == state - names_before


def test_rank_8_on_a_4096_square_layer_trains_65536_weights():
    model = nn.Sequential()
    model.add_module("proj", nn.Linear(4096, 4096, bias=False))
    add_lora(model, LoraConfig(r=8, target_modules=["proj"]))
    summary = trainable_summary(model)
    assert summary.trainable == 65_536
    assert summary.total == 4096 * 4096 + 65_536


def test_only_lora_learns_and_the_base_stays_bitwise_equal(tmp_path):
    model = tiny("llama", "causal-lm")
    add_lora(model, LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj", "down_proj"]))
    frozen = {name: p.detach().clone() for name, p in model.named_parameters() if not p.requires_grad}
    lora = {name: p.detach().clone() for name, p in model.named_parameters() if p.requires_grad}
    data = [{"input_ids": token_ids(1, 12, seed=s)[0].tolist()} for s in range(4)]
    arguments = TrainingArguments(output_dir=tmp_path, max_steps=25, per_device_batch_size=4, learning_rate=2e-2,
                                  logging_steps=1, progress=False)
    trainer = Trainer(model.train(), arguments, data, PaddingCollator(pad_token_id=0, causal_lm_labels=True))
    state = trainer.train()
    assert state.history[-1]["loss"] < state.history[0]["loss"] - 0.2
    for name, parameter in model.named_parameters():
        if name in frozen:
            assert torch.equal(parameter, frozen[name]), name
    assert all(not torch.equal(dict(model.named_parameters())[name], value) for name, value in lora.items()
               if ".lora_B." in name)


@pytest.mark.parametrize("model_type,task", [("llama", "causal-lm"), ("bert", "sequence-classification")])
def test_merge_unmerge_and_the_switch(model_type, task):
    model, ids = tiny(model_type, task), token_ids()
    base = logits(model, ids)
    weight = model.model.layers[0].self_attn.q_proj.weight.detach().clone()
    add_lora(model, LoraConfig(r=4, target_modules="all-linear"))
    randomize_lora(model)
    adapted = logits(model, ids)
    assert not torch.allclose(adapted, base, atol=1e-3)
    with lora_disabled(model):
        assert torch.equal(logits(model, ids), base)  # the reference model of DPO, without a second copy
    merge_lora(model)
    torch.testing.assert_close(logits(model, ids), adapted, rtol=0, atol=1e-5)
    unmerge_lora(model)
    torch.testing.assert_close(model.model.layers[0].self_attn.q_proj.weight, weight, rtol=0, atol=1e-6)
    torch.testing.assert_close(logits(model, ids), adapted, rtol=0, atol=1e-5)
    set_lora_enabled(model, False)
    torch.testing.assert_close(logits(model, ids), base, rtol=0, atol=1e-5)  # the weight went there and back
    set_lora_enabled(model, True)
    merge_and_unload(model)
    assert not any(isinstance(module, LoraLayer) for module in model.modules())
    assert type(model.model.layers[0].self_attn.q_proj) is nn.Linear
    torch.testing.assert_close(logits(model, ids), adapted, rtol=0, atol=1e-5)


def test_generation_uses_the_adapters_and_fusion_leaves_them_alone():
    model, prompt = tiny("llama", "causal-lm"), token_ids(1, 5)[0].tolist()
    add_lora(model, LoraConfig(r=4, target_modules="all-linear"))
    randomize_lora(model)
    params = SamplingParams(temperature=0.0, max_tokens=8, ignore_eos=True)
    with_lora = generate(model, None, prompt, params)[0].outputs[0].token_ids
    with lora_disabled(model):
        base = generate(model, None, prompt, params)[0].outputs[0].token_ids
    assert with_lora != base
    merge_and_unload(model)
    assert generate(model, None, prompt, params)[0].outputs[0].token_ids == with_lora


def hf_pair(tmp_path):
    """An lmforge tiny Llama and the HF transformers model loaded from the same folder."""
    transformers = pytest.importorskip("transformers")
    ours = tiny("llama", "causal-lm")
    ours.save_pretrained(tmp_path / "base")
    return ours, transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "base").eval()


def test_peft_loads_our_adapter_and_gets_our_logits(tmp_path):
    peft = pytest.importorskip("peft")
    ours, hf = hf_pair(tmp_path)
    add_lora(ours, LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj", "gate_proj"]))
    randomize_lora(ours)
    save_lora(ours, tmp_path / "adapter")
    theirs = peft.PeftModel.from_pretrained(hf, tmp_path / "adapter").eval()
    ids = token_ids()
    with torch.no_grad():
        torch.testing.assert_close(theirs(input_ids=ids).logits, logits(ours, ids), rtol=1e-5, atol=1e-5)


def test_we_load_peft_adapters_and_get_their_logits(tmp_path):
    peft = pytest.importorskip("peft")
    ours, hf = hf_pair(tmp_path)
    theirs = peft.get_peft_model(hf, peft.LoraConfig(r=2, lora_alpha=5, target_modules=["k_proj", "down_proj"],
                                                     modules_to_save=["lm_head"]))
    randomize_lora(theirs)
    theirs.save_pretrained(tmp_path / "adapter")
    names = load_lora(ours, tmp_path / "adapter")
    assert names == [f"model.layers.{i}.{layer}" for i in range(2) for layer in ("self_attn.k_proj", "mlp.down_proj")]
    ids = token_ids()
    with torch.no_grad():
        torch.testing.assert_close(logits(ours, ids), theirs.eval()(input_ids=ids).logits, rtol=1e-5, atol=1e-5)
    save_lora(ours, tmp_path / "again")  # and back out, with the same tensors
    from safetensors.torch import load_file

    first, second = (load_file(tmp_path / folder / "adapter_model.safetensors") for folder in ("adapter", "again"))
    assert first.keys() == second.keys()
    assert all(torch.equal(first[key], second[key]) for key in first)


def test_qlora_trains_adapters_over_a_frozen_nf4_base(tmp_path, caplog):
    model, ids = tiny("llama", "causal-lm", hidden_size=64, intermediate_size=128, num_attention_heads=4), token_ids()
    quantize_model(model, "nf4")
    base = logits(model, ids)
    codes = {name: buffer.clone() for name, buffer in model.named_buffers()}
    add_lora(model, LoraConfig(r=4, target_modules="all-linear"))
    assert type(model.model.layers[0].self_attn.q_proj).__name__ == "LoraQuantizedLinear"
    assert torch.equal(logits(model, ids), base)
    data = [{"input_ids": token_ids(1, 12, seed=s)[0].tolist()} for s in range(4)]
    arguments = TrainingArguments(output_dir=tmp_path, max_steps=15, per_device_batch_size=4, learning_rate=2e-2,
                                  logging_steps=1, progress=False)
    state = Trainer(model.train(), arguments, data, PaddingCollator(pad_token_id=0, causal_lm_labels=True)).train()
    assert state.history[-1]["loss"] < state.history[0]["loss"]
    assert all(torch.equal(buffer, codes[name]) for name, buffer in model.named_buffers() if name in codes)
    layer = model.model.layers[0].mlp.down_proj
    base_weight = layer.weight_format.dequantize()
    target = base_weight + layer.delta_weight().detach()
    with pytest.raises(ValidationError, match="merge_and_unload"):
        merge_lora(model)
    with caplog.at_level(logging.WARNING):
        merge_and_unload(model)
    assert "re-quantizes" in caplog.text
    assert type(layer).__name__ == "QuantizedLinear"
    merged = layer.weight_format.dequantize()
    # the merged weight is the update added and rounded again: NF4's error, not the update's size
    assert (merged - target).abs().max() < (base_weight - target).abs().max()
    absmax = target.reshape(-1, 64).abs().amax(-1, keepdim=True)
    assert ((merged - target).reshape(-1, 64).abs() <= 0.16 * absmax + 1e-6).all()  # half the widest NF4 code gap


def test_bad_input_names_the_fix():
    model = tiny("llama", "causal-lm")
    with pytest.raises(ValidationError, match=r"match no linear layer .*'q_proj'"):
        add_lora(model, LoraConfig(target_modules=["query"]))
    with pytest.raises(ValidationError, match="rank 64 is larger than layer"):
        add_lora(tiny("llama", "causal-lm"), LoraConfig(r=64, target_modules=["q_proj"]))
    with pytest.raises(ValidationError, match="rank r must be an integer"):
        LoraConfig(r=0)
    add_lora(model, LoraConfig(target_modules=["q_proj"]))
    with pytest.raises(ValidationError, match="already has LoRA layers"):
        add_lora(model, LoraConfig(target_modules=["v_proj"]))
    with pytest.raises(ValidationError, match="no LoRA layers"):
        merge_lora(tiny("llama", "causal-lm"))


def test_adapter_folders_are_checked(tmp_path):
    with pytest.raises(CheckpointError, match="not a PEFT adapter folder"):
        load_lora(tiny("llama", "causal-lm"), tmp_path)
    gpt2 = tiny("gpt2", "causal-lm")
    add_lora(gpt2, LoraConfig(target_modules=["q_proj"]))
    with pytest.raises(UnsupportedError, match="merge_and_unload"):
        save_lora(gpt2, tmp_path / "gpt2")
    model = tiny("llama", "causal-lm")
    add_lora(model, LoraConfig(r=4, target_modules=["q_proj"]))
    folder = save_lora(model, tmp_path / "adapter")
    config = (folder / "adapter_config.json").read_text().replace('"use_dora": false', '"use_dora": true')
    (folder / "adapter_config.json").write_text(config)
    with pytest.raises(UnsupportedError, match="DoRA"):
        load_lora(tiny("llama", "causal-lm"), folder)
