"""Architectures assembled from `lmforge.nn`; importing this package registers them all."""

from lmforge.models import llama  # noqa: F401
