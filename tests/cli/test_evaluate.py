"""`lmforge eval perplexity` and `lmforge eval exact-match`: the number on stdout, the details on stderr, one-line
errors; few-shot turns saved as a chat history and read back."""

import json
import math

from lmforge.cli import main
from lmforge.evaluation import perplexity
from lmforge.generation.chat import ChatHistory


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


def test_exact_match_few_shot_history_saves_and_loads_back_with_the_same_score(tiny_chat_model, tmp_path, capsys):
    rows = tmp_path / "held.jsonl"
    rows.write_text("".join(json.dumps({"instruction": f"Spell {w}", "response": "-".join(w)}) + "\n"
                            for w in ["cat", "dog", "sun"]))
    shots = tmp_path / "shots.json"
    common = ["eval", "exact-match", "--model", str(tiny_chat_model), "--data", str(rows), "--max-tokens", "4"]
    assert main([*common, "--shots-from", str(rows), "--shots", "2", "--save-history", str(shots),
                 "--predictions", str(tmp_path / "p.jsonl")]) == 0
    first = capsys.readouterr()
    assert [m["content"] for m in ChatHistory.load(shots).messages] == ["Spell cat", "c-a-t", "Spell dog", "d-o-g"]
    predictions = [json.loads(line) for line in (tmp_path / "p.jsonl").read_text().splitlines()]
    assert [p["expected"] for p in predictions] == ["c-a-t", "d-o-g", "s-u-n"]
    assert float(first.out) == sum(p["exact"] for p in predictions) / 3
    assert "after 2 shot(s)" in first.err
    assert main([*common, "--history", str(shots), "--predictions", str(tmp_path / "q.jsonl")]) == 0
    again = capsys.readouterr()
    assert again.out == first.out and (tmp_path / "q.jsonl").read_text() == (tmp_path / "p.jsonl").read_text()


def test_exact_match_bad_input_is_one_line(tiny_chat_model, tmp_path, capsys):
    plain = tmp_path / "plain.jsonl"
    plain.write_text(json.dumps({"prompt": "2+2=", "completion": "4"}) + "\n")
    model = ["--model", str(tiny_chat_model)]
    cases = [(["--shots", "500"], "--shots 500: choose between 0 and the 400 rows of the dates training split"),
             (["--limit", "0"], "--limit must be at least 1"),
             (["--data", str(plain)], "row 1: prompt/completion rows are plain text"),
             (["--history", str(tmp_path / "none.json")], "none.json: no such file")]
    for argv, message in cases:
        assert main(["eval", "exact-match", *model, *argv]) == 2
        err = capsys.readouterr().err
        assert err.startswith("lmforge: error: ") and message in err and err.count("\n") == 1
