"""Run by torchrun in tests/distributed/test_data_parallel.py: train the tiny model data-parallel,
then resume from its step-2 checkpoint, the same for a tiny MLM run, and (on rank 0) write the
losses as JSON.

Usage: torchrun --nproc_per_node 2 data_parallel_worker.py ddp|fsdp OUTPUT_DIR
"""

import json
import sys
from pathlib import Path

from lmforge.distributed import destroy_distributed, gather_objects
from tests.distributed.setup import WORLD, run, run_mlm


def main() -> None:
    strategy, output_dir = sys.argv[1], Path(sys.argv[2])
    losses, evaluation, trainer = run(output_dir, per_device_batch_size=4 // WORLD, data_parallel=strategy)
    resumed, _, _ = run(output_dir, per_device_batch_size=4 // WORLD, data_parallel=strategy,
                        resume_from=output_dir / "checkpoint-000002")
    mlm_losses, first_draw = run_mlm(output_dir / "mlm")
    mlm_resumed, _ = run_mlm(output_dir / "mlm", resume_from=output_dir / "mlm" / "checkpoint-000002")
    first_draws = gather_objects(first_draw, trainer.context)
    if trainer.context.is_main:
        (output_dir / "result.json").write_text(json.dumps(
            {"losses": losses, "eval": evaluation, "resumed": resumed, "world": trainer.context.world_size,
             "mlm_losses": mlm_losses, "mlm_resumed": mlm_resumed, "mlm_first_draws": first_draws}))
    destroy_distributed()


if __name__ == "__main__":
    main()
