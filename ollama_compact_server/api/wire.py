"""Pydantic at the edge, shared by the dialects whose wire shapes are pydantic models:
lenient but loud (unknown fields accepted and logged, as vLLM's OpenAIBaseModel does),
and a validation failure as one readable 400 message."""

from __future__ import annotations

import logging
from typing import Any, TypeVar

from pydantic import BaseModel, ConfigDict, ValidationError, model_validator

from .errors import APIError

log = logging.getLogger(__name__)
M = TypeVar("M", bound="WireModel")


class WireModel(BaseModel):
    model_config = ConfigDict(extra="allow", strict=True, allow_inf_nan=False)

    @model_validator(mode="wrap")
    @classmethod
    def _log_unknown(cls, data: Any, handler: Any) -> Any:
        result = handler(data)
        extra = getattr(result, "__pydantic_extra__", None)
        if extra:
            log.info("%s: ignoring unknown fields %s", cls.__name__, sorted(extra)[:10])
        return result


def parse(model: type[M], body: dict[str, Any]) -> M:
    """``body`` as ``model``, or a 400 naming the first wrong field."""
    try:
        return model.model_validate(body)
    except ValidationError as exc:
        first = exc.errors()[0]
        where = ".".join(str(p) for p in first.get("loc", ()))
        message = str(first.get("msg", "invalid request"))
        raise APIError(400, f"{where}: {message}" if where else message) from None


# ------------------------------------------------------------------ OpenAPI request bodies

SCHEMAS: dict[str, Any] = {}
"""Schemas the request bodies refer to, for the app's OpenAPI components."""


def body(model: type[BaseModel]) -> dict[str, Any]:
    """``openapi_extra`` describing a route's JSON body as ``model`` (the routes read the
    body themselves, so FastAPI would not know it): fuzzers and clients see every field."""
    schema = model.model_json_schema(ref_template="#/components/schemas/{model}")
    SCHEMAS.update(schema.pop("$defs", {}))
    SCHEMAS[model.__name__] = schema
    reference = {"$ref": f"#/components/schemas/{model.__name__}"}
    return {
        "requestBody": {"required": True, "content": {"application/json": {"schema": reference}}}
    }


BINARY_BODY: dict[str, Any] = {
    "requestBody": {
        "required": True,
        "content": {"application/octet-stream": {"schema": {"type": "string", "format": "binary"}}},
    }
}
