"""Run by torchrun in tests/distributed/test_data_parallel.py: train the tiny model data-parallel,
then resume from its step-2 checkpoint, and (on rank 0) write the losses as JSON.

Usage: torchrun --nproc_per_node 2 data_parallel_worker.py ddp|fsdp OUTPUT_DIR
"""

import json
import sys
from pathlib import Path

from lmforge.distributed import destroy_distributed
from tests.distributed.setup import WORLD, run


def main() -> None:
    strategy, output_dir = sys.argv[1], Path(sys.argv[2])
    losses, evaluation, trainer = run(output_dir, per_device_batch_size=4 // WORLD, data_parallel=strategy)
    resumed, _, _ = run(output_dir, per_device_batch_size=4 // WORLD, data_parallel=strategy,
                        resume_from=output_dir / "checkpoint-000002")
    if trainer.context.is_main:
        (output_dir / "result.json").write_text(json.dumps(
            {"losses": losses, "eval": evaluation, "resumed": resumed, "world": trainer.context.world_size}))
    destroy_distributed()


if __name__ == "__main__":
    main()
