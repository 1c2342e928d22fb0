"""The token economy: what a prompt costs, and (to come) how to keep a conversation within a budget."""

from lmforge.context.accounting import ChatCount, MessageCount, Prices, count_chat, count_text

__all__ = ["ChatCount", "MessageCount", "Prices", "count_chat", "count_text"]
