"""Fused q/k/v and gate/up projections: same outputs, same names, views of one matrix."""

import torch

from lmforge.nn.fusion import fuse_projections, unfuse_projections
from tests.models.test_llama import hf_llama
from tests.parity import max_abs_diff, ours_from_hf


def test_fused_model_computes_the_same_logits_and_keeps_its_names(tmp_path):
    model = ours_from_hf(hf_llama(num_key_value_heads=2, attention_bias=True), "causal-lm")
    ids = torch.randint(0, 97, (2, 7))
    names = list(model.state_dict())
    with torch.no_grad():
        before = model(ids).logits
        fuse_projections(model)
        after = model(ids).logits
    assert max_abs_diff(before, after) <= 1e-5
    assert list(model.state_dict()) == names  # fused buffers are not part of the checkpoint
    attention = model.model.layers[0].self_attn
    assert attention.q_proj.weight.data_ptr() == attention.qkv_weight.data_ptr()  # a view, not a copy
    model.save_pretrained(tmp_path)  # still saves the canonical tensors


def test_in_place_updates_reach_the_fused_matrix_and_unfuse_restores():
    model = fuse_projections(ours_from_hf(hf_llama(num_key_value_heads=2), "causal-lm"))
    mlp = model.model.layers[1].mlp
    with torch.no_grad():
        mlp.up_proj.weight.mul_(2)
    rows = mlp.gate_proj.out_features
    assert torch.equal(mlp.gate_up_weight[rows:], mlp.up_proj.weight)
    ids = torch.randint(0, 97, (1, 5))
    with torch.no_grad():
        fused = model(ids).logits
        unfuse_projections(model)
        assert not hasattr(mlp, "gate_up_weight")
        assert max_abs_diff(model(ids).logits, fused) <= 1e-5


def test_moving_the_model_keeps_the_views_linked():
    model = fuse_projections(ours_from_hf(hf_llama(num_key_value_heads=2), "causal-lm"))
    model.to(torch.float64)
    attention = model.model.layers[0].self_attn
    assert attention.qkv_weight.dtype == torch.float64
    assert attention.k_proj.weight.data_ptr() == attention.qkv_weight[attention.q_proj.out_features:].data_ptr()


def test_training_after_fusion_updates_the_parameters_the_optimizer_holds():
    """Generation fuses; a trainer's optimizer must keep updating the same Parameter objects, and a forward
    with gradients must reach them (the fused matmul serves only gradient-free forwards)."""
    model = ours_from_hf(hf_llama(num_key_value_heads=2), "causal-lm")
    attention = model.model.layers[0].self_attn
    parameter = attention.k_proj.weight
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    fuse_projections(model)
    assert attention.k_proj.weight is parameter  # the same object, its data a view into the fused matrix
    ids = torch.randint(0, 97, (2, 6))
    model(ids).logits.square().mean().backward()
    assert parameter.grad is not None and parameter.grad.abs().sum() > 0
    before = attention.qkv_weight.clone()
    optimizer.step()
    rows = attention.q_proj.out_features
    assert not torch.equal(attention.qkv_weight, before)  # the update reached the fused matrix too
    assert torch.equal(attention.qkv_weight[rows:rows + attention.k_proj.out_features], parameter)
    with torch.no_grad():
        fused = model(ids).logits
    unfuse_projections(model)
    assert attention.k_proj.weight is parameter
    with torch.no_grad():
        assert max_abs_diff(model(ids).logits, fused) <= 1e-5
