"""Data-parallel training with 2 CPU processes (torchrun, gloo) computes the one-process run.

13 examples in global batches of 4 with 2 accumulation steps: per-step losses, evaluation and
the resumed run must match one process with batch 4 (rtol 1e-5), for DDP and FSDP2.
"""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from tests.distributed.setup import run

ROOT = Path(__file__).resolve().parents[2]


@pytest.fixture(scope="module")
def alone(tmp_path_factory):
    folder = tmp_path_factory.mktemp("alone")
    losses, evaluation, _ = run(folder, per_device_batch_size=4)
    resumed, _, _ = run(folder, per_device_batch_size=4, resume_from=folder / "checkpoint-000002")
    return {"losses": losses, "eval": evaluation, "resumed": resumed, "folder": folder}


@pytest.fixture(scope="module")
def torchrun(tmp_path_factory):
    """Runs the worker under torchrun once per strategy; the tests share the results."""
    results = {}

    def launch(strategy):
        if strategy not in results:
            folder = tmp_path_factory.mktemp(strategy)
            results[strategy] = (launch_worker(strategy, folder), folder)
        return results[strategy]

    return launch


def launch_worker(strategy, folder):
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
               "-m", "tests.distributed.data_parallel_worker", strategy, str(folder)]
    environment = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(ROOT)}
    finished = subprocess.run(command, cwd=ROOT, env=environment, capture_output=True, text=True, timeout=300)
    assert finished.returncode == 0, finished.stderr[-4000:]
    return json.loads((folder / "result.json").read_text())


@pytest.mark.parametrize("strategy", ["ddp", "fsdp"])
def test_two_processes_match_one(strategy, alone, torchrun):
    together, folder = torchrun(strategy)
    assert together["world"] == 2
    assert len(together["losses"]) == 4
    torch.testing.assert_close(torch.tensor(together["losses"]), torch.tensor(alone["losses"]), rtol=1e-5, atol=0)
    assert together["eval"]["loss"] == pytest.approx(alone["eval"]["loss"], rel=1e-5)
    torch.testing.assert_close(torch.tensor(together["resumed"]), torch.tensor(alone["losses"][2:]),
                               rtol=1e-5, atol=0)
    final, reference = (load_file(run_folder / "checkpoint-000004" / "model.safetensors")
                        for run_folder in (folder, alone["folder"]))
    assert final.keys() == reference.keys()
    for name in final:
        torch.testing.assert_close(final[name], reference[name], rtol=1e-4, atol=1e-5, msg=name)


def test_each_process_masks_with_its_own_generator_and_resumes_it(torchrun):
    """MLM under 2 processes: the ranks' mask streams differ, and resuming restores each rank's stream."""
    together, _ = torchrun("ddp")
    first, second = together["mlm_first_draws"]
    assert first != second
    torch.testing.assert_close(torch.tensor(together["mlm_resumed"]), torch.tensor(together["mlm_losses"][2:]),
                               rtol=1e-6, atol=0)
