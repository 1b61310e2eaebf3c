"""Stream framing for every dialect: NDJSON lines (Ollama) and server-sent events (OpenAI,
Responses, Anthropic), each ending with the dialect's in-band error when the stream fails
after its headers went out."""

from __future__ import annotations

import json
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import Any

import anyio
from fastapi.responses import StreamingResponse
from sse_starlette.sse import EventSourceResponse, ServerSentEvent

from .errors import Dialect, error_body, in_band

LINE_BREAKS = {"\u2028": "\\u2028", "\u2029": "\\u2029", "\x85": "\\u0085"}
PING_SECONDS = 15
Closer = Callable[[], Awaitable[None]]


def stream_json(item: Any) -> str:
    """One JSON document for a stream line (NDJSON or SSE data). Unicode line and paragraph
    separators and NEL are escaped: JSON allows them raw, but clients that split streams
    with str.splitlines (httpx's aiter_lines, so the ollama and openai Python clients)
    would cut the document in two."""
    text = json.dumps(item, ensure_ascii=False)
    for raw, escaped in LINE_BREAKS.items():
        if raw in text:
            text = text.replace(raw, escaped)
    return text


def ndjson(
    items: AsyncIterator[dict[str, Any]], on_close: Closer | None = None
) -> StreamingResponse:
    """Ollama's streams: one JSON object per line; an error ends them as {"error": ...}.
    ``on_close`` runs when the response ends for any reason, the client leaving before the
    first line included (it aborts the engine requests a never-started stream holds)."""

    async def lines() -> AsyncIterator[bytes]:
        try:
            async for item in items:
                yield (stream_json(item) + "\n").encode()
        except Exception as exc:
            _, message = in_band(exc, Dialect.OLLAMA)
            yield (json.dumps({"error": message}) + "\n").encode()

    response = ClosingStream(lines(), media_type="application/x-ndjson")
    response.on_close = on_close
    return response


async def _closed(body: Any, on_close: Closer | None) -> None:
    """A stream's body generator is closed, and ``on_close`` run, however the response
    ended: a client that hangs up mid-send leaves the generator suspended otherwise (until
    the garbage collector), and the engine requests it holds running."""
    close = getattr(body, "aclose", None)
    if close is not None:
        await close()
    if on_close is not None:
        await on_close()


class ClosesBody:
    """For a streaming response class: its body closed and ``on_close`` run at the end."""

    on_close: Closer | None = None
    body_iterator: Any

    async def __call__(self, scope: Any, receive: Any, send: Any) -> None:
        try:
            await super().__call__(scope, receive, send)  # type: ignore[misc]
        finally:
            await _closed(self.body_iterator, self.on_close)


class ClosingStream(ClosesBody, StreamingResponse):
    pass


Frame = tuple[str | None, Any]
"""An SSE event: (event name or None, JSON-able data)."""


class DrainedEventSource(ClosesBody, EventSourceResponse):
    """sse-starlette's response, minus its own shutdown handling: it would end every stream
    the moment a signal arrives. Our server drains running requests itself (server.py) and
    cancels what outlasts the drain, so a stream ends when its request does. Its body is
    closed however the response ends."""

    @staticmethod
    async def _listen_for_exit_signal() -> None:
        await anyio.sleep_forever()


def sse(
    frames: AsyncIterator[Frame],
    dialect: Dialect,
    *,
    failed: Callable[[int, str], list[Frame]] | None = None,
    done: bool = False,
    ping: Frame | None = None,
    on_close: Closer | None = None,
) -> EventSourceResponse:
    """Server-sent events. An error after the headers becomes ``failed(status, message)``'s
    frames (by default the dialect's error body as data); ``done`` ends the stream with
    OpenAI's ``data: [DONE]``; ``ping`` is the keep-alive event (a comment by default)."""

    def render(frame: Frame) -> dict[str, str]:
        name, data = frame
        out = {"data": data if isinstance(data, str) else stream_json(data)}
        if name is not None:
            out["event"] = name
        return out

    async def events() -> AsyncIterator[dict[str, str]]:
        try:
            async for frame in frames:
                yield render(frame)
        except Exception as exc:
            status, message = in_band(exc, dialect)
            for frame in (
                failed(status, message) if failed else [(None, _error(dialect, status, message))]
            ):
                yield render(frame)
        if done:
            yield {"data": "[DONE]"}

    factory = None
    if ping is not None:
        name, data = ping
        factory = lambda: ServerSentEvent(event=name, data=stream_json(data))  # noqa: E731
    response = DrainedEventSource(events(), ping=PING_SECONDS, ping_message_factory=factory)
    response.on_close = on_close
    return response


def _error(dialect: Dialect, status: int, message: str) -> dict[str, Any]:
    return error_body(dialect, status, message)
