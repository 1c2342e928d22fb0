import pytest

from tests.models.test_llama import hf_llama
from tests.parity import id_tokenizer, ours_from_hf


@pytest.fixture(scope="package")
def tiny():
    """A tiny random Llama (GQA) and a tokenizer that writes each id out, shared by the engine tests."""
    return ours_from_hf(hf_llama(num_key_value_heads=2), "causal-lm"), id_tokenizer(128)
