"""Reward modelling: the Bradley–Terry loss on hand-computed rewards, rewards that padding does not change,
and a tiny Llama scorer that learns to rank the chosen answer first (full training, and LoRA + its head)."""

import math

import pytest
import torch

from lmforge.align import RewardConfig, RewardTrainer, bradley_terry_loss
from lmforge.config import LlamaConfig
from lmforge.errors import ValidationError
from lmforge.models.llama import LlamaForCausalLM, LlamaForSequenceClassification
from lmforge.peft import LoraConfig, add_lora
from lmforge.tokenizer import Tokenizer
from tests.parity import id_tokenizer

# A one-token answer over a long repetitive one, written in the ids of a 50-token tokenizer.
PAIRS = [{"prompt": f"{a} {b} 3", "chosen": f"{a + b}", "rejected": f"{a} {a} {a} {b} {b} {b}"}
         for a, b in [(11, 12), (13, 14), (15, 11), (12, 12), (16, 13), (14, 14), (10, 17), (17, 10)]]
HELD_OUT = [{"prompt": f"{a} {b} 3", "chosen": f"{a + b}", "rejected": f"{a} {a} {a} {b} {b} {b}"}
            for a, b in [(10, 10), (15, 15)]]


@pytest.fixture(scope="module")
def id_tokens():
    """A 50-token tokenizer without a chat template (ids written out, "1" is EOS): fast training tests."""
    return Tokenizer(id_tokenizer(50).backend, {"pad": "0", "eos": "1"})


def config(tokenizer, **overrides):
    return LlamaConfig(vocab_size=len(tokenizer.backend.get_vocab()), hidden_size=32, intermediate_size=64,
                       num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
                       max_position_embeddings=256, **overrides)


def tiny_scorer(tokenizer, seed=0):
    torch.manual_seed(seed)
    return LlamaForSequenceClassification(config(tokenizer, num_labels=1))


def test_the_loss_on_hand_computed_rewards():
    chosen, rejected = torch.tensor([2.0, 0.5, 1.0]), torch.tensor([1.0, 1.5, 1.0])
    # differences 1, −1, 0 → −log σ(1), −log σ(−1), log 2
    expected = torch.tensor([math.log(1 + math.exp(-1)), math.log(1 + math.exp(1)), math.log(2)])
    torch.testing.assert_close(bradley_terry_loss(chosen, rejected), expected)
    torch.testing.assert_close(bradley_terry_loss(chosen + 7, rejected + 7), expected)  # only differences count


def test_padding_does_not_change_a_reward(id_tokens, tmp_path):
    model = tiny_scorer(id_tokens).eval()
    trainer = RewardTrainer(model, RewardConfig(output_dir=tmp_path, max_steps=1, progress=False), PAIRS, id_tokens)
    batch = trainer.collator(trainer.train_dataset)  # right-padded to the longest (rejected) answer
    assert (batch["attention_mask"] == 0).any()
    with torch.no_grad():
        together = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
        for row, mask in enumerate(batch["attention_mask"]):
            alone = batch["input_ids"][row, :int(mask.sum())].unsqueeze(0)
            torch.testing.assert_close(model(input_ids=alone).logits[0], together[row], atol=1e-5, rtol=1e-5)


def test_a_scorer_with_several_labels_is_refused(id_tokens, tmp_path):
    with pytest.raises(ValidationError, match="num_labels=1"):
        RewardTrainer(LlamaForCausalLM(config(id_tokens)), RewardConfig(output_dir=tmp_path, max_steps=1), PAIRS,
                      id_tokens)


def test_full_training_learns_to_rank_the_chosen_answer_first(id_tokens, tmp_path):
    model = tiny_scorer(id_tokens)
    arguments = RewardConfig(output_dir=tmp_path, max_steps=20, per_device_batch_size=8, learning_rate=3e-3,
                             logging_steps=1, progress=False)
    trainer = RewardTrainer(model, arguments, PAIRS, id_tokens, eval_dataset=HELD_OUT)
    before = trainer.evaluate(trainer.train_dataset)
    trainer.train()
    after = trainer.evaluate()
    assert after["pairwise_accuracy"] == 1.0 and after["reward_margin"] > 1.0
    assert trainer.evaluate(trainer.train_dataset)["loss"] < 0.5 * before["loss"]


def test_lora_trains_only_the_adapters_and_the_head(id_tokens, tmp_path):
    model = tiny_scorer(id_tokens)
    add_lora(model, LoraConfig(r=8, lora_alpha=16, target_modules="all-linear", modules_to_save=["score"]))
    initial = {name: p.detach().clone() for name, p in model.named_parameters()}
    arguments = RewardConfig(output_dir=tmp_path, max_steps=25, per_device_batch_size=8, learning_rate=1e-2,
                             logging_steps=1, progress=False)
    trainer = RewardTrainer(model, arguments, PAIRS, id_tokens, eval_dataset=HELD_OUT)
    trainer.train()
    assert trainer.evaluate()["pairwise_accuracy"] == 1.0
    changed = {name for name, p in model.named_parameters() if not torch.equal(p, initial[name])}
    assert "score.weight" in changed and any("lora_" in name for name in changed)
    assert all("lora_" in name or name == "score.weight" for name in changed)
