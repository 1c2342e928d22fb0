"""Model evaluation: how well a model predicts held-out text, and how often it answers a task exactly."""

from lmforge.evaluation.exact_match import (
    ExactMatchResult,
    evaluate_exact_match,
    few_shot_history,
)
from lmforge.evaluation.perplexity import PerplexityResult, perplexity

__all__ = ["ExactMatchResult", "PerplexityResult", "evaluate_exact_match", "few_shot_history", "perplexity"]
