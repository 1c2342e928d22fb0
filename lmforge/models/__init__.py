"""Architectures assembled from `lmforge.nn`; importing this package registers them all."""

from lmforge.models import llama  # noqa: F401
from lmforge.models import gpt2  # noqa: F401
from lmforge.models import bert  # noqa: F401
from lmforge.models import bart  # noqa: F401
