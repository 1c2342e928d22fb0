"""Learning, one step: the loss on the text, the gradients it sends into each layer, and the update they make.

Training shows the model a text and scores how well it predicted each next token (cross-entropy, the
causal-LM loss); backpropagation turns that score into a gradient for every weight, and the optimizer
moves each weight against its gradient. `training_step` computes one such step on the explained text —
for a plain SGD step of `learning_rate`, the update of a weight is -learning_rate x its gradient — and
reports, per block, the gradient's size and the update's size relative to the weights it changes. The
model's weights are left as they were.
"""

from __future__ import annotations

import torch

from lmforge.nn import TransformerBlock
from lmforge.train.metrics import count_targets, loss_sum


def training_step(model, ids: list[int], learning_rate: float = 1e-4, top: int = 5) -> dict:
    """Loss, per-block gradient and relative update sizes, and the `top` parameters with the largest gradients."""
    trainable = [p for p in model.parameters() if p.requires_grad]
    if model.dtype != torch.float32 or not trainable:
        return {"note": f"shown for models with trainable float32 weights; this one is {model.dtype} "
                        f"with {len(trainable)} trainable tensors."}
    was_training = model.training
    model.eval()  # no dropout: the step is the one the report's forward pass shows
    try:
        model.zero_grad(set_to_none=True)
        with torch.enable_grad():
            batch = torch.tensor([ids], device=model.device)
            loss = loss_sum("causal-lm", model(batch).logits, batch) / count_targets("causal-lm", batch)
            loss.backward()
        names = {id(p): name for name, p in model.named_parameters()}
        blocks = [module for module in model.modules() if isinstance(module, TransformerBlock)]
        per_block = []
        for index, block in enumerate(blocks):
            grads = [p.grad for p in block.parameters() if p.grad is not None]
            weights = [p for p in block.parameters() if p.grad is not None]
            gradient = float(torch.sqrt(sum((g.double() ** 2).sum() for g in grads))) if grads else 0.0
            weight = float(torch.sqrt(sum((w.detach().double() ** 2).sum() for w in weights))) if weights else 0.0
            per_block.append({"layer": index, "gradient_norm": gradient,
                              "relative_update": learning_rate * gradient / weight if weight else 0.0})
        largest = sorted(((float(p.grad.norm()), names[id(p)]) for p in trainable if p.grad is not None),
                         reverse=True)[:top]
    finally:
        model.zero_grad(set_to_none=True)
        model.train(was_training)
    loss = loss.detach()
    return {"loss": float(loss), "perplexity": float(torch.exp(loss)), "tokens": len(ids) - 1,
            "learning_rate": learning_rate, "blocks": per_block,
            "largest_gradients": [{"parameter": name, "gradient_norm": norm} for norm, name in largest]}
