"""ChatHistory: messages, the chat-template prompt, and JSON save/load with clear errors for bad files."""

import json
import re

import pytest

from lmforge import AutoTokenizer
from lmforge.errors import InputError, UnsupportedError
from lmforge.generation.chat import FORMAT, ChatHistory


def test_messages_reset_and_system_prompt():
    history = ChatHistory(system="Be brief.")
    history.add_user("Hi!")
    history.add_assistant("Hello.")
    assert history.to_messages() == [{"role": "system", "content": "Be brief."},
                                     {"role": "user", "content": "Hi!"}, {"role": "assistant", "content": "Hello."}]
    history.reset()
    assert history.messages == [] and history.system == "Be brief."
    history.set_system("")
    assert history.system is None and history.to_messages() == []
    with pytest.raises(InputError, match="add_user: \"content\" must be text"):
        history.add_user(42)


def test_prompt_is_the_rendered_chat_template(smollm2_tokenizer):
    history = ChatHistory(system="You answer in French.")
    history.add_user("Hi!")
    prompt = history.to_prompt(smollm2_tokenizer)
    assert prompt == smollm2_tokenizer.apply_chat_template(history.to_messages())
    assert prompt.startswith("<|im_start|>system\nYou answer in French.<|im_end|>\n")
    assert prompt.endswith("<|im_start|>user\nHi!<|im_end|>\n<|im_start|>assistant\n")
    assert not history.to_prompt(smollm2_tokenizer, add_generation_prompt=False).endswith("assistant\n")


def test_prompt_needs_a_chat_template():
    with pytest.raises(UnsupportedError, match="no chat template.*lmforge generate --raw"):
        ChatHistory().to_prompt(AutoTokenizer.from_pretrained("all-minilm-l6-v2"))


def test_save_load_round_trip(tmp_path):
    history = ChatHistory(system="Sei breve.")
    history.add_user("Ciao! 👋 Qual è la capitale?")
    history.add_assistant("Roma.")
    path = tmp_path / "chat.json"
    history.save(path)
    assert json.loads(path.read_text(encoding="utf-8")) == {
        "format": FORMAT, "system": "Sei breve.",
        "messages": [{"role": "user", "content": "Ciao! 👋 Qual è la capitale?"},
                     {"role": "assistant", "content": "Roma."}]}
    assert ChatHistory.load(path) == history


def test_loads_openai_style_message_lists(tmp_path):
    path = tmp_path / "openai.json"
    path.write_text(json.dumps([
        {"role": "system", "content": "Be kind."},
        {"role": "user", "content": [{"type": "text", "text": "Hello, "}, {"type": "text", "text": "world"}]},
        {"role": "assistant", "content": "Hi."},
        {"role": "tool", "content": "42", "tool_call_id": "call_1"},
    ]))
    history = ChatHistory.load(path)
    assert history.system == "Be kind."
    assert history.messages == [{"role": "user", "content": "Hello, world"}, {"role": "assistant", "content": "Hi."},
                                {"role": "tool", "content": "42", "tool_call_id": "call_1"}]


BAD_FILES = [
    ("{not json", r"not valid JSON \(Expecting property name .* line 1, column 2\)"),
    ("42", r"expected a JSON object .* or a list of messages, got a number"),
    ('{"messages": []}', r"\"format\" is None, expected 'lmforge.chat/1'"),
    ('{"format": "lmforge.chat/1", "messages": {}}', r"\"messages\" must be a list of messages, got an object"),
    ('{"format": "lmforge.chat/1", "system": 3, "messages": []}', r"\"system\" must be text or null, got a number"),
    ('[{"role": "user", "content": "hi"}, "hello"]', r"message 1: a message must be an object"),
    ('[{"role": "bot", "content": "hi"}]', r"message 0: role 'bot' is not one of system, user, assistant, tool"),
    ('[{"role": "user"}]', r"message 0: \"content\" must be text \(or a list of text parts\), got null"),
    ('[{"role": "user", "content": [{"type": "image_url", "image_url": {}}]}]', r"only text content is supported"),
]


@pytest.mark.parametrize("text,problem", BAD_FILES)
def test_bad_files_name_the_file_and_the_problem(tmp_path, text, problem):
    path = tmp_path / "bad.json"
    path.write_text(text)
    with pytest.raises(InputError, match=f"^{re.escape(str(path))}: .*{problem}"):
        ChatHistory.load(path)


def test_unreadable_and_unwritable_paths(tmp_path):
    with pytest.raises(InputError, match="missing.json: no such file"):
        ChatHistory.load(tmp_path / "missing.json")
    (tmp_path / "latin1.json").write_bytes(b'["\xe9"]')
    with pytest.raises(InputError, match="latin1.json: cannot read it as UTF-8 text"):
        ChatHistory.load(tmp_path / "latin1.json")
    with pytest.raises(InputError, match="cannot write the chat history .*existing, writable folder"):
        ChatHistory().save(tmp_path / "no" / "such" / "folder.json")
