"""Tiny random models of every architecture, and inputs for them, for the fine-tuning tests."""

import torch

from lmforge.registry import AutoConfig, model_class

VOCAB = 50
CONFIGS = {
    "bert": {"vocab_size": VOCAB, "hidden_size": 32, "intermediate_size": 48, "num_hidden_layers": 2,
             "num_attention_heads": 4, "max_position_embeddings": 32, "pad_token_id": 0},
    "llama": {"vocab_size": VOCAB, "hidden_size": 32, "intermediate_size": 48, "num_hidden_layers": 2,
              "num_attention_heads": 4, "num_key_value_heads": 2, "max_position_embeddings": 32, "pad_token_id": 0},
    "gpt2": {"vocab_size": VOCAB, "n_embd": 32, "n_layer": 2, "n_head": 4, "n_positions": 32},
    "bart": {"vocab_size": VOCAB, "d_model": 32, "encoder_layers": 2, "decoder_layers": 2,
             "encoder_attention_heads": 4, "decoder_attention_heads": 4, "encoder_ffn_dim": 48,
             "decoder_ffn_dim": 48, "max_position_embeddings": 32},
}
EOS = 2  # BART's end-of-sequence id, which its classifier pools at


def tiny(model_type: str, task: str = "sequence-classification", seed: int = 0, **overrides):
    """A seeded random model in eval mode (dropout off, so outputs are deterministic)."""
    torch.manual_seed(seed)
    config = AutoConfig.for_model(model_type, **{**CONFIGS[model_type], "num_labels": 3, **overrides})
    return model_class(model_type, task)(config).eval()


def token_ids(rows: int = 2, length: int = 7, seed: int = 0) -> torch.Tensor:
    """Random ids above the special ones, each row ending with EOS (BART's classifier needs it)."""
    ids = torch.randint(3, VOCAB, (rows, length), generator=torch.Generator().manual_seed(seed))
    ids[:, -1] = EOS
    return ids
