"""Token-by-token generation: sampling parameters, logits processors, sampler, stop rules, streaming.

    from lmforge.generation import SamplingParams, generate, stream
    generate(model, tokenizer, "Hello", SamplingParams(temperature=0, max_tokens=20))
"""

from lmforge.generation.chat import ChatHistory
from lmforge.generation.generate import (
           CompletionOutput,
           RequestOutput,
           generate,
           stream,
)
from lmforge.generation.processors import LogitsPipeline, LogitsProcessor, SequenceState
from lmforge.generation.sampler import Sampler, TokenLogprob
from lmforge.generation.sampling_params import SamplingParams

__all__ = ["ChatHistory", "CompletionOutput", "RequestOutput", "generate", "stream", "LogitsPipeline", "LogitsProcessor",
           "SequenceState", "Sampler", "TokenLogprob", "SamplingParams"]
