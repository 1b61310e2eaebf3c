"""OpenAI's wire shapes for chat completions, legacy completions and embeddings: pydantic
models at the edge (strict JSON types, bounds in ``Field``, unknown fields accepted and
logged), each turning itself into a dialect-free ``ChatRequest`` once."""

from __future__ import annotations

import json
from typing import Any, Literal

from pydantic import Field

from ...chat.images import ImageData
from ...chat.options import stop_list
from ...chat.tools import ToolCall, check_tools, template_tool_calls
from ...chat.turn import CallSpec, ChatRequest, Message, ToolChoice
from ...engine.types import ANY_JSON_OBJECT
from ..errors import APIError
from ..wire import WireModel

MAX_N = 8
MAX_PROMPTS = 64
MAX_TOKENS = 1 << 20
REASONING_EFFORTS = ("none", "minimal", "low", "medium", "high", "xhigh")
Effort = Literal["none", "minimal", "low", "medium", "high", "xhigh"]


class StreamOptions(WireModel):
    include_usage: bool | None = None


class Sampling(WireModel):
    """The fields every generation route shares, with OpenAI's ranges (and vLLM's
    sampling extensions ``top_k``, ``min_p``, ``repetition_penalty``)."""

    model: str = Field(min_length=1)
    temperature: float | None = Field(default=None, ge=0.0, le=2.0)
    top_p: float | None = Field(default=None, ge=0.0, le=1.0)
    n: int | None = Field(default=None, ge=1, le=MAX_N)
    stop: str | list[str] | None = None
    seed: int | None = Field(default=None, ge=-(2**63), le=2**63 - 1)
    presence_penalty: float | None = Field(default=None, ge=-2.0, le=2.0)
    frequency_penalty: float | None = Field(default=None, ge=-2.0, le=2.0)
    logit_bias: dict[str, float] | None = Field(default=None, max_length=300)
    top_k: int | None = Field(default=None, ge=-1, le=1_000_000)
    min_p: float | None = Field(default=None, ge=0.0, le=1.0)
    repetition_penalty: float | None = Field(default=None, ge=0.01, le=100.0)
    user: str | None = None
    stream: bool | None = None
    stream_options: StreamOptions | None = None

    @property
    def include_usage(self) -> bool:
        return bool(self.stream_options and self.stream_options.include_usage)

    def options(self, max_tokens: int | None) -> dict[str, Any]:
        """The sampling fields in Ollama's option names (merged over the model's parameters
        and the defaults by the chat service)."""
        options: dict[str, Any] = {
            "temperature": self.temperature,
            "top_p": self.top_p,
            "presence_penalty": self.presence_penalty,
            "frequency_penalty": self.frequency_penalty,
            "seed": self.seed,
            "num_predict": max_tokens,
            "top_k": self.top_k,
            "min_p": self.min_p,
            "repeat_penalty": self.repetition_penalty,
            "stop": None if self.stop is None else stop_list(self.stop),
        }
        return {k: v for k, v in options.items() if v is not None}

    def bias(self) -> dict[int, float]:
        bias: dict[int, float] = {}
        for key, amount in (self.logit_bias or {}).items():
            if not (key.isascii() and key.isdigit() and len(key) <= 12):
                raise APIError(400, f"logit_bias key {key[:20]!r} is not a token id")
            if not -100 <= amount <= 100:
                raise APIError(400, "logit_bias values must be between -100 and 100")
            bias[int(key)] = float(amount)
        return bias


class ImageURL(WireModel):
    url: str
    detail: str | None = None  # accepted, not used: the model's processor sizes images


class ContentPart(WireModel):
    type: str
    text: str | None = None
    image_url: ImageURL | str | None = None


class FunctionCall(WireModel):
    name: str
    arguments: str | dict[str, Any] | None = None


class ToolCallParam(WireModel):
    id: str | None = None
    type: str | None = None
    function: FunctionCall


class ChatMessage(WireModel):
    role: str
    content: str | list[ContentPart] | None = None
    name: str | None = None
    tool_call_id: str | None = None
    tool_calls: list[ToolCallParam] | None = Field(default=None, max_length=128)
    reasoning_content: str | None = None

    def to_message(self) -> Message:
        role = "system" if self.role == "developer" else self.role.lower()
        calls = [
            CallSpec(c["function"]["name"], c["function"]["arguments"], given.id)
            for c, given in zip(
                template_tool_calls(
                    [t.model_dump(exclude_none=True) for t in self.tool_calls or []]
                ),
                self.tool_calls or [],
            )
        ]
        text, images = content_of(self.content)
        return Message(
            role=role,
            content=text,
            thinking=self.reasoning_content or None,
            tool_calls=calls,
            tool_call_id=self.tool_call_id,
            name=self.name,
            images=images,
        )


def content_of(content: str | list[ContentPart] | None) -> tuple[str, list[ImageData]]:
    """A message's content: a string, or an array of parts: the text parts joined, the
    ``image_url`` parts' images in order (a ``data:`` URI, or a URL the chat layer refuses
    unless its host is allowed)."""
    if content is None or isinstance(content, str):
        return content or "", []
    texts, images = [], []
    for part in content:
        if part.type == "image_url":
            if part.image_url is None:
                raise APIError(400, "an image_url content part needs an image_url")
            url = part.image_url if isinstance(part.image_url, str) else part.image_url.url
            images.append(ImageData.of_url(url))
            continue
        if part.type not in ("text", "input_text"):
            raise APIError(400, f"content parts of type {part.type[:20]!r} are not supported")
        if part.text is None:
            raise APIError(400, "a text content part needs a text string")
        texts.append(part.text)
    return "".join(texts), images


class FunctionDef(WireModel):
    name: str = Field(min_length=1, max_length=128)
    description: str | None = None
    parameters: dict[str, Any] | None = None
    strict: bool | None = None


class Tool(WireModel):
    type: Literal["function"] = "function"
    function: FunctionDef


class NamedFunction(WireModel):
    name: str


class NamedToolChoice(WireModel):
    type: Literal["function"]
    function: NamedFunction


class JSONSchemaSpec(WireModel):
    name: str | None = None
    json_schema: dict[str, Any] | None = Field(default=None, alias="schema")
    strict: bool | None = None


class ResponseFormat(WireModel):
    type: Literal["text", "json_object", "json_schema"]
    json_schema: JSONSchemaSpec | None = None

    def schema_text(self) -> str | None:
        if self.type == "text":
            return None
        if self.type == "json_object":
            return ANY_JSON_OBJECT
        if self.json_schema is None or self.json_schema.json_schema is None:
            raise APIError(400, "response_format.json_schema.schema must be a JSON schema object")
        return json.dumps(self.json_schema.json_schema)


class ChatCompletionRequest(Sampling):
    messages: list[ChatMessage] = Field(min_length=1)
    max_tokens: int | None = Field(default=None, ge=0, le=MAX_TOKENS)
    max_completion_tokens: int | None = Field(default=None, ge=0, le=MAX_TOKENS)
    logprobs: bool | None = None
    top_logprobs: int | None = Field(default=None, ge=0, le=20)
    response_format: ResponseFormat | None = None
    tools: list[Tool] | None = Field(default=None, max_length=128)
    tool_choice: Literal["none", "auto", "required"] | NamedToolChoice | None = None
    parallel_tool_calls: bool | None = None
    reasoning_effort: Effort | None = None

    def to_chat_request(self) -> ChatRequest:
        if self.top_logprobs is not None and not self.logprobs:
            raise APIError(400, "top_logprobs needs logprobs: true")
        choice, name = ToolChoice.AUTO, None
        if self.tool_choice == "none":
            choice = ToolChoice.NONE
        elif self.tool_choice == "required":
            choice = ToolChoice.REQUIRED
        elif isinstance(self.tool_choice, NamedToolChoice):
            choice, name = ToolChoice.REQUIRED, self.tool_choice.function.name
        effort = self.reasoning_effort
        tools = [t.model_dump(exclude_none=True, by_alias=True) for t in self.tools or []]
        max_tokens = self.max_completion_tokens
        if max_tokens is None:
            max_tokens = self.max_tokens
        return ChatRequest(
            model=self.model,
            messages=[m.to_message() for m in self.messages],
            tools=check_tools(tools),
            tool_choice=choice,
            tool_name=name,
            think=None if effort is None else effort not in ("none", "minimal"),
            think_strict=False,
            json_schema=self.response_format.schema_text() if self.response_format else None,
            options=self.options(max_tokens),
            logit_bias=self.bias(),
            logprobs=(self.top_logprobs or 0) if self.logprobs else None,
            n=self.n or 1,
        )


class CompletionRequest(Sampling):
    prompt: str | list[str]
    max_tokens: int | None = Field(default=None, ge=0, le=MAX_TOKENS)
    logprobs: int | None = Field(default=None, ge=0, le=20)
    echo: bool | None = None
    suffix: str | None = None
    best_of: int | None = Field(default=None, ge=1, le=MAX_N)  # accepted, not used

    def to_chat_request(self) -> ChatRequest:
        prompts = [self.prompt] if isinstance(self.prompt, str) else self.prompt
        if not prompts:
            raise APIError(400, "prompt must be a string or a non-empty array of strings")
        if len(prompts) > MAX_PROMPTS:
            raise APIError(400, f"at most {MAX_PROMPTS} prompts per request")
        if self.suffix:
            raise APIError(400, "suffix (infill) is not supported by this model")
        max_tokens = 16 if self.max_tokens is None else self.max_tokens  # OpenAI's default
        if max_tokens == 0 and not self.echo:
            raise APIError(400, "max_tokens 0 needs echo")
        return ChatRequest(
            model=self.model,
            prompts=list(prompts),
            raw=True,
            options=self.options(max_tokens),
            logit_bias=self.bias(),
            logprobs=self.logprobs,
            echo=bool(self.echo),
            n=self.n or 1,
        )


class EmbeddingRequest(WireModel):
    model: str = Field(min_length=1)
    input: str | list[str] | list[list[int]] = Field(min_length=1)
    encoding_format: Literal["float", "base64"] | None = None
    dimensions: int | None = Field(default=None, ge=1, le=1 << 16)
    user: str | None = None


def openai_tool_calls(calls: list[ToolCall], streaming: bool = False) -> list[dict[str, Any]]:
    out = []
    for index, call in enumerate(calls):
        entry: dict[str, Any] = {
            "id": call.id,
            "type": "function",
            "function": {"name": call.name, "arguments": json.dumps(call.arguments)},
        }
        if streaming:
            entry["index"] = index
        out.append(entry)
    return out
