"""`lmforge reward-model`: LoRA reward modelling end to end on a tiny Llama with SmolLM2's tokenizer (the
adapter folder holds the trained score head and reloads to the same rewards), and a one-line error for a bad row."""

import json

import torch

from lmforge import AutoModelForSequenceClassification, AutoTokenizer
from lmforge.align import PreferenceCollator, tokenize_preferences
from lmforge.cli import main
from lmforge.peft import load_lora

PAIRS = [{"prompt": f"Add {a} and {b}.", "chosen": str(a + b), "rejected": f"Hmm, maybe {a + b + 1}?"}
         for a, b in [(1, 2), (3, 4), (5, 6), (7, 8), (2, 9), (4, 4), (6, 1), (3, 3)]]


def test_lora_reward_model_on_a_preference_file(tiny_chat_model, tmp_path, capsys):
    rows = tmp_path / "prefs.jsonl"
    rows.write_text("".join(json.dumps(pair) + "\n" for pair in PAIRS))
    out = tmp_path / "reward"
    assert main(["reward-model", str(tiny_chat_model), "--data", str(rows), "--method", "lora", "--max-steps", "6",
                 "--lr", "1e-2", "--validation", "2", "--batch-size", "6", "--out", str(out)]) == 0
    assert "pairwise accuracy" in capsys.readouterr().out
    record = json.loads((out / "reward.json").read_text())
    assert (record["train_examples"], record["held_out_examples"], record["steps"]) == (6, 2, 6)
    assert record["held_out_after"]["pairwise_accuracy"] == 1.0
    assert json.loads((out / "adapter_config.json").read_text())["modules_to_save"] == ["score"]

    model = AutoModelForSequenceClassification.from_pretrained(tiny_chat_model, num_labels=1)
    load_lora(model, out)
    tokenizer = AutoTokenizer.from_pretrained(tiny_chat_model)
    batch = PreferenceCollator(tokenizer.pad_token_id)(tokenize_preferences(PAIRS, tokenizer)[0])
    with torch.no_grad():
        rewards = model.eval()(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits[:, 0]
    assert (rewards[:len(PAIRS)] > rewards[len(PAIRS):]).float().mean() >= 0.75


def test_a_bad_row_is_reported_by_number(tiny_chat_model, tmp_path, capsys):
    broken = tmp_path / "broken.json"
    broken.write_text(json.dumps([{"prompt": "a", "chosen": "b", "rejected": "c"}, {"prompt": "d", "rejected": "e"},
                                  {"prompt": "f", "chosen": "g", "rejected": "h"}]))
    assert main(["reward-model", str(tiny_chat_model), "--data", str(broken), "--method", "full",
                 "--validation", "1", "--out", str(tmp_path / "x")]) == 2
    assert "'chosen' is missing" in capsys.readouterr().err


def test_qlora_reward_model_keeps_its_new_head_in_float(tiny_chat_model, tmp_path, capsys):
    rows = tmp_path / "prefs.jsonl"
    rows.write_text("".join(json.dumps(pair) + "\n" for pair in PAIRS))
    out = tmp_path / "reward"
    assert main(["reward-model", str(tiny_chat_model), "--data", str(rows), "--method", "qlora", "--max-steps", "6",
                 "--lr", "1e-2", "--validation", "2", "--batch-size", "6", "--out", str(out)]) == 0
    printed = capsys.readouterr().out
    record = json.loads((out / "reward.json").read_text())
    assert record["held_out_after"]["pairwise_accuracy"] >= record["held_out_before"]["pairwise_accuracy"]
    from safetensors.torch import load_file

    head = load_file(out / "adapter_model.safetensors")["base_model.model.score.weight"]
    assert head.dtype == torch.float32 and head.shape[0] == 1
    assert "trainable" in printed
