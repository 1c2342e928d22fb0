"""`lmforge chat`: multi-turn from piped stdin, /commands, saved histories, and Ctrl-C that stops one answer."""

import io
import json

import pytest

from lmforge.cli import common, main
from lmforge.generation.chat import ChatHistory
from tests.cli.conftest import run_lmforge

GREEDY = ["--temperature", "0", "--max-tokens", "8"]


def test_piped_chat_keeps_stdout_for_answers(tmp_path):
    """Through the entry point: stdin is a pipe, so no prompt markers; stdout holds the answers alone."""
    result = run_lmforge("chat", *GREEDY, stdin="hi\n/system be brief\n/save chat.json\n/exit\nnever read\n",
                         cwd=tmp_path)
    assert result.returncode == 0, result.stderr
    answer = "Hello there! How can I assist you"
    assert result.stdout == answer + "\n"
    assert "system prompt set to 'be brief'" in result.stderr and "saved 2 messages to chat.json" in result.stderr
    assert json.loads((tmp_path / "chat.json").read_text()) == {
        "format": "lmforge.chat/1", "system": "be brief",
        "messages": [{"role": "user", "content": "hi"}, {"role": "assistant", "content": answer}]}


def chat(monkeypatch, capsys, lines: str, *flags: str) -> tuple[int, str, str]:
    monkeypatch.setattr("sys.stdin", io.StringIO(lines))
    status = main(["chat", *GREEDY, *flags])
    out, err = capsys.readouterr()
    return status, out, err


def test_a_loaded_history_is_continued_and_reset(loaded_smollm2, monkeypatch, capsys, tmp_path):
    saved = ChatHistory(system="You are a geography teacher.")
    saved.add_user("What is the capital of France?")
    saved.add_assistant("Paris.")
    saved.save(tmp_path / "before.json")
    lines = (f"/load {tmp_path / 'before.json'}\nAnd of Italy?\n/save {tmp_path / 'after.json'}\n"
             f"/reset\n/save {tmp_path / 'reset.json'}\n")  # EOF after the last line ends the chat
    status, out, err = chat(monkeypatch, capsys, lines)
    assert status == 0 and out.count("\n") == 1
    assert "loaded 2 messages" in err and "(with its system prompt)" in err
    after = ChatHistory.load(tmp_path / "after.json")
    assert after.system == "You are a geography teacher."
    assert [m["content"] for m in after.messages] == ["What is the capital of France?", "Paris.", "And of Italy?",
                                                      out.rstrip("\n")]
    assert ChatHistory.load(tmp_path / "reset.json") == ChatHistory(system="You are a geography teacher.")


def test_mistakes_are_reported_and_the_chat_goes_on(loaded_smollm2, monkeypatch, capsys, tmp_path):
    (tmp_path / "bad.json").write_text('[{"role": "robot", "content": "beep"}]')
    lines = f"/dance\n/save\n/load {tmp_path / 'bad.json'}\n/help\nhi\n"
    status, out, err = chat(monkeypatch, capsys, lines)
    assert status == 0 and out == "Hello there! How can I assist you\n"
    assert "lmforge: error: unknown command /dance; type /help for the list." in err
    assert "lmforge: error: /save needs a file name, e.g. /save chat.json" in err
    assert "bad.json: message 0: role 'robot' is not one of system, user, assistant, tool" in err
    assert "/system  TEXT  set the system prompt" in err  # /help


def test_ctrl_c_stops_the_answer_but_not_the_chat(loaded_smollm2, monkeypatch, capsys, tmp_path):
    written = []

    def emit_then_interrupt(text: str) -> None:  # the user presses Ctrl-C once two pieces are on screen
        written.append(text)
        if len(written) == 2:
            raise KeyboardInterrupt

    monkeypatch.setattr(common, "_emit", emit_then_interrupt)
    status, _, err = chat(monkeypatch, capsys, f"hi\n/save {tmp_path / 'chat.json'}\n")
    assert status == 0 and "finish reason: interrupted" in err
    assert ChatHistory.load(tmp_path / "chat.json").messages[-1] == {"role": "assistant", "content": "".join(written)}


def test_ctrl_c_at_the_prompt_leaves(loaded_smollm2, monkeypatch, capsys):
    def interrupted_input() -> str:
        raise KeyboardInterrupt

    monkeypatch.setattr("builtins.input", interrupted_input)
    assert main(["chat"]) == 0


@pytest.mark.parametrize("argv,message", [
    (["chat", "--min-p", "1.5"], "SamplingParams.min_p must be in [0, 1], got 1.5."),
    (["chat", "--model", "all-minilm-l6-v2"], "is a bert model, which cannot generate text"),
    (["chat", "--rag", "missing.index", "--rag-top-k", "0"], "--rag-top-k must be >= 1, got 0."),
])
def test_bad_options_end_the_chat_before_it_starts(capsys, argv, message):
    assert main(argv) == 2
    assert message in capsys.readouterr().err


def test_a_window_sends_only_the_last_exchanges_and_says_so(loaded_smollm2, monkeypatch, capsys, tmp_path):
    lines = f"My name is Ada.\nWhat is 2+2?\nWhat is my name?\n/save {tmp_path / 'chat.json'}\n"
    status, out, err = chat(monkeypatch, capsys, lines, "--context", "window", "--window-turns", "1")
    assert status == 0 and len(out.splitlines()) == 3
    assert err.count("context:") == 2 and "the 2 oldest message(s) left out or summarized" in err
    assert len(ChatHistory.load(tmp_path / "chat.json").messages) == 6  # the whole conversation is kept
    status, _, err = chat(monkeypatch, capsys, "hi\n", "--context", "window")
    assert status == 2 and "the window strategy needs max_turns" in err


def test_summarize_chats_normally_while_the_conversation_fits(loaded_smollm2, monkeypatch, capsys):
    status, out, err = chat(monkeypatch, capsys, "My name is Ada.\nWhat is my name?\n", "--context", "summarize")
    assert status == 0 and len(out.splitlines()) == 2 and "context:" not in err
    status, _, err = chat(monkeypatch, capsys, "hi\n", "--context", "summarize", "--window-tokens", "50")
    assert status == 2 and "--window-tokens applies to the truncate and window strategies" in err


def test_state_pins_the_facts_and_sends_only_the_last_exchange(loaded_smollm2, monkeypatch, capsys):
    lines = "My cat is called Pixel.\nI live in Lyon.\nWhat is my cat called?\n"
    status, out, err = chat(monkeypatch, capsys, lines, "--context", "state", "--max-tokens", "12")
    assert status == 0 and len(out.splitlines()) == 3
    assert err.count("context:") == 2  # the 2nd and 3rd turns leave older exchanges out
    assert "facts: {" in err and "prompt +" in err  # the state and what keeping it cost


def test_reasoning_needs_a_thinking_model(loaded_smollm2, monkeypatch, capsys):
    status, _, err = chat(monkeypatch, capsys, "hi\n", "--reasoning", "64")
    assert status == 2 and "no thinking mode" in err
    with pytest.raises(SystemExit) as exit_status:
        main(["chat", "--reasoning", "lots"])
    assert exit_status.value.code == 2 and "expected 'off' or a number of tokens" in capsys.readouterr().err
