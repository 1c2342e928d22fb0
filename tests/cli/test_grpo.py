"""`lmforge grpo`: LoRA GRPO end to end on a tiny Llama with SmolLM2's tokenizer (the dates prompts and reward when
no data is given), full GRPO on a prompt file with a reward function from a module in the current folder, and
one-line errors for a row without a prompt and a reward that does not import."""

import json

from lmforge.cli import main

REWARD_MODULE = '''
def brevity(prompts, completions, topic, **columns):
    assert all(isinstance(t, str) for t in topic)
    return [1.0 / (1 + len(text.split())) for text in completions]
'''


def test_lora_grpo_on_the_dates_prompts(tiny_chat_model, tmp_path, capsys):
    out = tmp_path / "grpo"
    assert main(["grpo", str(tiny_chat_model), "--method", "lora", "--max-steps", "2", "--validation", "4",
                 "--batch-size", "2", "--num-generations", "2", "--max-new-tokens", "4", "--out", str(out)]) == 0
    assert "held-out    mean reward" in capsys.readouterr().out
    record = json.loads((out / "grpo.json").read_text())
    assert record["data"].startswith("the dates task prompts")
    assert (record["train_examples"], record["held_out_examples"], record["steps"]) == (196, 4, 2)
    assert record["reward"] == "lmforge.align.tasks:iso_date_reward" and record["num_generations"] == 2
    assert set(record["held_out_before"]) == {"loss", "reward", "completion_length", "skipped_samples"}
    assert (out / "adapter_model.safetensors").is_file() and (out / "adapter_config.json").is_file()


def test_full_grpo_with_a_reward_function_from_the_current_folder(tiny_chat_model, tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    (tmp_path / "cli_grpo_rewards.py").write_text(REWARD_MODULE)
    rows = [{"prompt": "Name a colour.", "topic": "colours"},
            {"messages": [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Name a fruit."}],
             "topic": "fruit"},
            {"prompt": "Name an animal.", "topic": "animals"}, {"prompt": "Name a city.", "topic": "cities"}]
    (tmp_path / "prompts.jsonl").write_text("".join(json.dumps(row) + "\n" for row in rows))
    assert main(["grpo", str(tiny_chat_model), "--data", "prompts.jsonl", "--reward", "cli_grpo_rewards:brevity",
                 "--method", "full", "--max-steps", "1", "--validation", "1", "--batch-size", "3",
                 "--num-generations", "2", "--max-new-tokens", "3", "--beta", "0", "--out", "tuned"]) == 0
    record = json.loads((tmp_path / "tuned" / "grpo.json").read_text())
    assert (record["reward"], record["beta"], record["train_examples"]) == ("cli_grpo_rewards:brevity", 0.0, 3)
    assert record["held_out_after"]["skipped_samples"] == 0  # the reward got its topic column every time
    assert (tmp_path / "tuned" / "model.safetensors").is_file()


def test_a_row_without_a_prompt_and_a_reward_that_does_not_import(tiny_chat_model, tmp_path, capsys):
    broken = tmp_path / "broken.jsonl"
    broken.write_text(json.dumps({"prompt": "a", "response": "b"}) + "\n" + json.dumps({"question": "c"}) + "\n"
                      + json.dumps({"prompt": "d", "response": "e"}) + "\n")
    assert main(["grpo", str(tiny_chat_model), "--data", str(broken), "--method", "lora", "--validation", "1",
                 "--seed", "1", "--out", str(tmp_path / "x")]) == 2
    assert "row 2: no 'prompt' (it has question)" in capsys.readouterr().err
    broken.write_text(json.dumps({"prompt": "a", "response": "b"}) + "\n" + json.dumps({"prompt": "c"}) + "\n")
    assert main(["grpo", str(tiny_chat_model), "--data", str(broken), "--method", "lora", "--validation", "1",
                 "--out", str(tmp_path / "x")]) == 2
    assert "row 2: the reward lmforge.align.tasks:iso_date_reward needs the column(s) response" in \
        capsys.readouterr().err
    assert main(["grpo", str(tiny_chat_model), "--reward", "no_such_rewards:score", "--method", "lora",
                 "--out", str(tmp_path / "y")]) == 2
    error = capsys.readouterr().err
    assert "cannot import module 'no_such_rewards'" in error and "PYTHONPATH" in error
    assert not (tmp_path / "y").exists()


def test_rl_commands_default_to_no_lora_dropout_while_sft_keeps_it():
    """RL compares sampling-time probabilities (dropout off) with the training forward's: no dropout there."""
    from lmforge.cli import build_parser

    parser = build_parser()
    needs = {"ppo": ["--reward-model", "rm"]}
    dropout = {command: parser.parse_args([command, "--method", "lora", "--out", "x", *needs.get(command, [])])
               .lora_dropout for command in ("grpo", "ppo", "sft", "dpo")}
    assert dropout == {"grpo": 0.0, "ppo": 0.0, "sft": 0.05, "dpo": 0.05}
