"""PPO: GAE and the per-token rewards on hand-computed examples; a tiny Llama policy trained against a tiny reward
model — zero KL at the first step with LoRA, a value loss that falls, the value head carried by checkpoints and
taken off the policy after training, a schedule that counts every PPO update; a full fine-tuning run with a
frozen reference."""

import math

import pytest
import torch
from safetensors.torch import load_file

from lmforge.align import PPOConfig, PPOTrainer, RewardModel, gae
from lmforge.align.ppo import token_rewards, whiten
from lmforge.config import LlamaConfig
from lmforge.errors import ValidationError
from lmforge.models.llama import LlamaForCausalLM, LlamaForSequenceClassification
from lmforge.peft import LoraConfig, add_lora
from lmforge.tokenizer import Tokenizer
from tests.parity import id_tokenizer

PROMPTS = [{"prompt": f"{a} {b} 3"} for a, b in [(11, 12), (13, 14), (15, 11), (12, 12), (16, 13), (14, 14)]]


@pytest.fixture(scope="module")
def id_tokens():
    """A 50-token tokenizer without a chat template (ids written out, "1" is EOS)."""
    return Tokenizer(id_tokenizer(50).backend, {"pad": "0", "eos": "1"})


def llama_config(**fields):
    return LlamaConfig(vocab_size=50, hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
                       num_key_value_heads=2, max_position_embeddings=256, eos_token_id=1, **fields)


def tiny_policy(seed=0):
    torch.manual_seed(seed)
    return LlamaForCausalLM(llama_config())


@pytest.fixture(scope="module")
def reward_model(id_tokens):
    """A random tiny scorer with its head scaled up, so that scores spread over a few units."""
    torch.manual_seed(1)
    scorer = LlamaForSequenceClassification(llama_config(num_labels=1))
    with torch.no_grad():
        scorer.score.weight.mul_(30)
    return RewardModel(scorer, id_tokens)


def config(tmp_path, **overrides):
    fields = {"output_dir": tmp_path, "max_steps": 1, "per_device_batch_size": 3, "max_new_tokens": 5,
              "learning_rate": 1e-2, "logging_steps": 1, "progress": False}
    return PPOConfig(**{**fields, **overrides})


def test_gae_on_a_hand_computed_example():
    rewards = torch.tensor([[0.0, 0.0, 1.0], [0.0, 2.0, 5.0]])
    values = torch.tensor([[0.5, 0.6, 0.7], [1.0, 1.0, 9.0]])
    mask = torch.tensor([[1.0, 1.0, 1.0], [1.0, 1.0, 0.0]])  # the second completion has two tokens
    advantages, returns = gae(rewards, values, mask, gamma=1.0, lam=0.9)
    # row 1: δ = (0 + 0.6 − 0.5, 0 + 0.7 − 0.6, 1 + 0 − 0.7) = (0.1, 0.1, 0.3); A_2 = 0.3, A_1 = 0.1 + 0.9 · 0.3,
    # A_0 = 0.1 + 0.9 · 0.37. Row 2 ends after two tokens (its padding counts for nothing): δ = (0, 1), A = (0.9, 1).
    torch.testing.assert_close(advantages, torch.tensor([[0.433, 0.37, 0.3], [0.9, 1.0, 0.0]]))
    torch.testing.assert_close(returns, torch.tensor([[0.933, 0.97, 1.0], [1.9, 2.0, 0.0]]))
    discounted, _ = gae(rewards[:1], torch.zeros(1, 3), mask[:1], gamma=0.5, lam=1.0)
    torch.testing.assert_close(discounted, torch.tensor([[0.25, 0.5, 1.0]]))  # λ = 1: discounted returns − V


def test_token_rewards_put_the_kl_penalty_on_every_token_and_the_score_on_the_last():
    kl = torch.tensor([[0.1, 0.2, 0.3], [0.5, 0.5, 9.0]])
    mask = torch.tensor([[1.0, 1.0, 1.0], [1.0, 1.0, 0.0]])
    rewards = token_rewards(torch.tensor([1.0, 2.0]), kl, mask, beta=0.1)
    torch.testing.assert_close(rewards, torch.tensor([[-0.01, -0.02, 0.97], [-0.05, 1.95, 0.0]]))
    whitened = whiten(torch.tensor([1.0, 2.0, 3.0, 6.0]))
    assert whitened.mean().abs() < 1e-6 and whitened.var(unbiased=False) == pytest.approx(1.0, abs=1e-5)


def test_lora_ppo_against_a_reward_model(id_tokens, reward_model, tmp_path):
    model = tiny_policy()
    add_lora(model, LoraConfig(r=8, lora_alpha=16, target_modules="all-linear"))
    arguments = config(tmp_path, max_steps=10, ppo_epochs=2, num_mini_batches=2, save_steps=5)
    trainer = PPOTrainer(model, arguments, PROMPTS, id_tokens, reward_model, eval_dataset=PROMPTS[:2])
    assert trainer.reference_model is None and not hasattr(model, "value_head")
    before = trainer.evaluate()
    trainer.train()
    history = trainer.state.history
    assert history[0]["kl"] == 0.0  # LoRA starts at zero: the policy is the reference
    for name in ("reward", "policy_loss", "value_loss", "clip_fraction", "explained_variance", "completion_length"):
        assert all(math.isfinite(record[name]) for record in history), name
    # the value head starts at 0 and learns the returns the scores give
    first, last = history[0]["value_loss"], sum(record["value_loss"] for record in history[-3:]) / 3
    assert last < 0.5 * first
    assert not hasattr(model, "value_head")  # the policy is given back as it came
    assert trainer.scheduler.last_epoch == 10 * 2 * 2  # steps × ppo_epochs × num_mini_batches updates
    saved = load_file(tmp_path / "checkpoint-000005" / "model.safetensors")
    assert "value_head.weight" in saved and saved["value_head.weight"].abs().sum() > 0
    after = trainer.evaluate()
    assert math.isfinite(before["reward"]) and math.isfinite(after["reward"])


def test_full_ppo_keeps_a_frozen_reference_without_a_value_head(id_tokens, reward_model, tmp_path):
    model = tiny_policy()
    initial = {name: p.detach().clone() for name, p in model.named_parameters()}
    trainer = PPOTrainer(model, config(tmp_path, max_steps=2, learning_rate=1e-3, ppo_epochs=1), PROMPTS,
                         id_tokens, reward_model)
    trainer.train()
    assert not hasattr(trainer.reference_model, "value_head")
    assert all(torch.equal(p, initial[name]) for name, p in trainer.reference_model.named_parameters())
    assert any(not torch.equal(p, initial[name]) for name, p in model.named_parameters())
    assert trainer.state.history[0]["kl"] == 0.0  # the copy is the policy before its first update


def test_bad_settings_say_what_to_fix(tmp_path):
    with pytest.raises(ValidationError, match="ppo_epochs and num_mini_batches must be >= 1"):
        config(tmp_path, ppo_epochs=0)
    with pytest.raises(ValidationError, match="gamma, lam in"):
        config(tmp_path, lam=1.5)
