"""Architectures assembled from `lmforge.nn`; importing this package registers them all."""

from lmforge.models import (
    bart,  # noqa: F401
    bert,  # noqa: F401
    gpt2,  # noqa: F401
    llama,  # noqa: F401
)
