"""Fine-tuning methods that choose which parameters learn: full, frozen backbone, partial, adapters.

`freezing` holds the methods and the trainable-parameter summary; `adapters` the bottleneck
adapters injected after attention and feed-forward layers; `checkpoint` adapter-only folders.
See docs/training.md ("Fine-tuning").
"""

from lmforge.peft.adapters import AdapterLinear, BottleneckAdapter, add_adapters
from lmforge.peft.checkpoint import load_adapters, save_adapters
from lmforge.peft.freezing import (
    METHODS,
    TrainableSummary,
    adapter_tuning,
    apply_method,
    feature_extraction,
    full_finetuning,
    partial_finetuning,
    trainable_summary,
)

__all__ = [
    "METHODS",
    "AdapterLinear",
    "BottleneckAdapter",
    "TrainableSummary",
    "adapter_tuning",
    "add_adapters",
    "apply_method",
    "feature_extraction",
    "full_finetuning",
    "load_adapters",
    "partial_finetuning",
    "save_adapters",
    "trainable_summary",
]
