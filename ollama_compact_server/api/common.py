"""What both dialects' routes share: reading the JSON body and reaching app services."""

from __future__ import annotations

import json
from typing import Any

from fastapi import Request

from ..chat.service import ChatService
from ..registry.store import Registry
from .errors import APIError


async def json_body(request: Request) -> dict[str, Any]:
    raw = await request.body()
    if not raw.strip():
        raise APIError(400, "missing request body")
    try:
        body = json.loads(raw)
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
