"""`lmforge sft`: full, LoRA, QLoRA, prompt and prefix tuning end to end on a tiny Llama with SmolLM2's real tokenizer and chat
template; the adapter folder applies through `lmforge generate --adapter`; one-line errors for bad input."""

import json

import pytest
import torch

from lmforge import AutoModelForCausalLM
from lmforge.cli import main


@pytest.fixture
def rows(tmp_path):
    path = tmp_path / "rows.jsonl"
    words = ["cat", "dog", "sun", "map", "cup", "pen", "box", "hat", "car", "bus"]
    path.write_text("".join(json.dumps({"instruction": f"Spell {w}", "response": "-".join(w)}) + "\n" for w in words))
    return path


def run_sft(capsys, *argv):
    assert main(["sft", *map(str, argv)]) == 0
    return capsys.readouterr()


def test_lora_writes_a_peft_adapter_that_generate_applies(tiny_chat_model, rows, tmp_path, capsys):
    out = tmp_path / "adapter"
    printed = run_sft(capsys, tiny_chat_model, "--data", rows, "--method", "lora", "--max-steps", 6, "--lr", "1e-2",
                      "--validation", 2, "--batch-size", 4, "--out", out)
    assert "held-out    answer loss" in printed.out and "trainable" in printed.out
    assert sorted(p.name for p in out.iterdir()) == ["adapter_config.json", "adapter_model.safetensors", "sft.json",
                                                    "tokenizer.json", "tokenizer_config.json"]
    record = json.loads((out / "sft.json").read_text())
    assert (record["method"], record["steps"], record["train_examples"], record["held_out_examples"]) == \
        ("lora", 6, 8, 2)
    assert record["held_out_loss_after"] < record["held_out_loss_before"]
    assert json.loads((out / "adapter_config.json").read_text())["target_modules"] == [
        "down_proj", "gate_proj", "k_proj", "o_proj", "q_proj", "up_proj", "v_proj"]
    prompt = "Spell cat"
    assert main(["generate", "--model", str(tiny_chat_model), prompt, "--temperature", "0", "--max-tokens", "4"]) == 0
    base = capsys.readouterr().out
    assert main(["generate", "--model", str(tiny_chat_model), prompt, "--adapter", str(out), "--temperature", "0",
                 "--max-tokens", "4"]) == 0
    adapted = capsys.readouterr()
    assert "adapter" in adapted.err and adapted.out != base


def test_full_and_merged_qlora_write_loadable_models(tiny_chat_model, rows, tmp_path, capsys):
    run_sft(capsys, tiny_chat_model, "--data", rows, "--method", "full", "--max-steps", 2, "--validation", 2,
            "--out", tmp_path / "full")
    full = AutoModelForCausalLM.from_pretrained(tmp_path / "full")
    original = AutoModelForCausalLM.from_pretrained(tiny_chat_model)
    changed = [name for name, p in full.state_dict().items() if not torch.equal(p, original.state_dict()[name])]
    assert len(changed) > 10
    run_sft(capsys, tiny_chat_model, "--data", rows, "--method", "qlora", "--max-steps", 2, "--validation", 2,
            "--merge", "--packing", "--out", tmp_path / "qlora")
    config = json.loads((tmp_path / "qlora" / "config.json").read_text())
    assert config["quantization"]["method"] == "nf4"


@pytest.mark.parametrize("method,extra", [("prompt", ["--init-text", "Spell the word"]),
                                          ("prefix", ["--prefix-projection"])])
def test_virtual_tokens_write_a_peft_folder_that_generate_applies(tiny_chat_model, rows, tmp_path, capsys, method,
                                                                   extra):
    out = tmp_path / method
    run_sft(capsys, tiny_chat_model, "--data", rows, "--method", method, "--num-virtual-tokens", 4, *extra,
            "--max-steps", 6, "--lr", "5e-2", "--validation", 2, "--batch-size", 4, "--out", out)
    record = json.loads((out / "sft.json").read_text())
    assert record["held_out_loss_after"] < record["held_out_loss_before"]
    description = json.loads((out / "adapter_config.json").read_text())
    assert (description["peft_type"], description["num_virtual_tokens"]) == (f"{method.upper()}_TUNING", 4)
    config = AutoModelForCausalLM.from_pretrained(tiny_chat_model).config
    if method == "prompt":
        assert record["trainable_parameters"] == 4 * config.hidden_size
    else:  # the MLP: 4 embeddings -> hidden -> every layer's keys and values
        outputs = config.num_hidden_layers * 2 * config.num_key_value_heads * config.head_dim
        width = config.hidden_size
        assert record["trainable_parameters"] == 4 * width + (width + 1) * width + (width + 1) * outputs
    command = ["generate", "--model", str(tiny_chat_model), "Spell cat", "--temperature", "0", "--max-tokens", "4"]
    assert main(command) == 0
    base = capsys.readouterr().out
    assert main([*command, "--adapter", str(out)]) == 0
    assert capsys.readouterr().out != base


def test_bad_input_is_one_line(tiny_chat_model, rows, tmp_path, capsys):
    assert main(["sft", str(tiny_chat_model), "--data", str(rows), "--method", "full", "--merge",
                 "--out", str(tmp_path / "x")]) == 2
    assert "--merge folds LoRA updates" in capsys.readouterr().err
    assert main(["sft", str(tiny_chat_model), "--data", str(rows), "--method", "prompt", "--merge",
                 "--out", str(tmp_path / "x")]) == 2
    assert "no weights to fold into" in capsys.readouterr().err
    assert main(["sft", str(tiny_chat_model), "--data", str(rows), "--method", "prompt", "--packing",
                 "--out", str(tmp_path / "x")]) == 2
    assert "leave --packing out" in capsys.readouterr().err
    assert main(["sft", str(tiny_chat_model), "--data", str(rows), "--method", "prefix", "--num-virtual-tokens", "0",
                 "--out", str(tmp_path / "x")]) == 2
    assert "num_virtual_tokens must be an integer >= 1" in capsys.readouterr().err
    broken = tmp_path / "broken.jsonl"
    broken.write_text(json.dumps({"instruction": "a", "response": "b"}) + "\n" + json.dumps({"instruction": "c"}) + "\n"
                      + json.dumps({"instruction": "d", "response": "e"}) + "\n")
    assert main(["sft", str(tiny_chat_model), "--data", str(broken), "--method", "lora", "--validation", "1",
                 "--out", str(tmp_path / "y")]) == 2
    assert "'response' is missing" in capsys.readouterr().err
    assert main(["sft", str(tiny_chat_model), "--data", str(rows), "--method", "lora", "--target-modules", "query",
                 "--out", str(tmp_path / "z")]) == 2
    assert "match no linear layer" in capsys.readouterr().err
    assert not (tmp_path / "z").exists()


def test_options_from_a_config_file_with_the_command_line_on_top(tiny_chat_model, rows, tmp_path, capsys):
    out = tmp_path / "from-config"
    config = tmp_path / "run.yaml"
    config.write_text(f"model: {tiny_chat_model}\ndata: {rows}\nmethod: lora\nlora-r: 2\nmax_steps: 2\n"
                      f"validation: 2\npacking: true\nout: {out}\n")
    run_sft(capsys, "--config", config, "--max-steps", 3)
    record = json.loads((out / "sft.json").read_text())
    assert (record["method"], record["steps"]) == ("lora", 3)  # the command line wins over the file
    assert json.loads((out / "adapter_config.json").read_text())["r"] == 2
    for text, message in [("lora_rank: 4\n", "unknown option 'lora_rank'; did you mean 'lora-r'?"),
                          ("lora-r: many\n", "lora-r: 'many' is not a valid int"),
                          ("packing: 3\n", "packing is a switch; give true or false"),
                          ("method: lasso\n", "'lasso' is not one of full, lora"),
                          ("- method\n", "expected a mapping of option names")]:
        config.write_text(text)
        assert main(["sft", "--config", str(config), "--method", "lora", "--out", str(tmp_path / "x")]) == 2
        assert message in capsys.readouterr().err
    assert main(["sft", "--config", str(tmp_path / "missing.yaml")]) == 2
    assert "no such file" in capsys.readouterr().err
