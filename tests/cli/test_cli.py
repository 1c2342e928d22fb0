"""The `lmforge` command: run and info on the embedded models, and errors without tracebacks."""

from lmforge.cli import main


def test_run_prints_a_greedy_continuation(capsys):
    assert main(["run", "The capital of France is", "--raw", "--max-new-tokens", "2"]) == 0
    out = capsys.readouterr().out
    assert "next-token candidates: ' Paris'" in out
    assert "greedy continuation (2 tokens" in out


def test_info_describes_the_encoder(capsys):
    assert main(["info", "all-minilm-l6-v2"]) == 0
    out = capsys.readouterr().out
    assert '"model_type": "bert"' in out and "BertModel: 22,713,216 parameters" in out


def test_bad_model_is_a_one_line_error(capsys, tmp_path):
    assert main(["info", str(tmp_path / "missing")]) == 2
    assert capsys.readouterr().err.startswith("lmforge: error: model ")
