"""Bottleneck adapters: placement by module name on every architecture, an unchanged model at init, and both
ways of saving (a complete folder, or the adapters and head alone)."""

import json

import pytest
import torch
from safetensors.torch import load_file

from lmforge import AutoModelForSequenceClassification
from lmforge.errors import CheckpointError, ValidationError
from lmforge.peft import AdapterLinear, add_adapters, load_adapters, save_adapters
from lmforge.peft.adapters import adapter_parameter_names
from lmforge.peft.freezing import layer_counts
from lmforge.quant import quantize_model
from tests.peft.tiny import tiny, token_ids

ARCHITECTURES = [("bert", "sequence-classification"), ("llama", "causal-lm"), ("gpt2", "sequence-classification"),
                 ("bart", "seq2seq-lm"), ("bart", "sequence-classification")]

LABELS = {"0": "neg", "1": "neutral", "2": "pos"}


def wrapped(model) -> list[str]:
    return [name for name, module in model.named_modules() if isinstance(module, AdapterLinear)]


def perturb_adapters(model, seed=1):
    """Random values for the adapters and the head, so a save/load mix-up would show."""
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, parameter in model.named_parameters():
            if ".adapter." in name or not name.startswith("model."):
                parameter.copy_(torch.randn(parameter.shape, generator=generator) * 0.1)


@pytest.mark.parametrize("model_type,task", ARCHITECTURES)
def test_adapters_leave_the_output_unchanged_at_init(model_type, task):
    model, ids = tiny(model_type, task), token_ids()
    with torch.no_grad():
        before = model(ids).logits
        names = add_adapters(model, bottleneck=8)
        after = model(ids).logits
    assert torch.equal(before, after)
    assert names == wrapped(model) and len(names) == 2 * sum(layer_counts(model).values())  # 2 per layer
    perturb_adapters(model)
    with torch.no_grad():
        assert not torch.equal(model(ids).logits, before)  # the adapters are on the forward path


@pytest.mark.parametrize("where,endings", [("attention", {"self_attn.o_proj"}), ("ffn", {"mlp.down_proj"}),
                                          ("both", {"self_attn.o_proj", "mlp.down_proj"})])
def test_where_selects_the_layers_by_name(where, endings):
    bart = tiny("bart", "seq2seq-lm")
    names = add_adapters(bart, bottleneck=4, where=where)
    assert {name.split(".", 4)[4] for name in names} == endings  # model.<stack>.layers.N.<ending>
    assert len(names) == 4 * len(endings)  # 2 encoder + 2 decoder layers; cross-attention keeps no adapter
    assert not any("cross_attn" in name for name in names)


def test_base_weights_keep_their_names_and_identity():
    model = tiny("bert")
    plain = dict(model.named_parameters())
    add_adapters(model, bottleneck=4)
    adapted = dict(model.named_parameters())
    assert all(adapted[name] is parameter for name, parameter in plain.items())  # same Parameter objects
    extra = set(adapted) - set(plain)
    assert extra == set(adapter_parameter_names(model)) and len(extra) == 4 * 4  # 4 adapters x (down, up) x (w, b)
    o_proj = model.model.layers[0].self_attn.o_proj
    assert o_proj.adapter.down.weight.shape == (4, 32) and not o_proj.adapter.up.weight.any()


def test_bad_requests_are_clear_errors():
    model = tiny("bert")
    with pytest.raises(ValidationError, match="bottleneck must be an integer >= 1"):
        add_adapters(model, bottleneck=0)
    with pytest.raises(ValidationError, match="'attention', 'ffn' or 'both'"):
        add_adapters(model, where="everywhere")
    add_adapters(model, bottleneck=4)
    with pytest.raises(ValidationError, match="already has adapters"):
        add_adapters(model, bottleneck=8)
    quantized = tiny("llama", "causal-lm")
    quantize_model(quantized, "int8")
    with pytest.raises(ValidationError, match="add adapters before quantizing"):
        add_adapters(quantized)


@pytest.mark.parametrize("model_type", ["bert", "gpt2", "bart"])
def test_save_pretrained_writes_a_folder_that_loads_with_its_adapters(model_type, tmp_path):
    model, ids = tiny(model_type), token_ids()
    add_adapters(model, bottleneck=4, where="ffn")
    perturb_adapters(model)
    model.save_pretrained(tmp_path)
    block = json.loads((tmp_path / "config.json").read_text())["adapters"]
    assert block == {"format_version": 1, "bottleneck": 4, "modules": wrapped(model)}
    loaded = AutoModelForSequenceClassification.from_pretrained(tmp_path)
    assert wrapped(loaded) == wrapped(model)
    with torch.no_grad():
        assert torch.equal(loaded(ids).logits, model(ids).logits)


def test_hf_names_of_adapter_tensors_follow_the_layer():
    model = tiny("bert")
    add_adapters(model, bottleneck=4, where="attention")
    assert "bert.encoder.layer.1.attention.output.dense.adapter.up.weight" in model.hf_state_dict()


def test_a_broken_adapters_block_is_a_checkpoint_error(tmp_path):
    model = tiny("bert")
    add_adapters(model, bottleneck=4)
    model.save_pretrained(tmp_path)
    config = json.loads((tmp_path / "config.json").read_text())
    config["adapters"]["modules"] = ["model.layers.0.self_attn.q_proj.nothing"]
    (tmp_path / "config.json").write_text(json.dumps(config))
    with pytest.raises(CheckpointError, match="no Linear layer of that name"):
        AutoModelForSequenceClassification.from_pretrained(tmp_path)
    config["adapters"]["format_version"] = 99
    (tmp_path / "config.json").write_text(json.dumps(config))
    with pytest.raises(CheckpointError, match="format_version 1"):
        AutoModelForSequenceClassification.from_pretrained(tmp_path)


@pytest.mark.parametrize("model_type", ["bert", "llama"])
def test_adapter_only_folder_rebuilds_the_model_from_its_base(model_type, tmp_path):
    backbone = tiny(model_type, "base")
    backbone.save_pretrained(tmp_path / "base")  # a bare backbone, as pretrained checkpoints usually are
    model = AutoModelForSequenceClassification.from_pretrained(tmp_path / "base")
    add_adapters(model, bottleneck=4)
    perturb_adapters(model)
    model.config.extra.update(id2label=LABELS, label2id={name: int(i) for i, name in LABELS.items()})
    save_adapters(model, tmp_path / "adapters", base_model=str(tmp_path / "base"))

    stored = load_file(str(tmp_path / "adapters" / "adapter_model.safetensors"))
    assert len(stored) == len(adapter_parameter_names(model)) + sum(
        not name.startswith("model.") for name, _ in model.named_parameters())  # adapters + head, nothing else
    record = json.loads((tmp_path / "adapters" / "adapter_config.json").read_text())
    assert record["id2label"] == LABELS and record["base_model"] == str(tmp_path / "base")

    loaded = load_adapters(tmp_path / "adapters")
    ids = token_ids()
    with torch.no_grad():
        assert torch.equal(loaded(ids).logits, model(ids).logits)
    assert loaded.config.extra["id2label"] == LABELS and loaded.config.num_labels == 3


def test_adapter_only_folder_errors(tmp_path):
    model = tiny("bert")
    with pytest.raises(ValidationError, match="no adapters to save"):
        save_adapters(model, tmp_path / "none")
    add_adapters(model, bottleneck=4)
    save_adapters(model, tmp_path / "adapters")
    with pytest.raises(ValidationError, match="names no base model"):
        load_adapters(tmp_path / "adapters")
    tiny("llama", "base").save_pretrained(tmp_path / "llama")
    with pytest.raises(ValidationError, match="trained on a bert model, but .* is a llama model"):
        load_adapters(tmp_path / "adapters", base_model=tmp_path / "llama")
    with pytest.raises(CheckpointError, match="no adapter_config.json"):
        load_adapters(tmp_path / "llama")
