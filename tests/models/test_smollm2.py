"""The real SmolLM2-135M-Instruct (embedded Q4_1 GGUF) against HF transformers loading the same file."""

import torch

from tests.parity import max_abs_diff

PROMPT = ("The transformer architecture reads a sequence of tokens, embeds each one, and lets every "
          "position attend to the positions before it. After thirty layers of attention and feed-forward "
          "blocks the model predicts the next token. Écrire en français, 東京, 🤗 and code: def f(x): return")


def test_logits_match_hf_over_64_tokens(smollm2, hf_smollm2, smollm2_tokenizer):
    ids = torch.tensor([smollm2_tokenizer.encode(PROMPT)[:64]])
    assert ids.shape[1] == 64
    with torch.inference_mode():
        ours, reference = smollm2(ids).logits, hf_smollm2(ids).logits
    assert max_abs_diff(ours, reference) <= 1e-4
    assert torch.equal(ours.argmax(-1), reference.argmax(-1))


def test_padded_batch_matches_single_prompts(smollm2, smollm2_tokenizer):
    prompts = ["The capital of France is", "Write a haiku about the sea"]
    batch = smollm2_tokenizer(prompts, padding_side="left")
    with torch.inference_mode():
        batched = smollm2(batch["input_ids"], attention_mask=batch["attention_mask"]).logits[:, -1]
        for row, prompt in enumerate(prompts):
            alone = smollm2(torch.tensor([smollm2_tokenizer.encode(prompt)])).logits[0, -1]
            assert max_abs_diff(batched[row], alone) <= 1e-4


def test_knows_a_fact(smollm2, smollm2_tokenizer):
    ids = torch.tensor([smollm2_tokenizer.encode("The capital of France is")])
    with torch.inference_mode():
        next_id = int(smollm2(ids).logits[0, -1].argmax())
    assert smollm2_tokenizer.decode([next_id]) == " Paris"


def test_architecture_of_the_embedded_model(smollm2):
    config = smollm2.config
    assert (config.num_hidden_layers, config.num_attention_heads, config.num_key_value_heads) == (30, 9, 3)
    assert smollm2.lm_head.weight is smollm2.model.embed_tokens.weight  # tied embeddings
    assert abs(smollm2.num_parameters() - 134_515_008) < 1_000_000
