"""OpenAI's model listing: /v1/models and /v1/models/{id}."""

from __future__ import annotations

from typing import Any

from fastapi import APIRouter, Request

from ..common import registry_of
from ..errors import APIError

router = APIRouter(prefix="/v1")


def _model_entry(name: str, created: float) -> dict[str, Any]:
    owner = name.split("/")[0] if "/" in name else "library"
    return {"id": name, "object": "model", "created": int(created), "owned_by": owner}


@router.get("/models")
async def list_models(request: Request) -> dict[str, Any]:
    records = registry_of(request).models()
    return {
        "object": "list",
        "data": [_model_entry(r.name.display(), r.modified_at.timestamp()) for r in records],
    }


@router.get("/models/{model_id:path}")
async def get_model(request: Request, model_id: str) -> dict[str, Any]:
    registry = registry_of(request)
    try:
        record = registry.get(model_id)
    except Exception:
        raise APIError(404, f"The model `{model_id[:100]}` does not exist.") from None
    return _model_entry(record.name.display(), record.modified_at.timestamp())
