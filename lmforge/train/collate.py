"""Collators: from a list of tokenized examples to the rectangular tensors of one batch.

Three ways to make a batch out of sequences of different lengths: pad each
batch to its longest sequence (`PaddingCollator`); pack a token stream into
fixed-length blocks so no compute is spent on padding (`pack_sequences`, for
causal-LM pretraining); and mask tokens for masked-LM pretraining
(`MLMCollator`, BERT's 80/10/10 recipe). Labels use -100 wherever the loss must
not look: that is the `ignore_index` of `torch.nn.functional.cross_entropy`.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch

from lmforge.errors import InputError
from lmforge.tokenizer import Tokenizer

IGNORE_INDEX = -100  # cross_entropy's default ignore_index: label positions the loss skips


@dataclass
class PaddingCollator:
    """Pad a batch to its longest sequence ("dynamic padding").

    Padding every batch to the model's maximum length wastes compute on
    padding; padding to the longest sequence of *this* batch wastes far less.
    `pad_to_multiple_of` (e.g. 8) rounds the width up, which suits GPU tensor
    cores and gives torch.compile fewer distinct shapes. Decoders batched for
    generation pad on the left (`padding_side="left"`) so every row ends with a
    real token.

    Per-token fields are padded with what they mean there: `input_ids` with
    `pad_token_id`, `attention_mask` with 0 (the model ignores the position),
    `labels` with -100 (the loss ignores it), anything else (`token_type_ids`,
    `position_ids`) with 0. An integer `labels` (classification) is stacked.
    With `causal_lm_labels=True` and no labels given, `labels` is a copy of
    `input_ids` (the loss shifts by one: position t predicts token t+1) with
    -100 on padding.
    """

    pad_token_id: int
    padding_side: str = "right"
    pad_to_multiple_of: int | None = None
    causal_lm_labels: bool = False

    def __post_init__(self) -> None:
        if self.padding_side not in ("left", "right"):
            raise InputError(f"padding_side must be 'left' or 'right', got {self.padding_side!r}.")
        if self.pad_to_multiple_of is not None and self.pad_to_multiple_of < 1:
            raise InputError(f"pad_to_multiple_of must be >= 1, got {self.pad_to_multiple_of}.")

    def __call__(self, examples: Sequence[dict[str, Any]]) -> dict[str, torch.Tensor]:
        if not examples:
            raise InputError("cannot collate an empty batch.")
        if any("input_ids" not in example for example in examples):
            raise InputError("every example needs 'input_ids' (see lmforge.train.data.tokenize_documents).")
        lengths = [len(example["input_ids"]) for example in examples]
        width = max(lengths)
        if self.pad_to_multiple_of:
            width = -(-width // self.pad_to_multiple_of) * self.pad_to_multiple_of
        rows = [{"attention_mask": [1] * length, **example} for example, length in zip(examples, lengths)]
        for row in rows[1:]:
            if row.keys() != rows[0].keys():
                raise InputError(f"examples of one batch must have the same fields; got {sorted(rows[0])} and "
                                 f"{sorted(row)}.")
        if self.causal_lm_labels and "labels" not in rows[0]:
            rows = [{**row, "labels": row["input_ids"]} for row in rows]
        batch = {}
        for name in rows[0]:
            values = [row[name] for row in rows]
            if isinstance(values[0], (int, float)):  # one value per example, e.g. a class label
                batch[name] = torch.tensor(values)
            else:
                batch[name] = self._pad([list(value) for value in values], width, self._pad_value(name))
        return batch

    def _pad_value(self, name: str) -> int:
        return {"input_ids": self.pad_token_id, "labels": IGNORE_INDEX}.get(name, 0)

    def _pad(self, rows: list[list[int]], width: int, value: int) -> torch.Tensor:
        out = torch.full((len(rows), width), value, dtype=torch.long)
        for index, row in enumerate(rows):
            if row:
                span = slice(width - len(row), width) if self.padding_side == "left" else slice(0, len(row))
                out[index, span] = torch.tensor(row, dtype=torch.long)
        return out


def pack_sequences(sequences: Iterable[Sequence[int]], block_size: int, eos_token_id: int,
                   drop_last: bool = True, reset_position_ids: bool = False) -> list[dict[str, list[int]]]:
    """Concatenate documents into one token stream and cut it into blocks of `block_size` tokens.

    Packing is how causal LMs are pretrained: no padding, so every position of
    every block trains the model. An EOS token after each document marks where
    one text ends and the next, unrelated one begins; the model learns to
    predict the end of a text, and not to carry context across the boundary
    as if it were one story. A block may start mid-document: that is fine, the
    model simply sees less context there.

    `labels` equal `input_ids` (the loss shifts them by one). The last, partial
    block is dropped (`drop_last=True`, the usual choice: all blocks equal)
    or kept shorter, in which case `PaddingCollator` pads it with -100 labels.
    With `reset_position_ids=True`, `position_ids` restart at 0 after each EOS,
    so each document sees the positions it would have alone (attention can
    still cross the boundary unless the model uses a per-document mask).
    """
    if block_size < 1:
        raise InputError(f"block_size must be >= 1, got {block_size}.")
    stream: list[int] = []
    positions: list[int] = []
    for sequence in sequences:
        document = [*sequence, eos_token_id]
        stream.extend(document)
        positions.extend(range(len(document)))
    if not stream:
        raise InputError("no sequences to pack; pass at least one tokenized document.")
    end = len(stream) - len(stream) % block_size if drop_last else len(stream)
    if end == 0:
        raise InputError(f"the {len(stream)} tokens (with EOS) do not fill one block of {block_size}; lower "
                         "block_size, add data, or pass drop_last=False.")
    blocks = []
    for start in range(0, end, block_size):
        ids = stream[start:min(start + block_size, end)]
        block = {"input_ids": ids, "attention_mask": [1] * len(ids), "labels": list(ids)}
        if reset_position_ids:
            block["position_ids"] = positions[start:start + len(ids)]
        blocks.append(block)
    return blocks


@dataclass
class MLMCollator:
    """Pad a batch, then corrupt it for masked-language-model pretraining (BERT's recipe).

    Each real, non-special token is selected with probability
    `mlm_probability` (15%); the model must predict the original token at the
    selected positions, so `labels` hold it there and -100 everywhere else. Of
    the selected tokens, 80% become the mask token, 10% a random token and 10%
    stay unchanged. Why not always [MASK]? Fine-tuning and inference never see
    [MASK], so a model trained only on masks would learn nothing useful about
    the real tokens at those positions; random and unchanged tokens make it
    keep a good representation of every token, because any token might be one
    it has to check. Special tokens ([CLS], [SEP]) and padding are never
    selected: predicting them teaches nothing.

    Randomness comes from a `torch.Generator` seeded with `seed`: two collators
    with the same seed produce the same masks for the same batches.
    """

    mask_token_id: int
    pad_token_id: int
    vocab_size: int
    special_token_ids: Sequence[int] = ()
    mlm_probability: float = 0.15
    seed: int = 0
    pad_to_multiple_of: int | None = None
    generator: torch.Generator = field(init=False, repr=False)

    def __post_init__(self) -> None:
        if not 0 < self.mlm_probability < 1:
            raise InputError(f"mlm_probability must be between 0 and 1, got {self.mlm_probability}.")
        self.generator = torch.Generator().manual_seed(self.seed)
        self._padding = PaddingCollator(self.pad_token_id, pad_to_multiple_of=self.pad_to_multiple_of)
        self._special = torch.tensor(sorted({*self.special_token_ids, self.mask_token_id, self.pad_token_id}))
        vocabulary = torch.arange(self.vocab_size)
        self._random_candidates = vocabulary[~torch.isin(vocabulary, self._special)]  # only ordinary tokens

    @classmethod
    def from_tokenizer(cls, tokenizer: Tokenizer, mask_token: str = "[MASK]", **options: Any) -> MLMCollator:
        """Take the mask, padding and special token ids (every added special token) from a tokenizer."""
        mask_id = tokenizer.token_to_id(mask_token)
        if mask_id is None:
            raise InputError(f"the tokenizer has no {mask_token!r} token; train one with objective='mlm' or pass "
                             "mask_token=... .")
        special = [index for index, token in tokenizer.backend.get_added_tokens_decoder().items() if token.special]
        pad_id = tokenizer.pad_token_id
        if pad_id is None:
            raise InputError("the tokenizer has no pad token; set tokenizer.special_tokens['pad'].")
        return cls(mask_id, pad_id, tokenizer.vocab_size, special, **options)

    def __call__(self, examples: Sequence[dict[str, Any]]) -> dict[str, torch.Tensor]:
        batch = self._padding([{k: v for k, v in example.items() if k != "labels"} for example in examples])
        input_ids = batch["input_ids"]
        candidates = batch["attention_mask"].bool() & ~torch.isin(input_ids, self._special)
        draw = torch.rand(input_ids.shape, generator=self.generator)
        selected = candidates & (draw < self.mlm_probability)
        # One uniform draw per selected token decides its fate: < 0.8 mask, < 0.9 random, else unchanged.
        fate = torch.rand(input_ids.shape, generator=self.generator)
        masked = selected & (fate < 0.8)
        randomized = selected & (fate >= 0.8) & (fate < 0.9)
        random_ids = self._random_candidates[torch.randint(len(self._random_candidates), input_ids.shape,
                                                           generator=self.generator)]
        batch["labels"] = torch.where(selected, input_ids, IGNORE_INDEX)
        batch["input_ids"] = torch.where(masked, self.mask_token_id, torch.where(randomized, random_ids, input_ids))
        return batch
