"""Quantized model folders: bit-exact round trips, the config.json record, strict loading, clear errors."""

import json

import pytest
import torch
from safetensors.torch import load_file, save_file

from lmforge import LLM, AutoModelForCausalLM, LLMEngine, SamplingParams, generate
from lmforge.errors import CheckpointError, ConfigError, InputError
from lmforge.quant import QuantizedLinear, quantize_model
from lmforge.quant.checkpoint import FORMAT_VERSION, save_quantized
from tests.models.test_bart import hf_bart
from tests.models.test_gpt2 import hf_gpt2
from tests.models.test_llama import TINY, hf_llama
from tests.parity import id_tokenizer, ours_from_hf

METHODS = [("int8", {}), ("int4", {"group_size": 32}), ("nf4", {}), ("nf4", {"double_quant": True})]
IDS = torch.tensor([[5, 17, 3, 42, 8, 9, 60]])


@pytest.fixture(scope="module")
def hf_tiny():
    return hf_llama(num_key_value_heads=2, tie_word_embeddings=False)  # untied: the LM head is quantized too


def tiny_llama(hf_tiny):
    return ours_from_hf(hf_tiny, "causal-lm")


def quantized_folder(model, folder, method="int8", **options):
    names = quantize_model(model, method, **options)
    save_quantized(model, folder, id_tokenizer(TINY["vocab_size"]))
    return names


def assert_same_model(loaded, original):
    state, expected = loaded.state_dict(), original.state_dict()
    assert state.keys() == expected.keys()
    for name, tensor in expected.items():
        assert state[name].dtype == tensor.dtype and torch.equal(state[name], tensor), name
    with torch.no_grad():
        assert torch.equal(loaded(IDS).logits, original(IDS).logits)


@pytest.mark.parametrize("method,options", METHODS, ids=["int8", "int4", "nf4", "nf4-double"])
def test_round_trip_is_bit_exact(hf_tiny, tmp_path, method, options):
    model = tiny_llama(hf_tiny)
    names = quantized_folder(model, tmp_path / "out", method, **options)
    loaded = AutoModelForCausalLM.from_pretrained(tmp_path / "out")
    assert_same_model(loaded, model)
    assert len(names) == 2 * 7 + 1 and "lm_head" in names
    assert all(isinstance(loaded.get_submodule(name), QuantizedLinear) for name in names)

    block = json.loads((tmp_path / "out" / "config.json").read_text())["quantization"]
    assert (block["format_version"], block["method"], block["modules"]) == (FORMAT_VERSION, method, names)
    assert block["options"].items() >= options.items()  # complete: the format's defaults are recorded too
    # Each quantized layer is stored as its packed tensors under "<layer>.<field>", with no float weight.
    stored = load_file(tmp_path / "out" / "model.safetensors")
    layer = "model.layers.1.mlp.down_proj"
    assert {key for key in stored if key.startswith(layer + ".")} == {
        f"{layer}.{field}" for field in model.get_submodule(layer).state_dict()}
    assert f"{layer}.weight" not in stored and stored["model.norm.weight"].dtype == torch.float32
    assert sorted(p.name for p in (tmp_path / "out").iterdir()) == [
        "config.json", "model.safetensors", "tokenizer.json", "tokenizer_config.json"]


def test_a_model_that_generated_before_quantizes_its_fused_projections_too(hf_tiny):
    """generate() fuses q/k/v and gate/up into one float matmul each; quantizing must undo that."""
    fresh, used = tiny_llama(hf_tiny), tiny_llama(hf_tiny)
    generate(used, id_tokenizer(TINY["vocab_size"]), [5, 17, 3], SamplingParams(temperature=0, max_tokens=2))
    assert used.model.layers[0].self_attn.get_buffer("qkv_weight") is not None
    quantize_model(fresh, "int8")
    quantize_model(used, "int8")
    assert not any(name.endswith(("qkv_weight", "gate_up_weight")) for name, _ in used.named_buffers())
    with torch.no_grad():
        assert torch.equal(used(IDS).logits, fresh(IDS).logits)


@pytest.mark.parametrize("family", ["gpt2", "bart"])
def test_round_trip_of_other_layouts(tmp_path, family):
    """GPT-2 stores q/k/v fused and transposed, BART is an encoder-decoder: the packed tensors pass through."""
    if family == "gpt2":
        model = ours_from_hf(hf_gpt2(n_embd=64), "causal-lm")
    else:
        model = ours_from_hf(hf_bart(d_model=64, encoder_ffn_dim=64, decoder_ffn_dim=128), "seq2seq-lm")
    quantize_model(model, "int4", group_size=32)
    model.save_pretrained(tmp_path)
    loaded = type(model).from_pretrained(tmp_path)
    assert loaded.state_dict().keys() == model.state_dict().keys()
    assert all(torch.equal(a, b) for a, b in zip(loaded.state_dict().values(), model.state_dict().values()))


def test_dtype_applies_to_the_float_weights_only(hf_tiny, tmp_path):
    model = tiny_llama(hf_tiny)
    quantized_folder(model, tmp_path / "out", "int4")
    loaded = AutoModelForCausalLM.from_pretrained(tmp_path / "out", dtype=torch.bfloat16)
    assert loaded.model.embed_tokens.weight.dtype == torch.bfloat16 == loaded.model.norm.weight.dtype
    q_proj, original = loaded.model.layers[0].self_attn.q_proj, model.model.layers[0].self_attn.q_proj
    assert all(torch.equal(q_proj.get_buffer(name), tensor) and q_proj.get_buffer(name).dtype == tensor.dtype
               for name, tensor in original.named_buffers())


def test_a_loaded_quantized_model_refuses_a_second_quantization(hf_tiny, tmp_path):
    quantized_folder(tiny_llama(hf_tiny), tmp_path / "out")
    loaded = AutoModelForCausalLM.from_pretrained(tmp_path / "out")
    with pytest.raises(ConfigError, match="already quantized"):
        quantize_model(loaded, "nf4")
    with pytest.raises(ConfigError, match="already quantized"):
        LLMEngine.from_pretrained(str(tmp_path / "out"), dtype="float32", quantization="int8")


def test_engine_on_a_quantized_folder_generates_what_the_quantized_model_does(hf_tiny, tmp_path):
    model = tiny_llama(hf_tiny)
    quantized_folder(model, tmp_path / "out", "nf4")
    params = SamplingParams(temperature=0, max_tokens=8, ignore_eos=True)
    prompts = [[5, 17, 3], [42, 8, 9, 60, 2, 11], [7]]
    in_memory = LLM(model, id_tokenizer(TINY["vocab_size"]), kv_cache_tokens=256, block_size=4)
    from_folder = LLM(str(tmp_path / "out"), dtype="float32", kv_cache_tokens=256, block_size=4)
    expected = [out.outputs[0].token_ids for out in in_memory.generate(prompts, params, use_tqdm=False)]
    assert [out.outputs[0].token_ids for out in from_folder.generate(prompts, params, use_tqdm=False)] == expected
    assert expected[0] != expected[1]  # the tokens depend on the weights and prompts


def edit_config(folder, edit):
    config = json.loads((folder / "config.json").read_text())
    edit(config)
    (folder / "config.json").write_text(json.dumps(config))


def test_quantized_weights_without_their_config_block_are_refused(hf_tiny, tmp_path):
    quantized_folder(tiny_llama(hf_tiny), tmp_path / "out")
    edit_config(tmp_path / "out", lambda config: config.pop("quantization"))
    with pytest.raises(CheckpointError, match=r"quantized tensors \(e.g. \['lm_head\.\w+'.*"
                                              r"no 'quantization' block"):
        AutoModelForCausalLM.from_pretrained(tmp_path / "out")


@pytest.mark.parametrize("edit,message", [
    (lambda block: block.update(format_version=FORMAT_VERSION + 1), "format version"),
    (lambda block: block.update(method="int3"), "unknown quantization method 'int3'"),
    (lambda block: block.update(options={"bits": 3}), "int8 quantization has no option bits"),
    (lambda block: block["modules"].append("model.norm"), "'model.norm' as a quantized layer"),
    (lambda block: block["modules"].remove("model.layers.0.mlp.up_proj"), "missing 1 .*up_proj.weight"),
], ids=["version", "method", "option", "not-linear", "unlisted-layer"])
def test_a_config_block_that_does_not_match_is_a_clear_error(hf_tiny, tmp_path, edit, message):
    quantized_folder(tiny_llama(hf_tiny), tmp_path / "out")
    edit_config(tmp_path / "out", lambda config: edit(config["quantization"]))
    with pytest.raises(CheckpointError, match=message):
        AutoModelForCausalLM.from_pretrained(tmp_path / "out")


def test_missing_extra_and_retyped_tensors_are_errors(hf_tiny, tmp_path):
    quantized_folder(tiny_llama(hf_tiny), tmp_path / "out")
    path = tmp_path / "out" / "model.safetensors"
    original = load_file(path)
    layer = "model.layers.0.self_attn.o_proj"
    packed = next(key for key, tensor in original.items() if key.startswith(layer) and not tensor.is_floating_point())
    for state, message in [({k: v for k, v in original.items() if k != packed}, "missing 1 "),
                           ({**original, f"{layer}.extra": torch.zeros(2)}, "unexpected 1 "),
                           ({**original, packed: original[packed].float()}, "integer codes are copied as they are")]:
        save_file(state, path)
        with pytest.raises(CheckpointError, match=message):
            AutoModelForCausalLM.from_pretrained(tmp_path / "out")


def test_bad_quantization_settings_are_named(hf_tiny):
    model = tiny_llama(hf_tiny)  # hidden 64, intermediate 96
    with pytest.raises(ConfigError, match="layer model.layers.0.mlp.down_proj: int4 group_size .* 96; got 64"):
        quantize_model(model, "int4", group_size=64)
    model = tiny_llama(hf_tiny)
    with pytest.raises(ConfigError, match="int4 group_size"):
        quantize_model(model, "int4", group_size=48)
    with pytest.raises(ConfigError, match="nf4 quantization has no option group_size; its options are: double_quant"):
        quantize_model(model, "nf4", group_size=32)
    with pytest.raises(ConfigError, match="unknown quantization method 'int3'"):
        quantize_model(model, "int3")


def test_saving_is_atomic_and_never_overwrites_by_accident(hf_tiny, tmp_path, monkeypatch):
    model = tiny_llama(hf_tiny)
    with pytest.raises(ConfigError, match="not quantized"):
        save_quantized(model, tmp_path / "out")
    quantize_model(model, "int8")
    (tmp_path / "taken").mkdir()
    (tmp_path / "taken" / "notes.txt").write_text("keep me")
    with pytest.raises(InputError, match="already exists and is not empty.*--force"):
        save_quantized(model, tmp_path / "taken")
    tokenizer = id_tokenizer(TINY["vocab_size"])
    monkeypatch.setattr(type(tokenizer), "save_pretrained", lambda self, folder: 1 / 0)  # fails after the weights
    with pytest.raises(ZeroDivisionError):
        save_quantized(model, tmp_path / "taken", tokenizer, force=True)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["taken"]  # no half folder, no leftovers
    assert (tmp_path / "taken" / "notes.txt").read_text() == "keep me"
    monkeypatch.undo()
    save_quantized(model, tmp_path / "taken", tokenizer, force=True)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["taken"]
    assert not (tmp_path / "taken" / "notes.txt").exists() and (tmp_path / "taken" / "tokenizer.json").is_file()


def test_a_tied_head_is_stored_as_int8_rows_that_the_token_lookups_read(tmp_path):
    from lmforge.quant.embedding import QuantizedEmbedding

    float_model = ours_from_hf(hf_llama(num_key_value_heads=2, tie_word_embeddings=True), "causal-lm")
    model = ours_from_hf(hf_llama(num_key_value_heads=2, tie_word_embeddings=True), "causal-lm")
    model.load_state_dict(float_model.state_dict())
    names = quantize_model(model, "int4", tied_head=True, group_size=32)
    head, embedding = model.lm_head, model.model.embed_tokens
    assert names[-1] == "lm_head" and isinstance(head, QuantizedLinear) and head.method == "int8"
    assert head.weight_format.group_size == TINY["hidden_size"]  # one scale per row: per token
    assert isinstance(embedding, QuantizedEmbedding) and not list(embedding.parameters())  # no float table
    table = float_model.model.embed_tokens.weight.detach()
    with torch.no_grad():
        looked_up = embedding(IDS)[0]
        assert torch.equal(looked_up, head.weight_format.dequantize()[IDS[0]])
        assert float((looked_up - table[IDS[0]]).abs().max()) <= float(table.abs().max()) / 254 + 1e-7
    block = model.config.extra["quantization"]
    assert block["tied_head"] == {"module": "lm_head", "method": "int8"} and "lm_head" not in block["modules"]

    save_quantized(model, tmp_path / "out", id_tokenizer(TINY["vocab_size"]))
    loaded = AutoModelForCausalLM.from_pretrained(tmp_path / "out")
    assert isinstance(loaded.model.embed_tokens, QuantizedEmbedding)
    assert loaded.model.embed_tokens._head[0] is loaded.lm_head  # the lookups read the loaded head's rows
    assert_same_model(loaded, model)

    kept = ours_from_hf(hf_llama(num_key_value_heads=2, tie_word_embeddings=True), "causal-lm")
    assert "lm_head" not in quantize_model(kept, "int8", tied_head=True, keep_float=("lm_head",))
    assert kept.lm_head.weight is kept.model.embed_tokens.weight  # still float and still tied
    assert "tied_head" not in kept.config.extra["quantization"]


@pytest.mark.parametrize("tied_head,message", [
    ({"module": "model.norm", "method": "int8"}, "no head of that name tied"),
    ({"module": "lm_head", "method": "int4"}, "'tied_head' this lmforge cannot read"),
], ids=["not-a-head", "other-method"])
def test_a_tied_head_entry_that_does_not_match_is_a_clear_error(tmp_path, tied_head, message):
    model = ours_from_hf(hf_llama(num_key_value_heads=2, tie_word_embeddings=True), "causal-lm")
    quantized_folder(model, tmp_path / "out", tied_head=True)
    edit_config(tmp_path / "out", lambda config: config["quantization"].update(tied_head=tied_head))
    with pytest.raises(CheckpointError, match=message):
        AutoModelForCausalLM.from_pretrained(tmp_path / "out")


def test_load_time_quantization_stores_the_tied_head_in_int8():
    from lmforge.quant.apply import load_quantized

    model = load_quantized("smollm2-135m-instruct", quantization="int8")
    assert isinstance(model.lm_head, QuantizedLinear) and model.config.extra["quantization"]["tied_head"]
    assert sum(p.numel() for p in model.parameters()) < 1_000_000  # only norms stay float: no 113 MB table


@pytest.mark.parametrize("method", ["int4", "nf4"])
def test_quantizing_while_reading_a_gguf_file_equals_quantizing_the_loaded_model(method, monkeypatch):
    from lmforge.quant import gguf_blocks
    from lmforge.quant.apply import load_quantized, quantize_loaded

    calls = []
    streaming = gguf_blocks.quantize_while_loading_gguf
    monkeypatch.setattr(gguf_blocks, "quantize_while_loading_gguf", lambda *args: calls.append(1) or streaming(*args))
    read_quantizing = load_quantized("smollm2-135m-instruct", quantization=method)
    assert calls  # the file was read layer by layer
    loaded = AutoModelForCausalLM.from_pretrained("smollm2-135m-instruct")
    quantize_loaded(loaded, method)
    expected = loaded.state_dict()
    got = read_quantizing.state_dict()
    assert got.keys() == expected.keys()
    assert all(torch.equal(got[name], expected[name]) for name in expected)
    assert read_quantizing.config.extra["quantization"] == loaded.config.extra["quantization"]


@pytest.mark.parametrize("shard_bytes", [2**30, 40_000], ids=["one-file", "sharded"])
@pytest.mark.parametrize("tied", [True, False], ids=["tied-head", "own-head"])
def test_quantizing_while_reading_an_hf_folder_equals_quantizing_the_loaded_model(tied, shard_bytes, tmp_path,
                                                                                  monkeypatch):
    from lmforge.quant import streaming
    from lmforge.quant.apply import load_quantized, quantize_loaded

    model = ours_from_hf(hf_llama(num_key_value_heads=2, tie_word_embeddings=tied, intermediate_size=128), "causal-lm")
    model.save_pretrained(tmp_path / "float", max_shard_bytes=shard_bytes)
    calls = []
    reading = streaming.quantize_while_reading
    monkeypatch.setattr(streaming, "quantize_while_reading", lambda *args: calls.append(1) or reading(*args))
    read_quantizing = load_quantized(tmp_path / "float", quantization="int4")
    assert calls  # the folder was read tensor by tensor
    loaded = AutoModelForCausalLM.from_pretrained(tmp_path / "float")
    quantize_loaded(loaded, "int4")
    expected, got = loaded.state_dict(), read_quantizing.state_dict()
    assert got.keys() == expected.keys()
    assert all(torch.equal(got[name], expected[name]) for name in expected)
    assert read_quantizing.config.extra["quantization"] == loaded.config.extra["quantization"]
    save_quantized(read_quantizing, tmp_path / "quantized")  # an already quantized folder: not streamed again,
    calls.clear()  # and the plain loader's clear error
    with pytest.raises(ConfigError, match="already quantized"):
        load_quantized(tmp_path / "quantized", quantization="int4")
    assert not calls


@pytest.mark.parametrize("dropped", [None, "blk.0.ffn_norm.weight", "blk.1.ffn_up.weight"])
def test_quantizing_while_reading_a_gguf_file_needs_every_weight(dropped, tmp_path, monkeypatch):
    from lmforge.quant.apply import load_quantized
    from tests.checkpoint import test_gguf

    write = test_gguf.write_gguf
    monkeypatch.setattr(test_gguf, "write_gguf", lambda path, arch, tensors, configure: write(
        path, arch, {name: array for name, array in tensors.items() if name != dropped}, configure))
    path = test_gguf.tiny_llama_gguf(tmp_path, hf_llama(num_key_value_heads=2, tie_word_embeddings=False))
    if dropped is None:
        model = load_quantized(path, quantization="int8")
        assert isinstance(model.model.layers[1].mlp.up_proj, QuantizedLinear)
        return
    with pytest.raises(CheckpointError, match="no tensor for .*the checkpoint does not hold every weight"):
        load_quantized(path, quantization="int8")
