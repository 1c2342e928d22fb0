"""Perplexity against HF transformers on a tiny model, and the sliding window against brute force."""

import math

import pytest
import torch

from lmforge.errors import InputError
from lmforge.evaluation import perplexity
from tests.models.test_llama import hf_llama
from tests.parity import ours_from_hf


@pytest.fixture(scope="module")
def models():
    hf = hf_llama()
    return hf, ours_from_hf(hf, "causal-lm")


def text(length: int) -> list[int]:
    return torch.randint(1, 97, (length,), generator=torch.Generator().manual_seed(1)).tolist()


def test_one_window_equals_hf_cross_entropy(models):
    hf, ours = models
    ids = text(40)
    with torch.no_grad():
        loss = hf(torch.tensor([ids]), labels=torch.tensor([ids])).loss  # mean NLL of tokens 1..39
    result = perplexity(ours, ids, context=64)
    assert result.tokens == 39 and result.perplexity == pytest.approx(math.exp(float(loss)), rel=1e-5)


@pytest.mark.parametrize("context,stride", [(16, 16), (16, 5), (20, 7), (64, 64)])
def test_sliding_windows_score_each_token_once_with_its_window_context(models, context, stride):
    _, ours = models
    ids = text(50)
    expected, done, count = 0.0, 1, 0
    for begin in range(0, len(ids) - 1, stride):  # brute force: full logits of every window
        end = min(begin + context, len(ids))
        with torch.no_grad():
            log_probs = ours(torch.tensor([ids[begin:end]])).logits[0].log_softmax(-1)
        for position in range(max(done, begin + 1), end):
            expected -= float(log_probs[position - begin - 1, ids[position]])
            count += 1
        done = max(done, end)
        if end == len(ids):
            break
    result = perplexity(ours, ids, context=context, stride=stride)
    assert result.tokens == count and result.nll == pytest.approx(expected, rel=1e-5)
    assert count == (49 if stride < context else 49 - (len(range(0, 49, stride)) - 1))


def test_bad_settings_are_named(models):
    _, ours = models
    with pytest.raises(InputError, match="stride"):
        perplexity(ours, text(10), context=8, stride=9)
    with pytest.raises(InputError, match="context window"):
        perplexity(ours, text(10), context=4096)
    with pytest.raises(InputError, match="at least 2 tokens"):
        perplexity(ours, [5])
