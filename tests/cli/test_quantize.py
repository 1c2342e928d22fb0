"""`lmforge quantize`: a self-contained quantized folder that every command loads back, and one-line errors."""

import copy
import json
import re

import pytest
import torch

from lmforge import AutoModelForCausalLM, AutoTokenizer, SamplingParams, generate
from lmforge.cli import main, quantize
from lmforge.quant import QuantizedLinear, quantize_model
from tests.models.test_llama import TINY, hf_llama
from tests.parity import id_tokenizer, ours_from_hf


@pytest.fixture(scope="module")
def tiny_folder(tmp_path_factory):
    """A tiny random Llama with a tied head, saved with its tokenizer as an HF folder."""
    folder = tmp_path_factory.mktemp("tiny")
    ours_from_hf(hf_llama(num_key_value_heads=2, tie_word_embeddings=True), "causal-lm").save_pretrained(folder)
    id_tokenizer(TINY["vocab_size"]).save_pretrained(folder)
    return folder


@pytest.mark.parametrize("float_head", [False, True], ids=["int8-tied-head", "float-tied-head"])
def test_the_folder_loads_back_quantized_in_every_command(tiny_folder, tmp_path, capsys, float_head):
    out = tmp_path / "int4"
    flags = ["--float-tied-head"] if float_head else []
    assert main(["quantize", str(tiny_folder), "--method", "int4", "--group-size", "32", *flags, "--out", str(out)]) == 0
    stdout, stderr = capsys.readouterr()
    assert f"-> {out} (int4, group_size=32)" in stdout and "MB in memory" in stdout
    if float_head:
        assert "14 Linear layers quantized, 1 kept in float32" in stdout  # 2 layers x 7; the tied head stays
    else:
        assert "15 Linear layers quantized, the tied head as int8 per row" in stdout
    assert "quantizing (int4)" in stderr  # the progress bar
    assert sorted(p.name for p in out.iterdir()) == ["config.json", "model.safetensors", "tokenizer.json",
                                                     "tokenizer_config.json"]

    expected = AutoModelForCausalLM.from_pretrained(tiny_folder)
    quantize_model(expected, "int4", tied_head=not float_head, group_size=32)
    loaded = AutoModelForCausalLM.from_pretrained(out)
    assert list(loaded.state_dict()) == list(expected.state_dict())
    assert all(torch.equal(a, b) for a, b in zip(loaded.state_dict().values(), expected.state_dict().values()))

    assert main(["info", str(out), "--json"]) == 0
    formats = {"int4": 14, "float32": 1} if float_head else {"int4": 14, "int8": 1, "float32": 1}  # float: the norms
    assert json.loads(capsys.readouterr().out)["weight_formats"] == formats
    tokenizer = id_tokenizer(TINY["vocab_size"])
    answer = generate(expected, tokenizer, "5 17 3", SamplingParams(temperature=0, max_tokens=5, ignore_eos=True))
    assert main(["generate", "5 17 3", "--model", str(out), "--raw", "--temperature", "0", "--max-tokens", "5",
                 "--min-tokens", "5"]) == 0
    assert capsys.readouterr().out == answer[0].outputs[0].text


def test_an_occupied_output_needs_force(tiny_folder, tmp_path, capsys):
    (tmp_path / "out").mkdir()
    (tmp_path / "out" / "old.txt").write_text("old")
    args = ["quantize", str(tiny_folder), "--method", "int8", "--out", str(tmp_path / "out")]
    assert main(args) == 2
    assert "already exists and is not empty; choose another output folder, or pass force=True (--force)" in \
        capsys.readouterr().err
    assert main([*args, "--force"]) == 0
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out"] and not (tmp_path / "out" / "old.txt").exists()


@pytest.mark.parametrize("options,message", [
    (["--method", "int4", "--group-size", "48"], "int4 group_size must be"),
    (["--method", "int4", "--group-size", "64"], "layer model.layers.0.mlp.down_proj: int4 group_size .* got 64"),
    (["--method", "int8", "--double-quant"], "int8 quantization has no option double_quant"),
])
def test_bad_settings_are_one_line_and_write_nothing(tiny_folder, tmp_path, capsys, options, message):
    assert main(["quantize", str(tiny_folder), *options, "--out", str(tmp_path / "out")]) == 2
    error = capsys.readouterr().err.splitlines()[-1]  # after what the progress bar drew
    assert error.startswith("lmforge: error: ") and re.search(message, error)
    assert list(tmp_path.iterdir()) == []  # no output folder, no half-written leftovers


def test_quantized_or_unknown_models_are_refused(tiny_folder, tmp_path, capsys):
    assert main(["quantize", str(tiny_folder), "--method", "nf4", "--out", str(tmp_path / "nf4")]) == 0
    capsys.readouterr()
    assert main(["quantize", str(tmp_path / "nf4"), "--method", "int8", "--out", str(tmp_path / "again")]) == 2
    assert "this model is already quantized" in capsys.readouterr().err
    (tmp_path / "mamba").mkdir()
    (tmp_path / "mamba" / "config.json").write_text(json.dumps({"model_type": "mamba"}))
    assert main(["quantize", str(tmp_path / "mamba"), "--method", "int8", "--out", str(tmp_path / "again")]) == 2
    assert "architecture 'mamba' is not supported" in capsys.readouterr().err
    assert sorted(p.name for p in tmp_path.iterdir()) == ["mamba", "nf4"]
    with pytest.raises(SystemExit) as exit_info:  # argparse: the method must be one of the formats
        main(["quantize", str(tiny_folder), "--method", "int3", "--out", str(tmp_path / "again")])
    assert exit_info.value.code == 2


def test_smollm2_int8_folder_is_bit_exact_and_knows_paris(smollm2, smollm2_tokenizer, tmp_path, monkeypatch, capsys):
    model = copy.deepcopy(smollm2)  # quantized in place by the command: the in-memory reference
    monkeypatch.setattr(quantize, "load_float_model", lambda ref: (model, smollm2_tokenizer))
    assert main(["quantize", "smollm2-135m-instruct", "--method", "int8", "--out", str(tmp_path / "int8")]) == 0
    assert "211 Linear layers quantized, the tied head as int8 per row" in capsys.readouterr().out

    loaded = AutoModelForCausalLM.from_pretrained(tmp_path / "int8")
    assert loaded.state_dict().keys() == model.state_dict().keys()
    assert all(torch.equal(a, b) for a, b in zip(loaded.state_dict().values(), model.state_dict().values()))
    tokenizer = AutoTokenizer.from_pretrained(tmp_path / "int8")  # the GGUF vocabulary, saved as tokenizer.json
    prompt = tokenizer.apply_chat_template([{"role": "user", "content": "What is the capital of France?"}],
                                           tokenize=True)
    assert prompt == smollm2_tokenizer.apply_chat_template(
        [{"role": "user", "content": "What is the capital of France?"}], tokenize=True)
    with torch.no_grad():
        assert torch.equal(loaded(torch.tensor([prompt[-4:]])).logits, model(torch.tensor([prompt[-4:]])).logits)
    # the first answer token is a near tie that int8-rounded activations may tip (see test_apply's Paris test)
    monkeypatch.setattr(QuantizedLinear, "exact_activations", True)
    answer = generate(loaded, tokenizer, prompt, SamplingParams(temperature=0, max_tokens=8))[0].outputs[0].text
    assert "Paris" in answer
