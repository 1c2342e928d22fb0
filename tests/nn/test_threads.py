"""Threads meeting inside one compiled kernel, and torch's thread count around small work."""

from concurrent.futures import ThreadPoolExecutor

import numpy as np
import pytest
import torch

from lmforge.nn.kernels import threads
from lmforge.nn.kernels.jit import available, jit

pytestmark = pytest.mark.skipif(not available(), reason="numba is not installed")


@jit
def _rounds_of_sums(rank, count, sync, slots, totals):
    """Each round, every thread writes its slot, then (after a barrier) reads all slots: a thread running
    ahead of the others would read a slot still holding the previous round's value."""
    passed = 0
    for round_ in range(totals.shape[1]):
        slots[rank] = round_ * 100 + rank
        passed = threads.barrier(sync, count, passed)
        total = 0
        for other in range(count):
            total += slots[other]
        totals[rank, round_] = total
        passed = threads.barrier(sync, count, passed)  # nobody overwrites a slot another thread still reads


@pytest.mark.parametrize("count", [1, 2, 3])
def test_threads_meet_at_every_barrier(count):
    rounds = 300
    slots, totals = np.zeros(count, np.int64), np.zeros((count, rounds), np.int64)
    threads.run_on_threads(_rounds_of_sums, count, slots, totals)
    expected = np.array([r * 100 * count + count * (count - 1) // 2 for r in range(rounds)])
    assert (totals == expected).all()


def test_torch_runs_on_one_thread_inside_and_gets_its_count_back():
    before = torch.get_num_threads()
    with threads.torch_on_one_thread():
        assert torch.get_num_threads() == 1
        with threads.torch_on_one_thread():  # nested
            assert torch.get_num_threads() == 1
        assert torch.get_num_threads() == 1
    assert torch.get_num_threads() == before

    def overlapping(_):
        with threads.torch_on_one_thread():
            return torch.get_num_threads()

    with ThreadPoolExecutor(4) as pool:  # users overlapping from several threads
        assert set(pool.map(overlapping, range(64))) == {1}
    assert torch.get_num_threads() == before
