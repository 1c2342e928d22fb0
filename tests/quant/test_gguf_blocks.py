"""GGUF Q8_0 / Q4_1 / Q4_0 blocks kept as lmforge int8 / int4 weights: exact, and the model still answers."""

import pytest
import torch
import torch.nn.functional as F

from lmforge import AutoModelForCausalLM, generate
from lmforge.checkpoint.gguf import open_gguf
from lmforge.checkpoint.gguf_dequant import dequantize
from lmforge.errors import ConfigError, UnsupportedError
from lmforge.explain.architecture import weight_memory
from lmforge.generation import SamplingParams
from lmforge.quant import Int4Weight, Int8Weight, QuantizedLinear, quantize_model
from lmforge.quant.embedding import QuantizedEmbedding
from lmforge.quant.gguf_blocks import gguf_weight, use_gguf_blocks

BYTES_PER_BLOCK = {"Q8_0": 34, "Q4_1": 20, "Q4_0": 18}


class FakeGGUF:
    """One random tensor of a given block type: just what `gguf_weight` reads."""

    def __init__(self, kind: str, rows: int = 6, cols: int = 64, architecture: str = "llama"):
        self.kind, self.shape, self.architecture, self.path = kind, (rows, cols), architecture, "fake.gguf"
        blocks = torch.randint(0, 256, (rows * cols // 32, BYTES_PER_BLOCK[kind]), dtype=torch.uint8)
        scales = (torch.rand(rows * cols // 32, 2) * 0.1).half().view(torch.uint8)  # valid fp16 d (and m)
        blocks[:, :4 if kind == "Q4_1" else 2] = scales[:, :4 if kind == "Q4_1" else 2]
        self.raw = blocks.flatten()

    def tensor_type(self, name):
        return self.kind

    def tensor_shape(self, name):
        return self.shape

    def raw_tensor(self, name):
        return self.raw.clone()


@pytest.mark.parametrize("kind,format_type", [("Q8_0", Int8Weight), ("Q4_1", Int4Weight), ("Q4_0", Int4Weight)])
def test_blocks_map_exactly_onto_lmforge_formats(kind, format_type):
    file = FakeGGUF(kind)
    weight = gguf_weight(file, "w")
    assert isinstance(weight, format_type) and weight.group_size == 32 and weight.shape == (6, 64)
    assert torch.equal(weight.dequantize(), dequantize(file.raw, kind, file.shape))  # bit for bit
    assert weight.nbytes() < 64 * 6 * 2  # still 8 or 4 bits per weight (+ float32 scales)


def test_other_types_are_not_mapped():
    file = FakeGGUF("Q8_0")
    file.kind = "Q5_K"
    assert gguf_weight(file, "w") is None


def test_smollm2_keeps_its_q4_1_and_q8_0_blocks(smollm2_path, smollm2, smollm2_tokenizer, monkeypatch):
    gguf = open_gguf(smollm2_path)
    model = AutoModelForCausalLM.from_pretrained(smollm2_path)
    replaced = use_gguf_blocks(model, gguf)
    assert len(replaced) == 30 * 7 + 1 and "lm_head" in replaced  # the tied head reads token_embd's Q8_0
    q_proj = model.model.layers[0].self_attn.q_proj
    assert isinstance(q_proj, QuantizedLinear) and q_proj.method == "int4"
    reference = smollm2.model.layers[0].self_attn.q_proj.weight  # the dequantized load, q/k rows reordered
    assert torch.equal(q_proj.weight_format.dequantize(), reference)
    assert isinstance(model.lm_head.weight_format, Int8Weight)
    embedding = model.model.embed_tokens  # tied: looks tokens up in the head's Q8_0 rows, no float table
    assert isinstance(embedding, QuantizedEmbedding) and not list(embedding.parameters())
    ids_grid = torch.tensor([[0, 5], [49151, 2]])
    assert torch.equal(embedding(ids_grid), smollm2.model.embed_tokens(ids_grid))
    assert weight_memory(model)[0] < 130e6  # llama.cpp holds this file's tensors in 98 MB; fp32 is 538 MB
    ids = torch.tensor([[1, 504, 3458, 282, 4649, 314, 253]])
    with torch.no_grad():
        expected = smollm2(ids).logits
        rounded = model(ids).logits  # few rows: the kernels, on int8-rounded activations as in llama.cpp
        # llama.cpp's own logits differ from `expected` about as much (mean |diff| 0.30 vs 0.34 here).
        assert (rounded - expected).abs().mean() < 0.1 * expected.std()
        divergence = F.kl_div(rounded.log_softmax(-1), expected.log_softmax(-1), log_target=True, reduction="none")
        assert divergence.sum(-1).max() < 0.1  # nats, per position
        monkeypatch.setattr(QuantizedLinear, "exact_activations", True)
        assert torch.allclose(model(ids).logits, expected, atol=1e-3)  # the same weights exactly
        assert torch.allclose(model(ids[:, :1]).logits, expected[:, :1], atol=1e-3)
    # This file's own numerics are marginal on this question: with rounded activations it answers
    # "L'Étoile, ...", and llama.cpp itself "The capital of France is France."
    prompt = smollm2_tokenizer.apply_chat_template([{"role": "user", "content": "What is the capital of France?"}],
                                                   tokenize=True)
    answer = generate(model, smollm2_tokenizer, prompt, SamplingParams(temperature=0, max_tokens=8))[0]
    assert "Paris" in answer.outputs[0].text
    with pytest.raises(ConfigError, match="already quantized"):
        use_gguf_blocks(model, gguf)
    with pytest.raises(ConfigError, match="already quantized"):
        quantize_model(model, "int8")


def test_non_llama_files_are_refused_clearly():
    with pytest.raises(UnsupportedError, match="llama-architecture"):
        use_gguf_blocks(torch.nn.Linear(2, 2), FakeGGUF("Q8_0", architecture="gpt2"))


def test_gguf_blocks_as_a_load_time_choice(smollm2_tokenizer, monkeypatch):
    from lmforge import LLM
    from lmforge.quant import quantize_loaded

    monkeypatch.setattr(QuantizedLinear, "exact_activations", True)  # see the test above

    llm = LLM("smollm2-135m-instruct", dtype="float32", quantization="gguf", kv_cache_tokens=256,
              max_model_len=256)
    assert isinstance(llm.engine.runner.model.lm_head, QuantizedLinear)
    answer = llm.chat([{"role": "user", "content": "What is the capital of France?"}],
                      SamplingParams(temperature=0, max_tokens=8), use_tqdm=False)[0]
    assert "Paris" in answer.outputs[0].text
    with pytest.raises(ConfigError, match="pass the file by name"):
        quantize_loaded(torch.nn.Linear(2, 2), "gguf")
    with pytest.raises(ConfigError, match="unknown quantization 'int3'.*gguf"):
        quantize_loaded(torch.nn.Linear(2, 2), "int3")


def test_gguf_blocks_load_without_a_float_copy(smollm2_path, tmp_path):
    from lmforge.quant import load_quantized

    direct = load_quantized(smollm2_path, quantization="gguf")  # blocks straight from the file
    via_float = AutoModelForCausalLM.from_pretrained(smollm2_path)
    use_gguf_blocks(via_float, open_gguf(smollm2_path))
    ours, reference = dict(direct.named_parameters()), dict(via_float.named_parameters())
    assert set(ours) == set(reference) and all(torch.equal(ours[k], reference[k]) for k in ours)
    buffers, reference_buffers = dict(direct.named_buffers()), dict(via_float.named_buffers())
    assert all(torch.equal(buffers[k], reference_buffers[k]) for k in reference_buffers)
    ids = torch.tensor([[1, 504, 3458, 282, 4649, 314, 253]])
    with torch.no_grad():
        assert torch.equal(direct(ids).logits, via_float(ids).logits)
    folder = tmp_path / "hf"
    folder.mkdir()
    (folder / "config.json").write_text("{}")
    with pytest.raises(ConfigError, match="not a GGUF file"):
        load_quantized(folder, quantization="gguf")
