"""BART parity with HF transformers on tiny random encoder–decoder models (padding, tying, heads, save/load)."""

import pytest
import torch
import transformers
from safetensors.torch import load_file

from lmforge.config import BartConfig
from lmforge.errors import InputError
from lmforge.models.bart import BartForConditionalGeneration, shift_tokens_right
from tests.parity import max_abs_diff, ours_from_hf, padded_batch

TINY = dict(vocab_size=97, d_model=32, encoder_layers=2, decoder_layers=2, encoder_attention_heads=4,
            decoder_attention_heads=2, encoder_ffn_dim=48, decoder_ffn_dim=40, max_position_embeddings=32,
            pad_token_id=1, bos_token_id=0, eos_token_id=2, decoder_start_token_id=2)
PAD, EOS = 1, 2


def hf_bart(cls_name="BartForConditionalGeneration", **overrides):
    torch.manual_seed(0)
    config = transformers.BartConfig(**{**TINY, **overrides})
    config._attn_implementation = "eager"
    model = getattr(transformers, cls_name)(config).eval()
    with torch.no_grad():  # norms start at (1, 0) and the logit bias at 0; make them matter
        for name, p in model.named_parameters():
            if ("layer_norm" in name or "layernorm" in name) and name.endswith("weight"):
                torch.nn.init.uniform_(p, 0.5, 1.5)
            elif "layer_norm" in name or "layernorm" in name:
                torch.nn.init.normal_(p, std=0.1)
        if hasattr(model, "final_logits_bias"):
            model.final_logits_bias.normal_(std=0.1)
    return model


def sentences(lengths: list[int], seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Right-padded ids ending in EOS, without stray special tokens (BART's classifier needs one EOS per row)."""
    ids, mask = padded_batch(TINY["vocab_size"], lengths, left=False, seed=seed, pad_id=PAD)
    ids = torch.where((ids <= EOS) & mask.bool(), ids + 3, ids)
    ids[torch.arange(len(lengths)), torch.tensor(lengths) - 1] = EOS
    return ids, mask


@pytest.mark.parametrize("scale_embedding", [False, True], ids=["unscaled", "scaled"])
@pytest.mark.parametrize("implementation", ["eager", "sdpa"])
def test_seq2seq_padded_batches_match_hf(implementation, scale_embedding):
    hf = hf_bart(scale_embedding=scale_embedding)
    ours = ours_from_hf(hf, "seq2seq-lm", implementation)
    ids, mask = sentences([9, 5, 7], seed=0)
    targets, target_mask = sentences([6, 3, 4], seed=1)
    inputs = dict(input_ids=ids, attention_mask=mask, decoder_input_ids=targets, decoder_attention_mask=target_mask)
    with torch.no_grad():
        expected, got = hf(**inputs), ours(**inputs)
    real_source, real_target = mask.bool(), target_mask.bool()  # states at padding positions are meaningless
    assert max_abs_diff(got.logits[real_target], expected.logits[real_target]) <= 1e-4
    assert max_abs_diff(got.encoder_last_hidden_state[real_source],
                        expected.encoder_last_hidden_state[real_source]) <= 1e-4


def test_default_decoder_inputs_are_shifted_input_ids():
    hf = hf_bart()
    ours = ours_from_hf(hf, "seq2seq-lm")
    ids = torch.randint(3, TINY["vocab_size"], (2, 8))
    with torch.no_grad():
        assert max_abs_diff(ours(ids).logits, hf(ids).logits) <= 1e-4


def test_shift_tokens_right_matches_hf():
    labels = torch.tensor([[5, 6, 7, EOS], [8, EOS, -100, -100]])
    expected = transformers.models.bart.modeling_bart.shift_tokens_right(labels, PAD, EOS)
    assert torch.equal(shift_tokens_right(labels, PAD, EOS), expected)


def test_base_model_matches_hf():
    hf = hf_bart("BartModel")
    ours = ours_from_hf(hf, "base")
    ids, mask = sentences([8, 5], seed=2)
    targets, target_mask = sentences([4, 6], seed=3)
    with torch.no_grad():
        expected = hf(ids, attention_mask=mask, decoder_input_ids=targets, decoder_attention_mask=target_mask)
        got = ours(ids, attention_mask=mask, decoder_input_ids=targets, decoder_attention_mask=target_mask)
    assert max_abs_diff(got.last_hidden_state[target_mask.bool()],
                        expected.last_hidden_state[target_mask.bool()]) <= 1e-4
    assert max_abs_diff(got.encoder_last_hidden_state[mask.bool()],
                        expected.encoder_last_hidden_state[mask.bool()]) <= 1e-4


def test_precomputed_encoder_states_give_the_same_logits():
    ours = ours_from_hf(hf_bart(), "seq2seq-lm")
    ids, mask = sentences([7, 4], seed=4)
    targets = torch.randint(3, TINY["vocab_size"], (2, 5))
    with torch.no_grad():
        full = ours(ids, mask, decoder_input_ids=targets).logits
        reused = ours(attention_mask=mask, decoder_input_ids=targets,
                      encoder_hidden_states=ours.model.encode(ids, mask)).logits
    assert torch.equal(full, reused)


def test_tied_embeddings_share_storage():
    ours = ours_from_hf(hf_bart(), "seq2seq-lm")
    shared = ours.model.shared.weight
    assert ours.lm_head.weight is shared
    assert ours.model.encoder.embed_tokens.weight is shared and ours.model.decoder.embed_tokens.weight is shared


def test_untied_embeddings_match_hf():
    hf = hf_bart(tie_word_embeddings=False)
    ours = ours_from_hf(hf, "seq2seq-lm")
    assert ours.lm_head.weight is not ours.model.shared.weight
    ids = torch.randint(3, TINY["vocab_size"], (2, 6))
    targets = torch.randint(3, TINY["vocab_size"], (2, 5))
    with torch.no_grad():
        assert max_abs_diff(ours(ids, decoder_input_ids=targets).logits,
                            hf(ids, decoder_input_ids=targets).logits) <= 1e-4


def test_sequence_classification_matches_hf():
    hf = hf_bart("BartForSequenceClassification", num_labels=3)
    ours = ours_from_hf(hf, "sequence-classification")
    ids, mask = sentences([9, 5, 7], seed=5)
    with torch.no_grad():
        assert max_abs_diff(ours(ids, mask).logits, hf(ids, attention_mask=mask).logits) <= 1e-4
    with pytest.raises(InputError, match="end-of-sequence"):
        ours(torch.full((1, 4), 5))


def test_save_pretrained_loads_in_hf_and_back(tmp_path):
    hf = hf_bart()
    ours = ours_from_hf(hf, "seq2seq-lm")
    ours.save_pretrained(tmp_path)
    saved = load_file(str(tmp_path / "model.safetensors"))
    assert "model.shared.weight" in saved and "final_logits_bias" in saved
    assert not {"lm_head.weight", "model.encoder.embed_tokens.weight"} & set(saved)  # tied copies are not stored

    ids, mask = sentences([6, 4], seed=6)
    targets = torch.randint(3, TINY["vocab_size"], (2, 5))
    reloaded_hf = transformers.BartForConditionalGeneration.from_pretrained(tmp_path).eval()
    reloaded = BartForConditionalGeneration.from_pretrained(tmp_path)
    with torch.no_grad():
        expected = ours(ids, mask, decoder_input_ids=targets).logits
        assert max_abs_diff(reloaded_hf(ids, attention_mask=mask, decoder_input_ids=targets).logits, expected) <= 1e-5
        assert torch.equal(reloaded(ids, mask, decoder_input_ids=targets).logits, expected)


def test_bare_backbone_checkpoint_loads_into_seq2seq(caplog):
    hf = hf_bart("BartModel")
    ours = ours_from_hf(hf, "seq2seq-lm")  # no lm_head, no final_logits_bias: tied and defaulted
    assert "randomly initialised" not in caplog.text
    assert torch.equal(ours.model.shared.weight, hf.shared.weight)
    assert not ours.final_logits_bias.any()


def test_too_long_input_is_a_clear_error():
    model = BartForConditionalGeneration(BartConfig(**{**TINY, "max_position_embeddings": 8}))
    with pytest.raises(InputError, match="at most 8 positions"):
        model(torch.full((1, 9), 5))
    with pytest.raises(InputError, match="at most 8 positions"):
        model(torch.full((1, 4), 5), decoder_input_ids=torch.full((1, 9), 5))
