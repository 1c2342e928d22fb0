"""GGUF export: block encoders against hand-computed bytes and the gguf library, the file format as
the gguf library reads it, round trips through lmforge and HF transformers, and clear refusals."""

from __future__ import annotations

from pathlib import Path

import gguf
import numpy as np
import pytest
import torch
from gguf import GGMLQuantizationType, GGUFReader, GGUFValueType

from lmforge import AutoModelForCausalLM
from lmforge.checkpoint.gguf import GGUFFile
from lmforge.checkpoint.gguf_convert import unpermute_qk
from lmforge.checkpoint.gguf_export import (
    PRE_TOKENIZER_NAMES,
    check_exportable,
    export_gguf,
    pre_tokenizer_name,
    storage_type,
)
from lmforge.checkpoint.gguf_quant import quantize
from lmforge.checkpoint.gguf_tokenizer import BYTE_LEVEL_PRE_TOKENIZERS
from lmforge.checkpoint.gguf_writer import GGUFWriter, ValueType
from lmforge.config import LlamaConfig
from lmforge.errors import CheckpointError, UnsupportedError, ValidationError
from lmforge.models.llama import LlamaForCausalLM
from lmforge.tokenizer import Tokenizer

# --------------------------------------------------------------------------- #
# A tiny random Llama with a real byte-level BPE tokenizer
# --------------------------------------------------------------------------- #

CORPUS = ["The quick brown fox jumps over the lazy dog.", "Hello world, hello tokens! 12345 numbers",
          "It's a tiny model's vocabulary.\n\nNew lines\tand tabs."] * 20
CHAT_TEMPLATE = ("{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n{% endfor %}"
                 "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}")
SAMPLES = ["Hello world <think> 12345<|im_end|>", "It's  a\n\n tiny 2024 model's  vocabulary!", "éà 日本 fox"]
TINY_VOCAB = 320  # the tokenizer has 301 tokens: the export pads the vocabulary with [PAD] entries


def tiny_tokenizer() -> Tokenizer:
    """A GPT-2-style byte-level BPE trained on a few sentences: 3 special tokens, the 256 byte symbols,
    merges up to 300 entries, one added plain token (<think>); it adds BOS like Llama tokenizers."""
    from tokenizers import (
        AddedToken,
        decoders,
        models,
        pre_tokenizers,
        processors,
        trainers,
    )
    from tokenizers import Tokenizer as Backend

    backend = Backend(models.BPE())
    backend.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    backend.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=300, special_tokens=["<|endoftext|>", "<|im_start|>", "<|im_end|>"],
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False)
    backend.train_from_iterator(CORPUS, trainer)
    backend.add_tokens([AddedToken("<think>", special=False, normalized=False)])
    backend.post_processor = processors.TemplateProcessing(single="<|im_start|> $A",
                                                           special_tokens=[("<|im_start|>", 1)])
    return Tokenizer(backend, {"bos": "<|im_start|>", "eos": "<|im_end|>", "pad": "<|endoftext|>"}, CHAT_TEMPLATE)


def tiny_llama(tied: bool = True, bias: bool = False, vocab_size: int = TINY_VOCAB) -> LlamaForCausalLM:
    """GQA 4/2 heads, every row a multiple of 32 wide (so it splits into quantization blocks);
    norms and biases random too, so a misplaced one changes the logits."""
    torch.manual_seed(0)
    config = LlamaConfig(vocab_size=vocab_size, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=256,
                         rms_norm_eps=1e-5, rope_theta=10000.0, tie_word_embeddings=tied, attention_bias=bias,
                         bos_token_id=1, eos_token_id=2)
    model = LlamaForCausalLM(config).eval()
    with torch.no_grad():
        for name, parameter in model.named_parameters():
            if parameter.dim() == 1:
                parameter.uniform_(0.5, 1.5) if name.endswith("norm.weight") else parameter.uniform_(-0.5, 0.5)
    return model


def save_tiny(folder: Path, tied: bool = True, with_tokenizer: bool = True) -> Path:
    """A tiny model folder as save_pretrained writes it (for the CLI)."""
    tiny_llama(tied).save_pretrained(folder)
    if with_tokenizer:
        tiny_tokenizer().save_pretrained(folder)
    return folder


@pytest.fixture(scope="module")
def tokenizer() -> Tokenizer:
    return tiny_tokenizer()


@pytest.fixture(scope="module")
def models() -> dict[str, LlamaForCausalLM]:
    return {"tied": tiny_llama(tied=True), "untied": tiny_llama(tied=False),
            "untied-bias": tiny_llama(tied=False, bias=True)}


@pytest.fixture(scope="module")
def exported(models, tokenizer, tmp_path_factory):
    """export(variant, type) -> the path of that model exported as that type (written once per module)."""
    folder = tmp_path_factory.mktemp("exported")
    paths: dict[tuple[str, str], Path] = {}

    def export(variant: str, file_type: str) -> Path:
        if (variant, file_type) not in paths:
            path = folder / variant / f"model-{file_type}.gguf"
            export_gguf(models[variant], tokenizer, path, file_type)
            paths[variant, file_type] = path
        return paths[variant, file_type]

    return export


def logits(model, ids: torch.Tensor) -> torch.Tensor:
    with torch.no_grad():
        return model(ids).logits


@pytest.fixture(scope="module")
def ids(tokenizer) -> torch.Tensor:
    return torch.tensor([tokenizer.encode(SAMPLES[1])])


# --------------------------------------------------------------------------- #
# Block encoders
# --------------------------------------------------------------------------- #


def test_q8_0_hand_computed_blocks() -> None:
    # absmax 127 makes d = 1, so q = round(w) with ties away from zero (2.5 -> 3, not the even 2).
    first = torch.zeros(32)
    first[:7] = torch.tensor([-127.0, 2.5, -2.5, 3.5, 0.4, -0.6, 126.5])
    stored = quantize(torch.cat([first, torch.zeros(32)]).reshape(2, 32), "Q8_0")
    codes = [-127, 3, -3, 4, 0, -1, 127] + [0] * 25
    expected = [0x00, 0x3C] + [c & 0xFF for c in codes] + [0] * 34  # fp16 1.0 is 0x3C00; zero block: d = 0
    assert stored.tolist() == expected


def test_q4_0_hand_computed_blocks() -> None:
    # d = (value of largest magnitude) / -8, so that value is code 0; q = min(15, trunc(w / d + 8.5)).
    ramp = torch.cat([torch.arange(16.0) - 8, 7 - torch.arange(16.0)])  # -8 first: d = 1, codes 0..15, 15..0
    spike = torch.zeros(32)
    spike[5] = 16.0  # positive maximum: d = -2, so 16 -> code 0 and 0 -> code 8
    tie = torch.zeros(32)
    tie[3], tie[10] = -4.0, 4.0  # equal magnitudes: the first wins, d = 0.5; 4 / 0.5 + 8 = 16 clamps to 15
    stored = quantize(torch.stack([ramp, spike, tie]), "Q4_0").reshape(3, 18).tolist()
    assert stored[0] == [0x00, 0x3C] + [j | (15 - j) << 4 for j in range(16)]
    assert stored[1] == [0x00, 0xC0] + [0x80 if j == 5 else 0x88 for j in range(16)]  # fp16 -2.0 is 0xC000
    assert stored[2] == [0x00, 0x38] + [{3: 0x80, 10: 0x8F}.get(j, 0x88) for j in range(16)]  # 0.5 is 0x3800
    decoded = gguf.quants.dequantize(np.array(stored, np.uint8), GGMLQuantizationType.Q4_0).reshape(3, 32)
    assert np.array_equal(decoded[:2], torch.stack([ramp, spike]).numpy())
    assert decoded[2, 3] == -4.0 and decoded[2, 10] == 3.5  # the clamped code costs half a step


@pytest.mark.parametrize("type_name", ["F32", "F16", "Q8_0", "Q4_0"])
def test_encoders_equal_the_gguf_library(type_name: str) -> None:
    rng = np.random.default_rng(0)
    weights = (rng.standard_normal((16, 256)) * rng.uniform(0.01, 3, (16, 1))).astype(np.float32)
    weights[3, :32] = 0  # an all-zero block
    weights[5, 32:64] = rng.choice([-0.5, 0.5], 32)  # magnitude ties
    weights[7, :32] = np.round(weights[7, :32] * 4) / 4  # many exact halves after scaling
    qtype = GGMLQuantizationType[type_name]
    ours = quantize(torch.from_numpy(weights), type_name).numpy()
    assert np.array_equal(ours, np.asarray(gguf.quants.quantize(weights, qtype)).view(np.uint8).reshape(-1))
    decoded = gguf.quants.dequantize(ours.reshape(16, -1), qtype).reshape(16, -1, 32)
    blocks = weights.reshape(16, -1, 32)
    error = np.abs(decoded - blocks).max(-1)
    largest = np.abs(blocks).max(-1)
    # Half a step (a whole one where Q4_0 clamps code 16 to 15), plus the fp16 rounding of d times the code.
    fp16 = 2.0**-11
    bound = {"F32": 0, "F16": largest * fp16, "Q8_0": largest / 127 * (0.5 + 127 * fp16),
             "Q4_0": largest / 8 * (1 + 8 * fp16)}[type_name]
    assert (error <= bound).all()


def test_storage_types_follow_llama_cpp() -> None:
    assert storage_type("blk.0.attn_norm.weight", (64,), "Q4_0", "output.weight") == "F32"
    assert storage_type("blk.0.attn_q.bias", (64,), "F16", "output.weight") == "F32"
    assert storage_type("blk.0.attn_q.weight", (64, 40), "Q8_0", "output.weight") == "F16"  # 40 is no multiple of 32
    assert storage_type("token_embd.weight", (320, 64), "Q4_0", "token_embd.weight") == "Q8_0"  # the (tied) head
    assert storage_type("token_embd.weight", (320, 64), "Q4_0", "output.weight") == "Q4_0"
    assert storage_type("output.weight", (320, 64), "Q8_0", "output.weight") == "Q8_0"
    with pytest.raises(UnsupportedError, match="blocks of 32 weights.*F16 or F32"):
        quantize(torch.zeros(2, 40), "Q8_0")


# --------------------------------------------------------------------------- #
# The file format
# --------------------------------------------------------------------------- #


def test_writer_values_and_alignment_as_the_gguf_library_reads_them(tmp_path: Path) -> None:
    writer = GGUFWriter()
    values = [("t.u8", 255, ValueType.UINT8, GGUFValueType.UINT8), ("t.i8", -128, ValueType.INT8, GGUFValueType.INT8),
              ("t.u16", 65535, ValueType.UINT16, GGUFValueType.UINT16),
              ("t.i16", -300, ValueType.INT16, GGUFValueType.INT16),
              ("t.u32", 4_000_000_000, ValueType.UINT32, GGUFValueType.UINT32),
              ("t.i32", -7, ValueType.INT32, GGUFValueType.INT32), ("t.f32", 0.5, ValueType.FLOAT32, GGUFValueType.FLOAT32),
              ("t.bool", True, ValueType.BOOL, GGUFValueType.BOOL),
              ("t.str", "héllo {{ x }}\n", ValueType.STRING, GGUFValueType.STRING),
              ("t.u64", 1 << 40, ValueType.UINT64, GGUFValueType.UINT64),
              ("t.i64", -(1 << 40), ValueType.INT64, GGUFValueType.INT64),
              ("t.f64", 0.1, ValueType.FLOAT64, GGUFValueType.FLOAT64)]
    for key, value, ours, _ in values:
        writer.add(key, value, ours)
    writer.add("t.words", ["a", "", "日本"], ValueType.ARRAY, ValueType.STRING)
    writer.add("t.ints", [1, -2, 3], ValueType.ARRAY, ValueType.INT32)
    writer.add("t.floats", [0.25, -1.5], ValueType.ARRAY, ValueType.FLOAT32)
    odd = torch.arange(15, dtype=torch.float32).reshape(3, 5)  # 60 bytes: the next tensor needs padding
    q8 = torch.linspace(-1, 1, 64).reshape(1, 64)
    writer.add_tensor("odd", odd.shape, "F32", lambda: quantize(odd, "F32"))
    writer.add_tensor("q8", q8.shape, "Q8_0", lambda: quantize(q8, "Q8_0"))
    writer.write(tmp_path / "t.gguf")

    reader = GGUFReader(tmp_path / "t.gguf")
    for key, value, _, theirs in values:
        assert reader.fields[key].types == [theirs] and reader.fields[key].contents() == pytest.approx(value), key
    assert reader.fields["t.words"].types == [GGUFValueType.ARRAY, GGUFValueType.STRING]
    assert reader.fields["t.words"].contents() == ["a", "", "日本"]
    assert reader.fields["t.ints"].contents() == [1, -2, 3]
    assert reader.fields["t.floats"].contents() == [0.25, -1.5]
    assert reader.fields["general.alignment"].contents() == 32
    assert [(t.name, list(t.shape), t.tensor_type.name) for t in reader.tensors] == [
        ("odd", [5, 3], "F32"), ("q8", [64, 1], "Q8_0")]  # GGUF lists dimensions fastest first
    assert all(t.data_offset % 32 == 0 for t in reader.tensors)
    assert np.array_equal(reader.tensors[0].data.reshape(3, 5), odd.numpy())
    ours = GGUFFile(tmp_path / "t.gguf")
    assert ours.metadata["t.i64"] == -(1 << 40) and ours.metadata["t.words"] == ["a", "", "日本"]
    assert torch.equal(ours.load_tensor("odd"), odd)


def test_writer_rejects_values_that_do_not_fit() -> None:
    writer = GGUFWriter()
    with pytest.raises(ValueError, match="'t.small'.*UINT8"):
        writer.add("t.small", 256, ValueType.UINT8)
    with pytest.raises(ValueError, match="item_type"):
        writer.add("t.list", [1], ValueType.ARRAY)
    writer.add("t.once", 1, ValueType.UINT32)
    with pytest.raises(ValueError, match="added twice"):
        writer.add("t.once", 2, ValueType.UINT32)


def test_a_failed_write_leaves_no_file_and_keeps_the_old_one(tmp_path: Path) -> None:
    path = tmp_path / "model.gguf"
    path.write_bytes(b"the previous export")

    def fail() -> torch.Tensor:
        raise RuntimeError("disk on fire")

    writer = GGUFWriter()
    writer.add_tensor("fine", (32,), "F32", lambda: quantize(torch.ones(32), "F32"))
    writer.add_tensor("broken", (32,), "F32", fail)
    with pytest.raises(RuntimeError, match="disk on fire"):
        writer.write(path)
    assert path.read_bytes() == b"the previous export"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["model.gguf"]  # no partial file left behind
    writer = GGUFWriter()
    writer.add_tensor("short", (32,), "F32", lambda: quantize(torch.ones(16), "F32"))
    with pytest.raises(RuntimeError, match="'short' encoded to 64"):
        writer.write(path)
    with pytest.raises(CheckpointError, match="is a folder"):
        GGUFWriter().write(tmp_path)


# --------------------------------------------------------------------------- #
# Exported models
# --------------------------------------------------------------------------- #

LLAMA_KEYS = {"general.architecture": "llama", "general.type": "model", "general.name": "model-q4_0",
              "general.file_type": 2, "general.quantization_version": 2, "general.alignment": 32,
              "llama.vocab_size": 320, "llama.context_length": 256, "llama.embedding_length": 64,
              "llama.block_count": 2, "llama.feed_forward_length": 128, "llama.attention.head_count": 4,
              "llama.attention.head_count_kv": 2, "llama.attention.key_length": 16,
              "llama.attention.value_length": 16, "llama.attention.layer_norm_rms_epsilon": pytest.approx(1e-5),
              "llama.rope.dimension_count": 16, "llama.rope.freq_base": 10000.0, "tokenizer.ggml.model": "gpt2",
              "tokenizer.ggml.pre": "gpt-2", "tokenizer.ggml.bos_token_id": 1, "tokenizer.ggml.eos_token_id": 2,
              "tokenizer.ggml.padding_token_id": 0, "tokenizer.ggml.add_bos_token": True,
              "tokenizer.ggml.add_eos_token": False, "tokenizer.chat_template": CHAT_TEMPLATE}


def test_the_gguf_library_reads_every_key_tensor_type_and_shape(exported, models) -> None:
    reader = GGUFReader(exported("untied-bias", "q4_0"))
    arrays = {"tokenizer.ggml.tokens", "tokenizer.ggml.token_type", "tokenizer.ggml.merges"}
    assert reader.fields.pop("GGUF.version").contents() == 3  # the reader lists the header as pseudo-keys
    assert reader.fields.pop("GGUF.tensor_count").contents() == len(reader.tensors)
    assert reader.fields.pop("GGUF.kv_count").contents() == len(LLAMA_KEYS) + len(arrays)
    assert set(reader.fields) == set(LLAMA_KEYS) | arrays
    for key, value in LLAMA_KEYS.items():
        assert reader.fields[key].contents() == value, key
    types = {key: field.types for key, field in reader.fields.items()}
    assert types["llama.block_count"] == [GGUFValueType.UINT32]
    assert types["llama.rope.freq_base"] == [GGUFValueType.FLOAT32]
    assert types["tokenizer.ggml.add_bos_token"] == [GGUFValueType.BOOL]
    assert types["tokenizer.ggml.token_type"] == [GGUFValueType.ARRAY, GGUFValueType.INT32]
    assert types["tokenizer.ggml.merges"] == [GGUFValueType.ARRAY, GGUFValueType.STRING]
    assert len(reader.fields["tokenizer.ggml.tokens"].contents()) == TINY_VOCAB

    state = models["untied-bias"].hf_state_dict()
    tensors = {t.name: (t.tensor_type.name, list(t.shape)) for t in reader.tensors}
    assert len(tensors) == len(state) == 3 + 2 * 13
    assert tensors["token_embd.weight"] == ("Q4_0", [64, 320])
    assert tensors["output.weight"] == ("Q8_0", [64, 320])  # the head keeps 8 bits
    assert tensors["output_norm.weight"] == ("F32", [64])
    assert tensors["blk.1.attn_k.weight"] == ("Q4_0", [64, 32])
    assert tensors["blk.1.attn_k.bias"] == ("F32", [32])
    assert tensors["blk.0.ffn_down.weight"] == ("Q4_0", [128, 64])
    assert all(kind == "F32" for name, (kind, shape) in tensors.items() if len(shape) == 1)


@pytest.mark.parametrize("variant", ["tied", "untied-bias"])
def test_f32_round_trip_is_exact(exported, models, ids, variant: str) -> None:
    original = models[variant]
    loaded = AutoModelForCausalLM.from_pretrained(exported(variant, "f32"))
    expected, got = original.hf_state_dict(), loaded.hf_state_dict()
    assert got.keys() == expected.keys()
    for name, tensor in expected.items():
        assert torch.equal(got[name], tensor), name
    assert torch.equal(logits(loaded, ids), logits(original, ids))
    for field in ("tie_word_embeddings", "attention_bias", "num_key_value_heads", "head_dim",
                  "max_position_embeddings", "rope_theta", "bos_token_id", "eos_token_id"):
        assert getattr(loaded.config, field) == getattr(original.config, field), field
    assert GGUFFile(exported(variant, "f32")).metadata["general.file_type"] == 0


@pytest.mark.parametrize(("file_type", "qtype", "tolerance"), [
    ("f16", GGMLQuantizationType.F16, 2e-3), ("q8_0", GGMLQuantizationType.Q8_0, 2e-2),
    ("q4_0", GGMLQuantizationType.Q4_0, 0.25)])
def test_quantized_round_trip_equals_the_formats_own_rounding(exported, models, ids, file_type, qtype, tolerance):
    """Every loaded weight is exactly what the gguf library makes of the original in that format."""
    original = models["untied-bias"]
    loaded = AutoModelForCausalLM.from_pretrained(exported("untied-bias", file_type))
    config = original.config
    for name, tensor in original.hf_state_dict().items():
        if tensor.dim() == 1:
            expected = tensor  # norms and biases stay F32
        else:
            heads = {"q_proj": config.num_attention_heads, "k_proj": config.num_key_value_heads}
            n_head = next((n for key, n in heads.items() if key in name), None)
            layout = tensor if n_head is None else llama_cpp_permute(tensor.numpy(), n_head)
            stored_as = GGMLQuantizationType.Q8_0 if name == "lm_head.weight" and file_type == "q4_0" else qtype
            rounded = gguf.quants.dequantize(gguf.quants.quantize(np.asarray(layout), stored_as), stored_as)
            expected = torch.from_numpy(rounded.reshape(tensor.shape))
            expected = expected if n_head is None else unpermute_qk(expected, n_head)
        assert torch.equal(loaded.hf_state_dict()[name], expected), name
    reference = logits(original, ids)
    difference = (logits(loaded, ids) - reference).abs().max().item()
    assert 0 < difference <= tolerance * reference.abs().max().item()


def llama_cpp_permute(w: np.ndarray, n_head: int) -> np.ndarray:
    """convert_hf_to_gguf.py's LlamaModel.permute, verbatim."""
    return w.reshape(n_head, 2, w.shape[0] // n_head // 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


@pytest.mark.parametrize(("variant", "file_type"), [("tied", "f32"), ("tied", "q8_0"), ("untied", "q4_0")])
def test_transformers_loads_the_export_like_lmforge(exported, models, tokenizer, variant: str, file_type: str):
    """transformers reads the file with its own GGUF code: a missing or misread key changes its logits."""
    from transformers import AutoModelForCausalLM as HFModel
    from transformers import AutoTokenizer as HFTokenizer

    path = exported(variant, file_type)
    hf = HFModel.from_pretrained(path.parent, gguf_file=path.name, dtype=torch.float32).eval()
    ours = AutoModelForCausalLM.from_pretrained(path)
    ids = torch.tensor([tokenizer.encode(SAMPLES[0])])
    with torch.no_grad():
        expected = hf(ids).logits
    assert (expected - logits(ours, ids)).abs().max().item() <= 1e-4
    if file_type == "f32":  # and both readers see the original model
        assert (expected - logits(models[variant], ids)).abs().max().item() <= 1e-4
    hf_tokenizer = HFTokenizer.from_pretrained(path.parent, gguf_file=path.name)
    for text in SAMPLES:
        assert hf_tokenizer(text)["input_ids"] == tokenizer.encode(text), text
    assert hf_tokenizer.chat_template == CHAT_TEMPLATE
    assert hf.config.tie_word_embeddings is (variant == "tied")


@pytest.mark.parametrize(("variant", "file_type", "tolerance"), [
    ("tied", "f32", 1e-3), ("untied-bias", "f32", 1e-3), ("untied-bias", "q8_0", 2e-2)])
def test_llama_cpp_runs_the_export(exported, models, tokenizer, variant: str, file_type: str, tolerance: float):
    """llama.cpp itself (through llama-cpp-python) tokenizes like us and computes the same logits as the
    original model (f32) or lmforge reading the same file (q8_0: llama.cpp's Q8_0 matmuls also round the
    activations to 8 bits, hence the looser tolerance)."""
    llama_cpp = pytest.importorskip("llama_cpp")
    path = exported(variant, file_type)
    llm = llama_cpp.Llama(str(path), n_ctx=64, n_threads=1, n_batch=16, logits_all=True, verbose=False)
    for text in SAMPLES:
        assert llm.tokenize(text.encode(), add_bos=True, special=True) == tokenizer.encode(text), text
    assert llm.metadata["tokenizer.chat_template"] == CHAT_TEMPLATE
    ids = tokenizer.encode(SAMPLES[1])
    llm.eval(ids)
    theirs = torch.from_numpy(llm.scores[:len(ids)].copy())
    reference = models[variant] if file_type == "f32" else AutoModelForCausalLM.from_pretrained(path)
    ours = logits(reference, torch.tensor([ids]))[0]
    assert (theirs - ours).abs().max().item() <= tolerance * ours.abs().max().item()


def test_the_tokenizer_and_chat_template_survive(exported, tokenizer) -> None:
    path = exported("tied", "f16")
    loaded = Tokenizer.from_pretrained(path)
    for text in SAMPLES:
        assert loaded.encode(text) == tokenizer.encode(text), text
        assert loaded.decode(loaded.encode(text)) == tokenizer.decode(tokenizer.encode(text))
    assert loaded.special_tokens == tokenizer.special_tokens
    messages = [{"role": "user", "content": "Hi <think>"}]
    assert loaded.apply_chat_template(messages) == tokenizer.apply_chat_template(messages)
    metadata = GGUFFile(path).metadata
    tokens, types = metadata["tokenizer.ggml.tokens"], metadata["tokenizer.ggml.token_type"]
    assert (tokens[:3], types[:3]) == (["<|endoftext|>", "<|im_start|>", "<|im_end|>"], [3, 3, 3])  # CONTROL
    assert (tokens[300], types[300]) == ("<think>", 4)  # USER_DEFINED: matched whole, not special
    assert (tokens[301], types[301], tokens[-1], types[-1]) == ("[PAD301]", 5, "[PAD319]", 5)  # UNUSED filler
    assert set(types[3:300]) == {1}


def test_pre_tokenizer_names_are_recognised_by_behaviour() -> None:
    from tokenizers import Tokenizer as Backend
    from tokenizers import models

    for name in PRE_TOKENIZER_NAMES:
        backend = Backend(models.BPE())
        backend.pre_tokenizer = BYTE_LEVEL_PRE_TOKENIZERS[name]()
        assert pre_tokenizer_name(backend) == name


# --------------------------------------------------------------------------- #
# What cannot be exported
# --------------------------------------------------------------------------- #


def test_refusals_say_what_to_do(tmp_path: Path, models, tokenizer) -> None:
    from lmforge.sources import load_config
    from tests.parity import id_tokenizer

    with pytest.raises(UnsupportedError, match="'bert' model; lmforge exports Llama-family.*convert_hf_to_gguf"):
        check_exportable(load_config("all-minilm-l6-v2"), "all-minilm-l6-v2")
    with pytest.raises(UnsupportedError, match="quantized with 'gptq'.*--type q8_0 or q4_0"):
        check_exportable({"model_type": "llama", "quantization_config": {"quant_method": "gptq"}}, "folder")
    with pytest.raises(UnsupportedError, match="WordLevel tokenizer.*convert_hf_to_gguf"):
        export_gguf(models["tied"], id_tokenizer(TINY_VOCAB), tmp_path / "a.gguf")
    with pytest.raises(CheckpointError, match="token ids up to 300 but the model's embedding has 256 rows"):
        export_gguf(tiny_llama(vocab_size=256), tokenizer, tmp_path / "b.gguf")
    with pytest.raises(ValidationError, match="must end in .gguf.*c.gguf"):
        export_gguf(models["tied"], tokenizer, tmp_path / "c.bin")
    with pytest.raises(ValidationError, match="'q5_k'.*f32, f16, q8_0, q4_0"):
        export_gguf(models["tied"], tokenizer, tmp_path / "d.gguf", "q5_k")
    assert list(tmp_path.iterdir()) == []


def test_a_model_quantized_in_memory_is_refused(tmp_path: Path, tokenizer) -> None:
    from lmforge.quant import quantize_model

    model = tiny_llama()
    quantize_model(model, "int8")
    with pytest.raises(UnsupportedError, match=r"quantized in memory \(14 int8 layers.*before quantize_model"):
        export_gguf(model, tokenizer, tmp_path / "q.gguf", "q8_0")


# --------------------------------------------------------------------------- #
# The real SmolLM2-135M-Instruct (its Q4_1 file, dequantized, re-exported as F16)
# --------------------------------------------------------------------------- #


def test_smollm2_exports_with_its_tokenizer(smollm2, smollm2_tokenizer, smollm2_path, tmp_path) -> None:
    result = export_gguf(smollm2, smollm2_tokenizer, tmp_path / "smollm2.gguf", "f16", name="SmolLM2")
    assert result.tensor_types == {"F16": 211, "F32": 61}  # 30 layers x 7 matrices + the tied embedding
    assert result.size == result.path.stat().st_size < 2.05 * smollm2.num_parameters()
    original, ours = GGUFFile(smollm2_path), GGUFFile(result.path)
    for key in ("tokens", "token_type", "merges", "bos_token_id", "eos_token_id", "unknown_token_id",
                "padding_token_id", "add_bos_token", "pre"):
        assert ours.metadata[f"tokenizer.ggml.{key}"] == original.metadata[f"tokenizer.ggml.{key}"], key
    for key in ("tokenizer.chat_template", "llama.context_length", "llama.rope.freq_base", "llama.vocab_size",
                "llama.attention.layer_norm_rms_epsilon", "llama.attention.head_count_kv"):
        assert ours.metadata[key] == original.metadata[key], key
    assert "output.weight" not in ours.tensor_names
    for layer in (0, 29):
        attention = smollm2.model.layers[layer].self_attn
        for name, weight, n_head in (("attn_q", attention.q_proj.weight, 9), ("attn_k", attention.k_proj.weight, 3)):
            stored = unpermute_qk(ours.load_tensor(f"blk.{layer}.{name}.weight"), n_head)
            assert torch.equal(stored, weight.detach().half().float()), (layer, name)
    text = "The capital of France is"
    assert Tokenizer.from_pretrained(result.path).encode(text) == smollm2_tokenizer.encode(text)
