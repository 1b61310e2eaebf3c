"""Ollama's embedding routes: /api/embed (batches, truncation, dimensions) and the legacy
/api/embeddings."""

from __future__ import annotations

import time
import uuid
from typing import Any

from fastapi import APIRouter, Request
from fastapi.responses import JSONResponse, Response

from ...chat.service import ModelView, embed_inputs
from ...engine.types import EmbedRequest, TokenEvent
from ..common import chat_service, check_fields, json_body
from ..errors import APIError
from .chat import load_or_unload
from .wire import EMBED_FIELDS, EMBEDDINGS_FIELDS, check_options, keep_alive_of, model_field, nanos

router = APIRouter()


def _texts(value: Any, key: str) -> list[str]:
    if isinstance(value, str):
        return [value]
    if isinstance(value, list) and all(isinstance(v, str) for v in value):
        return list(value)
    raise APIError(400, f"{key} must be a string or a list of strings")


async def _embed(
    request: Request, body: dict[str, Any], texts: list[str]
) -> tuple[ModelView, TokenEvent]:
    service = chat_service(request)
    view = service.model(model_field(body))
    inputs = await embed_inputs(
        service, view, texts, truncate=body.get("truncate", True) is not False
    )
    event = await service.engine.embed(
        EmbedRequest(uuid.uuid4().hex, view.name, inputs, keep_alive=keep_alive_of(body))
    )
    return view, event


@router.post("/api/embed")
async def embed(request: Request) -> Response:
    body = await json_body(request)
    check_fields(body, EMBED_FIELDS)
    check_options(body)
    texts = (
        _texts(body.get("input", []), "input") if body.get("input") not in (None, "", []) else []
    )
    if not texts:
        service = chat_service(request)
        name = service.model(model_field(body)).name
        await load_or_unload(service, name, keep_alive_of(body), None, {})
        return JSONResponse({"model": name, "embeddings": []})
    started = time.perf_counter()
    view, event = await _embed(request, body, texts)
    vectors = _dimensions(event.embeddings or [], body.get("dimensions"))
    return JSONResponse(
        {
            "model": view.name,
            "embeddings": vectors,
            "total_duration": nanos(time.perf_counter() - started),
            "load_duration": nanos(event.load_time),
            "prompt_eval_count": event.prompt_tokens,
        }
    )


@router.post("/api/embeddings")
async def embeddings_legacy(request: Request) -> Response:
    body = await json_body(request)
    check_fields(body, EMBEDDINGS_FIELDS)
    check_options(body)
    prompt = body.get("prompt") or ""
    if not prompt:
        service = chat_service(request)
        await load_or_unload(service, model_field(body), keep_alive_of(body), None, {})
        return JSONResponse({"embedding": []})
    _, event = await _embed(request, body, [prompt])
    return JSONResponse({"embedding": (event.embeddings or [[]])[0]})


def _dimensions(vectors: list[list[float]], dimensions: Any) -> list[list[float]]:
    """Matryoshka-style truncation to ``dimensions``, renormalised."""
    if dimensions is None:
        return vectors
    if isinstance(dimensions, bool) or not isinstance(dimensions, int) or dimensions < 1:
        raise APIError(400, "dimensions must be a positive integer")
    out = []
    for vector in vectors:
        cut = vector[:dimensions]
        norm = sum(x * x for x in cut) ** 0.5 or 1.0
        out.append([x / norm for x in cut])
    return out
