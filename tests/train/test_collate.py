"""Collators: dynamic padding, packing into blocks, and BERT's 80/10/10 MLM masking."""

import pytest
import torch

from lmforge import AutoTokenizer
from lmforge.errors import InputError
from lmforge.train.collate import (
    IGNORE_INDEX,
    MLMCollator,
    PaddingCollator,
    pack_sequences,
)

PAD = 0


def examples(*rows):
    return [{"input_ids": list(row)} for row in rows]


# ----- padding --------------------------------------------------------------------------


def test_right_padding_shapes_masks_and_clm_labels():
    batch = PaddingCollator(PAD, causal_lm_labels=True)(examples([5, 6, 7], [8], [9, 10]))
    assert batch["input_ids"].tolist() == [[5, 6, 7], [8, PAD, PAD], [9, 10, PAD]]
    assert batch["attention_mask"].tolist() == [[1, 1, 1], [1, 0, 0], [1, 1, 0]]
    assert batch["labels"].tolist() == [[5, 6, 7], [8, -100, -100], [9, 10, -100]]
    assert all(t.dtype == torch.long for t in batch.values())
    assert "labels" not in PaddingCollator(PAD)(examples([1]))


def test_left_padding_keeps_the_last_token_real():
    batch = PaddingCollator(PAD, padding_side="left", causal_lm_labels=True)(examples([5, 6, 7], [8]))
    assert batch["input_ids"].tolist() == [[5, 6, 7], [PAD, PAD, 8]]
    assert batch["attention_mask"].tolist() == [[1, 1, 1], [0, 0, 1]]
    assert batch["labels"].tolist() == [[5, 6, 7], [-100, -100, 8]]


def test_padding_labels_use_the_mask_not_the_pad_id():
    # A decoder that pads with EOS (id 2) must still learn to predict its real EOS tokens.
    batch = PaddingCollator(2, causal_lm_labels=True)(examples([7, 2], [7, 8, 9, 2]))
    assert batch["labels"].tolist() == [[7, 2, -100, -100], [7, 8, 9, 2]]


def test_pad_to_multiple_of_and_other_fields():
    rows = [{"input_ids": [1, 2, 3], "token_type_ids": [0, 1, 1], "labels": 4},
            {"input_ids": [1] * 9, "token_type_ids": [1] * 9, "labels": 0}]
    batch = PaddingCollator(PAD, pad_to_multiple_of=8)(rows)
    assert batch["input_ids"].shape == (2, 16)
    assert batch["token_type_ids"][0].tolist() == [0, 1, 1] + [0] * 13
    assert batch["attention_mask"].sum(1).tolist() == [3, 9]
    assert batch["labels"].tolist() == [4, 0]  # one class label per example is stacked, not padded
    assert PaddingCollator(PAD, pad_to_multiple_of=8)(examples([1] * 8))["input_ids"].shape == (1, 8)


def test_padding_errors():
    with pytest.raises(InputError, match="padding_side"):
        PaddingCollator(PAD, padding_side="middle")
    with pytest.raises(InputError, match="same fields"):
        PaddingCollator(PAD)([{"input_ids": [1]}, {"input_ids": [1], "token_type_ids": [0]}])
    with pytest.raises(InputError, match="empty batch"):
        PaddingCollator(PAD)([])


# ----- packing --------------------------------------------------------------------------

EOS = 99


def test_packing_joins_documents_with_eos_and_drops_only_the_tail():
    documents = [list(range(1, 6)), list(range(10, 13)), list(range(20, 30)), [40]]
    stream = [*documents[0], EOS, *documents[1], EOS, *documents[2], EOS, 40, EOS]  # 23 tokens
    blocks = pack_sequences(documents, block_size=4, eos_token_id=EOS)
    assert len(blocks) == 23 // 4 == 5
    assert [token for block in blocks for token in block["input_ids"]] == stream[:20]
    assert all(len(block["input_ids"]) == 4 for block in blocks)
    assert all(block["labels"] == block["input_ids"] for block in blocks)
    assert blocks[1]["input_ids"] == [5, EOS, 10, 11]  # EOS right after each document, none at the start
    assert "position_ids" not in blocks[0]

    kept = pack_sequences(documents, block_size=4, eos_token_id=EOS, drop_last=False)
    assert len(kept) == 6 and kept[-1]["input_ids"] == [EOS, 40, EOS] and kept[:5] == blocks
    assert [token for block in kept for token in block["input_ids"]] == stream


def test_packing_position_ids_restart_after_each_eos():
    blocks = pack_sequences([[1, 2, 3], [4, 5], [6]], block_size=4, eos_token_id=EOS, drop_last=False,
                            reset_position_ids=True)
    assert [b["input_ids"] for b in blocks] == [[1, 2, 3, EOS], [4, 5, EOS, 6], [EOS]]
    assert [b["position_ids"] for b in blocks] == [[0, 1, 2, 3], [0, 1, 2, 0], [1]]


def test_a_kept_partial_block_is_padded_with_ignored_labels():
    blocks = pack_sequences([[1, 2, 3, 4, 5]], block_size=4, eos_token_id=EOS, drop_last=False,
                            reset_position_ids=True)
    batch = PaddingCollator(PAD)(blocks)
    assert batch["input_ids"].tolist() == [[1, 2, 3, 4], [5, EOS, PAD, PAD]]
    assert batch["labels"].tolist() == [[1, 2, 3, 4], [5, EOS, -100, -100]]
    assert batch["position_ids"].tolist() == [[0, 1, 2, 3], [4, 5, 0, 0]]


def test_packing_errors():
    with pytest.raises(InputError, match="do not fill one block of 8"):
        pack_sequences([[1, 2]], block_size=8, eos_token_id=EOS)
    with pytest.raises(InputError, match="no sequences"):
        pack_sequences([], block_size=8, eos_token_id=EOS)


# ----- MLM masking ----------------------------------------------------------------------

CLS, SEP, MASK, VOCAB = 1, 2, 3, 1000


def mlm(seed=0):
    return MLMCollator(mask_token_id=MASK, pad_token_id=PAD, vocab_size=VOCAB, special_token_ids=[CLS, SEP], seed=seed)


def random_batch(rows=200, seed=0):
    """[CLS] tokens... [SEP] rows of 900–1100 ordinary tokens (ids >= 4): ~200k tokens with padding."""
    generator = torch.Generator().manual_seed(seed)
    lengths = torch.randint(900, 1101, (rows,), generator=generator).tolist()
    return [{"input_ids": [CLS, *torch.randint(4, VOCAB, (n,), generator=generator).tolist(), SEP]}
            for n in lengths]


def test_mlm_proportions_follow_the_15_80_10_10_recipe():
    rows = random_batch()
    original = PaddingCollator(PAD)(rows)["input_ids"]
    batch = mlm()(rows)
    real = (batch["attention_mask"] == 1) & (original != CLS) & (original != SEP)
    assert real.sum() > 180_000
    selected = batch["labels"] != IGNORE_INDEX
    assert not (selected & ~real).any()
    assert torch.equal(batch["labels"][selected], original[selected])
    assert abs(selected.sum() / real.sum() - 0.15) < 0.005
    masked = selected & (batch["input_ids"] == MASK)
    unchanged = selected & (batch["input_ids"] == original)
    randomized = selected & ~masked & ~unchanged
    for part, expected in ((masked, 0.8), (randomized, 0.1), (unchanged, 0.1)):
        assert abs(part.sum() / selected.sum() - expected) < 0.015
    assert torch.equal(batch["input_ids"][~selected], original[~selected])  # nothing else changes
    random_tokens = batch["input_ids"][randomized]
    assert random_tokens.min() >= 4 and random_tokens.max() < VOCAB  # random tokens are ordinary ones


def test_special_tokens_and_padding_are_never_masked():
    rows = [{"input_ids": [CLS, SEP, CLS, SEP]}, {"input_ids": [CLS] + [7] * 50 + [SEP]}] * 20
    collator = MLMCollator(MASK, PAD, VOCAB, [CLS, SEP], mlm_probability=0.9)
    for _ in range(5):
        batch = collator(rows)
        selected = batch["labels"] != IGNORE_INDEX
        assert selected.any()
        original = PaddingCollator(PAD)(rows)["input_ids"]
        assert not selected[:, 0].any() and not selected[0::2].any()  # [CLS]/[SEP]-only rows and their padding
        assert not selected[(original == SEP) | (batch["attention_mask"] == 0)].any()
        assert (batch["input_ids"][batch["attention_mask"] == 0] == PAD).all()


def test_mlm_is_reproducible_with_a_seed():
    rows = random_batch(rows=8)
    first, second = mlm(seed=5), mlm(seed=5)
    a, b = first(rows), second(rows)
    assert torch.equal(a["input_ids"], b["input_ids"]) and torch.equal(a["labels"], b["labels"])
    assert not torch.equal(first(rows)["labels"], a["labels"])  # the generator moves on between batches
    assert not torch.equal(mlm(seed=6)(rows)["labels"], a["labels"])


def test_mlm_collator_from_a_bert_tokenizer_ignores_given_labels():
    tokenizer = AutoTokenizer.from_pretrained("all-minilm-l6-v2")
    collator = MLMCollator.from_tokenizer(tokenizer, mlm_probability=0.5, seed=0)
    assert collator.mask_token_id == tokenizer.token_to_id("[MASK]") and collator.pad_token_id == 0
    assert {tokenizer.token_to_id(t) for t in ("[CLS]", "[SEP]", "[UNK]")} <= set(collator.special_token_ids)
    ids = tokenizer.encode("the quick brown fox jumps over the lazy dog " * 4)
    batch = collator([{"input_ids": ids, "labels": 1}])
    assert batch["labels"].shape == batch["input_ids"].shape
    assert batch["labels"][0, 0] == batch["labels"][0, -1] == IGNORE_INDEX
    with pytest.raises(InputError, match="no '<mask>' token"):
        MLMCollator.from_tokenizer(tokenizer, mask_token="<mask>")
