"""The serving engine: many requests share one model through a paged KV cache and continuous batching.

`sequence` holds one request's tokens and state, `block_manager` maps its tokens to fixed-size
KV-cache blocks (with prefix caching and copy-on-write forks); the scheduler, model runner and
engine that drive them build on these two pure-Python pieces.
"""
