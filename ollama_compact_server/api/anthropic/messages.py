"""Anthropic's Messages API: POST /v1/messages (whole, or streamed as message_start,
content_block_* and message_delta / message_stop events) and /v1/messages/count_tokens."""

from __future__ import annotations

import json
import uuid
from collections.abc import AsyncIterator
from typing import Any

from fastapi import APIRouter, Request
from fastapi.responses import JSONResponse, Response

from ...chat.service import ChatService
from ...chat.tools import ToolCall
from ...chat.turn import ChatDelta, Choice, Finish, Usage
from ..common import chat_service, json_body
from ..errors import Dialect, error_body
from ..streaming import Frame, sse
from ..wire import body, parse
from .wire import CountTokensRequest, MessagesRequest

router = APIRouter(prefix="/v1")


def stop_reason(finish: Finish, stop_sequence: str | None) -> str:
    if finish == Finish.TOOL_CALLS:
        return "tool_use"
    if finish == Finish.LENGTH:
        return "max_tokens"
    return "stop_sequence" if stop_sequence else "end_turn"


def usage_json(usage: Usage) -> dict[str, Any]:
    """Anthropic counts the prompt tokens read from the cache apart from input_tokens."""
    return {
        "input_tokens": usage.prompt_tokens - usage.cached_tokens,
        "cache_creation_input_tokens": 0,
        "cache_read_input_tokens": usage.cached_tokens,
        "output_tokens": usage.completion_tokens,
    }


def tool_use(call: ToolCall) -> dict[str, Any]:
    return {"type": "tool_use", "id": call.id, "name": call.name, "input": call.arguments}


def content_json(choice: Choice) -> list[dict[str, Any]]:
    blocks: list[dict[str, Any]] = []
    if choice.thinking:
        blocks.append({"type": "thinking", "thinking": choice.thinking, "signature": ""})
    if choice.text or not choice.tool_calls:
        blocks.append({"type": "text", "text": choice.text})
    blocks.extend(tool_use(c) for c in choice.tool_calls)
    return blocks


@router.post("/messages", openapi_extra=body(MessagesRequest))
async def messages(request: Request) -> Response:
    wire = parse(MessagesRequest, await json_body(request))
    turn = await chat_service(request).start(wire.to_chat_request())
    ident = "msg_" + uuid.uuid4().hex[:24]

    def asked(stop: str | None) -> str | None:
        """A stop sequence of the request's own; the model's (its Modelfile's end-of-turn
        markers) end a turn as end_turn, as Anthropic's own turn markers would."""
        return stop if stop is not None and stop in (wire.stop_sequences or []) else None

    def message(content: list[dict[str, Any]], usage: dict[str, Any]) -> dict[str, Any]:
        return {
            "id": ident,
            "type": "message",
            "role": "assistant",
            "model": turn.model,
            "content": content,
            "stop_reason": None,
            "stop_sequence": None,
            "usage": usage,
        }

    if not wire.stream:
        result = await turn.collect()
        choice = result.choices[0]
        body = message(content_json(choice), usage_json(choice.usage))
        body["stop_reason"] = stop_reason(choice.finish, asked(choice.stop_sequence))
        body["stop_sequence"] = asked(choice.stop_sequence)
        return JSONResponse(body)

    async def frames() -> AsyncIterator[Frame]:
        prompt = turn.prompt_lengths[0]
        start = message([], {**usage_json(Usage(prompt_tokens=prompt)), "output_tokens": 0})
        yield "message_start", {"type": "message_start", "message": start}
        yield "ping", {"type": "ping"}
        blocks = Blocks()
        try:
            async for delta in turn.deltas():
                for frame in blocks.feed(delta):
                    yield frame
                if delta.finish is not None:
                    for frame in blocks.close():
                        yield frame
                    usage = usage_json(delta.usage or Usage())
                    yield (
                        "message_delta",
                        {
                            "type": "message_delta",
                            "delta": {
                                "stop_reason": stop_reason(
                                    delta.finish, asked(delta.stop_sequence)
                                ),
                                "stop_sequence": asked(delta.stop_sequence),
                            },
                            "usage": usage,
                        },
                    )
            yield "message_stop", {"type": "message_stop"}
        finally:
            await turn.close()

    return sse(
        frames(),
        Dialect.ANTHROPIC,
        failed=lambda status, text: [("error", error_body(Dialect.ANTHROPIC, status, text))],
        ping=("ping", {"type": "ping"}),
        on_close=turn.close,
    )


class Blocks:
    """Content blocks of a streamed message: a thinking block, a text block, then one
    block per tool call, each opened, fed and closed in order."""

    def __init__(self) -> None:
        self.index = -1
        self.open: str | None = None

    def _start(self, kind: str, block: dict[str, Any]) -> list[Frame]:
        frames = self.close()
        self.index += 1
        self.open = kind
        event = {"type": "content_block_start", "index": self.index, "content_block": block}
        return [*frames, ("content_block_start", event)]

    def _delta(self, delta: dict[str, Any]) -> Frame:
        event = {"type": "content_block_delta", "index": self.index, "delta": delta}
        return "content_block_delta", event

    def close(self) -> list[Frame]:
        if self.open is None:
            return []
        self.open = None
        return [("content_block_stop", {"type": "content_block_stop", "index": self.index})]

    def feed(self, delta: ChatDelta) -> list[Frame]:
        frames: list[Frame] = []
        if delta.thinking:
            if self.open != "thinking":
                frames += self._start(
                    "thinking", {"type": "thinking", "thinking": "", "signature": ""}
                )
            frames.append(self._delta({"type": "thinking_delta", "thinking": delta.thinking}))
        if delta.text:
            if self.open != "text":
                frames += self._start("text", {"type": "text", "text": ""})
            frames.append(self._delta({"type": "text_delta", "text": delta.text}))
        for call in delta.tool_calls:
            frames += self._start(
                "tool_use", {"type": "tool_use", "id": call.id, "name": call.name, "input": {}}
            )
            arguments = json.dumps(call.arguments)
            frames.append(self._delta({"type": "input_json_delta", "partial_json": arguments}))
        if delta.finish is not None and self.index < 0:  # nothing was said: one empty text
            frames += self._start("text", {"type": "text", "text": ""})
        return frames


@router.post("/messages/count_tokens", openapi_extra=body(CountTokensRequest))
async def count_tokens(request: Request) -> Response:
    wire = parse(CountTokensRequest, await json_body(request))
    service: ChatService = chat_service(request)
    return JSONResponse({"input_tokens": await service.count_tokens(wire.to_chat_request())})
