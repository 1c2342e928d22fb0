"""Tool calling: offer functions to the model and get back a call it can only write correctly.

The functions (OpenAI's `tools`: a name, a description, a JSON schema of the arguments) are described
to the model in the system prompt, unless the chat template renders tools itself. A call is the JSON
object {"name": ..., "arguments": {...}}; structured output guarantees its shape: `tool_choice`
"required" or a named function constrains the whole answer to a call, "auto" lets the answer be
either plain text (not starting with "{") or a call, "none" leaves the answer free.
"""

from __future__ import annotations

import json
import re
import uuid
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

from lmforge.context.structured import JSON_STYLE, StructuredOutputParams
from lmforge.errors import ValidationError

FUNCTION_NAME = re.compile(r"[a-zA-Z0-9_-]{1,64}")


@dataclass(frozen=True)
class Tool:
    """One function the model may call; `parameters` is the JSON schema of its arguments object."""

    name: str
    description: str = ""
    parameters: dict | None = None

    def __post_init__(self) -> None:
        if not isinstance(self.name, str) or not FUNCTION_NAME.fullmatch(self.name):
            raise ValidationError(f"tool name {self.name!r} must be 1-64 letters, digits, '_' or '-'.")
        if self.parameters is not None and not isinstance(self.parameters, dict):
            raise ValidationError(f"tool {self.name!r}: parameters must be a JSON schema object, "
                                  f"got {self.parameters!r}.")

    @classmethod
    def from_openai(cls, spec: dict) -> Tool:
        """From {"type": "function", "function": {"name", "description", "parameters"}}."""
        function = spec.get("function") if isinstance(spec, dict) and spec.get("type") == "function" else None
        if not isinstance(function, dict):
            raise ValidationError(f'each tool must be {{"type": "function", "function": {{"name": ...}}}}, '
                                  f"got {spec!r}.")
        return cls(function.get("name"), function.get("description") or "", function.get("parameters"))

    @property
    def arguments_schema(self) -> dict:
        return self.parameters if self.parameters is not None else {"type": "object", "properties": {}}

    def call_schema(self) -> dict:
        """The JSON schema of a call of this function."""
        return {"type": "object", "properties": {"name": {"const": self.name}, "arguments": self.arguments_schema},
                "required": ["name", "arguments"], "additionalProperties": False}


@dataclass(frozen=True)
class ToolCall:
    name: str
    arguments: dict
    id: str = ""

    def to_openai(self) -> dict:
        return {"id": self.id, "type": "function",
                "function": {"name": self.name, "arguments": json.dumps(self.arguments, ensure_ascii=False)}}


def calls_schema(tools: Sequence[Tool]) -> dict:
    """A call of any one of `tools`."""
    schemas = [tool.call_schema() for tool in tools]
    return schemas[0] if len(schemas) == 1 else {"anyOf": schemas}


def resolve_tool_choice(tools: Sequence[Tool], tool_choice: str | dict | None) -> list[Tool]:
    """The tools a call may use under `tool_choice` ("none" → none; a named function → that one)."""
    if tool_choice in (None, "auto", "required"):
        return list(tools)
    if tool_choice == "none":
        return []
    name = tool_choice.get("function", {}).get("name") if isinstance(tool_choice, dict) else None
    chosen = [tool for tool in tools if tool.name == name]
    if not chosen:
        raise ValidationError(f"tool_choice names {name!r}, which is not among the tools "
                              f"{[tool.name for tool in tools]}; name one of them, or use 'auto'.")
    return chosen


def tool_call_constraint(tools: Sequence[Tool], tool_choice: str | dict | None) -> StructuredOutputParams | None:
    """The structured output that makes the answer a well-formed call (or, with "auto", text or a call)."""
    callable_tools = resolve_tool_choice(tools, tool_choice)
    if not callable_tools:
        return None
    schema = {**calls_schema(callable_tools), "x-guidance": JSON_STYLE}
    if tool_choice in (None, "auto"):
        return StructuredOutputParams(grammar=f"start: call | text\ncall: %json {json.dumps(schema)}\n"
                                              "text: /[^{][\\s\\S]*/\n")
    return StructuredOutputParams(json=calls_schema(callable_tools))


def tools_system_prompt(tools: Sequence[Tool]) -> str:
    """How the tools are described to a model whose chat template does not render them itself."""
    lines = ["You can call these functions:"]
    for tool in tools:
        lines.append(json.dumps({"name": tool.name, "description": tool.description,
                                 "parameters": tool.arguments_schema}, ensure_ascii=False))
    lines.append('To call one, answer with only a JSON object: {"name": <function name>, "arguments": '
                 "<arguments object>}. Otherwise answer normally.")
    return "\n".join(lines)


def with_tools(messages: list[dict[str, Any]], tools: Sequence[Tool]) -> list[dict[str, Any]]:
    """`messages` as a template without tool support can render them: the tools described in the system
    prompt, earlier calls written as the JSON the model produced, and results as user turns."""
    rendered = []
    for message in messages:
        calls = message.get("tool_calls") or []
        if message["role"] == "assistant" and calls:
            text = "\n".join(json.dumps({"name": call["function"]["name"],
                                         "arguments": json.loads(call["function"]["arguments"] or "{}")},
                                        ensure_ascii=False) for call in calls)
            rendered.append({"role": "assistant", "content": text})
        elif message["role"] == "tool":
            rendered.append({"role": "user", "content": f"Function result: {message['content']}"})
        else:
            rendered.append({"role": message["role"], "content": message["content"]})
    if tools:
        description = tools_system_prompt(tools)
        if rendered and rendered[0]["role"] == "system":
            rendered[0] = {"role": "system", "content": f"{rendered[0]['content']}\n\n{description}"}
        else:
            rendered.insert(0, {"role": "system", "content": description})
    return rendered


def parse_tool_call(text: str, tools: Sequence[Tool]) -> ToolCall | None:
    """The call in an answer, or None when the answer is plain text (or not a call of one of `tools`)."""
    if not text.lstrip().startswith("{"):
        return None
    try:
        call = json.loads(text)
    except json.JSONDecodeError:
        return None  # cut short by max_tokens: returned as text
    names = {tool.name for tool in tools}
    if not (isinstance(call, dict) and call.get("name") in names and isinstance(call.get("arguments"), dict)):
        return None
    return ToolCall(call["name"], call["arguments"], f"call_{uuid.uuid4().hex[:24]}")
