"""OpenAI's Responses API, POST /v1/responses: input items to a ChatRequest, the turn to
output items (reasoning, message, function_call), whole or as typed SSE events from
``response.created`` to ``response.completed`` (``response.failed`` on an error).
Stateless unless ``store`` (OpenAI's default): then ``previous_response_id`` continues a
conversation kept in memory (responses_store.py)."""

from __future__ import annotations

import json
import time
import uuid
from collections.abc import AsyncIterator
from typing import Any

from fastapi import APIRouter, Request
from fastapi.responses import JSONResponse, Response

from ...chat.tools import ToolCall
from ...chat.turn import CallSpec, ChatDelta, Choice, Finish, Message, ScoredToken, Usage
from ..common import chat_service, json_body
from ..errors import APIError, Dialect
from ..streaming import Frame, sse
from ..wire import body, parse
from .responses_store import ResponseStore, Stored
from .responses_wire import ResponsesRequest

router = APIRouter(prefix="/v1")


def _id(prefix: str) -> str:
    return f"{prefix}_{uuid.uuid4().hex[:24]}"


def usage_json(usage: Usage) -> dict[str, Any]:
    return {
        "input_tokens": usage.prompt_tokens,
        "input_tokens_details": {"cached_tokens": usage.cached_tokens, "cache_write_tokens": 0},
        "output_tokens": usage.completion_tokens,
        "output_tokens_details": {"reasoning_tokens": 0},
        "total_tokens": usage.total_tokens,
    }


def logprobs_json(scores: list[ScoredToken]) -> list[dict[str, Any]]:
    def entry(score: ScoredToken) -> dict[str, Any]:
        return {"token": score.token, "logprob": score.logprob, "bytes": score.bytes}

    return [{**entry(s), "top_logprobs": [entry(a) for a in s.top]} for s in scores]


def reasoning_item(ident: str, text: str, status: str) -> dict[str, Any]:
    content = [{"type": "reasoning_text", "text": text}] if text else []
    return {"type": "reasoning", "id": ident, "summary": [], "content": content, "status": status}


def message_item(ident: str, text: str | None, status: str, logprobs: Any = None) -> dict[str, Any]:
    content = []
    if text is not None:
        part = {"type": "output_text", "text": text, "annotations": [], "logprobs": logprobs or []}
        content.append(part)
    return {
        "type": "message",
        "id": ident,
        "status": status,
        "role": "assistant",
        "content": content,
    }


def call_item(ident: str, call: ToolCall, arguments: str, status: str) -> dict[str, Any]:
    return {
        "type": "function_call",
        "id": ident,
        "call_id": call.id,
        "name": call.name,
        "arguments": arguments,
        "status": status,
    }


def output_items(choice: Choice) -> list[dict[str, Any]]:
    items = []
    if choice.thinking:
        items.append(reasoning_item(_id("rs"), choice.thinking, "completed"))
    if choice.text or not choice.tool_calls:
        logprobs = logprobs_json(choice.logprobs)
        items.append(message_item(_id("msg"), choice.text, "completed", logprobs))
    for call in choice.tool_calls:
        items.append(call_item(_id("fc"), call, json.dumps(call.arguments), "completed"))
    return items


def tool_choice_json(wire: ResponsesRequest) -> Any:
    choice = wire.tool_choice
    if choice is None or isinstance(choice, str):
        return choice or "auto"
    return choice.model_dump()


def said(text: str, thinking: str, calls: list[ToolCall]) -> Message:
    """The response's output as the assistant message of a stored conversation."""
    specs = [CallSpec(c.name, c.arguments, c.id) for c in calls]
    return Message("assistant", text, thinking=thinking or None, tool_calls=specs)


@router.post("/responses", openapi_extra=body(ResponsesRequest))
async def create_response(request: Request) -> Response:
    wire = parse(ResponsesRequest, await json_body(request))
    store: ResponseStore = request.app.state.responses
    history: list[Message] = []
    if wire.previous_response_id:
        stored = store.get(wire.previous_response_id)
        if stored is None:
            raise APIError(
                404,
                f"previous response '{wire.previous_response_id[:80]}' not found: responses "
                f"are kept in memory (the last {store.capacity}, with store true) until the "
                "server restarts; send the whole conversation as input instead",
            )
        history = stored.messages
    chat = wire.to_chat_request(history)
    turn = await chat_service(request).start(chat)
    ident = _id("resp")
    created = int(time.time())
    conversation = [m for m in chat.messages if not (m.role == "system" and wire.instructions)]

    def keep(message: Message) -> None:
        if wire.store is not False:
            store.put(ident, Stored(turn.model, [*conversation, message]))

    def envelope(
        status: str, output: list[dict[str, Any]], usage: Usage | None = None
    ) -> dict[str, Any]:
        fmt = wire.text.format if wire.text and wire.text.format else None
        return {
            "id": ident,
            "object": "response",
            "created_at": created,
            "status": status,
            "error": None,
            "incomplete_details": None,
            "instructions": wire.instructions,
            "max_output_tokens": wire.max_output_tokens,
            "model": turn.model,
            "output": output,
            "parallel_tool_calls": wire.parallel_tool_calls is not False,
            "previous_response_id": wire.previous_response_id,
            "reasoning": {
                "effort": wire.reasoning.effort if wire.reasoning else None,
                "summary": None,
            },
            "store": wire.store is not False,
            "temperature": wire.temperature,
            "text": {
                "format": fmt.model_dump(by_alias=True, exclude_none=True)
                if fmt
                else {"type": "text"}
            },
            "tool_choice": tool_choice_json(wire),
            "tools": [t.model_dump(exclude_none=True) for t in wire.tools or []],
            "top_p": wire.top_p,
            "truncation": "disabled",
            "usage": usage_json(usage) if usage is not None else None,
            "user": wire.user,
            "metadata": wire.metadata or {},
        }

    def finished(body: dict[str, Any], finish: Finish) -> dict[str, Any]:
        if finish == Finish.LENGTH:
            body["status"] = "incomplete"
            body["incomplete_details"] = {"reason": "max_output_tokens"}
        return body

    if not wire.stream:
        result = await turn.collect()
        choice = result.choices[0]
        keep(said(choice.text, choice.thinking, choice.tool_calls))
        body = envelope("completed", output_items(choice), choice.usage)
        return JSONResponse(finished(body, choice.finish))

    events = Events()

    async def frames() -> AsyncIterator[Frame]:
        try:
            yield events.frame("response.created", response=envelope("in_progress", []))
            yield events.frame("response.in_progress", response=envelope("in_progress", []))
            async for delta in turn.deltas():
                for frame in events.feed(delta):
                    yield frame
                if delta.finish is not None:
                    for frame in events.close():
                        yield frame
                    keep(said(events.text, events.thinking, delta.tool_calls))
                    body = finished(envelope("completed", events.output, delta.usage), delta.finish)
                    kind = (
                        "response.incomplete"
                        if body["status"] == "incomplete"
                        else "response.completed"
                    )
                    yield events.frame(kind, response=body)
        finally:
            await turn.close()

    def failed(status: int, message: str) -> list[Frame]:
        body = envelope("failed", events.output)
        body["error"] = {
            "code": "server_error" if status >= 500 else "invalid_request",
            "message": message,
        }
        return [events.frame("response.failed", response=body)]

    return sse(frames(), Dialect.OPENAI, failed=failed, on_close=turn.close)


class Events:
    """Output items of a streamed response, each added, fed with deltas and done in order:
    reasoning, then the message, then one function call per tool call."""

    def __init__(self) -> None:
        self.sequence = 0
        self.output: list[dict[str, Any]] = []  # the items done so far
        self.open: dict[str, Any] | None = None
        self.text = ""
        self.thinking = ""
        self._open_text = ""
        self._logprobs: list[dict[str, Any]] = []
        self.said = False  # a message item was opened

    def frame(self, kind: str, **fields: Any) -> Frame:
        data = {"type": kind, "sequence_number": self.sequence, **fields}
        self.sequence += 1
        return kind, data

    @property
    def index(self) -> int:
        return len(self.output)

    def _add(self, item: dict[str, Any]) -> list[Frame]:
        frames = self.close()
        self.open = item
        self._open_text = ""
        self._logprobs = []
        return [
            *frames,
            self.frame("response.output_item.added", output_index=self.index, item=dict(item)),
        ]

    def close(self) -> list[Frame]:
        item = self.open
        if item is None:
            return []
        self.open = None
        at = {"item_id": item["id"], "output_index": self.index}
        frames = []
        if item["type"] == "reasoning":
            text = self._open_text
            frames.append(
                self.frame("response.reasoning_text.done", **at, content_index=0, text=text)
            )
            done = reasoning_item(item["id"], text, "completed")
        elif item["type"] == "message":
            text, logprobs = self._open_text, self._logprobs
            part = {"type": "output_text", "text": text, "annotations": [], "logprobs": logprobs}
            frames.append(
                self.frame(
                    "response.output_text.done", **at, content_index=0, text=text, logprobs=logprobs
                )
            )
            frames.append(
                self.frame("response.content_part.done", **at, content_index=0, part=part)
            )
            done = message_item(item["id"], text, "completed", logprobs)
        else:
            arguments = item["arguments"]
            frames.append(
                self.frame(
                    "response.function_call_arguments.done",
                    **at,
                    arguments=arguments,
                    name=item["name"],
                )
            )
            done = {**item, "status": "completed"}
        frames.append(self.frame("response.output_item.done", output_index=self.index, item=done))
        self.output.append(done)
        return frames

    def _at(self) -> dict[str, Any]:
        item = self.open or {}
        return {"item_id": item.get("id"), "output_index": self.index}

    def feed(self, delta: ChatDelta) -> list[Frame]:
        frames: list[Frame] = []
        if delta.thinking:
            if self.open is None or self.open["type"] != "reasoning":
                frames += self._add(reasoning_item(_id("rs"), "", "in_progress"))
            self._open_text += delta.thinking
            self.thinking += delta.thinking
            frames.append(
                self.frame(
                    "response.reasoning_text.delta",
                    **self._at(),
                    content_index=0,
                    delta=delta.thinking,
                )
            )
        # a response that says nothing at all still has its (empty) message, as unstreamed
        silent = delta.finish is not None and not self.said and not delta.tool_calls
        if delta.text or delta.logprobs or silent:
            if self.open is None or self.open["type"] != "message":
                frames += self._add(message_item(_id("msg"), None, "in_progress"))
                self.said = True
                part = {"type": "output_text", "text": "", "annotations": [], "logprobs": []}
                frames.append(
                    self.frame(
                        "response.content_part.added", **self._at(), content_index=0, part=part
                    )
                )
            self._open_text += delta.text
            self.text += delta.text
            scores = logprobs_json(delta.logprobs)
            self._logprobs += scores
            if delta.text or scores:
                frames.append(
                    self.frame(
                        "response.output_text.delta",
                        **self._at(),
                        content_index=0,
                        delta=delta.text,
                        logprobs=scores,
                    )
                )
        for call in delta.tool_calls:
            arguments = json.dumps(call.arguments)
            item = call_item(_id("fc"), call, "", "in_progress")
            frames += self._add(item)
            item["arguments"] = arguments  # what output_item.done will carry
            frames.append(
                self.frame("response.function_call_arguments.delta", **self._at(), delta=arguments)
            )
        return frames
