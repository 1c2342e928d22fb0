"""RAG embeddings: the batched, length-sorted encoder gives HF transformers' mean-pooled unit vectors (AutoModel
on the same all-MiniLM-L6-v2 folder), in the order the texts were given."""

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from lmforge.config import LlamaConfig
from lmforge.context.rag import SentenceEncoder
from lmforge.errors import InputError, ValidationError
from lmforge.models.llama import LlamaForCausalLM
from lmforge.sources import resolve

SENTENCES = ["Hi!", "The quarterly report shows revenue grew by 12 percent, driven mostly by strong sales in Asia.",
             "A man is playing a guitar.", "Someone is strumming an instrument on stage, loudly and happily."]


def hf_embeddings(texts: list[str]) -> np.ndarray:
    """The reference: transformers' AutoModel, mean pooling over the attention mask, unit length."""
    import transformers

    folder = resolve("all-minilm-l6-v2")
    tokenizer = transformers.AutoTokenizer.from_pretrained(folder)
    model = transformers.AutoModel.from_pretrained(folder).eval()
    batch = tokenizer(texts, padding=True, return_tensors="pt")
    with torch.no_grad():
        hidden = model(**batch).last_hidden_state
    mask = batch["attention_mask"][..., None].float()
    return F.normalize((hidden * mask).sum(1) / mask.sum(1), dim=-1).numpy()


def test_embeddings_match_hf_mean_pooling_in_the_callers_order(minilm_encoder):
    ours = minilm_encoder.encode(SENTENCES, batch_size=3)  # sorted by length: the batches mix the input order
    assert ours.shape == (4, 384) and ours.dtype == np.float32
    np.testing.assert_allclose(ours, hf_embeddings(SENTENCES), atol=1e-5)
    np.testing.assert_allclose(np.linalg.norm(ours, axis=1), 1.0, atol=1e-6)
    similarity = ours @ ours.T
    assert similarity[2, 3] > similarity[2, 1] + 0.2  # two guitar sentences vs. a finance report


def test_texts_too_long_and_models_without_embeddings_are_refused(minilm_encoder):
    with pytest.raises(InputError, match=r"texts \[1\] are longer than the 512 tokens all-minilm-l6-v2 reads"):
        minilm_encoder.encode(["short", "word " * 600])
    with pytest.raises(ValidationError, match="batch_size must be >= 1"):
        minilm_encoder.encode(["a"], batch_size=0)
    assert minilm_encoder.max_text_tokens == 510  # [CLS] and [SEP] take two
    decoder = LlamaForCausalLM(LlamaConfig(vocab_size=64, hidden_size=16, intermediate_size=32, num_hidden_layers=1,
                                           num_attention_heads=2, num_key_value_heads=1))
    with pytest.raises(InputError, match="'smollm2-135m-instruct' is a llama model without sentence embeddings"):
        SentenceEncoder(decoder, minilm_encoder.tokenizer, "smollm2-135m-instruct")
