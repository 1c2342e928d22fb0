"""Explain: the transformer's work on one prompt made visible — tokens, architecture and sampling decisions."""
