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
from ..common import chat_service, json_body
from ..errors import APIError
from ..wire import body, parse
from .wire import EmbeddingRequest

router = APIRouter(prefix="/v1")


@router.post("/embeddings", openapi_extra=body(EmbeddingRequest))
async def embeddings(request: Request) -> Response:
    wire = parse(EmbeddingRequest, await json_body(request))
    service = chat_service(request)
    view = service.model(wire.model)
    value = wire.input
    if isinstance(value, str):
        value = [value]
    if all(isinstance(v, str) for v in value):
        inputs = await embed_inputs(service, view, [v for v in value if isinstance(v, str)])
    else:
        ids = [v for v in value if isinstance(v, list)]
        if any(not v for v in ids):
            raise APIError(400, "input holds an empty array of token ids")
        vocab = len(await service.tokenizer(view))
        if any(t < 0 or t >= vocab for v in ids for t in v):
            raise APIError(400, "input holds token ids outside the vocabulary")
        inputs = [list(v) for v in ids]
    event = await service.engine.embed(EmbedRequest(uuid.uuid4().hex, view.name, inputs))
    vectors = event.embeddings or []
    if wire.dimensions is not None:
        vectors = [_renormalised(v[: wire.dimensions]) for v in vectors]
    fmt = wire.encoding_format or "float"
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
