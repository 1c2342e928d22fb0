"""Learning-rate schedules: a linear warmup, then constant, linear or cosine decay to zero.

Adam's first updates are noisy (its moment estimates start from nothing), so the
learning rate climbs linearly from 0 over `warmup_steps` before the schedule proper
begins. Each schedule is a multiplier of the base learning rate wrapped in
`torch.optim.lr_scheduler.LambdaLR`; the formulas are those of HF transformers'
`get_*_schedule_with_warmup`, so a recipe tuned there transfers unchanged.
"""

from __future__ import annotations

import math
from collections.abc import Callable

import torch
from torch.optim.lr_scheduler import LambdaLR

from lmforge.errors import ValidationError

SCHEDULES = ("constant", "linear", "cosine")


def lr_multiplier(name: str, warmup_steps: int, total_steps: int) -> Callable[[int], float]:
    """The factor applied to the base learning rate at optimizer step `step` (0-based).

    Warmup: step / warmup_steps. After it, over the remaining steps: constant 1; linear from
    1 down to 0; cosine half-wave 0.5 · (1 + cos(π · progress)), which stays high longer and
    lands softly at 0.
    """
    if name not in SCHEDULES:
        raise ValidationError(f"lr_scheduler must be one of {', '.join(SCHEDULES)}; got {name!r}.")
    if warmup_steps < 0 or total_steps < 1:
        raise ValidationError(f"need warmup_steps >= 0 and total_steps >= 1; got {warmup_steps} and {total_steps}.")

    def multiplier(step: int) -> float:
        if step < warmup_steps:
            return step / warmup_steps
        if name == "constant":
            return 1.0
        progress = (step - warmup_steps) / max(1, total_steps - warmup_steps)
        if name == "linear":
            return max(0.0, 1.0 - progress)
        return max(0.0, 0.5 * (1.0 + math.cos(math.pi * progress)))

    return multiplier


def build_scheduler(optimizer: torch.optim.Optimizer, name: str, warmup_steps: int, total_steps: int) -> LambdaLR:
    """A LambdaLR for `optimizer`; call `.step()` once after every `optimizer.step()`."""
    return LambdaLR(optimizer, lr_multiplier(name, warmup_steps, total_steps))
