"""Chat history: the list of messages a chat model sees, and how it becomes one prompt.

A chat model is still a next-token predictor; the conversation reaches it as one text
rendered by the model's chat template (a Jinja program), which wraps every
{"role", "content"} message in the special tokens the model was tuned on and ends with
the cue for the assistant's turn. Histories are saved as JSON (never pickle), either in
lmforge's own format or as an OpenAI-style list of messages.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from lmforge.errors import InputError, UnsupportedError
from lmforge.tokenizer import Tokenizer

FORMAT = "lmforge.chat/1"
ROLES = ("system", "user", "assistant", "tool")

Message = dict[str, Any]


@dataclass
class ChatHistory:
    """An optional system prompt and the messages that follow it, oldest first.

    Each message is a dict with "role" (one of ROLES) and "content" (text); any other keys an
    OpenAI-style file carries (e.g. "name", "tool_call_id") are kept and passed to the template.
    """

    system: str | None = None
    messages: list[Message] = field(default_factory=list)

    def add_user(self, content: str) -> None:
        self.messages.append(_checked({"role": "user", "content": content}, "add_user"))

    def add_assistant(self, content: str) -> None:
        self.messages.append(_checked({"role": "assistant", "content": content}, "add_assistant"))

    def reset(self) -> None:
        """Forget the conversation; the system prompt stays."""
        self.messages.clear()

    def set_system(self, text: str | None) -> None:
        """Replace the system prompt; None or "" removes it (the template's default applies)."""
        if text is not None and not isinstance(text, str):
            raise InputError(f"the system prompt must be text, got {type(text).__name__}.")
        self.system = text or None

    def to_messages(self) -> list[Message]:
        """The messages a chat template expects: the system prompt first, when there is one."""
        system = [{"role": "system", "content": self.system}] if self.system else []
        return system + [dict(message) for message in self.messages]

    def to_prompt(self, tokenizer: Tokenizer, add_generation_prompt: bool = True, **template_vars) -> str:
        """The conversation rendered by the tokenizer's chat template, ending with the assistant cue
        (`template_vars` such as enable_thinking go to the template)."""
        if not tokenizer.chat_template:
            raise UnsupportedError("this model's tokenizer has no chat template, so a chat history cannot be "
                                   "turned into a prompt; use a chat (instruct) model such as "
                                   "smollm2-135m-instruct, or send plain text (lmforge generate --raw).")
        return tokenizer.apply_chat_template(self.to_messages(), add_generation_prompt=add_generation_prompt,
                                             **template_vars)

    # ----- JSON files ---------------------------------------------------------------------

    def to_json(self) -> dict[str, Any]:
        return {"format": FORMAT, "system": self.system, "messages": [dict(m) for m in self.messages]}

    @classmethod
    def from_json(cls, data: Any, source: str = "chat history") -> ChatHistory:
        """Build from lmforge's format or an OpenAI-style list of messages; `source` names it in errors.

        In a plain list, a leading system message becomes the system prompt.
        """
        if isinstance(data, list):
            messages = [_checked(m, f"{source}: message {i}") for i, m in enumerate(data)]
            if messages and messages[0]["role"] == "system":
                return cls(messages[0]["content"] or None, messages[1:])
            return cls(None, messages)
        if not isinstance(data, dict):
            raise InputError(f"{source}: expected a JSON object ({{\"format\": \"{FORMAT}\", ...}}) or a list of "
                             f"messages, got {_json_type(data)}.")
        if data.get("format") != FORMAT:
            raise InputError(f"{source}: \"format\" is {data.get('format')!r}, expected {FORMAT!r}; "
                             "write the file with ChatHistory.save (or /save in `lmforge chat`), "
                             "or give a plain list of messages.")
        system, messages = data.get("system"), data.get("messages", [])
        if system is not None and not isinstance(system, str):
            raise InputError(f"{source}: \"system\" must be text or null, got {_json_type(system)}.")
        if not isinstance(messages, list):
            raise InputError(f"{source}: \"messages\" must be a list of messages, "
                             f"got {_json_type(messages)}.")
        return cls(system or None, [_checked(m, f"{source}: message {i}") for i, m in enumerate(messages)])

    def save(self, path: str | Path) -> None:
        """Write the history as JSON in lmforge's format (UTF-8, readable by humans)."""
        path = Path(path).expanduser()
        try:
            path.write_text(json.dumps(self.to_json(), indent=2, ensure_ascii=False) + "\n", encoding="utf-8")
        except OSError as exc:
            raise InputError(f"{path}: cannot write the chat history ({exc.strerror}); "
                             "choose a path in an existing, writable folder.") from exc

    @classmethod
    def load(cls, path: str | Path) -> ChatHistory:
        """Read a history saved by `save`, or an OpenAI-style JSON list of messages."""
        path = Path(path).expanduser()
        try:
            text = path.read_text(encoding="utf-8")
        except FileNotFoundError:
            raise InputError(f"{path}: no such file; give the path of a chat history saved as JSON.") from None
        except (OSError, UnicodeDecodeError) as exc:
            raise InputError(f"{path}: cannot read it as UTF-8 text ({exc}); "
                             "chat histories are JSON files.") from exc
        try:
            data = json.loads(text)
        except json.JSONDecodeError as exc:
            raise InputError(f"{path}: not valid JSON ({exc.msg} at line {exc.lineno}, column {exc.colno}); "
                             "chat histories are JSON files written by ChatHistory.save or /save.") from None
        return cls.from_json(data, str(path))


def _checked(message: Any, where: str) -> Message:
    """`message` if it is a valid chat message; text parts (OpenAI style) are joined into one string."""
    if not isinstance(message, dict):
        raise InputError(f"{where}: a message must be an object with \"role\" and \"content\", "
                         f"got {_json_type(message)}.")
    role, content = message.get("role"), message.get("content")
    if role not in ROLES:
        raise InputError(f"{where}: role {role!r} is not one of {', '.join(ROLES)}; fix the role.")
    if isinstance(content, list):
        if not all(isinstance(p, dict) and p.get("type") == "text" and isinstance(p.get("text"), str)
                   for p in content):
            raise InputError(f"{where}: only text content is supported; a list of content parts must hold "
                             "{\"type\": \"text\", \"text\": ...} parts only.")
        content = "".join(part["text"] for part in content)
    if not isinstance(content, str):
        raise InputError(f"{where}: \"content\" must be text (or a list of text parts), "
                         f"got {_json_type(content)}.")
    return {**message, "content": content}


def _json_type(value: Any) -> str:
    """How JSON calls a parsed value's type, for error messages."""
    names = {dict: "an object", list: "an array", str: "a string", bool: "a boolean", int: "a number",
             float: "a number", type(None): "null"}
    return names.get(type(value), type(value).__name__)
