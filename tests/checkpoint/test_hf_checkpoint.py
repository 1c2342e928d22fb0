"""HF-layout checkpoints: save → HF load, save → reload, shards, and clear errors for bad files."""

import json

import pytest
import torch
import transformers

from lmforge import AutoModel, AutoModelForCausalLM, AutoModelForSequenceClassification
from lmforge.checkpoint.hf import load_hf_weights
from lmforge.errors import CheckpointError
from tests.models.test_llama import TINY, hf_llama
from tests.parity import max_abs_diff, ours_from_hf


@pytest.fixture(scope="module")
def tiny_llama():
    return ours_from_hf(hf_llama(num_key_value_heads=2, tie_word_embeddings=True), "causal-lm")


def test_hf_loads_what_we_save_with_same_logits(tiny_llama, tmp_path):
    tiny_llama.save_pretrained(tmp_path)
    reloaded = transformers.AutoModelForCausalLM.from_pretrained(tmp_path).eval()
    ids = torch.randint(0, TINY["vocab_size"], (2, 9))
    with torch.no_grad():
        assert max_abs_diff(reloaded(ids).logits, tiny_llama(ids).logits) <= 1e-5
    assert json.loads((tmp_path / "config.json").read_text())["architectures"] == ["LlamaForCausalLM"]


def test_save_reload_round_trip_is_exact(tiny_llama, tmp_path):
    tiny_llama.save_pretrained(tmp_path)
    reloaded = AutoModelForCausalLM.from_pretrained(tmp_path)
    for (name, a), (_, b) in zip(tiny_llama.state_dict().items(), reloaded.state_dict().items()):
        assert torch.equal(a, b), name
    assert reloaded.config == tiny_llama.config


def test_loading_from_files_takes_their_tensors_and_a_given_state_dict_is_copied(tiny_llama, tmp_path):
    tiny_llama.save_pretrained(tmp_path)
    reloaded = AutoModelForCausalLM.from_pretrained(tmp_path, dtype=torch.bfloat16)
    assert reloaded.lm_head.weight is reloaded.model.embed_tokens.weight  # still tied
    assert all(p.is_contiguous() and p.dtype == torch.bfloat16 and p.requires_grad for p in reloaded.parameters())
    ids = torch.randint(0, TINY["vocab_size"], (1, 5))
    with torch.no_grad():
        assert max_abs_diff(reloaded(ids).logits.float(), tiny_llama(ids).logits) < 0.1

    config = json.loads((tmp_path / "config.json").read_text())
    state = load_hf_weights(tmp_path)
    given = state["model.layers.0.mlp.up_proj.weight"]
    taken = type(tiny_llama).from_hf_state_dict(config, state, "test", assign=True)
    assert taken.model.layers[0].mlp.up_proj.weight.data_ptr() == given.data_ptr()  # no second copy
    state = load_hf_weights(tmp_path)  # e.g. another model's state_dict(): the model must not share it
    given = state["model.layers.0.mlp.up_proj.weight"]
    copied = type(tiny_llama).from_hf_state_dict(config, state, "test")
    assert copied.model.layers[0].mlp.up_proj.weight.data_ptr() != given.data_ptr()
    assert torch.equal(copied.model.layers[0].mlp.up_proj.weight, given)


def test_sharded_save_round_trip(tiny_llama, tmp_path):
    tiny_llama.save_pretrained(tmp_path, max_shard_bytes=64 * 1024)
    index = json.loads((tmp_path / "model.safetensors.index.json").read_text())
    assert len(set(index["weight_map"].values())) > 1
    reloaded = AutoModelForCausalLM.from_pretrained(tmp_path)
    assert all(torch.equal(a, b) for a, b in zip(tiny_llama.state_dict().values(), reloaded.state_dict().values()))
    hf = transformers.AutoModelForCausalLM.from_pretrained(tmp_path)
    assert torch.equal(hf.model.layers[1].mlp.down_proj.weight, tiny_llama.model.layers[1].mlp.down_proj.weight)


def test_backbone_and_head_checkpoints_load_into_each_other(tiny_llama, tmp_path):
    tiny_llama.save_pretrained(tmp_path)
    backbone = AutoModel.from_pretrained(tmp_path)  # drops the LM head
    assert torch.equal(backbone.layers[0].self_attn.q_proj.weight, tiny_llama.model.layers[0].self_attn.q_proj.weight)
    backbone.save_pretrained(tmp_path / "bare")
    classifier = AutoModelForSequenceClassification.from_pretrained(tmp_path / "bare")  # new head, same body
    assert torch.equal(classifier.model.norm.weight, tiny_llama.model.norm.weight)


def test_mismatched_shapes_name_the_tensor(tiny_llama, tmp_path):
    tiny_llama.save_pretrained(tmp_path)
    config = json.loads((tmp_path / "config.json").read_text())
    config["intermediate_size"] = 100
    (tmp_path / "config.json").write_text(json.dumps(config))
    with pytest.raises(CheckpointError, match=r"model\.layers\.0\.mlp\.gate_proj\.weight.*\(96, 64\).*\(100, 64\)"):
        AutoModelForCausalLM.from_pretrained(tmp_path)


def test_missing_weights_are_an_error(tiny_llama, tmp_path):
    tiny_llama.save_pretrained(tmp_path)
    config = json.loads((tmp_path / "config.json").read_text())
    config["num_hidden_layers"] = 3
    (tmp_path / "config.json").write_text(json.dumps(config))
    with pytest.raises(CheckpointError, match="missing.*model.layers.2"):
        AutoModelForCausalLM.from_pretrained(tmp_path)


def test_truncated_and_corrupt_files_are_clear_errors(tiny_llama, tmp_path):
    tiny_llama.save_pretrained(tmp_path)
    weights = tmp_path / "model.safetensors"
    data = weights.read_bytes()
    weights.write_bytes(data[: len(data) // 2])
    with pytest.raises(CheckpointError, match="model.safetensors.*truncated or corrupt"):
        load_hf_weights(tmp_path)
    weights.write_bytes(b"\x00" * 64)
    with pytest.raises(CheckpointError, match="model.safetensors"):
        load_hf_weights(tmp_path)
    (tmp_path / "config.json").write_text("{not json")
    with pytest.raises(CheckpointError, match="config.json.*not valid JSON"):
        AutoModelForCausalLM.from_pretrained(tmp_path)


def test_pickle_weights_are_refused(tmp_path):
    (tmp_path / "config.json").write_text(json.dumps({"model_type": "llama"}))
    torch.save({"w": torch.zeros(1)}, tmp_path / "pytorch_model.bin")
    with pytest.raises(CheckpointError, match="safetensors only"):
        load_hf_weights(tmp_path)


def test_the_tensor_reader_reads_each_tensor_as_the_whole_file_load_does(tmp_path):
    from safetensors.torch import save_file

    from lmforge.checkpoint.hf import hf_tensor_reader

    state = {"f32": torch.randn(3, 5), "bf16": torch.randn(4).bfloat16(), "f16": torch.randn(2, 2).half(),
             "i8": torch.randint(-128, 127, (7,), dtype=torch.int8), "u8": torch.arange(6, dtype=torch.uint8),
             "scalar": torch.tensor(2.5), "empty": torch.zeros(0, 3)}
    save_file(state, str(tmp_path / "model.safetensors"))
    names, read = hf_tensor_reader(tmp_path)
    assert sorted(names) == sorted(state)
    for name, tensor in state.items():
        got = read(name)
        assert got.dtype == tensor.dtype and got.shape == tensor.shape and torch.equal(got, tensor), name
    data = (tmp_path / "model.safetensors").read_bytes()
    (tmp_path / "model.safetensors").write_bytes(data[:-8])  # the last tensor's bytes cut short
    names, read = hf_tensor_reader(tmp_path)
    with pytest.raises(CheckpointError, match="truncated"):
        for name in names:
            read(name)
    (tmp_path / "model.safetensors").write_bytes(b"\x10\x00\x00\x00\x00\x00\x00\x00{not json")
    with pytest.raises(CheckpointError, match="safetensors header"):
        hf_tensor_reader(tmp_path)
