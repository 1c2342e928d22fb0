"""`lmforge dpo`: LoRA DPO end to end on a tiny Llama with SmolLM2's tokenizer (the generated format
preference when no data is given, a user file otherwise), and one-line errors for bad rows."""

import json

from lmforge.cli import main


def test_lora_dpo_on_a_preference_file(tiny_chat_model, tmp_path, capsys):
    rows = tmp_path / "prefs.jsonl"
    pairs = [{"prompt": f"Add {a} and {b}.", "chosen": str(a + b), "rejected": f"Hmm, maybe {a + b + 1}?"}
             for a, b in [(1, 2), (3, 4), (5, 6), (7, 8), (2, 9), (4, 4)]]
    rows.write_text("".join(json.dumps(pair) + "\n" for pair in pairs))
    out = tmp_path / "dpo"
    assert main(["dpo", str(tiny_chat_model), "--data", str(rows), "--method", "lora", "--max-steps", "8",
                 "--lr", "2e-2", "--beta", "0.5", "--validation", "2", "--batch-size", "4", "--out", str(out)]) == 0
    printed = capsys.readouterr().out
    assert "preference accuracy" in printed
    record = json.loads((out / "dpo.json").read_text())
    assert (record["train_examples"], record["held_out_examples"], record["steps"]) == (4, 2, 8)
    assert record["held_out_before"]["reward_margin"] == 0.0  # LoRA starts as the reference
    assert (out / "adapter_model.safetensors").is_file()


def test_default_data_and_bad_rows(tiny_chat_model, tmp_path, capsys):
    out = tmp_path / "dates"
    assert main(["dpo", str(tiny_chat_model), "--method", "lora", "--max-steps", "1", "--validation", "4",
                 "--out", str(out)]) == 0
    record = json.loads((out / "dpo.json").read_text())
    assert record["data"].startswith("the dates format preference") and record["train_examples"] == 196
    broken = tmp_path / "broken.json"
    broken.write_text(json.dumps([{"prompt": "a", "chosen": "b", "rejected": "c"}, {"prompt": "d", "chosen": "e"},
                                  {"prompt": "f", "chosen": "g", "rejected": "h"}]))
    assert main(["dpo", str(tiny_chat_model), "--data", str(broken), "--method", "lora", "--validation", "1",
                 "--out", str(tmp_path / "x")]) == 2
    assert "'rejected' is missing" in capsys.readouterr().err
