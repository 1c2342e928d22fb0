"""Sampler: greedy, seeded reproducibility, per-request independence, the sampled distribution, logprobs."""

import pytest
import torch

from lmforge.errors import InputError
from lmforge.generation.processors import LogitsPipeline
from lmforge.generation.sampler import Sampler, TokenLogprob, logprobs, sample_batch
from lmforge.generation.sampling_params import SamplingParams

INF = float("inf")
LOGITS = torch.tensor([0.4, 0.3, 0.2, 0.1]).log()


def draws(sampler: Sampler, n: int = 50, logits: torch.Tensor = LOGITS) -> list[int]:
    return [sampler.sample(logits) for _ in range(n)]


def test_greedy_takes_the_argmax():
    assert Sampler(SamplingParams(temperature=0)).sample(torch.tensor([0.1, 2.0, -1.0])) == 1
    assert Sampler(SamplingParams(top_k=1, seed=3)).sample(torch.tensor([0.1, 2.0, -1.0])) == 1


def test_seeded_sampling_is_reproducible_and_seeds_differ():
    assert draws(Sampler(SamplingParams(seed=7))) == draws(Sampler(SamplingParams(seed=7)))
    assert draws(Sampler(SamplingParams(seed=7))) != draws(Sampler(SamplingParams(seed=8)))


def test_seeded_sampling_is_independent_of_other_requests():
    alone = draws(Sampler(SamplingParams(seed=7)))
    mine, other = Sampler(SamplingParams(seed=7)), Sampler(SamplingParams())
    interleaved = []
    for _ in range(50):
        other.sample(LOGITS)
        torch.rand(3)  # and whatever else uses torch's global RNG
        interleaved.append(mine.sample(LOGITS))
    assert interleaved == alone


def test_unseeded_sampling_follows_torch_manual_seed():
    torch.manual_seed(123)
    first = draws(Sampler(SamplingParams()))
    torch.manual_seed(123)
    assert draws(Sampler(SamplingParams())) == first


def test_sampled_frequencies_match_temperature_and_top_k():
    # temperature 2 turns p into sqrt(p) / sum; top-k 3 then drops the last token:
    # sqrt([0.4, 0.3, 0.2]) = [0.63246, 0.54772, 0.44721], sum 1.62739
    expected = torch.tensor([0.38864, 0.33657, 0.27480, 0.0])
    params = SamplingParams(temperature=2.0, top_k=3, seed=0)
    pipeline = LogitsPipeline.from_params(params, eos_token_ids=[])
    processed = pipeline(LOGITS, pipeline.new_state([]))
    n = 20_000
    tokens = sample_batch(processed.expand(n, -1), [Sampler(params)] * n)
    counts = torch.bincount(torch.tensor(tokens), minlength=4).float()
    assert counts[3] == 0
    chi_square = float(((counts[:3] - n * expected[:3]) ** 2 / (n * expected[:3])).sum())
    assert chi_square < 13.8  # 99.9% quantile of chi-square with 2 degrees of freedom


def test_filtered_tokens_are_never_sampled():
    logits = torch.tensor([-INF, 0.0, -INF, 0.0, -INF])
    tokens = sample_batch(logits.expand(2000, -1), [Sampler(SamplingParams(seed=0))] * 2000)
    assert set(tokens) == {1, 3}
    assert 900 < tokens.count(1) < 1100


def test_sample_batch_gives_each_row_what_its_sampler_alone_would():
    logits = torch.randn(4, 50, generator=torch.Generator().manual_seed(0))
    params = [SamplingParams(seed=1), SamplingParams(temperature=0), SamplingParams(seed=2), SamplingParams(seed=1)]
    batched = sample_batch(logits, [Sampler(p) for p in params])
    single = [Sampler(p).sample(row) for p, row in zip(params, logits)]
    assert batched == single
    assert batched[1] == int(logits[1].argmax())
    with pytest.raises(InputError, match="one sampler per row"):
        sample_batch(logits, [Sampler(params[0])])


def test_fully_filtered_logits_are_a_clear_error():
    for params in (SamplingParams(temperature=0), SamplingParams(seed=0)):
        with pytest.raises(InputError, match="every token .* was filtered out"):
            Sampler(params).sample(torch.full((4,), -INF))


def test_logprobs_are_log_softmax_of_the_raw_logits():
    raw = torch.tensor([1.0, 3.0, -2.0, 2.5, 0.0])
    expected = raw - raw.exp().sum().log()  # log_softmax by definition
    result = logprobs(raw, token_id=2, top_n=3)
    assert result.token_id == 2
    assert result.logprob == pytest.approx(float(expected[2]), abs=1e-6)
    assert [token for token, _ in result.top] == [1, 3, 0]
    assert [value for _, value in result.top] == pytest.approx(expected[[1, 3, 0]].tolist(), abs=1e-6)
    assert logprobs(raw, token_id=1) == TokenLogprob(1, pytest.approx(float(expected[1]), abs=1e-6), [])
    with pytest.raises(InputError, match="outside the vocabulary"):
        logprobs(raw, token_id=5)
