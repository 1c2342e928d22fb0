"""Model evaluation: how well a model predicts held-out text."""

from lmforge.evaluation.perplexity import PerplexityResult, perplexity

__all__ = ["PerplexityResult", "perplexity"]
