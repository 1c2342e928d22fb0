"""LR schedules against hand-computed values (and HF transformers' formulas), and AdamW's decay groups."""

import math

import pytest
import torch

from lmforge.errors import ValidationError
from lmforge.train.optim import build_optimizer
from lmforge.train.schedules import build_scheduler, lr_multiplier


def test_warmup_then_constant():
    f = lr_multiplier("constant", warmup_steps=4, total_steps=10)
    assert [f(s) for s in range(6)] == [0.0, 0.25, 0.5, 0.75, 1.0, 1.0]
    assert f(100) == 1.0


def test_warmup_then_linear_decay_to_zero():
    f = lr_multiplier("linear", warmup_steps=2, total_steps=10)
    assert [f(s) for s in range(11)] == pytest.approx([0, 0.5, 1, 0.875, 0.75, 0.625, 0.5, 0.375, 0.25, 0.125, 0])
    assert f(12) == 0.0


def test_warmup_then_cosine():
    f = lr_multiplier("cosine", warmup_steps=2, total_steps=10)
    assert f(1) == 0.5
    assert f(2) == 1.0
    assert f(4) == pytest.approx(0.5 * (1 + math.cos(math.pi * 2 / 8)))  # 0.853553…
    assert f(6) == pytest.approx(0.5)  # half way through the decay
    assert f(10) == pytest.approx(0.0)


@pytest.mark.parametrize("name", ["linear", "cosine", "constant"])
def test_matches_hf_transformers(name):
    transformers = pytest.importorskip("transformers")
    reference = {"linear": transformers.get_linear_schedule_with_warmup,
                 "cosine": transformers.get_cosine_schedule_with_warmup,
                 "constant": lambda opt, warmup, _: transformers.get_constant_schedule_with_warmup(opt, warmup)}[name]
    ours, theirs = [], []
    for build, out in ((lambda o: build_scheduler(o, name, 3, 12), ours), (lambda o: reference(o, 3, 12), theirs)):
        optimizer = torch.optim.SGD([torch.nn.Parameter(torch.zeros(1))], lr=0.1)
        scheduler = build(optimizer)
        for _ in range(14):
            out.append(scheduler.get_last_lr()[0])
            optimizer.step()
            scheduler.step()
    assert ours == pytest.approx(theirs)


def test_unknown_schedule_is_rejected():
    with pytest.raises(ValidationError, match="constant, linear, cosine"):
        lr_multiplier("exponential", 0, 10)


def test_weight_decay_only_on_trainable_matrices():
    model = torch.nn.Sequential(torch.nn.Embedding(10, 4), torch.nn.Linear(4, 4), torch.nn.LayerNorm(4),
                                torch.nn.Linear(4, 2))
    model[3].weight.requires_grad_(False)
    decayed, plain = build_optimizer(model, 1e-3, weight_decay=0.1).param_groups
    assert decayed["weight_decay"] == 0.1 and plain["weight_decay"] == 0.0
    assert {id(p) for p in decayed["params"]} == {id(model[0].weight), id(model[1].weight)}
    assert {id(p) for p in plain["params"]} == {id(model[1].bias), id(model[2].weight), id(model[2].bias),
                                                id(model[3].bias)}


def test_frozen_model_is_a_clear_error():
    model = torch.nn.Linear(2, 2).requires_grad_(False)
    with pytest.raises(ValidationError, match="no trainable parameters"):
        build_optimizer(model, 1e-3)
