"""Tensor parallelism on CPU (torchrun, gloo): sharded layers and models compute what one process does.

Parallel layers and tiny random models split in 2 match their whole selves (1e-5; identical greedy
tokens); each process reads exactly its slices of a safetensors folder or of SmolLM2's GGUF file;
splits that do not divide the model fail before any weight is read. (SmolLM2 split in 3 through
the engine: tests/engine/test_tensor_parallel.py.)
"""

import copy
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file
from torch import nn

from lmforge.config import GPT2Config, LlamaConfig
from lmforge.distributed.process_group import free_port
from lmforge.distributed.sharded_loading import load_tensor_parallel
from lmforge.distributed.tensor_parallel import (
    TensorParallelPlan,
    check_devices,
    shard_model,
)
from lmforge.errors import ConfigError, UnsupportedError, ValidationError
from lmforge.models.gpt2 import GPT2LMHeadModel
from lmforge.models.llama import LlamaForCausalLM
from lmforge.quant import quantize_loaded
from tests.distributed.tensor_parallel_worker import TINY_GPT2, TINY_LLAMA, randomized

ROOT = Path(__file__).resolve().parents[2]


@pytest.fixture(scope="module")
def two_processes(tmp_path_factory):
    """The worker's results, run once by torchrun with 2 processes; the tests share them. The launch is the
    multi-node one (c10d rendezvous at an address every machine reaches) with a single node."""
    folder = tmp_path_factory.mktemp("tensor-parallel")
    command = [sys.executable, "-m", "torch.distributed.run", "--nnodes", "1", "--nproc_per_node", "2",
               "--rdzv-backend", "c10d", "--rdzv-endpoint", f"127.0.0.1:{free_port()}", "--rdzv-id", "tensor-parallel",
               "-m", "tests.distributed.tensor_parallel_worker", str(folder)]
    environment = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(ROOT)}
    finished = subprocess.run(command, cwd=ROOT, env=environment, capture_output=True, text=True, timeout=300)
    assert finished.returncode == 0, finished.stderr[-4000:]
    return json.loads((folder / "result.json").read_text())


def test_the_engine_under_torchrun_runs_on_the_jobs_ranks_with_the_same_greedy_tokens(two_processes):
    engine = two_processes["engine"]
    assert engine["spawned"] == 0  # rank 1 of the job is the worker; nothing was started
    assert engine["split"] == engine["alone"] and len(engine["alone"][0]) == 12


def test_parallel_layers_equal_their_one_process_counterparts(two_processes):
    assert two_processes["world"] == 2
    assert set(two_processes["layers"]) == {"column", "row", "embedding", "head"}
    for layer, difference in two_processes["layers"].items():
        assert difference <= 1e-5, layer


@pytest.mark.parametrize("kind, kv_heads_per_process", [("llama-gqa", 1), ("llama-mqa", 1), ("gpt2", 2)])
def test_tiny_models_split_in_two_give_the_same_greedy_tokens(two_processes, kind, kv_heads_per_process):
    """GQA with 2 KV heads gives each process one; MQA's single KV head is replicated; GPT-2 has biases."""
    result = two_processes["models"][kind]
    assert result["logits"] <= 1e-5
    assert result["sharded"] == result["alone"]
    assert result["kv_heads"] == kv_heads_per_process


def test_sharded_gguf_loading_reads_the_slices_of_the_whole_model(smollm2):
    """Rank 1 of 3, read slice by slice from the Q4_1 file (q/k rows re-ordered per head), holds
    query heads 3-5, key/value head 1, FFN features 512-1023 and vocabulary rows 16384-32767."""
    loaded = load_tensor_parallel("smollm2-135m-instruct", rank=1, world_size=3).state_dict()
    full = smollm2.state_dict()
    query, kv, ffn, vocab = slice(192, 384), slice(64, 128), slice(512, 1024), slice(16384, 32768)
    expected = {"model.embed_tokens.weight": full["model.embed_tokens.weight"][vocab],
                "lm_head.weight": full["model.embed_tokens.weight"][vocab], "model.norm.weight": full["model.norm.weight"]}
    for layer in (0, 29):
        prefix = f"model.layers.{layer}."
        for name, rows in (("self_attn.q_proj", query), ("self_attn.k_proj", kv), ("self_attn.v_proj", kv),
                           ("mlp.gate_proj", ffn), ("mlp.up_proj", ffn)):
            expected[f"{prefix}{name}.weight"] = full[f"{prefix}{name}.weight"][rows]
        for name, columns in (("self_attn.o_proj", query), ("mlp.down_proj", ffn)):
            expected[f"{prefix}{name}.weight"] = full[f"{prefix}{name}.weight"][:, columns]
        expected[f"{prefix}attn_norm.weight"] = full[f"{prefix}attn_norm.weight"]
    for name, tensor in expected.items():
        assert torch.equal(loaded[name], tensor), name


def tiny_llama(**overrides) -> LlamaForCausalLM:
    torch.manual_seed(0)
    return LlamaForCausalLM(LlamaConfig(**{**TINY_LLAMA, **overrides})).eval()


def assert_read_shards_equal_sharding(path: Path, whole: nn.Module) -> list[nn.Module]:
    """Each rank of 2 read slice by slice from `path` holds exactly what sharding the whole model gives it."""
    shards = []
    for rank in (0, 1):
        loaded = load_tensor_parallel(path, rank=rank, world_size=2)
        sharded = copy.deepcopy(whole)
        shard_model(sharded, rank, 2)
        assert loaded.state_dict().keys() == sharded.state_dict().keys()
        for name, tensor in sharded.state_dict().items():
            assert torch.equal(loaded.state_dict()[name], tensor), name
        shards.append(loaded)
    return shards


def test_sharded_safetensors_loading_equals_sharding_the_loaded_model(tmp_path):
    model = tiny_llama(tie_word_embeddings=True)
    model.save_pretrained(tmp_path)
    for loaded in assert_read_shards_equal_sharding(tmp_path, model):
        assert loaded.lm_head.weight is loaded.model.embed_tokens.weight
        assert loaded.model.embed_tokens.weight.shape == (32, 32)


@pytest.mark.parametrize("bare_backbone", [False, True])
def test_gpt2_shards_are_read_as_slices_of_the_fused_transposed_c_attn(tmp_path, monkeypatch, bare_backbone):
    """GPT-2 keeps q/k/v as column thirds of one Conv1D c_attn ([in, out]); each rank reads its heads' columns
    straight from the file, from a checkpoint with the task prefix or a bare backbone's (as the hub's gpt2)."""
    torch.manual_seed(0)
    model = randomized(GPT2LMHeadModel(GPT2Config(**TINY_GPT2))).eval()
    model.save_pretrained(tmp_path)
    if bare_backbone:
        state = load_file(tmp_path / "model.safetensors")
        save_file({name.removeprefix("transformer."): tensor for name, tensor in state.items()},
                  tmp_path / "model.safetensors")
    monkeypatch.setattr(GPT2LMHeadModel, "from_pretrained", None)  # the whole model is never loaded
    for loaded in assert_read_shards_equal_sharding(tmp_path, model):
        assert loaded.model.layers[1].self_attn.k_proj.weight.shape == (16, 32)


def test_gpt2_gguf_shards_are_row_ranges_of_attn_qkv(tmp_path, monkeypatch):
    """A GPT-2 GGUF keeps attn_qkv [3E, E]: each rank decodes only its heads' rows of q, k and v."""
    from transformers import GPT2Config as HFGPT2Config
    from transformers import GPT2LMHeadModel as HFGPT2LMHeadModel

    from tests.checkpoint.test_gguf import tiny_gpt2_gguf

    torch.manual_seed(0)
    hf_model = HFGPT2LMHeadModel(HFGPT2Config(vocab_size=64, n_positions=32, n_embd=32, n_layer=2, n_head=4))
    path = tiny_gpt2_gguf(tmp_path / "gpt2.gguf", hf_model)
    whole = GPT2LMHeadModel.from_pretrained(path)
    monkeypatch.setattr(GPT2LMHeadModel, "from_pretrained", None)  # the whole model is never loaded
    assert_read_shards_equal_sharding(path, whole)


def test_key_value_heads_are_split_or_replicated_by_query_group():
    plan = lambda world, rank, kv: TensorParallelPlan(rank, world, 8, kv, 4, 64, 64)
    assert [plan(2, rank, 4).kv_heads for rank in range(2)] == [range(0, 2), range(2, 4)]
    assert [plan(4, rank, 2).kv_heads for rank in range(4)] == [range(0, 1), range(0, 1), range(1, 2), range(1, 2)]
    assert [plan(4, rank, 2).query_heads for rank in range(4)] == [range(0, 2), range(2, 4), range(4, 6), range(6, 8)]
    assert plan(4, 3, 2).features("query") == (24, 32) and plan(4, 3, 2).features("kv") == (4, 8)


@pytest.mark.parametrize("overrides, world, message", [
    ({}, 3, "4 attention heads"),
    ({"num_attention_heads": 6, "num_key_value_heads": 3, "hidden_size": 36}, 2, "3 key/value heads"),
    ({"intermediate_size": 66}, 4, "feed-forward width 66"),
    ({"vocab_size": 63}, 2, "vocabulary size 63"),
])
def test_a_split_that_does_not_divide_the_model_fails_with_the_sizes_that_do(overrides, world, message):
    with pytest.raises(ConfigError, match=message) as error:
        shard_model(tiny_llama(**overrides), 0, world)
    assert "does not pad; use one of: 1" in str(error.value)


def test_a_split_larger_than_the_gpus_or_of_a_quantized_model_fails():
    if torch.cuda.device_count() < 64:
        with pytest.raises(ValidationError, match="needs 64 GPUs"):
            check_devices(64, "cuda")
    check_devices(64, "cpu")  # CPU processes share the cores
    model = tiny_llama()
    quantize_loaded(model, "int8")
    with pytest.raises(UnsupportedError, match="without quantization"):
        shard_model(model, 0, 2)
    with pytest.raises(UnsupportedError, match="decoder-only"):
        shard_model(nn.Linear(2, 2), 0, 2)
