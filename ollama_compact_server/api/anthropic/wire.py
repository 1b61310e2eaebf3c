"""Anthropic's Messages wire shapes (pydantic, bounded, unknown fields logged) and their
conversion to a dialect-free ChatRequest."""

from __future__ import annotations

import json
import logging
from typing import Any, Literal

from pydantic import Field

from ...chat.images import ImageData
from ...chat.tools import check_tools
from ...chat.turn import CallSpec, ChatRequest, Message, ToolChoice
from ..errors import APIError
from ..wire import WireModel

log = logging.getLogger(__name__)
MAX_TOKENS = 1 << 20


class Source(WireModel):
    """An image block's source: ``base64`` (``media_type`` and ``data``) or ``url``."""

    type: str
    media_type: str | None = None
    data: str | None = None
    url: str | None = None


class Block(WireModel):
    """A content block. Which fields a type needs is checked on conversion, so that an
    unsupported block gets a message naming it rather than a union's error list."""

    type: str
    text: str | None = None
    id: str | None = None
    name: str | None = None
    input: dict[str, Any] | None = None
    tool_use_id: str | None = None
    content: str | list[Block] | None = None
    is_error: bool | None = None
    thinking: str | None = None
    signature: str | None = None
    source: Source | None = None


class MessageParam(WireModel):
    role: Literal["user", "assistant"]
    content: str | list[Block]


class Tool(WireModel):
    name: str = Field(min_length=1, max_length=128)
    description: str | None = None
    input_schema: dict[str, Any] = Field(default_factory=lambda: {"type": "object"})
    type: str | None = None  # "custom" or absent; server tools are refused


class ToolChoiceParam(WireModel):
    type: Literal["auto", "any", "tool", "none"]
    name: str | None = None
    disable_parallel_tool_use: bool | None = None


class ThinkingParam(WireModel):
    type: Literal["enabled", "disabled", "adaptive"]
    budget_tokens: int | None = Field(default=None, ge=0)


class CountTokensRequest(WireModel):
    model: str = Field(min_length=1)
    messages: list[MessageParam] = Field(min_length=1, max_length=4096)
    system: str | list[Block] | None = None
    tools: list[Tool] | None = Field(default=None, max_length=128)
    tool_choice: ToolChoiceParam | None = None
    thinking: ThinkingParam | None = None

    def to_chat_request(self) -> ChatRequest:
        request = ChatRequest(model=self.model, messages=self._messages(), think_strict=False)
        if self.tools:
            request.tools = check_tools(_functions(self.tools))
        if self.tool_choice is not None:
            request.tool_choice, request.tool_name = _choice(self.tool_choice)
        if self.thinking is not None:
            request.think = self.thinking.type != "disabled"
        return request

    def _messages(self) -> list[Message]:
        out: list[Message] = []
        if self.system:
            out.append(Message("system", _texts(self.system, "system")))
        names: dict[str, str] = {}  # tool_use id -> tool name, for the results that follow
        for message in self.messages:
            if isinstance(message.content, str):
                out.append(Message(message.role, message.content))
                continue
            if message.role == "assistant":
                out.append(_assistant(message.content, names))
            else:
                out.extend(_user(message.content, names))
        return out


class MessagesRequest(CountTokensRequest):
    max_tokens: int = Field(ge=1, le=MAX_TOKENS)
    stop_sequences: list[str] | None = Field(default=None, max_length=16)
    temperature: float | None = Field(default=None, ge=0.0, le=1.0)
    top_p: float | None = Field(default=None, ge=0.0, le=1.0)
    top_k: int | None = Field(default=None, ge=0, le=1_000_000)
    stream: bool = False
    metadata: dict[str, Any] | None = None

    def to_chat_request(self) -> ChatRequest:
        request = super().to_chat_request()
        options: dict[str, Any] = {
            "num_predict": self.max_tokens,
            "temperature": self.temperature,
            "top_p": self.top_p,
            "top_k": self.top_k,
            "stop": self.stop_sequences,
        }
        request.options = {k: v for k, v in options.items() if v is not None}
        return request


def _functions(tools: list[Tool]) -> list[dict[str, Any]]:
    """Client tools in the chat layer's shape. Anthropic's server tools (web_search,
    code_execution...) have nothing here to run them: they are left out, loudly, so an
    agent that offers them still gets its turn."""
    out = []
    for tool in tools:
        if tool.type not in (None, "custom"):
            log.warning(
                "messages: server tools of type %r are not served; left out", tool.type[:40]
            )
            continue
        function: dict[str, Any] = {"name": tool.name, "parameters": tool.input_schema}
        if tool.description is not None:
            function["description"] = tool.description
        out.append({"type": "function", "function": function})
    return out


def _choice(choice: ToolChoiceParam) -> tuple[ToolChoice, str | None]:
    if choice.type == "tool":
        if not choice.name:
            raise APIError(400, 'tool_choice: type "tool" needs a name')
        return ToolChoice.REQUIRED, choice.name
    return {
        "auto": ToolChoice.AUTO,
        "any": ToolChoice.REQUIRED,
        "none": ToolChoice.NONE,
    }[choice.type], None


def _texts(content: str | list[Block], where: str) -> str:
    if isinstance(content, str):
        return content
    parts = []
    for block in content:
        if block.type != "text" or block.text is None:
            raise APIError(400, f"{where}: blocks of type {block.type[:40]!r} are not supported")
        parts.append(block.text)
    return "\n".join(parts) if where == "system" else "".join(parts)


def _assistant(blocks: list[Block], names: dict[str, str]) -> Message:
    message = Message("assistant")
    thinking = []
    for block in blocks:
        if block.type == "text":
            message.content += block.text or ""
        elif block.type == "thinking":
            thinking.append(block.thinking or "")
        elif block.type == "redacted_thinking":
            continue
        elif block.type in ("tool_use", "server_tool_use"):
            if not block.id or not block.name:
                raise APIError(400, "messages: a tool_use block needs an id and a name")
            names[block.id] = block.name
            message.tool_calls.append(CallSpec(block.name, block.input or {}, block.id))
        else:
            raise APIError(400, f"messages: {block.type[:40]!r} blocks are not supported")
    message.thinking = "".join(thinking) or None
    return message


def _image(block: Block) -> ImageData:
    source = block.source
    if source is None:
        raise APIError(400, "messages: an image block needs a source")
    if source.type == "base64":
        if source.data is None or source.media_type is None:
            raise APIError(400, "messages: a base64 image source needs media_type and data")
        return ImageData.of_base64(source.data, source.media_type)
    if source.type == "url":
        if source.url is None:
            raise APIError(400, "messages: a url image source needs a url")
        return ImageData.of_url(source.url)
    raise APIError(400, f"messages: image sources of type {source.type[:40]!r} are not supported")


def _user(blocks: list[Block], names: dict[str, str]) -> list[Message]:
    """Tool results become tool messages (before the user's own text, as Anthropic
    orders them); image blocks become the message's images, in order."""
    results: list[Message] = []
    text = []
    images = []
    for block in blocks:
        if block.type == "text":
            text.append(block.text or "")
        elif block.type == "tool_result":
            if not block.tool_use_id:
                raise APIError(400, "messages: a tool_result block needs a tool_use_id")
            content = block.content if block.content is not None else ""
            output = content if isinstance(content, str) else _result_text(content)
            if block.is_error:
                output = f"Error: {output}"
            results.append(
                Message(
                    "tool",
                    output,
                    tool_call_id=block.tool_use_id,
                    name=names.get(block.tool_use_id),
                    images=[_image(b) for b in content if b.type == "image"]
                    if isinstance(content, list)
                    else [],
                )
            )
        elif block.type == "image":
            images.append(_image(block))
        else:
            raise APIError(400, f"messages: {block.type[:40]!r} blocks are not supported")
    out = results
    if text or images or not results:
        out.append(Message("user", "".join(text), images=images))
    return out


def _result_text(blocks: list[Block]) -> str:
    parts = []
    for block in blocks:
        if block.type == "text":
            parts.append(block.text or "")
        elif block.type != "image":  # images go to the tool message's images
            parts.append(json.dumps(block.model_dump(exclude_none=True)))
    return "".join(parts)
