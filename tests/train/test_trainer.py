"""The training loop on tiny random models: token-normalised accumulation, overfitting, evaluation,
early stopping, callbacks, logs and divergence."""

import csv
import json
import math

import pytest
import torch

from lmforge.checkpoint.hf import load_hf_weights
from lmforge.config import LlamaConfig
from lmforge.errors import ValidationError
from lmforge.models.llama import LlamaForCausalLM, LlamaForSequenceClassification
from lmforge.train import (
    PaddingCollator,
    Trainer,
    TrainerCallback,
    TrainingArguments,
    TrainingDivergedError,
    latest_checkpoint,
)
from lmforge.train.metrics import classification_metrics, count_targets, loss_sum

TINY = {"vocab_size": 50, "hidden_size": 32, "intermediate_size": 64, "num_hidden_layers": 2,
        "num_attention_heads": 4, "num_key_value_heads": 2, "max_position_embeddings": 64, "pad_token_id": 0}


def tiny_llama(seed=0, cls=LlamaForCausalLM, **overrides):
    torch.manual_seed(seed)
    return cls(LlamaConfig(**{**TINY, **overrides}))


def sequences(count, seed=0, lengths=(3, 12)):
    generator = torch.Generator().manual_seed(seed)
    return [{"input_ids": torch.randint(1, TINY["vocab_size"], (int(torch.randint(*lengths, (1,),
                                                                                   generator=generator)),),
                                        generator=generator).tolist()} for _ in range(count)]


CLM = PaddingCollator(pad_token_id=0, causal_lm_labels=True)


def args(tmp_path, **overrides):
    return TrainingArguments(**{"output_dir": tmp_path, "max_steps": 4, "per_device_batch_size": 2,
                                "logging_steps": 1, "progress": False, **overrides})


class Recorder(TrainerCallback):
    def __init__(self):
        self.losses, self.evaluations, self.saves = [], [], []

    def on_step_end(self, trainer):
        self.losses.append(trainer.state.loss)

    def on_evaluate(self, trainer, metrics):
        self.evaluations.append(metrics)

    def on_save(self, trainer, folder):
        self.saves.append(folder.name)


def gradients(model):
    return {name: p.grad.clone() for name, p in model.named_parameters()}


def test_accumulation_normalises_by_all_target_tokens(tmp_path):
    """One batch of 8 sequences of different lengths and 4 micro-batches of 2 give the same gradient."""
    data = sequences(8, lengths=(2, 15))
    big, small = tiny_llama().double(), tiny_llama().double()
    one = Trainer(big, args(tmp_path, per_device_batch_size=8), data, CLM)
    four = Trainer(small, args(tmp_path, per_device_batch_size=2, gradient_accumulation_steps=4), data, CLM)
    batches_one, batches_four = one._next_step_batches(), four._next_step_batches()
    assert (len(batches_one), len(batches_four)) == (1, 4)
    loss_one, loss_four = one.accumulate_gradients(batches_one), four.accumulate_gradients(batches_four)
    assert loss_four == pytest.approx(loss_one, rel=1e-10)
    expected, got = gradients(big), gradients(small)
    for name in expected:
        torch.testing.assert_close(got[name], expected[name], rtol=1e-9, atol=1e-12)

    # Averaging the four micro-batch means instead would weigh tokens unequally: a different gradient.
    small.zero_grad()
    for batch in batches_four:
        logits = small(batch["input_ids"], batch["attention_mask"]).logits
        (loss_sum("causal-lm", logits, batch["labels"]) / count_targets("causal-lm", batch["labels"]) / 4).backward()
    naive = gradients(small)
    assert not torch.allclose(naive["lm_head.weight"], expected["lm_head.weight"], rtol=1e-5)


def test_tiny_model_overfits_tiny_dataset(tmp_path):
    data = sequences(4, seed=1, lengths=(8, 13))
    model = tiny_llama()
    recorder = Recorder()
    trainer = Trainer(model, args(tmp_path, max_steps=60, per_device_batch_size=4, learning_rate=1e-2,
                                  lr_scheduler="constant", logging_steps=0), data, CLM, callbacks=[recorder])
    trainer.train()
    assert recorder.losses[0] > 3.5  # about ln(50) at random initialisation
    assert recorder.losses[-1] < 0.3
    assert trainer.evaluate(data)["loss"] < 0.3
    assert model.training  # evaluation puts the model back in training mode


def test_evaluate_reports_per_token_loss_and_perplexity(tmp_path):
    data = sequences(5, seed=2)
    model = tiny_llama()
    trainer = Trainer(model, args(tmp_path, per_device_batch_size=2), data, CLM, eval_dataset=data)
    metrics = trainer.evaluate()
    batch = CLM(data)
    with torch.no_grad():
        logits = model(batch["input_ids"], batch["attention_mask"]).logits
    expected = loss_sum("causal-lm", logits, batch["labels"]).item() / count_targets("causal-lm", batch["labels"])
    assert metrics["loss"] == pytest.approx(expected, rel=1e-5)
    assert metrics["perplexity"] == pytest.approx(math.exp(expected), rel=1e-5)


def test_sequence_classification_trains_and_reports_accuracy_and_f1(tmp_path):
    data = [{"input_ids": example["input_ids"], "labels": index % 3} for index, example in enumerate(sequences(6))]
    model = tiny_llama(cls=LlamaForSequenceClassification, num_labels=3)
    trainer = Trainer(model, args(tmp_path, max_steps=40, per_device_batch_size=6, learning_rate=1e-2,
                                  lr_scheduler="constant"), data, PaddingCollator(pad_token_id=0), eval_dataset=data)
    assert trainer.task == "sequence-classification"
    trainer.train()
    metrics = trainer.evaluate()
    assert set(metrics) == {"loss", "accuracy", "macro_f1"}
    assert metrics["accuracy"] == 1.0 and metrics["macro_f1"] == 1.0


def test_classification_metrics_by_hand():
    predictions, labels = torch.tensor([0, 0, 1, 1, 2, -5]), torch.tensor([0, 1, 1, 1, 0, -100])
    metrics = classification_metrics(predictions, labels)  # -100 is ignored
    assert metrics["accuracy"] == pytest.approx(3 / 5)
    # F1: class 0: tp 1, predicted 2, actual 2 → 0.5; class 1: tp 2, 2, 3 → 0.8; class 2: 0
    assert metrics["macro_f1"] == pytest.approx((0.5 + 0.8 + 0.0) / 3)


def test_logs_callbacks_and_final_checkpoint(tmp_path):
    recorder = Recorder()
    data = sequences(6)
    trainer = Trainer(tiny_llama(), args(tmp_path, max_steps=6, logging_steps=2, eval_steps=3, save_steps=4),
                      data, CLM, eval_dataset=data[:2], callbacks=[recorder])
    trainer.train()
    lines = [json.loads(line) for line in (tmp_path / "log.jsonl").read_text().splitlines()]
    train_lines = [line for line in lines if "loss" in line]
    assert [line["step"] for line in train_lines] == [2, 4, 6]
    assert {"epoch", "lr", "grad_norm", "tokens_per_second"} <= set(train_lines[0])
    assert [line["step"] for line in lines if "eval_loss" in line] == [3, 6]
    assert len(recorder.losses) == 6 and len(recorder.evaluations) == 2
    assert recorder.saves == ["checkpoint-000004", "checkpoint-000006"]
    assert latest_checkpoint(tmp_path).name == "checkpoint-000006"
    with open(tmp_path / "log.csv", newline="") as table:
        rows = list(csv.DictReader(table))
    assert [(row["step"], bool(row["loss"]), bool(row["eval_loss"])) for row in rows] == \
        [("2", True, False), ("3", False, True), ("4", True, False), ("6", True, False), ("6", False, True)]
    assert float(rows[0]["loss"]) == pytest.approx(train_lines[0]["loss"])
    assert (tmp_path / "loss_curve.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_tensorboard_receives_every_logged_scalar(tmp_path):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    data = sequences(4)
    Trainer(tiny_llama(), args(tmp_path, max_steps=3, eval_steps=3, report_to=("tensorboard",)), data, CLM,
            eval_dataset=data).train()
    events = EventAccumulator(str(tmp_path / "tensorboard"))
    events.Reload()
    assert {"loss", "lr", "grad_norm", "eval_loss", "eval_perplexity"} <= set(events.Tags()["scalars"])
    assert [event.step for event in events.Scalars("loss")] == [1, 2, 3]
    with pytest.raises(ValidationError, match="unknown targets"):
        args(tmp_path, report_to=("wandb",))


def test_sequences_longer_than_the_model_positions_are_refused(tmp_path):
    long = [{"input_ids": list(range(1, 41)) * 2}]  # 80 tokens, the tiny model has 64 positions
    trainer = Trainer(tiny_llama(), args(tmp_path), long, CLM)
    with pytest.raises(ValidationError, match="at most 64 positions; tokenize with max_length=64"):
        trainer.train()


def test_early_stopping_on_eval_loss(tmp_path, monkeypatch):
    data = sequences(4)
    trainer = Trainer(tiny_llama(), args(tmp_path, max_steps=10, eval_steps=1, early_stopping_patience=2), data, CLM,
                      eval_dataset=data)
    scripted = iter([3.0, 2.0, 2.5, 2.4, 1.0])
    monkeypatch.setattr(trainer, "evaluate", lambda: {"loss": next(scripted)})
    state = trainer.train()
    assert state.global_step == 4  # two evaluations (2.5, 2.4) without beating 2.0
    assert state.best_eval_loss == 2.0


def test_num_epochs_sets_the_step_count(tmp_path):
    trainer = Trainer(tiny_llama(), args(tmp_path, max_steps=None, num_epochs=2, per_device_batch_size=2,
                                         gradient_accumulation_steps=2), sequences(7), CLM)
    assert trainer.total_steps == 4  # 4 micro-batches per epoch, 2 per step
    state = trainer.train()
    assert (state.global_step, state.epoch) == (4, 1)


def test_nan_loss_stops_and_keeps_last_good_checkpoint(tmp_path):
    class Poison(TrainerCallback):
        def on_step_end(self, trainer):
            if trainer.state.global_step == 3:
                with torch.no_grad():
                    trainer.model.lm_head.weight[0, 0] = float("nan")

    trainer = Trainer(tiny_llama(), args(tmp_path, max_steps=8, save_steps=2), sequences(6), CLM, callbacks=[Poison()])
    with pytest.raises(TrainingDivergedError, match=r"step 4: .*not finite.*checkpoint-000002.*learning_rate"):
        trainer.train()
    assert latest_checkpoint(tmp_path).name == "checkpoint-000002"
    restored = tiny_llama(seed=1)
    restored.load_hf_state_dict(load_hf_weights(tmp_path / "checkpoint-000002"))
    assert all(torch.isfinite(p).all() for p in restored.parameters())


def test_bad_arguments_are_clear_errors(tmp_path):
    with pytest.raises(ValidationError, match="exactly one of max_steps and num_epochs"):
        TrainingArguments(output_dir=tmp_path)
    with pytest.raises(ValidationError, match="no label in its batches"):
        Trainer(tiny_llama(), args(tmp_path), [{"input_ids": [1]}], CLM).train()
    with pytest.raises(ValidationError, match="pass task="):
        Trainer(torch.nn.Linear(2, 2), args(tmp_path), [{"input_ids": [1]}], CLM)


def test_gradient_checkpointing_recomputes_blocks_and_keeps_the_losses(tmp_path):
    """Same per-step losses with each block's activations recomputed in the backward pass."""
    runs = []
    for checkpointing in (False, True):
        model = tiny_llama()
        calls = []
        model.model.layers[0].self_attn.register_forward_hook(lambda *_: calls.append(1))
        recorder = Recorder()
        Trainer(model, args(tmp_path / str(checkpointing), gradient_checkpointing=checkpointing),
                sequences(8), CLM, callbacks=[recorder]).train()
        runs.append((recorder.losses, len(calls)))
    (plain, plain_calls), (recomputed, recomputed_calls) = runs
    assert recomputed == pytest.approx(plain, rel=1e-6)
    assert recomputed_calls == 2 * plain_calls  # each block ran again in the backward pass


def test_gradient_checkpointing_replays_dropout_exactly():
    """A post-norm encoder with dropout: recomputation sees the same dropout masks, so gradients match."""
    from lmforge.config import BertConfig
    from lmforge.models.bert import BertForMaskedLM

    ids = torch.randint(0, 50, (2, 9), generator=torch.Generator().manual_seed(1))
    grads = []
    for checkpointing in (False, True):
        torch.manual_seed(0)
        model = BertForMaskedLM(BertConfig(vocab_size=50, hidden_size=32, num_hidden_layers=2, num_attention_heads=4,
                                           intermediate_size=64, max_position_embeddings=16)).train()
        model.set_gradient_checkpointing(checkpointing)
        torch.manual_seed(1)
        model(ids).logits.square().mean().backward()
        grads.append({name: p.grad.clone() for name, p in model.named_parameters() if p.grad is not None})
    assert grads[0].keys() == grads[1].keys()
    assert all(torch.allclose(grads[0][k], grads[1][k], atol=1e-6) for k in grads[0])
