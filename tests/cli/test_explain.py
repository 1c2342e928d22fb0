"""`lmforge explain`: an HTML report and JSON from the same run, and one-line errors for bad input."""

import json

from lmforge.cli import main

PROMPT = "Why is the sky blue?"


def test_the_command_writes_html_and_json_and_refuses_bad_input(loaded_smollm2, capsys, tmp_path):
    out = tmp_path / "sky.html"
    assert main(["explain", PROMPT, "--max-tokens", "3", "--temperature", "0", "--out", str(out), "--json"]) == 0
    data = json.loads(capsys.readouterr().out)
    assert len(data["sampling"]) == 3 and "Sampling decisions" in out.read_text()
    for argv, message in ((["--out", str(tmp_path / "missing" / "r.html")], "not writable"),
                          (["--out", str(tmp_path)], "is a folder"),
                          ([], "say where the report goes")):
        assert main(["explain", PROMPT, *argv]) == 2
        assert message in capsys.readouterr().err
    assert main(["explain", "word " * 9000, "--raw", "--json"]) == 2
    assert "shorten it" in capsys.readouterr().err


def test_layers_and_heads_are_chosen_by_index_and_checked(loaded_smollm2, capsys):
    assert main(["explain", PROMPT, "--max-tokens", "1", "--json", "--layers", "0,29", "--heads", "2"]) == 0
    attention = json.loads(capsys.readouterr().out)["forward"]["attention"]
    assert {layer: list(heads) for layer, heads in attention.items()} == {"0": ["2"], "29": ["2"]}
    assert main(["explain", PROMPT, "--max-tokens", "1", "--json", "--layers", "30"]) == 2
    assert "layer 30 is out of range: this model has layers 0..29" in capsys.readouterr().err
