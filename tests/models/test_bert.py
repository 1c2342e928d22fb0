"""BERT parity with HF transformers: tiny random models for every head, and the real all-MiniLM-L6-v2."""

import logging

import pytest
import torch
import torch.nn.functional as F
import transformers
from tokenizers import Tokenizer

import lmforge
from lmforge.config import BertConfig
from lmforge.errors import InputError
from lmforge.models.bert import BertForSequenceClassification, BertModel
from lmforge.sources import resolve
from tests.parity import max_abs_diff, ours_from_hf, padded_batch

TINY = dict(vocab_size=97, hidden_size=64, intermediate_size=96, num_hidden_layers=2, num_attention_heads=4,
            max_position_embeddings=32, type_vocab_size=2, pad_token_id=0)

SENTENCES = [
    "A man is playing a guitar.",
    "Someone is strumming an instrument on stage.",
    "The quarterly report shows revenue grew by 12 percent, driven mostly by strong sales in Asia.",
    "Hi!",
]


def hf_bert(cls_name: str, **overrides):
    torch.manual_seed(0)
    config = transformers.BertConfig(**{**TINY, **overrides})
    config._attn_implementation = "eager"
    model = getattr(transformers, cls_name)(config).eval()
    with torch.no_grad():  # HF starts norms at 1 and biases at 0; make them matter
        for name, p in model.named_parameters():
            if "LayerNorm.weight" in name:
                torch.nn.init.uniform_(p, 0.5, 1.5)
            elif name.endswith("bias"):
                torch.nn.init.normal_(p, std=0.1)
    return model


def padded_inputs():
    """A right-padded batch (BERT's convention) with two segments per row."""
    ids, mask = padded_batch(TINY["vocab_size"], [9, 5, 7], left=False)
    token_types = torch.zeros_like(ids)
    token_types[:, 3:] = 1
    return ids, mask, token_types * mask


@pytest.mark.parametrize("implementation", ["eager", "sdpa"])
@pytest.mark.parametrize("task,cls_name", [("base", "BertModel"), ("masked-lm", "BertForMaskedLM"),
                                           ("sequence-classification", "BertForSequenceClassification"),
                                           ("token-classification", "BertForTokenClassification")])
def test_heads_match_hf(task, cls_name, implementation):
    hf = hf_bert(cls_name, num_labels=3)
    ours = ours_from_hf(hf, task, implementation)
    ids, mask, token_types = padded_inputs()
    with torch.no_grad():
        expected = hf(ids, attention_mask=mask, token_type_ids=token_types)
        got = ours(ids, attention_mask=mask, token_type_ids=token_types)
    real = mask.bool()  # outputs at padding positions are meaningless
    if task == "base":
        assert max_abs_diff(got.last_hidden_state[real], expected.last_hidden_state[real]) <= 1e-4
        assert max_abs_diff(got.pooler_output, expected.pooler_output) <= 1e-4
    elif task == "sequence-classification":
        assert max_abs_diff(got.logits, expected.logits) <= 1e-4
    else:
        assert max_abs_diff(got.logits[real], expected.logits[real]) <= 1e-4


def test_masked_lm_ties_decoder_to_embeddings():
    ours = ours_from_hf(hf_bert("BertForMaskedLM"), "masked-lm")
    assert ours.lm_head.weight is ours.model.embed_tokens.weight
    assert ours.model.pooler is None  # like HF, the masked-LM head does without the pooler


def test_padding_does_not_change_real_tokens():
    ours = ours_from_hf(hf_bert("BertModel"), "base")
    ids, mask, _ = padded_inputs()
    with torch.no_grad():
        batched = ours(ids, attention_mask=mask).last_hidden_state[1, :5]
        alone = ours(ids[1:, :5]).last_hidden_state[0]
    assert max_abs_diff(batched, alone) <= 1e-5


def test_checkpoint_without_pooler_loads_with_a_warning(caplog):
    mlm_state = hf_bert("BertForMaskedLM").state_dict()  # HF's masked-LM model has no pooler
    config = BertConfig(**TINY)
    with caplog.at_level(logging.WARNING, logger="lmforge.models.base"):
        for cls in (BertModel, BertForSequenceClassification):
            cls.from_hf_state_dict(config.to_dict(), mlm_state, "mlm-checkpoint")
    assert "pooler.dense.weight" in caplog.text


def test_too_long_input_is_a_clear_error():
    model = BertModel(BertConfig(**{**TINY, "max_position_embeddings": 8}))
    with pytest.raises(InputError, match="at most 8 positions"):
        model(torch.ones(1, 9, dtype=torch.long))


def test_save_pretrained_round_trips(tmp_path):
    ours = ours_from_hf(hf_bert("BertForMaskedLM"), "masked-lm")
    ours.save_pretrained(tmp_path)
    ids, mask, token_types = padded_inputs()
    real = mask.bool()
    with torch.no_grad():
        expected = ours(ids, attention_mask=mask, token_type_ids=token_types).logits
        hf = transformers.BertForMaskedLM.from_pretrained(tmp_path, attn_implementation="eager").eval()
        assert max_abs_diff(hf(ids, attention_mask=mask, token_type_ids=token_types).logits[real],
                            expected[real]) <= 1e-4
        reloaded = lmforge.AutoModelForMaskedLM.from_pretrained(tmp_path)
        assert torch.equal(reloaded(ids, attention_mask=mask, token_type_ids=token_types).logits, expected)


# ----- the real all-MiniLM-L6-v2 sentence encoder -------------------------------------------------


@pytest.fixture(scope="module")
def minilm():
    folder = resolve("all-minilm-l6-v2")
    tokenizer = Tokenizer.from_file(str(folder / "tokenizer.json"))
    tokenizer.enable_padding(pad_id=0, pad_token="[PAD]")
    encodings = tokenizer.encode_batch(SENTENCES)
    ids = torch.tensor([e.ids for e in encodings])
    mask = torch.tensor([e.attention_mask for e in encodings])
    ours = lmforge.AutoModel.from_pretrained("all-minilm-l6-v2")
    hf = transformers.AutoModel.from_pretrained(folder).eval()
    return ours, hf, ids, mask


def test_minilm_sentence_embeddings_match_hf(minilm):
    ours, hf, ids, mask = minilm
    assert mask.sum(1).min() < ids.shape[1]  # the batch really is padded
    with torch.no_grad():
        got = ours.embed(ids, mask)
        hidden = hf(ids, attention_mask=mask).last_hidden_state
    weights = mask[..., None].float()
    expected = F.normalize((hidden * weights).sum(1) / weights.sum(1), dim=-1)
    assert F.cosine_similarity(got, expected).min() > 0.9999
    assert max_abs_diff(got, expected) <= 1e-4


def test_minilm_embeddings_capture_meaning(minilm):
    ours, _, ids, mask = minilm
    with torch.no_grad():
        embeddings = ours.embed(ids, mask)
    similarity = embeddings @ embeddings.T
    assert torch.allclose(similarity.diagonal(), torch.ones(len(SENTENCES)), atol=1e-5)  # unit length
    assert similarity[0, 1] > similarity[0, 2] + 0.2  # two guitar sentences vs. a finance report
