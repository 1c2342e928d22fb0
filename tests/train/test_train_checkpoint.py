"""Training checkpoints: exact resume, atomic saves, no pickles, clear errors."""

import json
import random

import numpy as np
import pytest
import torch

import lmforge.train.checkpoint as checkpoint_module
from lmforge.errors import CheckpointError, ValidationError
from lmforge.train import MLMCollator, Trainer, TrainerCallback, latest_checkpoint
from lmforge.train.checkpoint import (
    optimizer_from_files,
    optimizer_to_files,
    rng_state,
    set_rng_state,
)
from tests.train.test_trainer import CLM, Recorder, args, sequences, tiny_llama

# 2 examples per micro-batch, 2 micro-batches per step, 9 examples: 5 micro-batches per epoch, so steps
# cross epoch boundaries with a short last step, and the warmup + cosine schedule and weight decay all matter.
RUN = {"max_steps": 20, "per_device_batch_size": 2, "gradient_accumulation_steps": 2, "warmup_steps": 3,
       "lr_scheduler": "cosine", "learning_rate": 3e-3, "weight_decay": 0.1, "logging_steps": 0}


class StopAt(TrainerCallback):
    def __init__(self, step):
        self.step = step

    def on_step_end(self, trainer):
        trainer.state.should_stop = trainer.state.global_step == self.step


@pytest.fixture(scope="module")
def data():
    return sequences(9, seed=3)


@pytest.fixture(scope="module")
def uninterrupted(tmp_path_factory, data):
    """The per-step losses of 20 steps in one go."""
    recorder = Recorder()
    Trainer(tiny_llama(), args(tmp_path_factory.mktemp("full"), **RUN), data, CLM, callbacks=[recorder]).train()
    return recorder.losses


def test_stop_and_resume_latest_replays_the_same_losses(tmp_path, data, uninterrupted):
    first = Recorder()
    Trainer(tiny_llama(), args(tmp_path, **RUN), data, CLM, callbacks=[first, StopAt(10)]).train()
    assert latest_checkpoint(tmp_path).name == "checkpoint-000010"
    second = Recorder()
    # A differently initialised model: every weight must come from the checkpoint.
    state = Trainer(tiny_llama(seed=7), args(tmp_path, **RUN), data, CLM, callbacks=[second]).train(
        resume_from="latest")
    assert state.global_step == 20
    assert first.losses + second.losses == pytest.approx(uninterrupted, rel=1e-6, abs=0)
    assert first.losses[-1] != second.losses[0]


def test_resume_restores_the_mlm_masks(tmp_path):
    """The MLM collator's generator is part of the state: resumed masks equal the uninterrupted ones."""
    data = sequences(6, seed=4, lengths=(6, 12))

    def collator():
        return MLMCollator(mask_token_id=1, pad_token_id=0, vocab_size=50, mlm_probability=0.3, seed=5)

    def run(folder, callbacks, resume_from=None, seed=0):
        recorder = Recorder()
        settings = {**RUN, "max_steps": 8, "save_steps": 4}
        Trainer(tiny_llama(seed), args(folder, **settings), data, collator(), task="masked-lm",
                callbacks=[recorder, *callbacks]).train(resume_from)
        return recorder.losses

    full = run(tmp_path / "full", [])
    resumed = run(tmp_path / "full", [], resume_from=tmp_path / "full" / "checkpoint-000004", seed=3)
    assert resumed == pytest.approx(full[4:], rel=1e-6, abs=0)


def test_rng_states_roundtrip_through_json():
    state = json.loads(json.dumps(rng_state()))
    expected = (random.random(), np.random.rand(), torch.rand(1).item())
    set_rng_state(state)
    assert (random.random(), np.random.rand(), torch.rand(1).item()) == expected


def test_checkpoint_holds_no_pickles_and_roundtrips_the_optimizer(tmp_path, data):
    trainer = Trainer(tiny_llama(), args(tmp_path, max_steps=2), data, CLM)
    trainer.train()
    folder = latest_checkpoint(tmp_path)
    assert sorted(p.name for p in folder.iterdir()) == ["config.json", "model.safetensors", "optimizer.json",
                                                       "optimizer.safetensors", "trainer_state.json"]
    tensors, layout = optimizer_to_files(trainer.optimizer.state_dict())
    rebuilt = optimizer_from_files(tensors, layout)
    original = trainer.optimizer.state_dict()
    assert rebuilt["param_groups"] == original["param_groups"]
    for index, values in original["state"].items():
        for name, value in values.items():
            assert torch.equal(rebuilt["state"][index][name], value)


def test_failed_save_leaves_previous_checkpoint_intact(tmp_path, data, monkeypatch):
    trainer = Trainer(tiny_llama(), args(tmp_path, max_steps=2), data, CLM)
    trainer.train()
    previous = latest_checkpoint(tmp_path)
    before = {p.name: p.read_bytes() for p in previous.iterdir()}

    def broken_save_file(*args, **kwargs):
        raise OSError("disk full")

    monkeypatch.setattr(checkpoint_module, "save_file", broken_save_file)  # fails after the model is written
    for step in (3, 2):  # a new step, then the saved step again (whose folder a save replaces)
        trainer.state.global_step = step
        with pytest.raises(OSError, match="disk full"):
            trainer.save()
    assert latest_checkpoint(tmp_path) == previous
    assert {p.name: p.read_bytes() for p in previous.iterdir()} == before
    assert sorted(p.name for p in tmp_path.iterdir()) == ["checkpoint-000002", "log.csv", "log.jsonl", "loss_curve.png"]

    monkeypatch.undo()
    trainer.state.global_step = 2
    trainer.save()  # re-saving an existing step replaces it whole
    assert sorted(p.name for p in tmp_path.iterdir()) == ["checkpoint-000002", "log.csv", "log.jsonl", "loss_curve.png"]


def test_resume_errors_say_what_to_do(tmp_path, data):
    trainer = Trainer(tiny_llama(), args(tmp_path), data, CLM)
    with pytest.raises(ValidationError, match="holds no checkpoint"):
        trainer.train(resume_from="latest")
    (tmp_path / "not-a-checkpoint").mkdir()
    with pytest.raises(CheckpointError, match="not a complete training checkpoint"):
        trainer.train(resume_from=tmp_path / "not-a-checkpoint")
