"""Helpers for CLI tests: the command through a real subprocess, and in-process runs on the session's model."""

import subprocess
import sys

import pytest

from lmforge.cli import chat, explain, generate
from lmforge.sources import DEFAULT_MODEL


def run_lmforge(*args: str, stdin: str = "", cwd=None) -> subprocess.CompletedProcess:
    """`python -m lmforge.cli ARGS` as a user runs it: its own process, its exit status, separate stdout/stderr."""
    return subprocess.run([sys.executable, "-m", "lmforge.cli", *args], check=False, input=stdin, capture_output=True,
                          text=True, timeout=300, cwd=cwd)


@pytest.fixture
def loaded_smollm2(monkeypatch, smollm2, smollm2_tokenizer):
    """In-process commands reuse the session's SmolLM2 instead of loading it again for every test."""

    def load_generator(ref: str, quantization: str | None = None, adapter: str | None = None):
        assert ref == DEFAULT_MODEL and quantization is None and adapter is None
        return smollm2, smollm2_tokenizer

    for module in (generate, chat, explain):
        monkeypatch.setattr(module, "load_generator", load_generator)


@pytest.fixture(scope="session")
def tiny_chat_model(tmp_path_factory):
    """A random 2-layer Llama with SmolLM2's tokenizer (and chat template) beside it: fast SFT/DPO runs."""
    import torch

    from lmforge import AutoTokenizer
    from lmforge.config import LlamaConfig
    from lmforge.models.llama import LlamaForCausalLM

    folder = tmp_path_factory.mktemp("tiny-chat")
    tokenizer = AutoTokenizer.from_pretrained("smollm2-135m-instruct")
    torch.manual_seed(0)
    LlamaForCausalLM(LlamaConfig(vocab_size=len(tokenizer.backend.get_vocab()), hidden_size=64,
                                 intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
                                 num_key_value_heads=2, max_position_embeddings=256)).save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    return folder
