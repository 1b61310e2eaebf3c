"""What every dialect's routes share: reading the JSON body and reaching app services."""

from __future__ import annotations

import asyncio
import json
import re
from typing import Any

from fastapi import Request

from ..chat.service import ChatService
from ..registry.store import Registry
from .errors import APIError

MAX_BODY_BYTES = 32 << 20  # JSON bodies; model files go through /api/blobs


async def json_body(request: Request) -> dict[str, Any]:
    """The request's JSON object, counted as bytes arrive (413 past the cap, whatever
    Content-Length claims); parsing a big body runs off the event loop."""
    chunks: list[bytes] = []
    size = 0
    async for chunk in request.stream():
        size += len(chunk)
        if size > MAX_BODY_BYTES:
            raise APIError(413, f"request body is larger than {MAX_BODY_BYTES >> 20} MiB")
        chunks.append(chunk)
    raw = b"".join(chunks)
    if not raw.strip():
        raise APIError(400, "missing request body")
    try:
        body = parse_json(raw) if size < (1 << 20) else await asyncio.to_thread(parse_json, raw)
    except (ValueError, RecursionError) as exc:  # JSONDecodeError and UnicodeError are too
        raise APIError(400, f"invalid JSON body: {str(exc)[:200]}") from None
    if not isinstance(body, dict):
        raise APIError(400, "request body must be a JSON object")
    return body


LONG_INT = 19  # digits beyond which an integer literal is read as a float (too big anyway)
MAX_NUMBER = 1000  # characters of one number literal (Python refuses ints past 4,300 digits)
_SURROGATE_ESCAPE = re.compile(rb"\\u[dD][89a-fA-F]")


def _number(text: str) -> int | float:
    """An integer literal; one too long for any field becomes a float (infinite past
    1e308), which the wire models refuse, instead of an int that overflows a float field
    or a string past Python's int-string limit (a ValueError deep in the parser)."""
    if len(text) > MAX_NUMBER:
        raise ValueError(f"a number literal of {len(text)} characters is too long")
    return int(text) if len(text) <= LONG_INT else float(text)


def _float(text: str) -> float:
    if len(text) > MAX_NUMBER:
        raise ValueError(f"a number literal of {len(text)} characters is too long")
    return float(text)


def _refuse_constant(name: str) -> Any:
    raise ValueError(f"{name} is not a JSON number")


def parse_json(raw: bytes | str) -> Any:
    """json.loads for client bodies: NaN / Infinity refused, huge integers tamed, and text
    with a lone UTF-16 surrogate (which no tokenizer or file can take) refused."""
    body = json.loads(raw, parse_int=_number, parse_float=_float, parse_constant=_refuse_constant)
    encoded = raw if isinstance(raw, bytes) else raw.encode("utf-8", "surrogatepass")
    if _SURROGATE_ESCAPE.search(encoded):
        _check_text(body)
    return body


def _check_text(value: Any) -> None:
    """ValueError if any string (key or value) in ``value`` holds a lone surrogate."""
    stack = [value]
    while stack:
        item = stack.pop()
        if isinstance(item, str):
            try:
                item.encode("utf-8")
            except UnicodeEncodeError:
                raise ValueError("text holds a lone UTF-16 surrogate (\\ud800-\\udfff)") from None
        elif isinstance(item, dict):
            stack.extend(item.keys())
            stack.extend(item.values())
        elif isinstance(item, list):
            stack.extend(item)


def registry_of(request: Request) -> Registry:
    registry: Registry = request.app.state.registry
    return registry


def chat_service(request: Request) -> ChatService:
    service: ChatService = request.app.state.chat
    return service
