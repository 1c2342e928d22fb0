"""DPO: the loss on hand-computed log-probabilities, answer log-probabilities, the reference (LoRA switched off,
or a frozen copy), and training that learns the preferences on a tiny model with SmolLM2's chat template."""

import math

import pytest
import torch

from lmforge import AutoTokenizer
from lmforge.align import DPOConfig, DPOTrainer, dpo_loss, sequence_logprobs, tokenize_preferences
from lmforge.config import LlamaConfig
from lmforge.errors import InputError, ValidationError
from lmforge.models.llama import LlamaForCausalLM
from lmforge.peft import LoraConfig, add_lora, lora_disabled
from lmforge.train.collate import IGNORE_INDEX
from tests.parity import id_tokenizer


@pytest.fixture(scope="module")
def tokenizer():
    return AutoTokenizer.from_pretrained("smollm2-135m-instruct")


@pytest.fixture(scope="module")
def id_tokens():
    """A 50-token tokenizer without a chat template (ids written out, "1" is EOS): fast training tests."""
    from lmforge.tokenizer import Tokenizer

    return Tokenizer(id_tokenizer(50).backend, {"pad": "0", "eos": "1"})


def tiny_model(tokenizer, seed=0):
    torch.manual_seed(seed)
    return LlamaForCausalLM(LlamaConfig(vocab_size=len(tokenizer.backend.get_vocab()), hidden_size=32,
                                        intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
                                        num_key_value_heads=2, max_position_embeddings=256))


# Prefer the short, direct answer to the rambling one.
PAIRS = [{"prompt": f"What is {a} plus {b}?", "chosen": str(a + b),
          "rejected": f"Well, let me think about it, it could be {a + b + 1} or so"} for a, b in
         [(1, 2), (3, 4), (5, 1), (2, 2), (6, 3), (4, 4)]]
# The same preference in ids: a one-token answer over a long repetitive one.
ID_PAIRS = [{"prompt": f"{a} {b} 3", "chosen": f"{a + b}", "rejected": f"{a} {a} {a} {b} {b} {b}"}
            for a, b in [(11, 12), (13, 14), (15, 11), (12, 12), (16, 13), (14, 14)]]


def test_the_loss_on_hand_computed_logprobs():
    chosen, rejected = torch.tensor([-1.0, -4.0]), torch.tensor([-3.0, -2.0])
    ref_chosen, ref_rejected = torch.tensor([-2.0, -3.0]), torch.tensor([-2.0, -3.0])
    # margins: (−1+2) − (−3+2) = 2, (−4+3) − (−2+3) = −2; beta 0.5 → −log σ(±1)
    expected = torch.tensor([-math.log(1 / (1 + math.exp(-1))), -math.log(1 / (1 + math.exp(1)))])
    torch.testing.assert_close(dpo_loss(chosen, rejected, ref_chosen, ref_rejected, beta=0.5), expected)
    ipo = dpo_loss(chosen, rejected, ref_chosen, ref_rejected, beta=0.5, loss_type="ipo")
    torch.testing.assert_close(ipo, torch.tensor([(2 - 1.0) ** 2, (-2 - 1.0) ** 2]))


def test_sequence_logprobs_sum_the_answer_tokens_only():
    logits = torch.randn(1, 4, 5)
    labels = torch.tensor([[IGNORE_INDEX, IGNORE_INDEX, 3, 1]])
    log_probs = torch.log_softmax(logits, -1)
    expected = log_probs[0, 1, 3] + log_probs[0, 2, 1]  # position t predicts token t+1
    torch.testing.assert_close(sequence_logprobs(logits, labels), expected.unsqueeze(0))


def test_pairs_tokenize_with_the_template_and_bad_rows_are_numbered(tokenizer):
    (pair,), dropped = tokenize_preferences(PAIRS[:1], tokenizer)
    assert dropped == 0
    answer = [i for i, label in zip(pair["chosen_input_ids"], pair["chosen_labels"]) if label != IGNORE_INDEX]
    assert tokenizer.decode(answer) == "3<|im_end|>\n"
    prompt_length = pair["chosen_labels"].index(next(l for l in pair["chosen_labels"] if l != IGNORE_INDEX))
    assert pair["chosen_input_ids"][:prompt_length] == pair["rejected_input_ids"][:prompt_length]
    with pytest.raises(InputError, match="row 2: 'rejected' is missing"):
        tokenize_preferences([PAIRS[0], {"prompt": "a", "chosen": "b"}], tokenizer)
    with pytest.raises(ValidationError, match="beta must be > 0"):
        DPOConfig(output_dir="x", max_steps=1, beta=0)


def test_lora_dpo_uses_the_adapter_free_model_as_reference_and_learns_the_preference(id_tokens, tmp_path):
    model = tiny_model(id_tokens)
    reference = tiny_model(id_tokens)  # the same weights, never trained
    add_lora(model, LoraConfig(r=8, lora_alpha=16, target_modules="all-linear"))
    arguments = DPOConfig(output_dir=tmp_path, max_steps=25, per_device_batch_size=6, learning_rate=2e-2, beta=0.5,
                          logging_steps=1, progress=False)
    trainer = DPOTrainer(model, arguments, ID_PAIRS, id_tokens, eval_dataset=ID_PAIRS)
    assert trainer.reference_model is None  # no second copy: the adapters are switched off instead
    before = trainer.evaluate()
    assert before["reward_margin"] == pytest.approx(0.0, abs=1e-6)  # LoRA starts at zero: policy == reference
    assert before["loss"] == pytest.approx(math.log(2), rel=1e-5)
    trainer.train()
    after = trainer.evaluate()
    assert after["loss"] < 0.5 * before["loss"]
    assert after["preference_accuracy"] == 1.0 and after["reward_margin"] > 1.0
    batch = trainer.collator(trainer.train_dataset)
    with torch.no_grad(), lora_disabled(model):
        switched_off = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
    reference_logits = reference(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
    assert torch.equal(switched_off, reference_logits.detach())


def test_full_dpo_keeps_a_frozen_reference_copy(id_tokens, tmp_path):
    model = tiny_model(id_tokens)
    initial = {name: p.detach().clone() for name, p in model.named_parameters()}
    arguments = DPOConfig(output_dir=tmp_path, max_steps=5, per_device_batch_size=6, learning_rate=1e-3,
                          logging_steps=1, progress=False, loss_type="ipo")
    trainer = DPOTrainer(model, arguments, ID_PAIRS, id_tokens)
    trainer.train()
    assert trainer.reference_model is not model
    assert all(torch.equal(p, initial[name]) for name, p in trainer.reference_model.named_parameters())
    assert any(not torch.equal(p, initial[name]) for name, p in model.named_parameters())
