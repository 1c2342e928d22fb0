"""Prompt and prefix tuning: what the virtual tokens compute (against the plain model reading them as
input), generation through the KV cache, training, PEFT-format files both ways, and bad input."""

import pytest
import torch

from lmforge.errors import CheckpointError, UnsupportedError, ValidationError
from lmforge.generation import SamplingParams, generate
from lmforge.peft import (
    LoraConfig,
    PrefixTuningConfig,
    PromptTuningConfig,
    add_lora,
    add_prefix_tuning,
    add_prompt_tuning,
    load_peft_adapter,
    save_peft_adapter,
    trainable_summary,
)
from lmforge.peft.virtual_tokens import init_token_ids
from lmforge.train import PaddingCollator, Trainer, TrainingArguments
from tests.peft.test_lora import hf_pair
from tests.peft.tiny import tiny, token_ids

DECODERS = ["llama", "gpt2"]
P = 3


def logits(model, ids, mask=None):
    with torch.no_grad():
        return model(ids, mask).logits


def randomize(encoder, seed=1):
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for parameter in encoder.parameters():
            parameter.copy_(torch.randn(parameter.shape, generator=generator) * 0.5)


def left_padded():
    ids = token_ids(2, 6, seed=3)
    mask = torch.ones_like(ids)
    mask[1, :2] = 0
    ids[1, :2] = 0
    return ids, mask


@pytest.mark.parametrize("model_type", DECODERS)
def test_a_soft_prompt_computes_what_the_model_computes_with_those_vectors_as_input(model_type):
    base, tuned = tiny(model_type, "causal-lm"), tiny(model_type, "causal-lm")
    add_prompt_tuning(tuned, PromptTuningConfig(num_virtual_tokens=P))
    randomize(tuned.prompt_encoder)
    ids, mask = left_padded()
    soft = tuned.prompt_encoder.embedding.detach()
    with torch.no_grad():
        inputs = torch.cat([soft.expand(2, -1, -1), base.model.embed_tokens(ids)], dim=1)
        full_mask = torch.cat([torch.ones(2, P, dtype=mask.dtype), mask], dim=1)
        expected = base.lm_head(base.model(inputs_embeds=inputs, attention_mask=full_mask).last_hidden_state)[:, P:]
    torch.testing.assert_close(logits(tuned, ids, mask), expected, rtol=1e-5, atol=1e-5)
    soft = tuned.prompt_encoder.embedding.detach().clone().requires_grad_(True)  # and so are the gradients
    inputs = torch.cat([soft.expand(2, -1, -1), base.model.embed_tokens(ids)], dim=1)
    reference = base.lm_head(base.model(inputs_embeds=inputs, attention_mask=full_mask).last_hidden_state)[:, P:]
    reference.square().mean().backward()
    tuned(ids, mask).logits.square().mean().backward()
    torch.testing.assert_close(tuned.prompt_encoder.embedding.grad, soft.grad, rtol=1e-4, atol=1e-6)


@pytest.mark.parametrize("model_type", DECODERS)
def test_a_fresh_prefix_is_what_the_model_leaves_for_its_init_tokens(model_type):
    """Prefix keys/values start as the model's own for the init tokens: the same as reading those tokens."""
    base, tuned = tiny(model_type, "causal-lm"), tiny(model_type, "causal-lm")
    add_prefix_tuning(tuned, PrefixTuningConfig(num_virtual_tokens=P, seed=5))
    start = init_token_ids(base, P, None, None, seed=5)
    ids = token_ids(2, 6)
    expected = logits(base, torch.cat([start.expand(2, -1), ids], dim=1))[:, P:]
    torch.testing.assert_close(logits(tuned, ids), expected, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("add,config", [(add_prompt_tuning, PromptTuningConfig(num_virtual_tokens=P)),
                                        (add_prefix_tuning, PrefixTuningConfig(num_virtual_tokens=P)),
                                        (add_prefix_tuning, PrefixTuningConfig(num_virtual_tokens=P,
                                                                               prefix_projection=True,
                                                                               encoder_hidden_size=16))])
def test_generation_through_the_kv_cache_matches_recomputing_everything(add, config):
    model = tiny("llama", "causal-lm")
    add(model, config)
    randomize(model.prompt_encoder)
    prompts = [token_ids(1, 5, seed=1)[0].tolist(), token_ids(1, 3, seed=2)[0].tolist()]
    params = SamplingParams(temperature=0.0, max_tokens=6, ignore_eos=True)
    batched = [out.outputs[0].token_ids for out in generate(model, None, prompts, params)]
    for prompt, tokens in zip(prompts, batched):
        ids = list(prompt)
        for _ in range(6):  # no cache: the virtual tokens are recomputed at every step
            ids.append(int(logits(model, torch.tensor([ids]))[0, -1].argmax()))
        assert tokens == ids[len(prompt):]
    plain = tiny("llama", "causal-lm")
    assert batched != [out.outputs[0].token_ids for out in generate(plain, None, prompts, params)]


@pytest.mark.parametrize("add,config,drop", [
    (add_prompt_tuning, PromptTuningConfig(num_virtual_tokens=4), 0.08),  # a soft prompt is read through every
    (add_prefix_tuning, PrefixTuningConfig(num_virtual_tokens=4), 0.2),  # norm; learned values act directly
    (add_prefix_tuning, PrefixTuningConfig(num_virtual_tokens=4, prefix_projection=True), 0.2)])
def test_only_the_virtual_tokens_learn_and_the_loss_falls(tmp_path, add, config, drop):
    model = tiny("llama", "causal-lm")
    add(model, config)
    frozen = {name: p.detach().clone() for name, p in model.named_parameters() if not p.requires_grad}
    assert all(name.startswith("prompt_encoder.") for name, p in model.named_parameters() if p.requires_grad)
    data = [{"input_ids": [start] + [9] * 9} for start in (4, 5, 6, 7)]  # a habit virtual tokens can teach
    arguments = TrainingArguments(output_dir=tmp_path, max_steps=30, per_device_batch_size=4, learning_rate=0.3, warmup_ratio=0.0,
                                  logging_steps=1, progress=False)
    state = Trainer(model.train(), arguments, data, PaddingCollator(pad_token_id=0, causal_lm_labels=True)).train()
    assert state.history[-1]["loss"] < state.history[0]["loss"] - drop
    assert all(torch.equal(parameter, frozen[name]) for name, parameter in model.named_parameters() if name in frozen)


def test_trainable_counts():
    model = tiny("llama", "causal-lm")  # 2 layers, 2 KV heads of 8 dims, hidden 32
    add_prompt_tuning(model, PromptTuningConfig(num_virtual_tokens=5))
    assert trainable_summary(model).trainable == 5 * 32
    model = tiny("llama", "causal-lm")
    add_prefix_tuning(model, PrefixTuningConfig(num_virtual_tokens=5))
    assert trainable_summary(model).trainable == 5 * 2 * 2 * 2 * 8


def test_init_text_starts_from_its_tokens():
    class Tokenizer:
        def encode(self, text):
            return [7, 9]

    assert init_token_ids(tiny("llama", "causal-lm"), 5, "solve it", Tokenizer(), 0).tolist() == [7, 9, 7, 9, 7]
    model = tiny("llama", "causal-lm")
    add_prompt_tuning(model, PromptTuningConfig(num_virtual_tokens=2, init_text="x"), Tokenizer())
    torch.testing.assert_close(model.prompt_encoder.embedding.detach(), model.model.embed_tokens.weight[[7, 9]])


@pytest.mark.parametrize("add,config", [(add_prompt_tuning, PromptTuningConfig(num_virtual_tokens=P)),
                                        (add_prefix_tuning, PrefixTuningConfig(num_virtual_tokens=P,
                                                                               prefix_projection=True))])
def test_saved_adapters_load_back_onto_a_fresh_base(tmp_path, add, config):
    model = tiny("llama", "causal-lm")
    add(model, config)
    randomize(model.prompt_encoder)
    save_peft_adapter(model, tmp_path / "adapter", base_model_name_or_path="tiny")
    fresh = tiny("llama", "causal-lm")
    assert load_peft_adapter(fresh, tmp_path / "adapter") == model.prompt_encoder.peft_type
    ids = token_ids()
    torch.testing.assert_close(logits(fresh, ids), logits(model, ids), rtol=1e-5, atol=1e-5)


def peft_configs(peft):
    return {"PROMPT_TUNING": peft.PromptTuningConfig(task_type="CAUSAL_LM", num_virtual_tokens=P),
            "PREFIX_TUNING": peft.PrefixTuningConfig(task_type="CAUSAL_LM", num_virtual_tokens=P)}


@pytest.mark.parametrize("kind", ["PROMPT_TUNING", "PREFIX_TUNING"])
def test_we_load_peft_virtual_tokens_and_get_their_logits(tmp_path, kind):
    peft = pytest.importorskip("peft")
    ours, hf = hf_pair(tmp_path)
    theirs = peft.get_peft_model(hf, peft_configs(peft)[kind])
    randomize(theirs.prompt_encoder)
    theirs.save_pretrained(tmp_path / "adapter")
    load_peft_adapter(ours, tmp_path / "adapter")
    ids = token_ids()
    with torch.no_grad():
        expected = theirs.eval()(input_ids=ids).logits[:, -ids.shape[1]:]  # prompt tuning returns virtual rows too
    torch.testing.assert_close(logits(ours, ids), expected, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("add,config", [(add_prompt_tuning, PromptTuningConfig(num_virtual_tokens=P)),
                                        (add_prefix_tuning, PrefixTuningConfig(num_virtual_tokens=P))])
def test_peft_loads_our_virtual_tokens_and_gets_our_logits(tmp_path, add, config):
    peft = pytest.importorskip("peft")
    ours, hf = hf_pair(tmp_path)
    add(ours, config)
    randomize(ours.prompt_encoder)
    save_peft_adapter(ours, tmp_path / "adapter")
    theirs = peft.PeftModel.from_pretrained(hf, tmp_path / "adapter").eval()
    ids = token_ids()
    with torch.no_grad():
        expected = theirs(input_ids=ids).logits[:, -ids.shape[1]:]
    torch.testing.assert_close(logits(ours, ids), expected, rtol=1e-5, atol=1e-5)


def test_bad_input_names_the_fix(tmp_path):
    with pytest.raises(UnsupportedError, match="decoder-only"):
        add_prompt_tuning(tiny("bert"), PromptTuningConfig())
    with pytest.raises(ValidationError, match="num_virtual_tokens"):
        PrefixTuningConfig(num_virtual_tokens=0)
    with pytest.raises(ValidationError, match="tokenizer"):
        add_prompt_tuning(tiny("llama", "causal-lm"), PromptTuningConfig(init_text="dates"))
    model = tiny("llama", "causal-lm")
    add_prompt_tuning(model, PromptTuningConfig(num_virtual_tokens=2))
    with pytest.raises(ValidationError, match="already has virtual tokens"):
        add_prefix_tuning(model, PrefixTuningConfig())
    lora = tiny("llama", "causal-lm")
    add_lora(lora, LoraConfig(r=2))
    with pytest.raises(UnsupportedError, match="LoRA"):
        add_prompt_tuning(lora, PromptTuningConfig())
    save_peft_adapter(model, tmp_path / "adapter")
    wider = tiny("llama", "causal-lm", hidden_size=64)
    with pytest.raises(ValidationError, match="base model they were trained on"):
        load_peft_adapter(wider, tmp_path / "adapter")
    with pytest.raises(CheckpointError, match="not a PEFT adapter folder"):
        load_peft_adapter(tiny("llama", "causal-lm"), tmp_path)
    with pytest.raises(ValidationError, match="no LoRA layers or virtual tokens"):
        save_peft_adapter(tiny("llama", "causal-lm"), tmp_path / "nothing")
