"""lmforge: a hackable transformer stack — models, checkpoints, generation, training, serving."""

from lmforge.engine import LLM, EngineConfig, LLMEngine
from lmforge.errors import LMForgeError
from lmforge.generation.sampling_params import SamplingParams
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


def generate(model, tokenizer, prompts, params=None):
    """Complete prompts with `model` (see lmforge.generation.generate)."""
    from lmforge.generation import generate as _generate

    return _generate(model, tokenizer, prompts, params)


def stream(model, tokenizer, prompt, params=None):
    """Yield the completion of one prompt as text deltas (see lmforge.generation.stream)."""
    from lmforge.generation import stream as _stream

    return _stream(model, tokenizer, prompt, params)

__all__ = [
    "LMForgeError", "AutoConfig", "AutoModel", "AutoModelForCausalLM", "AutoModelForMaskedLM",
    "AutoModelForSeq2SeqLM", "AutoModelForSequenceClassification", "AutoModelForTokenClassification",
    "AutoTokenizer", "generate", "stream", "LLM", "LLMEngine", "EngineConfig", "SamplingParams",
]
