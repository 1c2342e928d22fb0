"""AdamW with weight decay on weight matrices only.

Weight decay pulls weights towards zero, a prior that a smaller-norm projection
generalises better. It makes sense for matrices (Linear weights, embeddings),
whose scale is free; a norm's gain or a bias is a per-channel offset or scale
whose value 1 or 0 has no privileged "small" meaning, and decaying it only
fights the normalisation. The rule used by nanoGPT and most recipes follows:
decay tensors with dim >= 2, never 1-D ones. Frozen parameters are left out.
"""

from __future__ import annotations

import torch
from torch import nn

from lmforge.errors import ValidationError


def parameter_groups(model: nn.Module, weight_decay: float) -> list[dict]:
    """Two AdamW groups: trainable matrices (decayed) and trainable vectors/scalars (not decayed)."""
    trainable = [p for p in model.parameters() if p.requires_grad]  # parameters() lists a tied weight once
    if not trainable:
        raise ValidationError("the model has no trainable parameters (requires_grad is False everywhere); "
                              "unfreeze some before training.")
    return [{"params": [p for p in trainable if p.dim() >= 2], "weight_decay": weight_decay},
            {"params": [p for p in trainable if p.dim() < 2], "weight_decay": 0.0}]


def build_optimizer(model: nn.Module, learning_rate: float, weight_decay: float = 0.0,
                    betas: tuple[float, float] = (0.9, 0.999), eps: float = 1e-8) -> torch.optim.AdamW:
    """AdamW over the trainable parameters of `model`, decaying only its matrices."""
    return torch.optim.AdamW(parameter_groups(model, weight_decay), lr=learning_rate, betas=betas, eps=eps)
