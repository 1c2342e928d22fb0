"""`lmforge tokens count`: raw text, files and stdin as one number; chat histories per message with the
template's share; JSON and cost estimates; one-line errors."""

import io
import json

from lmforge import AutoTokenizer
from lmforge.cli import main
from lmforge.context import count_chat
from lmforge.generation.chat import ChatHistory


def test_text_file_and_stdin_print_the_count(tmp_path, capsys, monkeypatch):
    tokenizer = AutoTokenizer.from_pretrained("smollm2-135m-instruct")
    text = "How many tokens is this sentence?"
    assert main(["tokens", "count", text]) == 0
    assert int(capsys.readouterr().out) == len(tokenizer.encode(text))
    path = tmp_path / "notes.md"
    path.write_text("# Notes\n\nSome *text* here.\n", encoding="utf-8")
    assert main(["tokens", "count", str(path)]) == 0
    assert int(capsys.readouterr().out) == len(tokenizer.encode(path.read_text()))
    monkeypatch.setattr("sys.stdin", io.StringIO(text))
    assert main(["tokens", "count", "-", "--json"]) == 0
    assert json.loads(capsys.readouterr().out)["total"] == len(tokenizer.encode(text))


def test_a_chat_file_is_counted_per_message_with_its_cost(tmp_path, capsys):
    history = ChatHistory("Be brief.", [{"role": "user", "content": "What is 2+2?"},
                                        {"role": "assistant", "content": "4"}])
    history.save(tmp_path / "chat.json")
    expected = count_chat(AutoTokenizer.from_pretrained("smollm2-135m-instruct"), history)
    assert main(["tokens", "count", str(tmp_path / "chat.json")]) == 0
    lines = capsys.readouterr().out.splitlines()
    assert lines[1].split() == ["0", "system", str(expected.messages[0].content_tokens),
                                str(expected.messages[0].turn_tokens), str(expected.messages[0].overhead)]
    assert lines[-1].startswith(f"total: {expected.total} tokens ({expected.content_tokens} text")
    assert main(["tokens", "count", str(tmp_path / "chat.json"), "--json", "--price-in", "1", "--price-out", "4",
                 "--output-tokens", "100"]) == 0
    report = json.loads(capsys.readouterr().out)
    assert [m["role"] for m in report["messages"]] == ["system", "user", "assistant"]
    assert report["cost"] == (expected.total * 1 + 100 * 4) / 1e6


def test_bad_input_is_one_line(tmp_path, capsys):
    broken = tmp_path / "broken.json"
    broken.write_text("{not json", encoding="utf-8")
    for argv, message in ((["missing.json"], "missing.json: no such file"),
                          ([str(broken)], "not valid JSON"),
                          (["x", "--output-tokens", "-1"], "--output-tokens must be >= 0"),
                          (["x", "--price-in", "-2"], "prices must be >= 0")):
        assert main(["tokens", "count", *argv]) == 2
        err = capsys.readouterr().err
        assert err.startswith("lmforge: error: ") and message in err and err.count("\n") == 1


def test_compact_prints_the_compact_text_or_writes_it(tmp_path, capsys):
    page = tmp_path / "page.html"
    page.write_text("<html><head><script>track()</script></head><body><p>Hi &amp; bye</p></body></html>")
    assert main(["tokens", "compact", str(page)]) == 0
    out, err = capsys.readouterr()
    assert out == "Hi & bye\n" and "tokens (" in err and "fewer)" in err
    assert main(["tokens", "compact", str(page), "--out", str(tmp_path / "page.txt")]) == 0
    assert (tmp_path / "page.txt").read_text() == "Hi & bye\n" and capsys.readouterr().out == ""
    assert main(["tokens", "compact", str(tmp_path / "slides.pptx")]) == 2
    assert "no converter for '.pptx' files" in capsys.readouterr().err
