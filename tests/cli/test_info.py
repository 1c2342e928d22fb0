"""`lmforge info`: architecture, parameters per component, tokenizer facts, as text and as JSON."""

import json

from lmforge.cli import main
from lmforge.explain.architecture import parameter_components, tied_parameters


def test_json_describes_the_encoder(capsys):
    assert main(["info", "all-minilm-l6-v2", "--json"]) == 0
    info = json.loads(capsys.readouterr().out)
    assert (info["architecture"], info["class"], info["dtype"]) == ("bert", "BertModel", "float32")
    assert (info["context_length"], info["vocab_size"], info["blocks"]) == (512, 30522, 6)
    assert info["parameters"] == 22_713_216 == sum(c["parameters"] for c in info["components"].values())
    assert info["components"]["attention"]["modules"] == {"Attention": 6}
    assert info["components"]["norm"]["modules"] == {"LayerNorm": 13}  # 2 per block + the embedding norm
    assert info["components"]["head"]["modules"] == {"pooler.dense": 1}
    assert info["tokenizer"]["chat_template"] is False
    assert info["tokenizer"]["special_tokens"]["pad"] == {"token": "[PAD]", "id": 0}
    assert info["config"]["model_type"] == "bert"


def test_text_report_of_the_default_chat_model(capsys):
    assert main(["info"]) == 0
    out = capsys.readouterr().out
    for line in ["class           LlamaForCausalLM", "context length  8,192 tokens", "chat template   yes",
                 "special tokens  bos '<|im_start|>' (1), eos '<|im_end|>' (2)", "parameters      134,515,008",
                 "  tied          lm_head.weight shares model.embed_tokens.weight (counted once)",
                 "weights         538.1 MB in memory (float32)", "file tensors    Q4_1 x210, F32 x61, Q8_0 x1"]:
        assert line in out


def test_weight_memory_counts_quantized_layers_packed():
    from lmforge.config import LlamaConfig
    from lmforge.explain.architecture import weight_memory
    from lmforge.models.llama import LlamaForCausalLM
    from lmforge.quant import parameter_count, quantize_model

    config = LlamaConfig(vocab_size=64, hidden_size=64, intermediate_size=128, num_hidden_layers=1,
                         num_attention_heads=4, tie_word_embeddings=False)
    model = LlamaForCausalLM(config)
    before, formats = weight_memory(model)
    assert before == model.num_parameters() * 4 and formats == {"float32": 1}
    parameters = model.num_parameters()
    quantize_model(model, "int8")
    assert parameter_count(model) == parameters  # packed weights still count
    after, formats = weight_memory(model)
    linear = 4 * 64 * 64 + 3 * 64 * 128 + 64 * 64  # q, k, v, o; gate, up, down; the untied head
    assert formats == {"int8": 8, "float32": 1}
    assert after == before - linear * 4 + linear + 4 * (4 * 64 + 2 * 128 + 64 + 64)  # int8 + an fp32 scale per row


def test_components_of_a_decoder_with_tied_head(smollm2):
    components = parameter_components(smollm2)
    assert list(components) == ["embedding", "attention", "mlp", "norm"]  # the head is the tied embedding
    assert components["embedding"]["parameters"] == 49152 * 576
    # 30 layers of q, o (576x576) and k, v (192x576 with GQA 9/3 heads)
    assert components["attention"]["parameters"] == 30 * (2 * 576 * 576 + 2 * 192 * 576)
    assert components["mlp"] == {"parameters": 30 * 3 * 576 * 1536, "share": 0.592, "modules": {"GatedMLP": 30}}
    assert components["norm"]["modules"] == {"RMSNorm": 61}
    assert tied_parameters(smollm2) == {"lm_head.weight": "model.embed_tokens.weight"}


def test_missing_model_is_a_one_line_error(capsys, tmp_path):
    assert main(["info", str(tmp_path / "missing")]) == 2
    assert capsys.readouterr().err == (f"lmforge: error: model '{tmp_path / 'missing'}' not found: it is not an "
                                       "embedded model (smollm2-135m-instruct, all-minilm-l6-v2), a folder or a "
                                       ".gguf file.\n")
