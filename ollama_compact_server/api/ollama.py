"""Ollama dialect routes (`/`, `/api/*`). Registry routes answer from disk; generation routes
arrive with the engine."""

from __future__ import annotations

import json
from datetime import datetime, timezone
from typing import Any

from fastapi import APIRouter, Request
from fastapi.responses import JSONResponse, PlainTextResponse, Response

from .. import __version__
from ..registry.errors import InvalidName
from ..registry.names import ModelName
from ..registry.store import ModelRecord, Registry
from .errors import APIError

router = APIRouter()
OLLAMA_COMPAT_VERSION = "0.12.0"


def rfc3339(moment: datetime) -> str:
    return moment.astimezone(timezone.utc).isoformat().replace("+00:00", "Z")


def parameter_size(count: int) -> str:
    if count >= 1_000_000_000:
        return f"{count / 1e9:.1f}B"
    if count >= 1_000_000:
        return f"{count / 1e6:.0f}M"
    return f"{count / 1e3:.0f}K"


def details(record: ModelRecord) -> dict[str, Any]:
    config = record.config
    return {
        "parent_model": config.parent_model,
        "format": config.format,
        "family": config.family,
        "families": config.families or [config.family],
        "parameter_size": parameter_size(config.parameter_count),
        "quantization_level": config.quantization_level,
    }


def list_entry(record: ModelRecord) -> dict[str, Any]:
    return {
        "name": record.name.display(),
        "model": record.name.display(),
        "modified_at": rfc3339(record.modified_at),
        "size": record.size,
        "digest": record.digest,
        "details": details(record),
        "context_length": record.config.context_length,
    }


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


def model_field(body: dict[str, Any], *keys: str) -> str:
    """`model`, or the deprecated `name` (the CLI sends "model": "" beside it)."""
    for key in keys or ("model", "name"):
        value = body.get(key)
        if isinstance(value, str) and value.strip():
            return value
        if value is not None and not isinstance(value, str):
            raise APIError(400, f"{key} must be a string")
    raise APIError(400, "model is required")


def parse_name(text: str, label: str | None = None) -> ModelName:
    try:
        return ModelName.parse(text)
    except InvalidName as exc:
        if label:
            raise APIError(400, f'{label} "{text[:100]}" is invalid') from exc
        raise APIError(400, "invalid model name") from exc


def registry_of(request: Request) -> Registry:
    registry: Registry = request.app.state.registry
    return registry


@router.head("/")
@router.get("/")
async def root() -> PlainTextResponse:
    return PlainTextResponse("Ollama is running")


@router.get("/api/version")
async def version() -> dict[str, str]:
    return {"version": OLLAMA_COMPAT_VERSION, "server": f"ollama-compact-server {__version__}"}


@router.get("/api/tags")
async def tags(request: Request) -> dict[str, Any]:
    records = registry_of(request).models()
    records.sort(key=lambda r: r.modified_at, reverse=True)
    return {"models": [list_entry(r) for r in records]}


@router.post("/api/copy")
async def copy(request: Request) -> Response:
    body = await json_body(request)
    source = parse_name(model_field(body, "source"), "source")
    destination = parse_name(model_field(body, "destination"), "destination")
    registry = registry_of(request)
    if not registry.exists(source):
        raise APIError(404, f'model "{source.display()}" not found')
    registry.copy(source, destination)
    return Response(status_code=200)


@router.delete("/api/delete")
async def delete(request: Request) -> Response:
    body = await json_body(request)
    name = parse_name(model_field(body))
    registry = registry_of(request)
    if not registry.exists(name):
        raise APIError(404, f"model '{name.display()}' not found")
    registry.delete(name)
    return Response(status_code=200)


def not_found() -> JSONResponse:
    return JSONResponse({"error": "not found"}, status_code=404)
