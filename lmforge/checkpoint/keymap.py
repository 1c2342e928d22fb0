"""Translate parameter names between lmforge's module tree and Hugging Face's.

lmforge keeps one canonical tree for every architecture (q_proj/k_proj/v_proj/
o_proj, attn_norm/mlp_norm, ...). Each model declares prefix rules
`(ours, hf)` where `*` stands for a layer number; the first rule whose prefix
matches rewrites the start of the name and keeps the rest. Names no rule
matches are the same on both sides.
"""

from __future__ import annotations

import re
from dataclasses import dataclass


def _compile(prefix: str) -> re.Pattern:
    return re.compile("^" + re.escape(prefix).replace(r"\*", r"(\d+)"))


def _fill(template: str, numbers: tuple[str, ...]) -> str:
    for number in numbers:
        template = template.replace("*", number, 1)
    return template


@dataclass(frozen=True)
class KeyMap:
    rules: tuple[tuple[str, str], ...] = ()

    def _translate(self, key: str, to_hf: bool) -> str:
        for ours, hf in self.rules:
            source, target = (ours, hf) if to_hf else (hf, ours)
            match = _compile(source).match(key)
            if match:
                return _fill(target, match.groups()) + key[match.end():]
        return key

    def to_hf(self, key: str) -> str:
        return self._translate(key, to_hf=True)

    def from_hf(self, key: str) -> str:
        return self._translate(key, to_hf=False)

    def prefixed(self, ours: str, hf: str) -> "KeyMap":
        """The same rules for a tree nested under `ours.` here and `hf.` in HF."""
        join = lambda prefix, rest: f"{prefix}.{rest}" if prefix else rest
        rules = tuple((join(ours, a), join(hf, b)) for a, b in self.rules) + ((join(ours, ""), join(hf, "")),)
        return KeyMap(rules)

    def __add__(self, other: "KeyMap") -> "KeyMap":
        return KeyMap(self.rules + other.rules)


@dataclass(frozen=True)
class StoredTensor:
    """Where one of our tensors lives in an HF checkpoint, for readers that fetch slices of it.

    `name` is the checkpoint tensor; `transposed` says it is stored [in, out] (GPT-2's Conv1D) where we
    hold [out, in]; `rows` is the [start, stop) range of our first dimension inside a fused tensor
    (q, k and v as thirds of GPT-2's c_attn), None when the tensor is ours alone.
    """

    name: str
    transposed: bool = False
    rows: tuple[int, int] | None = None
