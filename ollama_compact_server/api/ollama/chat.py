"""Ollama's generation routes, /api/chat and /api/generate: wire fields to a ChatRequest,
the turn's deltas to NDJSON chunks (or one object with ``"stream": false``). An empty
prompt or message list loads the model, or unloads it with ``keep_alive`` 0."""

from __future__ import annotations

import time
from collections.abc import AsyncIterator, Callable
from typing import Any

from fastapi import APIRouter, Request
from fastapi.responses import JSONResponse, Response

from ...chat.errors import Unsupported
from ...chat.service import ChatService
from ...chat.turn import ChatDelta, Finish, ScoredToken, Turn, Usage
from ...engine.types import KeepAlive
from ..common import chat_service, json_body
from ..streaming import ndjson
from ..wire import body, parse
from .wire import (
    ChatRequestWire,
    GenerateRequestWire,
    Run,
    metrics,
    now_rfc3339,
    ollama_tool_calls,
)

router = APIRouter()


async def load_or_unload(
    service: ChatService,
    name: str,
    keep_alive: KeepAlive,
    think: bool | None,
    shape: dict[str, Any],
) -> JSONResponse:
    """Empty prompt or messages: load the model, or with keep_alive 0 unload it (before
    any think check, as Ollama does)."""
    view = service.model(name)
    if keep_alive != 0 and think and "thinking" not in view.record.config.capabilities:
        raise Unsupported(f'"{view.name}" does not support thinking')
    if keep_alive == 0:
        service.engine.unload(view.name)
        reason = "unload"
    else:
        await service.engine.load(view.name, keep_alive)
        reason = "load"
    return JSONResponse(
        {
            "model": view.name,
            "created_at": now_rfc3339(),
            **shape,
            "done": True,
            "done_reason": reason,
        }
    )


@router.post("/api/generate", openapi_extra=body(GenerateRequestWire))
async def generate(request: Request) -> Response:
    started = time.perf_counter()
    wire = parse(GenerateRequestWire, await json_body(request))
    chat = wire.to_chat_request()
    service = chat_service(request)
    if not wire.prompt and not wire.images:
        shape = {"response": ""}
        return await load_or_unload(service, chat.model, chat.keep_alive, chat.think, shape)
    if wire.suffix:
        raise Unsupported(f'"{service.model(chat.model).name}" does not support insert')
    turn = await service.start(chat)

    def frame(text: str) -> dict[str, Any]:
        return {"model": turn.model, "created_at": now_rfc3339(), "response": text}

    def put_thinking(item: dict[str, Any], text: str) -> None:
        item["thinking"] = text

    def extra(usage: Usage, token_ids: list[int]) -> dict[str, Any]:
        return {} if chat.raw else {"context": [*turn.prompt_ids(0), *token_ids]}

    return await respond(turn, wire, started, frame, put_thinking, extra)


@router.post("/api/chat", openapi_extra=body(ChatRequestWire))
async def chat(request: Request) -> Response:
    started = time.perf_counter()
    wire = parse(ChatRequestWire, await json_body(request))
    chat = wire.to_chat_request()
    service = chat_service(request)
    if not wire.messages:
        shape = {"message": {"role": "assistant", "content": ""}}
        return await load_or_unload(service, chat.model, chat.keep_alive, chat.think, shape)
    turn = await service.start(chat)

    def frame(text: str) -> dict[str, Any]:
        return {
            "model": turn.model,
            "created_at": now_rfc3339(),
            "message": {"role": "assistant", "content": text},
        }

    def put_thinking(item: dict[str, Any], text: str) -> None:
        item["message"]["thinking"] = text

    return await respond(turn, wire, started, frame, put_thinking, lambda usage, ids: {})


def logprobs_json(scores: list[ScoredToken]) -> list[dict[str, Any]]:
    def entry(score: ScoredToken) -> dict[str, Any]:
        return {"token": score.token, "logprob": score.logprob, "bytes": score.bytes}

    return [{**entry(s), "top_logprobs": [entry(a) for a in s.top]} for s in scores]


def done_reason(finish: Finish) -> str:
    return "length" if finish == Finish.LENGTH else "stop"


async def respond(
    turn: Turn,
    wire: Run,
    started: float,
    frame: Callable[[str], dict[str, Any]],
    put_thinking: Callable[[dict[str, Any], str], None],
    extra: Callable[[Usage, list[int]], dict[str, Any]],
) -> Response:
    """One object (``stream`` false) or NDJSON chunks, then the final chunk with the
    metrics. Tool calls come whole, in a chunk of their own text's, as Ollama sends them."""

    def final(finish: Finish, usage: Usage, token_ids: list[int]) -> dict[str, Any]:
        return {
            **frame(""),
            "done": True,
            "done_reason": done_reason(finish),
            **metrics(usage, started),
            **extra(usage, token_ids),
        }

    if wire.stream is False:
        result = await turn.collect()
        choice = result.choices[0]
        item = final(choice.finish, choice.usage, choice.token_ids)
        item.update(frame(choice.text))
        if choice.thinking:
            put_thinking(item, choice.thinking)
        if choice.tool_calls:
            item["message"]["tool_calls"] = ollama_tool_calls(choice.tool_calls)
        if choice.logprobs or wire.scored() is not None:
            item["logprobs"] = logprobs_json(choice.logprobs)
        return JSONResponse(item)

    async def items() -> AsyncIterator[dict[str, Any]]:
        try:
            async for delta in turn.deltas():
                if delta.text or delta.thinking or delta.tool_calls or delta.logprobs:
                    yield chunk(delta)
                if delta.finish is not None:
                    yield final(delta.finish, delta.usage or Usage(), delta.token_ids)
        finally:
            await turn.close()

    def chunk(delta: ChatDelta) -> dict[str, Any]:
        item = {**frame(delta.text), "done": False}
        if delta.thinking:
            put_thinking(item, delta.thinking)
        if delta.tool_calls:
            item["message"]["tool_calls"] = ollama_tool_calls(delta.tool_calls)
        if delta.logprobs:
            item["logprobs"] = logprobs_json(delta.logprobs)
        return item

    return ndjson(items(), on_close=turn.close)
