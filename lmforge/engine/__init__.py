"""The serving engine: many requests share one model through a paged KV cache and continuous batching.

`sequence` holds one generation stream, `block_manager` maps its tokens to fixed-size KV-cache
blocks (prefix caching, copy-on-write forks), `scheduler` picks each step's batch (continuous
batching, chunked prefill, preemption), `model_runner` runs it as one packed forward pass,
`llm_engine` samples and streams, and `llm` is the offline `LLM(...).generate(...)` interface.
"""

from lmforge.engine.config import EngineConfig
from lmforge.engine.llm import LLM
from lmforge.engine.llm_engine import EngineStats, LLMEngine
from lmforge.engine.tensor_parallel import run_tensor_parallel_worker

__all__ = ["LLM", "EngineConfig", "EngineStats", "LLMEngine", "run_tensor_parallel_worker"]
