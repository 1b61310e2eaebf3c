"""OpenAI's legacy /v1/completions: raw prompts (several at once), ``n``, ``echo`` and the
legacy logprobs shape, streamed as ``text_completion`` chunks or answered whole."""

from __future__ import annotations

import time
import uuid
from collections.abc import AsyncIterator
from typing import Any

from fastapi import APIRouter, Request
from fastapi.responses import JSONResponse, Response

from ...chat.turn import ScoredToken
from ..common import chat_service, json_body
from ..errors import Dialect
from ..streaming import Frame, sse
from ..wire import body, parse
from .chat import finish_reason, usage_chunk, usage_json
from .wire import CompletionRequest

router = APIRouter(prefix="/v1")


def text_logprobs(scores: list[ScoredToken], offset: int) -> dict[str, Any]:
    """Legacy completions shape: tokens, token_logprobs, top_logprobs, text_offset (with
    echo the prompt's tokens come first; the very first has no score)."""
    offsets = []
    for score in scores:
        offsets.append(offset)
        offset += len(score.token)
    return {
        "tokens": [s.token for s in scores],
        "token_logprobs": [s.logprob for s in scores],
        "top_logprobs": [
            None if s.logprob is None else {a.token: a.logprob for a in s.top} for s in scores
        ],
        "text_offset": offsets,
    }


@router.post("/completions", openapi_extra=body(CompletionRequest))
async def completions(request: Request) -> Response:
    wire = parse(CompletionRequest, await json_body(request))
    chat = wire.to_chat_request()
    turn = await chat_service(request).start(chat)
    ident = "cmpl-" + uuid.uuid4().hex[:24]
    created = int(time.time())
    scored = chat.logprobs is not None
    echo = chat.prompts if chat.echo else None

    def prompt_of(index: int) -> str:
        return echo[index // chat.n] if echo else ""

    if not wire.stream:
        result = await turn.collect()
        choices = []
        for c in result.choices:
            scores = [*(c.prompt_logprobs or []), *c.logprobs] if echo else c.logprobs
            choices.append(
                {
                    "index": c.index,
                    "text": prompt_of(c.index) + c.text,
                    "logprobs": text_logprobs(scores, 0) if scored else None,
                    "finish_reason": finish_reason(c.finish),
                }
            )
        return JSONResponse(
            {
                "id": ident,
                "object": "text_completion",
                "created": created,
                "model": turn.model,
                "system_fingerprint": "ocs",
                "choices": choices,
                "usage": usage_json(result.usage),
            }
        )

    include_usage = wire.include_usage

    def chunk(index: int, text: str, finish: str | None = None, scores: Any = None) -> Frame:
        return (
            None,
            {
                "id": ident,
                "object": "text_completion",
                "created": created,
                "model": turn.model,
                "system_fingerprint": "ocs",
                "choices": [
                    {"index": index, "text": text, "logprobs": scores, "finish_reason": finish}
                ],
            },
        )

    async def frames() -> AsyncIterator[Frame]:
        offsets = [0] * turn.choices
        try:
            if echo:
                for index in range(turn.choices):
                    yield chunk(index, prompt_of(index))
            async for delta in turn.deltas():
                i = delta.index
                scores: Any = None
                if scored and (delta.logprobs or delta.prompt_logprobs):
                    tokens = [*(delta.prompt_logprobs or []), *delta.logprobs]
                    scores = text_logprobs(tokens, offsets[i])
                    offsets[i] += sum(len(t.token) for t in tokens)
                if delta.text or scores is not None:
                    yield chunk(i, delta.text, None, scores)
                if delta.finish is not None:
                    yield chunk(i, "", finish_reason(delta.finish))
            if include_usage:
                yield usage_chunk(ident, "text_completion", created, turn.model, turn.usage)
        finally:
            await turn.close()

    return sse(frames(), Dialect.OPENAI, done=True, on_close=turn.close)
