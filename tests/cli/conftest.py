"""Helpers for CLI tests: the command through a real subprocess, and in-process runs on the session's model."""

import subprocess
import sys

import pytest

from lmforge.cli import chat, generate
from lmforge.sources import DEFAULT_MODEL


def run_lmforge(*args: str, stdin: str = "", cwd=None) -> subprocess.CompletedProcess:
    """`python -m lmforge.cli ARGS` as a user runs it: its own process, its exit status, separate stdout/stderr."""
    return subprocess.run([sys.executable, "-m", "lmforge.cli", *args], check=False, input=stdin, capture_output=True,
                          text=True, timeout=300, cwd=cwd)


@pytest.fixture
def loaded_smollm2(monkeypatch, smollm2, smollm2_tokenizer):
    """In-process commands reuse the session's SmolLM2 instead of loading it again for every test."""

    def load_generator(ref: str, quantization: str | None = None):
        assert ref == DEFAULT_MODEL and quantization is None
        return smollm2, smollm2_tokenizer

    for module in (generate, chat):
        monkeypatch.setattr(module, "load_generator", load_generator)
