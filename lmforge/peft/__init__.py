"""Fine-tuning methods that choose which parameters learn: full, frozen backbone, partial, adapters.

`freezing` holds the methods and the trainable-parameter summary; `adapters` the bottleneck
adapters injected after attention and feed-forward layers; `checkpoint` adapter-only folders;
`lora` low-rank updates of frozen (or quantized: QLoRA) linear layers, `lora_files` their
PEFT-format adapter folders; `virtual_tokens` prompt and prefix tuning; `peft_folders` PEFT adapter
folders of any of these kinds.
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
from lmforge.peft.lora import (
    ALL_LINEAR,
    LoraConfig,
    add_lora,
    lora_disabled,
    merge_and_unload,
    merge_lora,
    set_lora_enabled,
    unmerge_lora,
)
from lmforge.peft.lora_files import load_lora, save_lora
from lmforge.peft.peft_folders import load_peft_adapter, peft_type, save_peft_adapter
from lmforge.peft.virtual_tokens import (
    PrefixTuningConfig,
    PromptTuningConfig,
    add_prefix_tuning,
    add_prompt_tuning,
)

__all__ = [
    "ALL_LINEAR",
    "LoraConfig",
    "add_lora",
    "load_lora",
    "load_peft_adapter",
    "lora_disabled",
    "merge_and_unload",
    "merge_lora",
    "save_lora",
    "save_peft_adapter",
    "peft_type",
    "PrefixTuningConfig",
    "PromptTuningConfig",
    "add_prefix_tuning",
    "add_prompt_tuning",
    "set_lora_enabled",
    "unmerge_lora",
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
