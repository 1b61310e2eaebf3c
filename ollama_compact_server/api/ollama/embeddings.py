"""Ollama's embedding routes: /api/embed (batches, truncation, dimensions) and the legacy
/api/embeddings."""

from __future__ import annotations

import time
import uuid

from fastapi import APIRouter, Request
from fastapi.responses import JSONResponse, Response

from ...chat.service import ChatService, ModelView, embed_inputs
from ...engine.types import EmbedRequest, KeepAlive, TokenEvent
from ..common import chat_service, json_body
from ..wire import body, parse
from .chat import load_or_unload
from .wire import EmbeddingsRequestWire, EmbedRequestWire, nanos

router = APIRouter()


async def _embed(
    service: ChatService, name: str, texts: list[str], keep_alive: KeepAlive, truncate: bool
) -> tuple[ModelView, TokenEvent]:
    view = service.model(name)
    inputs = await embed_inputs(service, view, texts, truncate=truncate)
    event = await service.engine.embed(
        EmbedRequest(uuid.uuid4().hex, view.name, inputs, keep_alive=keep_alive)
    )
    return view, event


@router.post("/api/embed", openapi_extra=body(EmbedRequestWire))
async def embed(request: Request) -> Response:
    wire = parse(EmbedRequestWire, await json_body(request))
    keep_alive = wire.keep()
    name = wire.model_name()
    service = chat_service(request)
    if wire.input in (None, "", []):  # no input: load the model, or unload it (keep_alive 0)
        view = service.model(name)
        await load_or_unload(service, view.name, keep_alive, None, {})
        return JSONResponse({"model": view.name, "embeddings": []})
    texts = [wire.input] if isinstance(wire.input, str) else list(wire.input or [])
    started = time.perf_counter()
    view, event = await _embed(service, name, texts, keep_alive, wire.truncate is not False)
    vectors = _dimensions(event.embeddings or [], wire.dimensions)
    return JSONResponse(
        {
            "model": view.name,
            "embeddings": vectors,
            "total_duration": nanos(time.perf_counter() - started),
            "load_duration": nanos(event.load_time),
            "prompt_eval_count": event.prompt_tokens,
        }
    )


@router.post("/api/embeddings", openapi_extra=body(EmbeddingsRequestWire))
async def embeddings_legacy(request: Request) -> Response:
    wire = parse(EmbeddingsRequestWire, await json_body(request))
    keep_alive = wire.keep()
    service = chat_service(request)
    if not wire.prompt:
        await load_or_unload(service, wire.model_name(), keep_alive, None, {})
        return JSONResponse({"embedding": []})
    _, event = await _embed(service, wire.model_name(), [wire.prompt], keep_alive, True)
    return JSONResponse({"embedding": (event.embeddings or [[]])[0]})


def _dimensions(vectors: list[list[float]], dimensions: int | None) -> list[list[float]]:
    """Matryoshka-style truncation to ``dimensions``, renormalised."""
    if dimensions is None:
        return vectors
    out = []
    for vector in vectors:
        cut = vector[:dimensions]
        norm = sum(x * x for x in cut) ** 0.5 or 1.0
        out.append([x / norm for x in cut])
    return out
