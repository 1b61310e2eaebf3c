"""OpenAI Responses API wire shapes (pydantic, bounded, unknown fields logged) and their
conversion to a dialect-free ChatRequest."""

from __future__ import annotations

import json
import logging
from typing import Any, Literal

from pydantic import Field

from ...chat.images import ImageData
from ...chat.tools import check_tools
from ...chat.turn import CallSpec, ChatRequest, Message, ToolChoice
from ...engine.types import ANY_JSON_OBJECT
from ..errors import APIError
from ..wire import WireModel
from .wire import REASONING_EFFORTS

log = logging.getLogger(__name__)


class Part(WireModel):
    type: str
    text: str | None = None
    image_url: str | None = None  # input_image: a data: URI (or a URL of an allowed host)
    file_id: str | None = None  # input_image: refused (no file store here)
    detail: str | None = None  # input_image: accepted, not used


class Item(WireModel):
    """An input item: a message (``role`` and ``content``), a ``function_call``, a
    ``function_call_output`` or a ``reasoning`` item; checked on conversion."""

    type: str | None = None
    role: str | None = None
    content: str | list[Part] | None = None
    id: str | None = None
    call_id: str | None = None
    name: str | None = None
    arguments: str | None = None
    output: str | list[Part] | None = None
    summary: list[Part] | None = None


class FunctionTool(WireModel):
    type: str
    name: str | None = Field(default=None, min_length=1, max_length=128)
    description: str | None = None
    parameters: dict[str, Any] | None = None
    strict: bool | None = None


class NamedFunction(WireModel):
    type: Literal["function"]
    name: str


class Format(WireModel):
    type: Literal["text", "json_object", "json_schema"]
    name: str | None = None
    json_schema: dict[str, Any] | None = Field(default=None, alias="schema")
    strict: bool | None = None


class TextConfig(WireModel):
    format: Format | None = None


class Reasoning(WireModel):
    effort: str | None = None
    summary: str | None = None


class ResponsesRequest(WireModel):
    model: str = Field(min_length=1)
    input: str | list[Item]
    instructions: str | None = None
    max_output_tokens: int | None = Field(default=None, ge=1, le=1 << 20)
    temperature: float | None = Field(default=None, ge=0.0, le=2.0)
    top_p: float | None = Field(default=None, ge=0.0, le=1.0)
    top_logprobs: int | None = Field(default=None, ge=0, le=20)
    tools: list[FunctionTool] | None = Field(default=None, max_length=128)
    tool_choice: Literal["none", "auto", "required"] | NamedFunction | None = None
    parallel_tool_calls: bool | None = None
    text: TextConfig | None = None
    reasoning: Reasoning | None = None
    stream: bool = False
    store: bool | None = None
    previous_response_id: str | None = Field(default=None, max_length=200)
    metadata: dict[str, Any] | None = None
    user: str | None = None

    def to_chat_request(self, history: list[Message]) -> ChatRequest:
        """``history``: the stored conversation ``previous_response_id`` names."""
        effort = self.reasoning.effort if self.reasoning else None
        if effort is not None and effort not in REASONING_EFFORTS:
            raise APIError(400, "reasoning.effort must be one of " + ", ".join(REASONING_EFFORTS))
        request = ChatRequest(
            model=self.model,
            messages=[*self.system(), *history, *self.input_messages()],
            think=None if effort is None else effort not in ("none", "minimal"),
            think_strict=False,
            json_schema=self.schema_text(),
            logprobs=self.top_logprobs,
        )
        if self.tools:
            request.tools = check_tools(_functions(self.tools))
        choice = self.tool_choice
        if choice == "none":
            request.tool_choice = ToolChoice.NONE
        elif choice == "required":
            request.tool_choice = ToolChoice.REQUIRED
        elif isinstance(choice, NamedFunction):
            request.tool_choice, request.tool_name = ToolChoice.REQUIRED, choice.name
        options = {
            "num_predict": self.max_output_tokens,
            "temperature": self.temperature,
            "top_p": self.top_p,
        }
        request.options = {k: v for k, v in options.items() if v is not None}
        return request

    def system(self) -> list[Message]:
        return [Message("system", self.instructions)] if self.instructions else []

    def schema_text(self) -> str | None:
        fmt = self.text.format if self.text else None
        if fmt is None or fmt.type == "text":
            return None
        if fmt.type == "json_object":
            return ANY_JSON_OBJECT
        if fmt.json_schema is None:
            raise APIError(400, "text.format.schema is required for json_schema")
        return json.dumps(fmt.json_schema)

    def input_messages(self) -> list[Message]:
        if isinstance(self.input, str):
            return [Message("user", self.input)]
        if not self.input:
            raise APIError(400, "input must not be empty")
        out: list[Message] = []
        names: dict[str, str] = {}
        thinking: list[str] = []  # reasoning items go to the assistant message after them
        for item in self.input:
            kind = item.type or ("message" if item.role else None)
            if kind == "message":
                role = {"developer": "system"}.get(item.role or "", item.role or "")
                if role not in ("user", "system", "assistant"):
                    raise APIError(400, f"input: invalid message role {str(item.role)[:20]!r}")
                message = Message(role, _text(item.content), images=_images(item.content))
                if role == "assistant" and thinking:
                    message.thinking, thinking = "".join(thinking), []
                out.append(message)
            elif kind == "function_call":
                if not item.call_id or not item.name:
                    raise APIError(400, "input: a function_call item needs a call_id and a name")
                try:
                    arguments = json.loads(item.arguments or "{}")
                except (json.JSONDecodeError, RecursionError):
                    raise APIError(400, "input: function_call arguments must be JSON") from None
                if not isinstance(arguments, dict):
                    raise APIError(400, "input: function_call arguments must be a JSON object")
                names[item.call_id] = item.name
                previous = out[-1] if out else None
                if previous is None or previous.role != "assistant":
                    previous = Message("assistant")
                    out.append(previous)
                if thinking:
                    previous.thinking, thinking = "".join(thinking), []
                previous.tool_calls.append(CallSpec(item.name, arguments, item.call_id))
            elif kind == "function_call_output":
                if not item.call_id:
                    raise APIError(400, "input: a function_call_output item needs a call_id")
                output = item.output if item.output is not None else ""
                out.append(
                    Message(
                        "tool",
                        output if isinstance(output, str) else _text(output),
                        tool_call_id=item.call_id,
                        name=names.get(item.call_id),
                    )
                )
            elif kind == "reasoning":
                thinking += [p.text or "" for p in [*(item.summary or []), *_parts(item.content)]]
            elif kind == "item_reference":
                raise APIError(400, "input: item references need stored responses; send the items")
            else:
                raise APIError(400, f"input: items of type {str(kind)[:40]!r} are not supported")
        return out


def _parts(content: str | list[Part] | None) -> list[Part]:
    return content if isinstance(content, list) else []


def _images(content: str | list[Part] | None) -> list[ImageData]:
    images = []
    for part in _parts(content):
        if part.type != "input_image":
            continue
        if part.image_url is None:
            what = "file_id images need a file store" if part.file_id else "it needs an image_url"
            raise APIError(400, f"input: an input_image part is not supported here: {what}")
        images.append(ImageData.of_url(part.image_url))
    return images


def _text(content: str | list[Part] | None) -> str:
    if content is None or isinstance(content, str):
        return content or ""
    texts = []
    for part in content:
        if part.type in ("input_text", "output_text", "text", "reasoning_text", "summary_text"):
            texts.append(part.text or "")
        elif part.type == "refusal":
            continue
        elif part.type != "input_image":
            raise APIError(400, f"input: content of type {part.type[:40]!r} is not supported")
    return "".join(texts)


def _functions(tools: list[FunctionTool]) -> list[dict[str, Any]]:
    """The function tools, in the chat layer's shape. Hosted tools (web_search, file_search,
    custom grammar tools...) have nothing here to run them: they are left out, loudly, so
    an agent that offers them still gets its turn."""
    out = []
    for tool in tools:
        if tool.type != "function":
            log.warning("responses: tools of type %r are not served; left out", tool.type[:40])
            continue
        if not tool.name:
            raise APIError(400, "tools: a function tool needs a name")
        function: dict[str, Any] = {
            "name": tool.name,
            "parameters": tool.parameters or {"type": "object"},
        }
        if tool.description is not None:
            function["description"] = tool.description
        out.append({"type": "function", "function": function})
    return out
