"""`lmforge export gguf`: a model folder to a GGUF file, and one-line errors for what cannot be exported."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from lmforge import AutoModelForCausalLM
from lmforge.checkpoint.gguf import GGUFFile
from lmforge.cli import main
from tests.checkpoint.test_gguf_export import CHAT_TEMPLATE, save_tiny


@pytest.fixture(scope="module")
def folder(tmp_path_factory) -> Path:
    return save_tiny(tmp_path_factory.mktemp("tiny") / "tiny-llama")


def test_exports_a_model_folder(folder: Path, tmp_path: Path, capsys) -> None:
    out = tmp_path / "out" / "tiny.gguf"  # the missing folder is created
    assert main(["export", "gguf", str(folder), "--out", str(out), "--type", "q8_0"]) == 0
    err = capsys.readouterr().err
    assert f"lmforge: wrote {out} (0.1 MB; Q8_0 x15, F32 x5) in " in err
    assert "GGUF q8_0: 100%" in err  # the progress bar over tensors
    gguf = GGUFFile(out)
    assert gguf.metadata["general.name"] == "tiny-llama" and gguf.metadata["general.file_type"] == 7
    assert gguf.metadata["tokenizer.chat_template"] == CHAT_TEMPLATE
    original, exported = AutoModelForCausalLM.from_pretrained(folder), AutoModelForCausalLM.from_pretrained(out)
    ids = torch.tensor([[5, 17, 42, 300]])
    with torch.no_grad():
        assert (original(ids).logits - exported(ids).logits).abs().max() < 0.05


def test_the_tokenizer_can_come_from_another_model(folder: Path, tmp_path: Path, capsys) -> None:
    bare = save_tiny(tmp_path / "bare", with_tokenizer=False)
    out = tmp_path / "bare.gguf"
    assert main(["export", "gguf", str(bare), "--out", str(out)]) == 2
    assert capsys.readouterr().err == (
        f"lmforge: error: {bare} has no tokenizer.json, and a GGUF file carries its tokenizer. Save the tokenizer "
        "next to the weights (tokenizer.save_pretrained(folder)) or name one with --tokenizer MODEL.\n")
    assert not out.exists()
    assert main(["export", "gguf", str(bare), "--tokenizer", str(folder), "--out", str(out), "--type", "f32",
                 "--name", "Bare"]) == 0
    assert GGUFFile(out).metadata["general.name"] == "Bare"
    assert GGUFFile(out).tensor_type("token_embd.weight") == "F32"


def test_unknown_type_is_an_argparse_error(capsys) -> None:
    with pytest.raises(SystemExit) as exit_info:
        main(["export", "gguf", "--out", "x.gguf", "--type", "q5_k"])
    assert exit_info.value.code == 2
    err = capsys.readouterr().err
    assert "argument --type: invalid choice: 'q5_k'" in err and "q8_0" in err


def test_a_bert_model_or_a_missing_path_is_a_one_line_error(tmp_path: Path, capsys) -> None:
    out = tmp_path / "x.gguf"
    assert main(["export", "gguf", "all-minilm-l6-v2", "--out", str(out)]) == 2
    err = capsys.readouterr().err
    assert err.startswith("lmforge: error: all-minilm-l6-v2 is a 'bert' model; lmforge exports Llama-family decoders")
    assert err.count("\n") == 1 and "convert_hf_to_gguf.py" in err
    assert main(["export", "gguf", str(tmp_path / "nowhere"), "--out", str(out)]) == 2
    assert capsys.readouterr().err == (f"lmforge: error: model '{tmp_path / 'nowhere'}' not found: it is not an "
                                       "embedded model (smollm2-135m-instruct, all-minilm-l6-v2), a folder or a "
                                       ".gguf file.\n")
    assert not out.exists()


def test_an_output_name_without_gguf_suffix_is_refused(folder: Path, tmp_path: Path, capsys) -> None:
    assert main(["export", "gguf", str(folder), "--out", str(tmp_path / "model.bin")]) == 2
    assert "must end in .gguf" in capsys.readouterr().err
    assert list(tmp_path.iterdir()) == []
