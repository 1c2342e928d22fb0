"""The token economy: what a prompt costs, and which part of a conversation to send within a budget."""

from lmforge.context.accounting import (
           ChatCount,
           MessageCount,
           Prices,
           count_chat,
           count_text,
)
from lmforge.context.state import StatefulContext
from lmforge.context.strategies import ContextPolicy, SelectedContext, select_context
from lmforge.context.summary import SummarizedContext

CONDENSING = {"summarize": SummarizedContext, "state": StatefulContext}
"""The strategies in which the model condenses the older exchanges (beside strategies.STRATEGIES, which only
choose messages), and their classes."""

__all__ = ["CONDENSING", "ChatCount", "ContextPolicy", "MessageCount", "Prices", "SelectedContext",
           "StatefulContext", "SummarizedContext", "count_chat", "count_text", "select_context"]
