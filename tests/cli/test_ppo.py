"""`lmforge ppo`: RLHF end to end on a tiny Llama with SmolLM2's tokenizer against a reward model that `lmforge
reward-model` trained (LoRA policy; full policy saved without its value head), the same reward model driving
`lmforge grpo`, and one-line errors for a folder that is no reward model."""

import json

import pytest
from safetensors.torch import load_file

from lmforge.cli import main


@pytest.fixture(scope="module")
def reward_folder(tiny_chat_model, tmp_path_factory):
    out = tmp_path_factory.mktemp("ppo-cli") / "reward"
    assert main(["reward-model", str(tiny_chat_model), "--method", "full", "--max-steps", "1", "--validation", "2",
                 "--batch-size", "2", "--out", str(out)]) == 0
    return out


def test_lora_ppo_against_a_trained_reward_model(tiny_chat_model, reward_folder, tmp_path, capsys):
    out = tmp_path / "ppo"
    assert main(["ppo", str(tiny_chat_model), "--reward-model", str(reward_folder), "--method", "lora",
                 "--max-steps", "2", "--validation", "3", "--batch-size", "2", "--max-new-tokens", "4",
                 "--ppo-epochs", "2", "--out", str(out)]) == 0
    assert "held-out    mean reward-model score" in capsys.readouterr().out
    record = json.loads((out / "ppo.json").read_text())
    assert record["data"].startswith("the dates task prompts") and record["reward_model"] == str(reward_folder)
    assert (record["train_examples"], record["held_out_examples"], record["steps"], record["ppo_epochs"]) == \
        (197, 3, 2, 2)
    assert isinstance(record["held_out_before"]["reward"], float)
    assert (out / "adapter_model.safetensors").is_file()
    assert not any("value_head" in key for key in load_file(out / "adapter_model.safetensors"))


def test_full_ppo_saves_the_policy_without_its_value_head(tiny_chat_model, reward_folder, tmp_path):
    out = tmp_path / "full"
    assert main(["ppo", str(tiny_chat_model), "--reward-model", str(reward_folder), "--method", "full",
                 "--max-steps", "1", "--validation", "2", "--batch-size", "2", "--max-new-tokens", "3",
                 "--ppo-epochs", "1", "--out", str(out)]) == 0
    weights = load_file(out / "model.safetensors")
    assert "lm_head.weight" in weights and not any("value_head" in key for key in weights)


def test_grpo_takes_the_reward_model_too(tiny_chat_model, reward_folder, tmp_path):
    out = tmp_path / "grpo"
    assert main(["grpo", str(tiny_chat_model), "--reward-model", str(reward_folder), "--method", "lora",
                 "--max-steps", "1", "--validation", "2", "--batch-size", "2", "--num-generations", "2",
                 "--max-new-tokens", "3", "--out", str(out)]) == 0
    assert json.loads((out / "grpo.json").read_text())["reward"] == str(reward_folder)


def test_a_folder_that_is_no_reward_model(tiny_chat_model, tmp_path, capsys):
    assert main(["ppo", str(tiny_chat_model), "--reward-model", str(tiny_chat_model), "--method", "lora",
                 "--out", str(tmp_path / "x")]) == 2
    assert "not a reward model" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        main(["ppo", "--method", "lora", "--out", str(tmp_path / "y")])  # --reward-model is required
    assert "--reward-model" in capsys.readouterr().err
