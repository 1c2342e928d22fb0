"""GRPO: group advantages, the k3 KL, the clipped loss and token log-probabilities on hand-computed numbers; the
rollout layout; a zero KL at the first step with LoRA (the adapters switched off are the reference); a tiny Llama
that learns to say the token its reward favours; full fine-tuning that keeps training the weights generation
fuses; rewards that fail (skipped, counted, training goes on); bad prompt rows."""

import json
import logging
import math

import pytest
import torch

from lmforge.align import GRPOConfig, GRPOTrainer, group_advantages, k3_kl
from lmforge.align.rollout import clipped_policy_loss, collate_rollout, prompt_examples, token_logprobs
from lmforge.config import LlamaConfig
from lmforge.errors import InputError, ValidationError
from lmforge.models.llama import LlamaForCausalLM
from lmforge.peft import LoraConfig, add_lora
from lmforge.tokenizer import Tokenizer
from tests.parity import id_tokenizer

PROMPTS = [{"prompt": f"{a} {b} 3"} for a, b in [(11, 12), (13, 14), (15, 11), (12, 12)]]
FAVOURED = "7"


def sevens(prompts, completions, **columns):
    """The share of a completion's tokens that are the favoured one."""
    return [completion.split().count(FAVOURED) / max(len(completion.split()), 1) for completion in completions]


@pytest.fixture(scope="module")
def id_tokens():
    """A 50-token tokenizer without a chat template (ids written out, "1" is EOS)."""
    return Tokenizer(id_tokenizer(50).backend, {"pad": "0", "eos": "1"})


def tiny_model(seed=0):
    torch.manual_seed(seed)
    return LlamaForCausalLM(LlamaConfig(vocab_size=50, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                                        num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=256,
                                        eos_token_id=1))


def config(tmp_path, **overrides):
    fields = {"output_dir": tmp_path, "max_steps": 1, "per_device_batch_size": 4, "num_generations": 4,
              "max_new_tokens": 4, "learning_rate": 1e-2, "logging_steps": 1, "progress": False}
    return GRPOConfig(**{**fields, **overrides})


def test_group_advantages_on_hand_computed_rewards():
    std = math.sqrt(0.5)  # sample std of {1, 0}: sqrt(((0.5)² + (0.5)²) / 1)
    advantages = group_advantages(torch.tensor([1.0, 0.0, 0.5, 0.5]), group_size=2)
    torch.testing.assert_close(advantages, torch.tensor([0.5 / (std + 1e-4), -0.5 / (std + 1e-4), 0.0, 0.0]))
    # NaN (no reward) is left out of its group: {1, 0} as above, and a group with one reward gets 0
    advantages = group_advantages(torch.tensor([1.0, math.nan, 0.0, 2.0, math.nan, math.nan]), group_size=3)
    expected = torch.tensor([0.5 / (std + 1e-4), math.nan, -0.5 / (std + 1e-4), 0.0, math.nan, math.nan])
    torch.testing.assert_close(advantages, expected, equal_nan=True)
    three = group_advantages(torch.tensor([3.0, 0.0, 0.0]), group_size=3)  # mean 1, std sqrt((4 + 1 + 1) / 2)
    torch.testing.assert_close(three, torch.tensor([2.0, -1.0, -1.0]) / (math.sqrt(3) + 1e-4))


def test_k3_kl_is_zero_for_equal_policies_and_matches_hand_values():
    logps = torch.log(torch.tensor([0.5, 0.25, 0.1]))
    assert torch.equal(k3_kl(logps, logps), torch.zeros(3))
    reference = torch.log(torch.tensor([0.25, 0.5, 0.1]))
    # d = log(ref / p): log 0.5 → 0.5 + log 2 − 1; log 2 → 2 − log 2 − 1; 0 → 0
    expected = torch.tensor([0.5 + math.log(2) - 1, 2 - math.log(2) - 1, 0.0])
    torch.testing.assert_close(k3_kl(logps, reference), expected)
    assert (k3_kl(logps, reference) >= 0).all()


def test_the_clipped_loss_on_hand_computed_ratios():
    old = torch.zeros(4)
    logps = torch.log(torch.tensor([1.5, 0.5, 0.5, 1.1]))  # ratios, since log π_old = 0
    advantages = torch.tensor([1.0, 1.0, -1.0, 1.0])
    losses, clipped = clipped_policy_loss(logps, old, advantages, epsilon=0.2)
    # min(1.5, 1.2) = 1.2 clipped; min(0.5, 0.8) = 0.5; min(−0.5, −0.8) = −0.8 clipped; min(1.1, 1.1) = 1.1
    torch.testing.assert_close(losses, torch.tensor([-1.2, -0.5, 0.8, -1.1]))
    assert clipped.tolist() == [True, False, True, False]


def test_token_logprobs_are_those_of_the_tempered_distribution():
    logits = torch.randn(2, 3, 7)
    ids = torch.randint(0, 7, (2, 3))
    expected = torch.log_softmax(logits / 0.7, -1).gather(2, ids.unsqueeze(-1)).squeeze(-1)
    torch.testing.assert_close(token_logprobs(logits, ids, temperature=0.7), expected)


def test_a_rollout_batch_is_prompt_left_padded_then_completion_right_padded():
    samples = [{"prompt_ids": [5, 6, 7], "completion_ids": [8, 1], "advantage": 0.5, "ref_logps": torch.ones(2)},
               {"prompt_ids": [9], "completion_ids": [10, 11, 1], "advantage": -1.0, "ref_logps": torch.ones(3)}]
    batch = collate_rollout(samples, pad_id=0)
    assert batch["input_ids"].tolist() == [[5, 6, 7, 8, 1, 0], [0, 0, 9, 10, 11, 1]]
    assert batch["attention_mask"].tolist() == [[1, 1, 1, 1, 1, 0], [0, 0, 1, 1, 1, 1]]
    assert batch["completion_ids"].tolist() == [[8, 1, 0], [10, 11, 1]]
    assert batch["completion_mask"].tolist() == [[1, 1, 0], [1, 1, 1]]
    assert batch["ref_logps"].tolist() == [[1, 1, 0], [1, 1, 1]] and batch["advantage"].tolist() == [0.5, -1.0]


def test_with_lora_the_first_step_has_zero_kl_and_no_reference_copy(id_tokens, tmp_path):
    model = tiny_model()
    add_lora(model, LoraConfig(r=4, lora_alpha=8, target_modules="all-linear"))
    def longer(prompts, completions, **columns):  # varies from the first step on, unlike sevens
        return [float(len(text)) for text in completions]

    trainer = GRPOTrainer(model, config(tmp_path, max_steps=2), PROMPTS, id_tokens, longer)
    assert trainer.reference_model is None  # the adapters switched off are the reference
    trainer.train()
    first, second = trainer.state.history
    assert first["kl"] == 0.0  # B starts at zero: the policy is the reference, token for token
    assert second["kl"] > 0.0
    assert first["clip_fraction"] == 0.0  # one update per rollout: the ratio is 1
    assert first["skipped_samples"] == 0 and first["completion_length"] > 0 and "reward_std" in first


def test_grpo_raises_the_reward_a_tiny_model_earns(id_tokens, tmp_path):
    model = tiny_model()
    add_lora(model, LoraConfig(r=8, lora_alpha=16, target_modules="all-linear"))
    arguments = config(tmp_path, max_steps=8, num_generations=8, max_new_tokens=6, learning_rate=2e-2, seed=1)
    trainer = GRPOTrainer(model, arguments, PROMPTS, id_tokens, sevens, eval_dataset=PROMPTS)
    before = trainer.evaluate()
    trainer.train()
    after = trainer.evaluate()
    assert before["reward"] < 0.1  # a random model rarely says "7"
    assert after["reward"] > before["reward"] + 0.3
    assert after["loss"] == -after["reward"]
    assert all(math.isfinite(record["loss"]) for record in trainer.state.history)
    logged = [json.loads(line) for line in (tmp_path / "log.jsonl").read_text().splitlines()]
    assert {"reward", "reward_std", "kl", "clip_fraction", "completion_length", "skipped_samples"} <= set(logged[0])


def test_full_finetuning_keeps_a_frozen_reference_and_trains_the_weights_generation_uses(id_tokens, tmp_path):
    model = tiny_model()
    initial = {name: p.detach().clone() for name, p in model.named_parameters()}
    trainer = GRPOTrainer(model, config(tmp_path, max_steps=2, learning_rate=1e-3, num_iterations=2), PROMPTS,
                          id_tokens, sevens)
    trainer.train()
    assert all(torch.equal(p, initial[name]) for name, p in trainer.reference_model.named_parameters())
    assert any(not torch.equal(p, initial[name]) for name, p in model.named_parameters())
    # sampling fused q/k/v and gate/up into new tensors; the optimizer's parameters are the model's again
    optimized = {id(p) for group in trainer.optimizer.param_groups for p in group["params"]}
    assert optimized == {id(p) for p in model.parameters()}
    assert trainer.scheduler.last_epoch == 4  # the schedule counts updates: 2 steps × num_iterations 2


def test_a_reward_that_fails_is_skipped_and_training_goes_on(id_tokens, tmp_path, caplog):
    def fragile(prompts, completions, **columns):
        if any(FAVOURED in completion.split() for completion in completions):
            raise RuntimeError("no sevens here")
        return [1.0] * len(completions)

    model = tiny_model()
    add_lora(model, LoraConfig(r=4, target_modules="all-linear"))
    with caplog.at_level(logging.WARNING):
        trainer = GRPOTrainer(model, config(tmp_path, max_steps=3, max_new_tokens=12, seed=3), PROMPTS, id_tokens,
                              fragile)
        trainer.train()
    assert trainer.state.global_step == 3
    assert "no sevens here" in caplog.text
    assert sum(record["skipped_samples"] for record in trainer.state.history) > 0


def test_a_step_where_nothing_scores_makes_no_update(id_tokens, tmp_path, caplog):
    model = tiny_model()
    add_lora(model, LoraConfig(r=4, target_modules="all-linear"))
    initial = {name: p.detach().clone() for name, p in model.named_parameters()}

    def wrong_count(prompts, completions, **columns):
        return [1.0]

    with caplog.at_level(logging.WARNING):
        trainer = GRPOTrainer(model, config(tmp_path, max_steps=2), PROMPTS, id_tokens, wrong_count)
        trainer.train()
    assert "returned 1 values for 16 completions" in caplog.text and "makes no update" in caplog.text
    assert all(torch.equal(p, initial[name]) for name, p in model.named_parameters())
    assert [record["skipped_samples"] for record in trainer.state.history] == [16, 16]
    assert all(record["skipped_steps"] == 1 and math.isnan(record["loss"]) for record in trainer.state.history)


def test_bad_rows_and_settings_say_what_to_fix(id_tokens, tmp_path):
    with pytest.raises(InputError, match=r"row 2: no 'prompt' \(it has completion\)"):
        prompt_examples([{"prompt": "1 2"}, {"completion": "3"}], id_tokens, max_length=64)
    with pytest.raises(InputError, match="row 1: the conversation ends with an assistant turn"):
        prompt_examples([{"messages": [{"role": "user", "content": "a"}, {"role": "assistant", "content": "b"}]}],
                        id_tokens, max_length=64)
    with pytest.raises(InputError, match="row 1: chat messages need a tokenizer with a chat template"):
        prompt_examples([{"prompt": [{"role": "user", "content": "2 3"}]}], id_tokens, max_length=64)
    with pytest.raises(InputError, match="row 1: the prompt has 3 tokens, more than max_length=2"):
        prompt_examples([{"prompt": "5 6 7"}], id_tokens, max_length=2)
    examples, dropped = prompt_examples([{"prompt": "5 6 7"}, {"prompt": "8"}], id_tokens, 2, overlong="truncate")
    assert examples[0]["input_ids"] == [6, 7] and dropped == 0  # the prompt's end is kept
    with pytest.raises(ValidationError, match="num_generations must be >= 2"):
        config(tmp_path, num_generations=1)
    with pytest.raises(ValidationError, match="temperature must be > 0"):
        config(tmp_path, temperature=0.0)
    with pytest.raises(InputError, match=r"row 3: the reward .*iso_date_reward needs the column\(s\) response"):
        GRPOTrainer(tiny_model(), config(tmp_path), [{"prompt": "1", "response": "2"}] * 2 + [{"prompt": "3"}],
                    id_tokens, "lmforge.align.tasks:iso_date_reward")
