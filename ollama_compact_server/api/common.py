"""What every dialect's routes share: reading the JSON body and reaching app services."""

from __future__ import annotations

import asyncio
import json
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
        body = json.loads(raw) if size < (1 << 20) else await asyncio.to_thread(json.loads, raw)
    except (json.JSONDecodeError, UnicodeDecodeError, RecursionError):
        raise APIError(400, "invalid JSON body") from None
    if not isinstance(body, dict):
        raise APIError(400, "request body must be a JSON object")
    return body


def registry_of(request: Request) -> Registry:
    registry: Registry = request.app.state.registry
    return registry


def chat_service(request: Request) -> ChatService:
    service: ChatService = request.app.state.chat
    return service
