"""lmforge: a hackable transformer stack — models, checkpoints, generation, training, serving."""

from lmforge.errors import LMForgeError
from lmforge.registry import (
    AutoConfig,
    AutoModel,
    AutoModelForCausalLM,
    AutoModelForMaskedLM,
    AutoModelForSeq2SeqLM,
    AutoModelForSequenceClassification,
    AutoModelForTokenClassification,
    AutoTokenizer,
)

__version__ = "0.1.0"

__all__ = [
    "LMForgeError", "AutoConfig", "AutoModel", "AutoModelForCausalLM", "AutoModelForMaskedLM",
    "AutoModelForSeq2SeqLM", "AutoModelForSequenceClassification", "AutoModelForTokenClassification",
    "AutoTokenizer",
]
