"""The OpenAI API's request bodies (pydantic) and how each becomes one `SamplingParams`.

Field names and defaults follow the OpenAI spec; `top_k`, `min_p`, `repetition_penalty`,
`min_tokens`, `ignore_eos` and `structured_outputs` are the usual extensions (vLLM's names).
Unknown fields are ignored, as OpenAI-compatible servers do, so newer clients keep working. Range
checks live in `SamplingParams` (one set of rules for the CLI, the Python API and the server).
"""

from __future__ import annotations

import dataclasses
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field

from lmforge.context.reasoning import reasoning_template_vars
from lmforge.context.structured import StructuredOutputParams
from lmforge.context.tools import Tool, tool_call_constraint, with_tools
from lmforge.errors import LMForgeError, ValidationError
from lmforge.generation.generate import prompt_list
from lmforge.generation.sampling_params import SamplingParams
from lmforge.serve.context import SERVER_STRATEGIES


class _Request(BaseModel):
    model_config = ConfigDict(extra="ignore")


class TextPart(_Request):
    type: Literal["text"] = "text"
    text: str


class FunctionCall(_Request):
    name: str
    arguments: str = "{}"  # JSON text, as OpenAI sends it


class ToolCallMessage(_Request):
    id: str = ""
    type: Literal["function"] = "function"
    function: FunctionCall


class ChatMessage(_Request):
    role: Literal["system", "user", "assistant", "tool", "developer"]
    content: str | list[TextPart] | None = None
    tool_calls: list[ToolCallMessage] | None = None  # an assistant turn that called tools
    tool_call_id: str | None = None  # a tool turn: which call this result answers

    def text(self) -> str:
        if isinstance(self.content, list):
            return "".join(part.text for part in self.content)
        return self.content or ""


class StreamOptions(_Request):
    include_usage: bool = False


class _Sampling(_Request):
    """Fields shared by chat and text completions."""

    model: str | None = None
    max_tokens: int | None = Field(default=None, ge=1)
    temperature: float = 1.0
    top_p: float = 1.0
    n: int = Field(default=1, ge=1, le=16)
    stop: str | list[str] | None = None
    seed: int | None = None
    presence_penalty: float = 0.0
    frequency_penalty: float = 0.0
    logit_bias: dict[str, float] | None = None
    stream: bool = False
    stream_options: StreamOptions | None = None
    user: str | None = None
    top_k: int = 0
    min_p: float = 0.0
    repetition_penalty: float = 1.0
    min_tokens: int = 0
    ignore_eos: bool = False
    structured_outputs: dict[str, Any] | None = None  # {"json": schema} / {"regex": ...} / {"choice": [...]} / ...

    def _sampling_params(self, max_tokens: int | None, logprobs: int | None,
                         structured: StructuredOutputParams | None = None) -> SamplingParams:
        return SamplingParams(
            n=self.n, temperature=self.temperature, top_p=self.top_p, top_k=self.top_k, min_p=self.min_p,
            repetition_penalty=self.repetition_penalty, presence_penalty=self.presence_penalty,
            frequency_penalty=self.frequency_penalty, logit_bias=self.logit_bias, max_tokens=max_tokens,
            min_tokens=self.min_tokens, stop=self.stop, ignore_eos=self.ignore_eos, seed=self.seed,
            logprobs=logprobs, structured_outputs=structured or self._structured_outputs())

    def _structured_outputs(self) -> StructuredOutputParams | None:
        if self.structured_outputs is None:
            return None
        return checked("structured_outputs", lambda: StructuredOutputParams.coerce(self.structured_outputs))


def checked(param: str, build):
    """build(), with a library error re-raised as one of its kind that names the request field (the 400's
    `param`)."""
    try:
        return build()
    except LMForgeError as exc:
        raise type(exc)(f"SamplingParams.{param}: {exc}") from None


class JsonSchemaFormat(_Request):
    name: str = "response"
    description: str | None = None
    schema_: dict[str, Any] = Field(alias="schema")
    strict: bool | None = None


class ResponseFormat(_Request):
    """OpenAI's `response_format`: free text, any JSON object, or JSON matching a schema."""

    type: Literal["text", "json_object", "json_schema"]
    json_schema: JsonSchemaFormat | None = None

    def structured_outputs(self) -> StructuredOutputParams | None:
        if self.type == "text":
            return None
        if self.type == "json_object":
            return StructuredOutputParams(json_object=True)
        if self.json_schema is None:
            raise ValidationError('response_format of type "json_schema" needs a "json_schema": {"name": ..., '
                                  '"schema": {...}} object.')
        return StructuredOutputParams(json=self.json_schema.schema_)


class FunctionSpec(_Request):
    name: str
    description: str | None = None
    parameters: dict[str, Any] | None = None


class ToolSpec(_Request):
    type: Literal["function"] = "function"
    function: FunctionSpec


class NamedFunction(_Request):
    name: str


class NamedToolChoice(_Request):
    type: Literal["function"] = "function"
    function: NamedFunction


class ContextOptions(_Request):
    """lmforge's extension to chat completions: what part of `messages` to send when they outgrow the
    window (see lmforge.context.strategies); OpenAI clients pass it with extra_body={"context": {...}}."""

    strategy: Literal[SERVER_STRATEGIES] = "full"
    max_turns: int | None = Field(default=None, ge=1)  # window: the last N exchanges
    max_tokens: int | None = Field(default=None, ge=1)  # truncate / window: at most this many prompt tokens
    keep_turns: int | None = Field(default=None, ge=1)  # summarize / state: exchanges kept word for word
    rag: bool = False  # passages from the server's index (lmforge serve --rag-index) go into the latest message
    rag_top_k: int = Field(default=4, ge=1, le=32)  # rag: passages retrieved per request


class ChatCompletionRequest(_Sampling):
    messages: list[ChatMessage] = Field(min_length=1)
    context: ContextOptions | None = None
    max_completion_tokens: int | None = Field(default=None, ge=1)
    logprobs: bool = False
    top_logprobs: int | None = Field(default=None, ge=0, le=20)
    response_format: ResponseFormat | None = None
    tools: list[ToolSpec] | None = None
    tool_choice: Literal["none", "auto", "required"] | NamedToolChoice | None = None
    reasoning: Literal["off"] | int | None = None  # thinking models: "off", or a budget of thinking tokens

    def template_vars(self, tokenizer) -> dict:
        """Chat-template variables of this request (the thinking switch)."""
        return checked("reasoning", lambda: reasoning_template_vars(tokenizer, self.reasoning))

    def sampling_params(self, default_max_tokens: int | None) -> SamplingParams:
        max_tokens = self.max_completion_tokens or self.max_tokens or default_max_tokens
        params = self._sampling_params(max_tokens, (self.top_logprobs or 0) if self.logprobs else None,
                                       self._output_constraint())
        if isinstance(self.reasoning, int):
            params = checked("reasoning", lambda: dataclasses.replace(params, reasoning_budget=self.reasoning))
        return params

    def callable_tools(self) -> list[Tool]:
        """The tools the answer may call (none without `tools` or with tool_choice "none")."""
        if not self.tools or self.tool_choice == "none":
            return []
        return checked("tools", lambda: [Tool.from_openai(tool.model_dump()) for tool in self.tools])

    def _output_constraint(self) -> StructuredOutputParams | None:
        """What the answer must match: a tool call, the response_format, or the structured_outputs extension."""
        tools = self.callable_tools()
        formats = [name for name, given in [("tools", tools), ("structured_outputs", self.structured_outputs),
                                            ("response_format", self.response_format and
                                             self.response_format.type != "text")] if given]
        if len(formats) > 1:
            raise ValidationError(f"SamplingParams.{formats[1]}: use one of tools, response_format and "
                                  f"structured_outputs per request, got {formats}.")
        if tools:
            choice = self.tool_choice.model_dump() if isinstance(self.tool_choice, NamedToolChoice) else self.tool_choice
            return checked("tool_choice", lambda: tool_call_constraint(tools, choice))
        if self.response_format is not None:
            return checked("response_format", self.response_format.structured_outputs)
        return self._structured_outputs()

    def conversation(self) -> list[dict[str, str]]:
        """The messages as the chat template renders them (tool calls and results written out as text)."""
        messages = [{"role": "system" if m.role == "developer" else m.role, "content": m.text(),
                     "tool_calls": [call.model_dump() for call in m.tool_calls or []]} for m in self.messages]
        return with_tools(messages, self.callable_tools())


class CompletionRequest(_Sampling):
    prompt: str | list[str] | list[int] | list[list[int]]
    echo: bool = False
    logprobs: int | None = Field(default=None, ge=0, le=5)
    max_tokens: int | None = Field(default=16, ge=1)  # the OpenAI default for completions

    def sampling_params(self) -> SamplingParams:
        return self._sampling_params(self.max_tokens, self.logprobs)

    def prompts(self) -> list[str | list[int]]:
        """One prompt or a batch: a string, strings, token ids, or lists of token ids."""
        return prompt_list(self.prompt)


class EmbeddingRequest(_Request):
    model: str | None = None
    input: str | list[str] | list[int] | list[list[int]]
    encoding_format: Literal["float", "base64"] = "float"
    user: str | None = None

    def inputs(self) -> list[str] | list[list[int]]:
        return prompt_list(self.input)


class TokenizeRequest(_Request):
    model: str | None = None
    prompt: str | None = None
    messages: list[ChatMessage] | None = None
    add_special_tokens: bool = True


class DetokenizeRequest(_Request):
    model: str | None = None
    tokens: list[int]
