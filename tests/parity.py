"""Helpers for numerical parity tests against Hugging Face transformers (the reference)."""

from __future__ import annotations

import torch

from lmforge.registry import model_class


def ours_from_hf(hf_model, task: str, attn_implementation: str = "sdpa"):
    """Build the lmforge model for `task` carrying exactly the weights of `hf_model`."""
    config = hf_model.config.to_dict()
    cls = model_class(config["model_type"], task)
    return cls.from_hf_state_dict(config, hf_model.state_dict(), "hf-model", torch.float32, attn_implementation)


def random_hf_model(cls_name: str, config, is_norm_weight) -> torch.nn.Module:
    """A seeded random HF model (eager attention, eval mode) whose norm weights and biases are random too.

    Fresh norms are all ones and biases all zeros, so a mapping mistake in either would go unnoticed.
    """
    import transformers

    torch.manual_seed(0)
    config._attn_implementation = "eager"
    model = getattr(transformers, cls_name)(config).eval()
    for name, parameter in model.named_parameters():
        if is_norm_weight(name):
            torch.nn.init.uniform_(parameter, 0.5, 1.5)
        elif name.endswith("bias"):
            torch.nn.init.uniform_(parameter, -0.5, 0.5)
    return model


def max_abs_diff(a: torch.Tensor, b: torch.Tensor) -> float:
    assert a.shape == b.shape, (a.shape, b.shape)
    return (a.float() - b.float()).abs().max().item()


def padded_batch(vocab_size: int, lengths: list[int], left: bool, seed: int = 0, pad_id: int = 0):
    """Random ids with an attention mask, padded to the longest length on the left or right."""
    generator = torch.Generator().manual_seed(seed)
    width = max(lengths)
    ids = torch.full((len(lengths), width), pad_id, dtype=torch.long)
    mask = torch.zeros((len(lengths), width), dtype=torch.long)
    for row, length in enumerate(lengths):
        tokens = torch.randint(1, vocab_size, (length,), generator=generator)
        span = slice(width - length, width) if left else slice(0, length)
        ids[row, span], mask[row, span] = tokens, 1
    return ids, mask


def id_tokenizer(vocab_size: int):
    """A real lmforge Tokenizer for tiny random models: each token is its id written out ("17")."""
    from tokenizers import Tokenizer as BackendTokenizer
    from tokenizers import decoders, models, pre_tokenizers

    from lmforge.tokenizer import Tokenizer

    backend = BackendTokenizer(models.WordLevel({str(i): i for i in range(vocab_size)}, unk_token="0"))
    backend.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    backend.decoder = decoders.WordPiece(prefix="##", cleanup=False)  # joins pieces with spaces
    return Tokenizer(backend, {"pad": "0"})
