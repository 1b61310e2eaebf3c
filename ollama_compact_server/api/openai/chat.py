"""OpenAI's /v1/chat/completions: wire fields to a ChatRequest, the turn's deltas to
``chat.completion`` chunks over SSE (ending in ``[DONE]``), or one ``chat.completion``."""

from __future__ import annotations

import time
import uuid
from collections.abc import AsyncIterator
from typing import Any

from fastapi import APIRouter, Request
from fastapi.responses import JSONResponse, Response

from ...chat.turn import Choice, Finish, ScoredToken, Usage
from ..common import chat_service, json_body
from ..errors import Dialect
from ..streaming import Frame, sse
from ..wire import body, parse
from .wire import ChatCompletionRequest, openai_tool_calls

router = APIRouter(prefix="/v1")


def finish_reason(finish: Finish) -> str:
    return finish.value  # stop, length, tool_calls: OpenAI's names


def usage_json(usage: Usage) -> dict[str, Any]:
    return {
        "prompt_tokens": usage.prompt_tokens,
        "completion_tokens": usage.completion_tokens,
        "total_tokens": usage.total_tokens,
        "prompt_tokens_details": {"cached_tokens": usage.cached_tokens},
    }


def usage_chunk(ident: str, kind: str, created: int, model: str, usage: Usage) -> Frame:
    """The last chunk of a stream with ``stream_options.include_usage``: no choices."""
    body = {"id": ident, "object": kind, "created": created, "model": model, "choices": []}
    return None, {**body, "usage": usage_json(usage)}


def logprobs_json(scores: list[ScoredToken]) -> dict[str, Any]:
    """OpenAI chat shape: {"content": [{token, logprob, bytes, top_logprobs}], "refusal"}."""

    def entry(score: ScoredToken) -> dict[str, Any]:
        return {"token": score.token, "logprob": score.logprob, "bytes": score.bytes}

    content = [{**entry(s), "top_logprobs": [entry(a) for a in s.top]} for s in scores]
    return {"content": content, "refusal": None}


def message_json(choice: Choice) -> dict[str, Any]:
    message: dict[str, Any] = {"role": "assistant", "content": choice.text}
    if choice.thinking:
        message["reasoning_content"] = choice.thinking
    if choice.tool_calls:
        message["tool_calls"] = openai_tool_calls(choice.tool_calls)
        message["content"] = choice.text or None
    return message


@router.post("/chat/completions", openapi_extra=body(ChatCompletionRequest))
async def chat_completions(request: Request) -> Response:
    wire = parse(ChatCompletionRequest, await json_body(request))
    chat = wire.to_chat_request()
    turn = await chat_service(request).start(chat)
    ident = "chatcmpl-" + uuid.uuid4().hex[:24]
    created = int(time.time())
    scored = chat.logprobs is not None

    if not wire.stream:
        result = await turn.collect()
        return JSONResponse(
            {
                "id": ident,
                "object": "chat.completion",
                "created": created,
                "model": turn.model,
                "system_fingerprint": "ocs",
                "choices": [
                    {
                        "index": c.index,
                        "message": message_json(c),
                        "logprobs": logprobs_json(c.logprobs) if scored else None,
                        "finish_reason": finish_reason(c.finish),
                    }
                    for c in result.choices
                ],
                "usage": usage_json(result.usage),
            }
        )

    include_usage = wire.include_usage

    def chunk(
        index: int, delta: dict[str, Any], finish: str | None = None, scores: Any = None
    ) -> Frame:
        return (
            None,
            {
                "id": ident,
                "object": "chat.completion.chunk",
                "created": created,
                "model": turn.model,
                "system_fingerprint": "ocs",
                "choices": [
                    {"index": index, "delta": delta, "logprobs": scores, "finish_reason": finish}
                ],
            },
        )

    async def frames() -> AsyncIterator[Frame]:
        try:
            for index in range(turn.choices):
                yield chunk(index, {"role": "assistant", "content": ""})
            async for delta in turn.deltas():
                i = delta.index
                if delta.thinking:
                    yield chunk(i, {"reasoning_content": delta.thinking})
                if delta.text or delta.logprobs:
                    scores = logprobs_json(delta.logprobs) if delta.logprobs else None
                    yield chunk(i, {"content": delta.text}, None, scores)
                if delta.tool_calls:
                    yield chunk(i, {"tool_calls": openai_tool_calls(delta.tool_calls, True)})
                if delta.finish is not None:
                    yield chunk(i, {}, finish_reason(delta.finish))
            if include_usage:
                yield usage_chunk(ident, "chat.completion.chunk", created, turn.model, turn.usage)
        finally:
            await turn.close()

    return sse(frames(), Dialect.OPENAI, done=True, on_close=turn.close)
