"""`lmforge eval perplexity`: the number on stdout, the details on stderr, one-line errors."""

import math

from lmforge.cli import main
from lmforge.evaluation import perplexity


def test_perplexity_of_a_file_matches_the_library(tmp_path, capsys, smollm2, smollm2_tokenizer):
    text = tmp_path / "text.txt"
    text.write_text("The quick brown fox jumps over the lazy dog. " * 12, encoding="utf-8")
    assert main(["eval", "perplexity", "--text", str(text), "--context", "64", "--stride", "32"]) == 0
    out, err = capsys.readouterr()
    expected = perplexity(smollm2, smollm2_tokenizer.encode(text.read_text()), 64, 32).perplexity
    assert math.isclose(float(out), expected, rel_tol=1e-4) and float(out) < 10  # a repeated sentence is easy
    assert "tokens scored, context 64, stride 32" in err


def test_missing_text_is_one_line(capsys):
    assert main(["eval", "perplexity", "--text", "/no/such/file.txt"]) == 2
    assert capsys.readouterr().err.startswith("lmforge: error: text file '/no/such/file.txt' not found")
