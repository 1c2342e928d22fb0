"""GGUF reading: dequantization parity with the gguf library, file errors, HF layout."""

from __future__ import annotations

from collections import Counter
from pathlib import Path

import gguf
import numpy as np
import pytest
import torch
from gguf import GGMLQuantizationType, GGUFValueType, GGUFWriter

from lmforge.checkpoint.gguf import GGUFFile
from lmforge.checkpoint.gguf_convert import gguf_to_hf, permute_qk, unpermute_qk
from lmforge.checkpoint.gguf_dequant import QUANT_FORMATS, dequantize
from lmforge.errors import CheckpointError, UnsupportedError

# --------------------------------------------------------------------------- #
# Helpers
# --------------------------------------------------------------------------- #


def write_gguf(path: Path, arch: str, tensors: dict[str, np.ndarray], configure=lambda w: None) -> Path:
    """Write a GGUF with float32 `tensors` (torch-shaped numpy arrays) and extra metadata."""
    writer = GGUFWriter(path, arch)
    configure(writer)
    for name, array in tensors.items():
        writer.add_tensor(name, np.ascontiguousarray(array, dtype=np.float32))
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return path


def llama_cpp_permute(w: np.ndarray, n_head: int) -> np.ndarray:
    """convert_hf_to_gguf.py's LlamaModel.permute, verbatim (the reference we must invert)."""
    return w.reshape(n_head, 2, w.shape[0] // n_head // 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


def random_fp16_bytes(rng: np.random.Generator, n: int) -> np.ndarray:
    return (rng.standard_normal((n, 1)) * 0.05).astype(np.float16).view(np.uint8)


# --------------------------------------------------------------------------- #
# Dequantization
# --------------------------------------------------------------------------- #

QUANTIZABLE = ["F32", "F16", "BF16", "Q8_0", "Q4_0", "Q4_1", "Q5_0", "Q5_1"]
# K-quants the gguf library can only decode: byte offsets of their fp16 fields.
K_QUANT_FP16_FIELDS = {"Q2_K": (80, 82), "Q3_K": (108,), "Q4_K": (0, 2), "Q5_K": (0, 2), "Q6_K": (208,)}


@pytest.mark.parametrize("type_name", QUANTIZABLE)
def test_dequantize_matches_gguf_on_quantized_random_weights(type_name: str) -> None:
    rng = np.random.default_rng(0)
    weights = rng.standard_normal((6, 256)).astype(np.float32)
    qtype = GGMLQuantizationType[type_name]
    stored = gguf.quants.quantize(weights, qtype)
    reference = torch.from_numpy(gguf.quants.dequantize(stored, qtype))
    ours = dequantize(torch.from_numpy(np.ascontiguousarray(stored).view(np.uint8)), type_name, (6, 256))
    assert ours.dtype == torch.float32 and ours.shape == (6, 256)
    assert torch.equal(ours, reference)


@pytest.mark.parametrize("type_name", sorted(K_QUANT_FP16_FIELDS))
def test_dequantize_k_quants_match_gguf_on_random_blocks(type_name: str) -> None:
    rng = np.random.default_rng(1)
    fmt = QUANT_FORMATS[type_name]
    n_blocks = 12
    blocks = rng.integers(0, 256, (n_blocks, fmt.type_size), dtype=np.uint8)
    for offset in K_QUANT_FP16_FIELDS[type_name]:  # random bytes may spell inf/nan; use real scales
        blocks[:, offset:offset + 2] = random_fp16_bytes(rng, n_blocks)
    qtype = GGMLQuantizationType[type_name]
    reference = torch.from_numpy(gguf.quants.dequantize(blocks, qtype)).reshape(3, -1)
    ours = dequantize(torch.from_numpy(blocks), type_name, (3, n_blocks * fmt.block_size // 3))
    assert torch.isfinite(reference).all()
    assert torch.equal(ours, reference)


def test_dequantize_q8_k() -> None:
    # gguf has no Q8_K decoder; the format is simple enough to spell out: fp32 d, 256 int8, 16 int16 sums.
    rng = np.random.default_rng(2)
    d = rng.standard_normal(2).astype(np.float32)
    q = rng.integers(-128, 128, (2, 256), dtype=np.int8)
    sums = q.reshape(2, 16, 16).sum(-1).astype(np.int16)
    blocks = np.concatenate([d.reshape(2, 1).view(np.uint8), q.view(np.uint8), sums.view(np.uint8)], axis=1)
    ours = dequantize(torch.from_numpy(blocks), "Q8_K", (512,))
    assert torch.equal(ours, torch.from_numpy((d[:, None] * q.astype(np.float32)).reshape(-1)))


def test_dequantize_rejects_unknown_type_and_wrong_size() -> None:
    with pytest.raises(UnsupportedError, match="IQ2_XXS.*Q4_K"):
        dequantize(torch.zeros(66, dtype=torch.uint8), "IQ2_XXS", (256,))
    with pytest.raises(CheckpointError, match="needs 34 bytes but has 33"):
        dequantize(torch.zeros(33, dtype=torch.uint8), "Q8_0", (32,))


# --------------------------------------------------------------------------- #
# The file format and its errors
# --------------------------------------------------------------------------- #


@pytest.fixture
def small_gguf(tmp_path: Path) -> Path:
    def configure(w: GGUFWriter) -> None:
        w.add_key_value("test.text", "héllo", GGUFValueType.STRING)
        w.add_key_value("test.count", 7, GGUFValueType.UINT32)
        w.add_key_value("test.offset", -5_000_000_000, GGUFValueType.INT64)
        w.add_key_value("test.size", 5_000_000_000, GGUFValueType.UINT64)
        w.add_key_value("test.precise", 0.1, GGUFValueType.FLOAT64)
        w.add_key_value("test.scale", 0.5, GGUFValueType.FLOAT32)
        w.add_key_value("test.flag", True, GGUFValueType.BOOL)
        w.add_key_value("test.words", ["a", "bc"], GGUFValueType.ARRAY, GGUFValueType.STRING)
        w.add_key_value("test.ids", [1, 2, 3], GGUFValueType.ARRAY, GGUFValueType.INT32)
        w.add_key_value("test.sizes", [1 << 40, 7], GGUFValueType.ARRAY, GGUFValueType.UINT64)

    rng = np.random.default_rng(3)
    writer = GGUFWriter(tmp_path / "small.gguf", "llama")
    configure(writer)
    writer.add_tensor("q8", gguf.quants.quantize(rng.standard_normal((4, 64)).astype(np.float32),
                                                 GGMLQuantizationType.Q8_0), raw_dtype=GGMLQuantizationType.Q8_0)
    writer.add_tensor("unsupported", np.zeros((2, 18), np.uint8), raw_dtype=GGMLQuantizationType.IQ4_NL)
    writer.add_tensor("last", np.arange(24, dtype=np.float32).reshape(3, 8))  # 96 bytes: no trailing padding
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return tmp_path / "small.gguf"


def test_reads_metadata_as_python_values_and_tensors_torch_shaped(small_gguf: Path) -> None:
    f = GGUFFile(small_gguf)
    assert f.architecture == "llama" and f.version == 3
    expected = {"test.text": "héllo", "test.count": 7, "test.offset": -5_000_000_000, "test.size": 5_000_000_000,
                "test.precise": 0.1, "test.scale": 0.5, "test.flag": True, "test.words": ["a", "bc"],
                "test.ids": [1, 2, 3], "test.sizes": [1 << 40, 7]}
    for key, value in expected.items():
        assert f.metadata[key] == value and type(f.metadata[key]) is type(value), key
    assert f.tensor_names == ["q8", "unsupported", "last"]
    assert [f.tensor_type(n) for n in f.tensor_names] == ["Q8_0", "IQ4_NL", "F32"]
    assert f.tensor_shape("q8") == (4, 64) and f.load_tensor("q8").shape == (4, 64)
    assert torch.equal(f.load_tensor("last"), torch.arange(24, dtype=torch.float32).reshape(3, 8))
    assert f.raw_tensor("q8").numel() == 4 * 2 * 34


def test_unsupported_tensor_type_and_unknown_name(small_gguf: Path) -> None:
    f = GGUFFile(small_gguf)
    with pytest.raises(CheckpointError, match=r"small\.gguf.*'unsupported'.*IQ4_NL.*supported: F32"):
        f.load_tensor("unsupported")
    with pytest.raises(UnsupportedError):  # the same error is also an UnsupportedError
        f.load_tensor("unsupported")
    with pytest.raises(CheckpointError, match="no tensor named 'nope'"):
        f.load_tensor("nope")


def test_missing_file_folder_and_empty_file(tmp_path: Path) -> None:
    with pytest.raises(CheckpointError, match="not found.*missing.gguf"):
        GGUFFile(tmp_path / "missing.gguf")
    with pytest.raises(CheckpointError, match="is a folder"):
        GGUFFile(tmp_path)
    (tmp_path / "empty.gguf").write_bytes(b"")
    with pytest.raises(CheckpointError, match="empty.gguf is truncated"):
        GGUFFile(tmp_path / "empty.gguf")


def test_bad_magic_and_unsupported_version(small_gguf: Path, tmp_path: Path) -> None:
    data = small_gguf.read_bytes()
    (tmp_path / "zip.gguf").write_bytes(b"PK\x03\x04" + data[4:])
    with pytest.raises(CheckpointError, match=r"zip.gguf is not a GGUF file: it starts with b'PK\\x03\\x04'"):
        GGUFFile(tmp_path / "zip.gguf")
    for version, message in ((1, "version 1"), (4, "version 4"), (3 << 24, "big-endian")):
        (tmp_path / "v.gguf").write_bytes(data[:4] + version.to_bytes(4, "little") + data[8:])
        with pytest.raises(CheckpointError, match=message):
            GGUFFile(tmp_path / "v.gguf")


@pytest.mark.parametrize("keep", [0.002, 0.05, 0.3, 0.6, 0.9, 0.999])
def test_truncated_file(small_gguf: Path, tmp_path: Path, keep: float) -> None:
    data = small_gguf.read_bytes()
    cut = tmp_path / "cut.gguf"
    cut.write_bytes(data[: int(len(data) * keep)])
    with pytest.raises(CheckpointError, match="truncated|corrupt"):
        GGUFFile(cut)


def test_corrupt_lengths_and_types(small_gguf: Path, tmp_path: Path) -> None:
    data = bytearray(small_gguf.read_bytes())
    bad = tmp_path / "bad.gguf"
    bad.write_bytes(data[:24] + (1 << 40).to_bytes(8, "little") + data[32:])  # first key's length
    with pytest.raises(CheckpointError, match="truncated or corrupt"):
        GGUFFile(bad)
    type_at = data.index(b"test.count") + len(b"test.count")  # the value type of that key
    bad.write_bytes(data[:type_at] + (99).to_bytes(4, "little") + data[type_at + 4:])
    with pytest.raises(CheckpointError, match="unknown value type 99"):
        GGUFFile(bad)


# --------------------------------------------------------------------------- #
# GGUF -> Hugging Face layout on tiny synthetic models
# --------------------------------------------------------------------------- #


def test_unpermute_inverts_llama_cpp_permutation() -> None:
    torch.manual_seed(0)
    for n_head, shape in ((4, (32, 16)), (2, (16, 16)), (4, (32,))):
        w = torch.randn(shape)
        permuted = permute_qk(w, n_head)
        assert torch.equal(permuted, torch.from_numpy(llama_cpp_permute(w.numpy(), n_head)))
        assert not torch.equal(permuted, w)
        assert torch.equal(unpermute_qk(permuted, n_head), w)


def tiny_llama_gguf(tmp_path: Path, hf_model: torch.nn.Module) -> Path:
    """Convert an HF Llama to GGUF the way convert_hf_to_gguf.py does (float32)."""
    cfg = hf_model.config
    renames = {"model.embed_tokens.weight": "token_embd.weight", "model.norm.weight": "output_norm.weight",
               "lm_head.weight": "output.weight"}
    layer_renames = {"input_layernorm": "attn_norm", "self_attn.q_proj": "attn_q", "self_attn.k_proj": "attn_k",
                     "self_attn.v_proj": "attn_v", "self_attn.o_proj": "attn_output",
                     "post_attention_layernorm": "ffn_norm", "mlp.gate_proj": "ffn_gate",
                     "mlp.up_proj": "ffn_up", "mlp.down_proj": "ffn_down"}
    tensors = {}
    for name, value in hf_model.state_dict().items():
        array = value.numpy()
        if name.startswith("model.layers."):
            _, _, layer, *rest = name.split(".")
            module, kind = ".".join(rest[:-1]), rest[-1]
            if module == "self_attn.q_proj":
                array = llama_cpp_permute(array, cfg.num_attention_heads)
            if module == "self_attn.k_proj":
                array = llama_cpp_permute(array, cfg.num_key_value_heads)
            name = f"blk.{layer}.{layer_renames[module]}.{kind}"
        else:
            name = renames[name]
        tensors[name] = array

    def configure(w: GGUFWriter) -> None:
        w.add_context_length(cfg.max_position_embeddings)
        w.add_embedding_length(cfg.hidden_size)
        w.add_block_count(cfg.num_hidden_layers)
        w.add_feed_forward_length(cfg.intermediate_size)
        w.add_head_count(cfg.num_attention_heads)
        w.add_head_count_kv(cfg.num_key_value_heads)
        w.add_rope_dimension_count(cfg.head_dim)
        w.add_rope_freq_base(500000.0)
        w.add_rope_scaling_type(gguf.RopeScalingType.LINEAR)
        w.add_rope_scaling_factor(2.0)
        w.add_layer_norm_rms_eps(1e-6)
        w.add_bos_token_id(1)
        w.add_eos_token_id(2)

    return write_gguf(tmp_path / "tiny-llama.gguf", "llama", tensors, configure)


def test_llama_round_trip_untied_with_bias(tmp_path: Path) -> None:
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    hf_model = LlamaForCausalLM(LlamaConfig(
        vocab_size=64, hidden_size=32, intermediate_size=48, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=2, max_position_embeddings=128, attention_bias=True, tie_word_embeddings=False,
    ))
    config, state_dict = gguf_to_hf(tiny_llama_gguf(tmp_path, hf_model))
    expected = hf_model.state_dict()
    assert state_dict.keys() == expected.keys()
    for name, value in expected.items():
        assert torch.equal(state_dict[name], value), name
    assert config["tie_word_embeddings"] is False and config["attention_bias"] is True
    assert config["mlp_bias"] is False
    assert (config["num_attention_heads"], config["num_key_value_heads"], config["head_dim"]) == (4, 2, 8)
    assert config["rope_theta"] == 500000.0
    assert config["rope_scaling"] == {"rope_type": "linear", "factor": 2.0}
    assert (config["bos_token_id"], config["eos_token_id"], config["pad_token_id"]) == (1, 2, None)


def tiny_gpt2_gguf(path: Path, hf_model: torch.nn.Module) -> Path:
    """Convert an HF GPT-2 (n_inner unset: 4 x n_embd) to GGUF the way convert_hf_to_gguf.py does (float32)."""
    cfg = hf_model.config
    conv1d = ("attn.c_attn.weight", "attn.c_proj.weight", "mlp.c_fc.weight", "mlp.c_proj.weight")
    renames = {"ln_1": "attn_norm", "attn.c_attn": "attn_qkv", "attn.c_proj": "attn_output", "ln_2": "ffn_norm",
               "mlp.c_fc": "ffn_up", "mlp.c_proj": "ffn_down"}
    tensors = {}
    for name, value in hf_model.state_dict().items():
        array = value.numpy().T if name.endswith(conv1d) else value.numpy()
        if name.startswith("transformer.h."):
            _, _, layer, *rest = name.split(".")
            tensors[f"blk.{layer}.{renames['.'.join(rest[:-1])]}.{rest[-1]}"] = array
        elif name != "lm_head.weight":
            short = name.removeprefix("transformer.")
            tensors[{"wte.weight": "token_embd.weight", "wpe.weight": "position_embd.weight",
                     "ln_f.weight": "output_norm.weight", "ln_f.bias": "output_norm.bias"}[short]] = array

    def configure(w: GGUFWriter) -> None:
        w.add_context_length(cfg.n_positions)
        w.add_embedding_length(cfg.n_embd)
        w.add_feed_forward_length(4 * cfg.n_embd)
        w.add_block_count(cfg.n_layer)
        w.add_head_count(cfg.n_head)
        w.add_layer_norm_eps(1e-5)

    return write_gguf(path, "gpt2", tensors, configure)


def test_gpt2_round_trip(tmp_path: Path) -> None:
    from transformers import GPT2Config, GPT2LMHeadModel

    torch.manual_seed(0)
    hf_model = GPT2LMHeadModel(GPT2Config(vocab_size=64, n_positions=32, n_embd=32, n_layer=2, n_head=4))
    config, state_dict = gguf_to_hf(tiny_gpt2_gguf(tmp_path / "gpt2.gguf", hf_model))
    assert config["tie_word_embeddings"] is True and "lm_head.weight" not in state_dict
    rebuilt = GPT2LMHeadModel(GPT2Config(**{k: v for k, v in config.items() if k != "torch_dtype"}))
    rebuilt.load_state_dict(state_dict, strict=False)
    for name, value in hf_model.state_dict().items():
        assert torch.equal(rebuilt.state_dict()[name], value), name


def test_unsupported_architecture_and_tensor(tmp_path: Path) -> None:
    with pytest.raises(UnsupportedError, match="'bert'.*llama, gpt2"):
        gguf_to_hf(write_gguf(tmp_path / "bert.gguf", "bert", {"token_embd.weight": np.zeros((4, 4))}))

    def configure(w: GGUFWriter) -> None:
        for key, value in (("embedding_length", 4), ("block_count", 1), ("feed_forward_length", 8),
                           ("attention.head_count", 1)):
            w.add_uint32(f"llama.{key}", value)

    moe = write_gguf(tmp_path / "moe.gguf", "llama",
                     {"token_embd.weight": np.zeros((4, 4)), "blk.0.ffn_gate_exps.weight": np.zeros((2, 8, 4))},
                     configure)
    with pytest.raises(UnsupportedError, match="'blk.0.ffn_gate_exps.weight' has no place"):
        gguf_to_hf(moe)
    rope = write_gguf(tmp_path / "rope.gguf", "llama",
                      {"token_embd.weight": np.zeros((4, 4)), "rope_freqs.weight": np.ones(2)}, configure)
    with pytest.raises(UnsupportedError, match="rope_freqs"):
        gguf_to_hf(rope)


# --------------------------------------------------------------------------- #
# The real SmolLM2-135M-Instruct Q4_1 file against HF transformers
# --------------------------------------------------------------------------- #


@pytest.fixture(scope="module")
def smollm2_gguf(smollm2_path: Path) -> GGUFFile:
    return GGUFFile(smollm2_path)


@pytest.fixture(scope="module")
def converted(smollm2_gguf: GGUFFile) -> tuple[dict, dict[str, torch.Tensor]]:
    return gguf_to_hf(smollm2_gguf)


def test_real_file_tensor_table(smollm2_gguf: GGUFFile) -> None:
    assert smollm2_gguf.architecture == "llama"
    types = Counter(smollm2_gguf.tensor_type(name) for name in smollm2_gguf.tensor_names)
    assert types == {"Q4_1": 210, "F32": 61, "Q8_0": 1}
    assert smollm2_gguf.tensor_shape("token_embd.weight") == (49152, 576)
    assert "output.weight" not in smollm2_gguf.tensor_names


@pytest.mark.parametrize("name", ["token_embd.weight", "blk.0.attn_q.weight", "blk.29.ffn_down.weight"])
def test_real_q8_0_and_q4_1_tensors_match_gguf(smollm2_gguf: GGUFFile, name: str) -> None:
    qtype = GGMLQuantizationType[smollm2_gguf.tensor_type(name)]
    reference = gguf.quants.dequantize(smollm2_gguf.raw_tensor(name).numpy(), qtype)
    reference = torch.from_numpy(reference).reshape(smollm2_gguf.tensor_shape(name))
    assert torch.equal(smollm2_gguf.load_tensor(name), reference)


def test_real_state_dict_equals_transformers(converted: tuple, hf_smollm2: torch.nn.Module) -> None:
    _, state_dict = converted
    expected = hf_smollm2.state_dict()
    assert set(expected) - set(state_dict) == {"lm_head.weight"}  # tied to the embedding
    assert set(state_dict) <= set(expected)
    for name in ("model.embed_tokens.weight", "model.layers.0.self_attn.q_proj.weight",
                 "model.layers.0.self_attn.k_proj.weight", "model.layers.29.self_attn.k_proj.weight"):
        assert torch.equal(state_dict[name], expected[name]), name
    mismatched = [name for name, value in state_dict.items() if not torch.equal(value, expected[name])]
    assert mismatched == []


def test_real_config_agrees_with_transformers(converted: tuple, hf_smollm2: torch.nn.Module) -> None:
    config, _ = converted
    hf = hf_smollm2.config
    for key in ("vocab_size", "hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads",
                "num_key_value_heads", "head_dim", "max_position_embeddings", "rms_norm_eps",
                "tie_word_embeddings", "bos_token_id", "eos_token_id", "pad_token_id", "attention_bias"):
        assert config[key] == getattr(hf, key), key
    hf_rope_theta = getattr(hf, "rope_theta", None) or hf.rope_parameters["rope_theta"]
    assert config["rope_theta"] == hf_rope_theta == 100000.0
    assert (config["num_attention_heads"], config["num_key_value_heads"], config["num_hidden_layers"]) == (9, 3, 30)
    assert "rope_scaling" not in config and config["model_type"] == "llama"


def test_open_gguf_parses_an_unchanged_file_once(tmp_path: Path) -> None:
    from lmforge.checkpoint.gguf import open_gguf

    path = write_gguf(tmp_path / "m.gguf", "llama", {"token_embd.weight": np.zeros((4, 2))})
    first = open_gguf(path)
    assert open_gguf(path) is first
    write_gguf(path, "gpt2", {"token_embd.weight": np.zeros((4, 2)), "output_norm.weight": np.ones(2)})
    assert open_gguf(path) is not first and open_gguf(path).architecture == "gpt2"
    with pytest.raises(CheckpointError, match="nowhere.gguf"):
        open_gguf(tmp_path / "nowhere.gguf")
