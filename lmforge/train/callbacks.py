"""Ready-made Trainer callbacks.

`TimeBudget` ends a run after a wall-clock budget: "train for 15 minutes" is often the
honest way to compare models or settings on one machine, since the number of steps that
fit depends on the model. It stops at the end of a step, so the final checkpoint is
complete and the run can be resumed.
"""

from __future__ import annotations

import logging
import time

from lmforge.errors import ValidationError
from lmforge.train.trainer import Trainer, TrainerCallback

logger = logging.getLogger(__name__)


class TimeBudget(TrainerCallback):
    """Stop training once `minutes` have passed since the callback was made (a resumed run gets a new budget)."""

    def __init__(self, minutes: float):
        if minutes <= 0:
            raise ValidationError(f"the time budget must be > 0 minutes, got {minutes}.")
        self.seconds = minutes * 60
        self.started = time.monotonic()
        self.exhausted = False

    def on_step_end(self, trainer: Trainer) -> None:
        if not self.exhausted and time.monotonic() - self.started >= self.seconds:
            self.exhausted = True
            trainer.state.should_stop = True
            logger.info("time budget of %.1f minutes used up at step %d; stopping.", self.seconds / 60,
                        trainer.state.global_step)
