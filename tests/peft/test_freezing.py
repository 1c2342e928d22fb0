"""The classic fine-tuning methods: each trains exactly the parameters it names, and training leaves every
frozen weight bit for bit as it was."""

import pytest
import torch

from lmforge.errors import ValidationError
from lmforge.peft import TrainableSummary, apply_method, trainable_summary
from lmforge.peft.adapters import adapter_parameter_names
from lmforge.train import PaddingCollator, Trainer, TrainingArguments
from tests.peft.tiny import tiny, token_ids

BERT_EMBEDDINGS = {"model.embed_tokens.weight", "model.embed_positions.weight", "model.embed_token_types.weight",
                   "model.embed_norm.weight", "model.embed_norm.bias"}
OPTIONS = {"full": {}, "frozen": {}, "partial": {"freeze_layers": 1}, "adapter": {"bottleneck": 4}}


def names(model, prefix: str) -> set[str]:
    return {name for name, _ in model.named_parameters() if name.startswith(prefix)}


def trainable(model) -> set[str]:
    return {name for name, parameter in model.named_parameters() if parameter.requires_grad}


def expected_bert_trainable(model, method: str) -> set[str]:
    every = {name for name, _ in model.named_parameters()}
    head = names(model, "classifier.")
    if method == "full":
        return every
    if method == "frozen":
        return head
    if method == "partial":
        return every - BERT_EMBEDDINGS - names(model, "model.layers.0.")
    return head | set(adapter_parameter_names(model))


@pytest.mark.parametrize("method", list(OPTIONS))
def test_each_method_trains_what_it_says_and_nothing_else(method, tmp_path):
    model = tiny("bert")
    returned = apply_method(model, method, **OPTIONS[method])
    expected = expected_bert_trainable(model, method)
    assert trainable(model) == set(returned) == expected
    assert trainable_summary(model).trainable == sum(p.numel() for n, p in model.named_parameters() if n in expected)

    before = {name: parameter.detach().clone() for name, parameter in model.named_parameters()}
    ids = token_ids(rows=8, length=6, seed=3)
    examples = [{"input_ids": row.tolist(), "labels": index % 3} for index, row in enumerate(ids)]
    args = TrainingArguments(output_dir=tmp_path, max_steps=3, learning_rate=1e-2, weight_decay=0.1,
                             per_device_batch_size=4, logging_steps=0, progress=False)
    Trainer(model, args, examples, PaddingCollator(pad_token_id=0)).train()
    for name, parameter in model.named_parameters():
        if name in expected:
            assert not torch.equal(parameter, before[name]), f"{name} should have trained"
        else:
            assert torch.equal(parameter, before[name]), f"{name} should be frozen"


def test_partial_freezes_the_first_layers_of_both_bart_stacks():
    model = tiny("bart")
    apply_method(model, "partial", freeze_layers=1)
    frozen = {name for name, parameter in model.named_parameters() if not parameter.requires_grad}
    assert frozen == (names(model, "model.shared.") | names(model, "model.encoder.embed_")
                      | names(model, "model.decoder.embed_") | names(model, "model.encoder.layers.0.")
                      | names(model, "model.decoder.layers.0."))
    assert names(model, "model.decoder.layers.1.") <= trainable(model)


def test_frozen_trains_the_head_of_every_architecture():
    for model_type, head in [("llama", "score."), ("gpt2", "score."), ("bart", "classification_head.")]:
        model = tiny(model_type)
        apply_method(model, "frozen")
        assert trainable(model) == names(model, head)


def test_a_method_can_be_switched_after_another():
    model = tiny("bert")
    apply_method(model, "frozen")
    apply_method(model, "full")
    assert trainable(model) == {name for name, _ in model.named_parameters()}


def test_trainable_summary_counts_a_tied_weight_once():
    model = tiny("llama", "causal-lm", tie_word_embeddings=True)
    assert model.lm_head.weight is model.model.embed_tokens.weight
    summary = trainable_summary(model)
    assert summary.total == sum(p.numel() for p in set(model.parameters())) == summary.trainable
    apply_method(model, "partial", freeze_layers=2)
    frozen = 50 * 32 + 2 * sum(p.numel() for p in model.model.layers[0].parameters())
    assert trainable_summary(model) == TrainableSummary(summary.total - frozen, summary.total)


def test_summary_reads_like_peft():
    assert str(TrainableSummary(99, 1_234_567)) == \
        "trainable params: 99 || all params: 1,234,567 || trainable%: 0.0080"
    assert TrainableSummary(0, 0).percent == 0.0


def test_wrong_requests_are_clear_errors():
    model = tiny("bert")
    with pytest.raises(ValidationError, match="unknown fine-tuning method 'lora'; use one of: full, frozen"):
        apply_method(model, "lora")
    with pytest.raises(ValidationError, match="option bottleneck does not apply to method 'full'"):
        apply_method(model, "full", bottleneck=8)
    with pytest.raises(ValidationError, match="'partial' needs freeze_layers: how many of the 2 layers"):
        apply_method(model, "partial")
    with pytest.raises(ValidationError, match="freeze_layers must be an integer from 0 to 2"):
        apply_method(model, "partial", freeze_layers=3)
    with pytest.raises(ValidationError, match="has no task head to train with method 'frozen'"):
        apply_method(tiny("bert", "base"), "frozen")
    assert trainable(model) == {name for name, _ in model.named_parameters()}  # failed requests changed nothing
