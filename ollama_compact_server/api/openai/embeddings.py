"""OpenAI's /v1/embeddings: strings or token-id arrays, float or base64, ``dimensions``."""

from __future__ import annotations

import base64
import math
import struct
import uuid
from typing import Any

from fastapi import APIRouter, Request
from fastapi.responses import JSONResponse, Response

from ...chat.service import embed_inputs
from ...engine.types import EmbedRequest
from ..common import chat_service, check_fields, json_body
from ..errors import APIError
from .wire import EMBEDDING_FIELDS, integer, model_of

router = APIRouter(prefix="/v1")


@router.post("/embeddings")
async def embeddings(request: Request) -> Response:
    body = await json_body(request)
    check_fields(body, EMBEDDING_FIELDS)
    integer(body, "dimensions", 1, 1 << 16)
    service = chat_service(request)
    view = service.model(model_of(body))
    value = body.get("input")
    if isinstance(value, str):
        value = [value]
    if not isinstance(value, list) or not value:
        raise APIError(400, "input must be a non-empty string or array")
    fmt = body.get("encoding_format") or "float"
    if fmt not in ("float", "base64"):
        raise APIError(400, "encoding_format must be float or base64")
    if all(isinstance(v, str) for v in value):
        inputs = await embed_inputs(service, view, value)
    elif all(
        isinstance(v, list) and v and all(isinstance(t, int) and not isinstance(t, bool) for t in v)
        for v in value
    ):
        vocab = len(await service.tokenizer(view))
        if any(t < 0 or t >= vocab for v in value for t in v):
            raise APIError(400, "input holds token ids outside the vocabulary")
        inputs = [list(v) for v in value]
    else:
        raise APIError(400, "input must be strings or arrays of token ids")
    event = await service.engine.embed(EmbedRequest(uuid.uuid4().hex, view.name, inputs))
    vectors = event.embeddings or []
    dimensions = integer(body, "dimensions", 1, 1 << 16)
    if dimensions is not None:
        vectors = [_renormalised(v[:dimensions]) for v in vectors]
    data = []
    for index, vector in enumerate(vectors):
        embedding: Any = vector
        if fmt == "base64":
            embedding = base64.b64encode(struct.pack(f"<{len(vector)}f", *vector)).decode()
        data.append({"object": "embedding", "embedding": embedding, "index": index})
    tokens = event.prompt_tokens
    return JSONResponse(
        {
            "object": "list",
            "data": data,
            "model": view.name,
            "usage": {"prompt_tokens": tokens, "total_tokens": tokens},
        }
    )


def _renormalised(vector: list[float]) -> list[float]:
    norm = math.sqrt(sum(x * x for x in vector)) or 1.0
    return [x / norm for x in vector]
