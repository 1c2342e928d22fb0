"""The token economy: what a prompt costs, and which part of a conversation to send within a budget."""

from lmforge.context.accounting import (
           ChatCount,
           MessageCount,
           Prices,
           count_chat,
           count_text,
)
from lmforge.context.strategies import ContextPolicy, SelectedContext, select_context

__all__ = ["ChatCount", "ContextPolicy", "MessageCount", "Prices", "SelectedContext", "count_chat", "count_text",
           "select_context"]
