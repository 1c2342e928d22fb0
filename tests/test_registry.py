"""Auto routing: model types and tasks to classes, and clear errors for what is not supported."""

import json

import pytest
import torch

from lmforge import (
    AutoConfig,
    AutoModel,
    AutoModelForCausalLM,
    AutoModelForMaskedLM,
    AutoModelForSequenceClassification,
)
from lmforge.errors import ModelNotFoundError, UnsupportedError
from lmforge.models.gpt2 import GPT2LMHeadModel
from lmforge.models.llama import LlamaForCausalLM, LlamaModel
from lmforge.registry import model_class


def test_routes_model_type_and_task():
    assert model_class("llama", "causal-lm") is LlamaForCausalLM
    assert model_class("gpt2", "causal-lm") is GPT2LMHeadModel
    config = AutoConfig.for_model("llama", vocab_size=50, hidden_size=32, intermediate_size=64,
                                  num_hidden_layers=1, num_attention_heads=4)
    assert isinstance(AutoModel.from_config(config), LlamaModel)
    assert isinstance(AutoModelForCausalLM.from_config(config), LlamaForCausalLM)


def test_unknown_architecture_lists_supported(tmp_path):
    (tmp_path / "config.json").write_text(json.dumps({"model_type": "mamba"}))
    with pytest.raises(UnsupportedError, match=r"'mamba' is not supported; supported architectures: .*gpt2.*llama"):
        AutoModelForCausalLM.from_pretrained(tmp_path)


def test_unknown_head_lists_available():
    config = AutoConfig.for_model("llama", vocab_size=50, hidden_size=32, intermediate_size=64,
                                  num_hidden_layers=1, num_attention_heads=4)
    with pytest.raises(UnsupportedError, match="no 'masked-lm' model; available for it: base, causal-lm"):
        AutoModelForMaskedLM.from_config(config)


def test_missing_reference_is_a_clear_error(tmp_path):
    with pytest.raises(ModelNotFoundError, match="not an embedded model"):
        AutoModel.from_pretrained(tmp_path / "nowhere")
    with pytest.raises(ModelNotFoundError, match="no config.json"):
        AutoModel.from_pretrained(tmp_path)


def test_config_overrides_size_a_new_head(tmp_path):
    config = AutoConfig.for_model("llama", vocab_size=50, hidden_size=32, intermediate_size=64,
                                  num_hidden_layers=1, num_attention_heads=4)
    backbone = AutoModel.from_config(config)
    backbone.save_pretrained(tmp_path)
    names = {0: "neg", 1: "neutral", 2: "pos", 3: "mixed"}
    model = AutoModelForSequenceClassification.from_pretrained(tmp_path, num_labels=4, id2label=names)
    assert model.score.out_features == 4 and model.config.extra["id2label"] == {str(i): n for i, n in names.items()}
    assert torch.equal(model.model.embed_tokens.weight, backbone.embed_tokens.weight)  # the checkpoint still loads
