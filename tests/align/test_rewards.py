"""Reward sources for online RL: the dates reward on hand-picked answers, "module:function" loading and its errors,
columns passed as keyword lists, failures (raising, wrong count, non-numbers) reported and skipped, and reward
model folders (full and LoRA adapter) scoring as the model does."""

import logging

import pytest
import torch

from lmforge import AutoModelForSequenceClassification, AutoTokenizer
from lmforge.align import RewardFunction, RewardModel, tokenize_preferences
from lmforge.align.rewards import as_reward
from lmforge.align.tasks import date_prompts, iso_date_reward
from lmforge.config import LlamaConfig
from lmforge.errors import InputError
from lmforge.models.llama import LlamaForCausalLM, LlamaForSequenceClassification
from lmforge.peft import LoraConfig, add_lora, save_lora

LOGGER = "lmforge.align.rewards"


def test_the_dates_reward_gives_full_partial_and_no_credit():
    completions = ["1984-03-21", " 1984-03-21\n", "1984-03-22", "1985-04-21", "2001-12-30", "1984-02-30",
                   "March 21, 1984", "1984-3-21", "It is 1984-03-21."]
    rewards = iso_date_reward(["p"] * 9, completions, response=["1984-03-21"] * 9, other=[None] * 9)
    assert rewards == [1.0, 1.0, 0.7, 0.4, 0.1, 0.0, 0.0, 0.0, 0.0]  # 1984-02-30 is no date
    rows = date_prompts(3)
    assert set(rows[0]) == {"prompt", "response"} and rows[0]["prompt"].startswith("Write this date")


def test_a_reward_function_loads_from_module_and_name_and_bad_specs_say_how_to_fix():
    reward = RewardFunction.from_string("lmforge.align.tasks:iso_date_reward")
    assert reward.required_columns == ["response"]
    assert reward.score(["p", "p"], ["2001-01-01", "x"], [{"response": "2001-01-01"}] * 2) == [1.0, 0.0]
    with pytest.raises(InputError, match=r"cannot import module 'no_such_rewards'.*PYTHONPATH"):
        RewardFunction.from_string("no_such_rewards:score")
    with pytest.raises(InputError, match=r"has no 'nope'; it defines .*iso_date_reward"):
        RewardFunction.from_string("lmforge.align.tasks:nope")
    with pytest.raises(InputError, match="is not 'module:function'"):
        RewardFunction.from_string("lmforge.align.tasks")
    with pytest.raises(InputError, match=r"row 2: the reward .* needs the column\(s\) response"):
        reward.check_columns([{"prompt": "a", "response": "b"}, {"prompt": "c"}])


def test_columns_arrive_as_keyword_lists_and_a_function_without_kwargs_gets_only_its_own():
    seen = {}

    def everything(prompts, completions, **columns):
        seen.update(columns)
        return [0.0] * len(completions)

    def only_target(prompts, completions, target):
        return [float(c == t) for c, t in zip(completions, target)]

    rows = [{"prompt": "a", "target": "x", "id": 1}, {"prompt": "b", "target": "y", "id": 2}]
    RewardFunction(everything).score(["a", "b"], ["x", "x"], rows)
    assert seen == {"target": ["x", "y"], "id": [1, 2]}  # the prompt column is `prompts` itself
    assert as_reward(only_target).score(["a", "b"], ["x", "x"], rows) == [1.0, 0.0]


def test_failing_rewards_are_reported_and_only_their_samples_skipped(caplog):
    def picky(prompts, completions, **columns):
        if any(c == "boom" for c in completions):
            raise ValueError("cannot score boom")
        return [1.0 if c == "nan" else 0.5 for c in completions]

    rows = [{"prompt": "p"}] * 3
    with caplog.at_level(logging.WARNING, logger=LOGGER):
        assert RewardFunction(picky).score(["p"] * 3, ["ok", "boom", "fine"], rows) == [0.5, None, 0.5]
    assert "failed on 1 of 3 completions" in caplog.text and "cannot score boom" in caplog.text
    assert "'boom'" in caplog.text  # the completion it failed on

    caplog.clear()
    with caplog.at_level(logging.WARNING, logger=LOGGER):
        assert RewardFunction(lambda p, c, **k: [1.0]).score(["p"] * 3, ["a", "b", "c"], rows) == [None] * 3
    assert "returned 1 values for 3 completions" in caplog.text

    caplog.clear()
    with caplog.at_level(logging.WARNING, logger=LOGGER):
        values = RewardFunction(lambda p, c, **k: [1, None, "high", float("nan")]).score(
            ["p"] * 4, list("abcd"), [{"prompt": "p"}] * 4)
    assert values == [1.0, None, None, None]  # None on purpose is no failure; a string and NaN are
    assert "failed on 2 of 4 completions" in caplog.text and "'high', not a finite number" in caplog.text


@pytest.fixture(scope="module")
def chat_tokenizer():
    return AutoTokenizer.from_pretrained("smollm2-135m-instruct")


def tiny_config(tokenizer, **fields):
    return LlamaConfig(vocab_size=len(tokenizer.backend.get_vocab()), hidden_size=32, intermediate_size=64,
                       num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
                       max_position_embeddings=256, **fields)


def test_a_reward_model_scores_the_chat_rendered_answer_at_its_last_token(chat_tokenizer, tmp_path):
    torch.manual_seed(0)
    scorer = LlamaForSequenceClassification(tiny_config(chat_tokenizer, num_labels=1)).eval()
    prompts = ["What is 2 + 2?", [{"role": "user", "content": "Say hi."}]]
    completions = ["4", "Hello there, friend!"]
    scores = RewardModel(scorer, chat_tokenizer, batch_size=2).score(prompts, completions, [{}, {}])
    alone = RewardModel(scorer, chat_tokenizer, batch_size=1).score(prompts, completions, [{}, {}])
    assert scores == pytest.approx(alone, abs=1e-5)  # padding in a batch changes nothing
    (pair,), _ = tokenize_preferences([{"prompt": "What is 2 + 2?", "chosen": "4", "rejected": "5"}], chat_tokenizer)
    ids = torch.tensor([pair["chosen_input_ids"]])  # the answer as RewardTrainer trained on it
    with torch.no_grad():
        assert scores[0] == pytest.approx(scorer(input_ids=ids).logits[0, 0].item(), abs=1e-5)

    scorer.save_pretrained(tmp_path / "full")
    chat_tokenizer.save_pretrained(tmp_path / "full")
    assert RewardModel.from_pretrained(tmp_path / "full").score(prompts, completions) == pytest.approx(scores,
                                                                                                       abs=1e-5)


def test_a_lora_reward_model_folder_loads_onto_its_base_and_a_language_model_is_refused(chat_tokenizer, tmp_path):
    torch.manual_seed(0)
    LlamaForCausalLM(tiny_config(chat_tokenizer)).save_pretrained(tmp_path / "base")
    chat_tokenizer.save_pretrained(tmp_path / "base")
    scorer = AutoModelForSequenceClassification.from_pretrained(tmp_path / "base", num_labels=1)
    add_lora(scorer, LoraConfig(r=4, target_modules="all-linear", modules_to_save=["score"]))
    with torch.no_grad():
        for name, parameter in scorer.named_parameters():
            if "lora_B" in name:
                parameter.normal_(std=0.1)  # a "trained" adapter
    save_lora(scorer, tmp_path / "adapter", base_model_name_or_path=str(tmp_path / "base"))
    chat_tokenizer.save_pretrained(tmp_path / "adapter")
    expected = RewardModel(scorer.eval(), chat_tokenizer).score(["Add 1 and 2."], ["3"])
    loaded = RewardModel.from_pretrained(tmp_path / "adapter")
    assert loaded.score(["Add 1 and 2."], ["3"]) == pytest.approx(expected, abs=1e-4)
    with pytest.raises(InputError, match=r"not a reward model .*lmforge reward-model"):
        RewardModel.from_pretrained(tmp_path / "base")
    with pytest.raises(InputError, match="no such folder"):
        RewardModel.from_pretrained(tmp_path / "missing")
