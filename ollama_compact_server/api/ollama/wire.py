"""Ollama's wire shapes: the JSON types of each route's fields, the request fields turned
into a dialect-free ``ChatRequest``, and the small response pieces every route shares."""

from __future__ import annotations

import json
import time
from datetime import datetime, timezone
from typing import Any

from ...chat.errors import ChatError
from ...chat.options import merge_options
from ...chat.service import ModelView, check_messages
from ...chat.tools import ToolCall, check_tools, template_tool_calls
from ...chat.turn import CallSpec, ChatRequest, Message, Usage
from ...engine.types import ANY_JSON_OBJECT, DEFAULT, KeepAlive
from ...registry.errors import InvalidName
from ...registry.names import ModelName
from ...registry.store import ModelRecord
from ...settings import parse_duration
from ..errors import APIError


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


# the JSON types of each route's known fields (model / name are checked by model_field)
KEEP_ALIVE = ("string", "number")
# what /api/generate and /api/chat both take
_RUN_FIELDS: dict[str, tuple[str, ...]] = {
    "format": ("string", "object"),
    "options": ("object",),
    "stream": ("boolean",),
    "keep_alive": KEEP_ALIVE,
    "think": ("boolean", "string"),
    "logprobs": ("boolean",),
    "top_logprobs": ("integer",),
    "truncate": ("boolean",),
    "shift": ("boolean",),
}
GENERATE_FIELDS: dict[str, tuple[str, ...]] = {
    "prompt": ("string",),
    "suffix": ("string",),
    "system": ("string",),
    "template": ("string",),
    "images": ("array",),
    "context": ("array",),
    "raw": ("boolean",),
    **_RUN_FIELDS,
}
CHAT_FIELDS: dict[str, tuple[str, ...]] = {
    "messages": ("array",),
    "tools": ("array",),
    **_RUN_FIELDS,
}
EMBED_FIELDS: dict[str, tuple[str, ...]] = {
    "input": ("string", "array"),
    "truncate": ("boolean",),
    "options": ("object",),
    "keep_alive": KEEP_ALIVE,
    "dimensions": ("integer",),
}
EMBEDDINGS_FIELDS: dict[str, tuple[str, ...]] = {
    "prompt": ("string",),
    "options": ("object",),
    "keep_alive": KEEP_ALIVE,
}
SHOW_FIELDS: dict[str, tuple[str, ...]] = {
    "system": ("string",),
    "template": ("string",),
    "options": ("object",),
    "verbose": ("boolean",),
}
JOB_FIELDS: dict[str, tuple[str, ...]] = {"stream": ("boolean",), "insecure": ("boolean",)}


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


def keep_alive_of(body: dict[str, Any]) -> KeepAlive:
    """Ollama's keep_alive: seconds or a Go duration; negative = forever; absent = default."""
    if "keep_alive" not in body or body["keep_alive"] is None:
        return DEFAULT
    value = body["keep_alive"]
    if isinstance(value, str) and value.strip().lstrip("+-").replace(".", "", 1).isdigit():
        raise APIError(400, f'time: missing unit in duration "{value[:40]}"')
    try:
        return parse_duration(value)
    except ValueError as exc:
        raise APIError(400, f"invalid keep_alive: {exc}") from None


def now_rfc3339() -> str:
    return rfc3339(datetime.now(timezone.utc))


def nanos(seconds: float) -> int:
    return max(0, int(seconds * 1e9))


def metrics(done: Usage, started: float) -> dict[str, Any]:
    return {
        "total_duration": nanos(time.perf_counter() - started),
        "load_duration": nanos(done.load_time),
        # what was evaluated: prompt tokens reused from the KV cache are not (as in Ollama)
        "prompt_eval_count": done.prompt_tokens - done.cached_tokens,
        "prompt_eval_duration": nanos(done.prompt_time),
        "eval_count": done.completion_tokens,
        "eval_duration": nanos(done.decode_time),
    }


def schema_of(body: dict[str, Any]) -> str | None:
    """Ollama's format: "json" (any JSON object) or a JSON schema object; "" / null: none."""
    fmt = body.get("format")
    if fmt in (None, ""):
        return None
    if fmt == "json":
        return ANY_JSON_OBJECT
    if isinstance(fmt, dict):
        return json.dumps(fmt)
    raise APIError(
        400, f'invalid format: {str(fmt)[:40]}; expected "json" or a valid JSON Schema object'
    )


THINK_LEVELS = ("low", "medium", "high", "max")


def think_of(body: dict[str, Any]) -> bool | None:
    """Ollama's think: true, false or a level (which turns thinking on); absent: the
    model's default."""
    think = body.get("think")
    if not (think is None or isinstance(think, bool) or think in THINK_LEVELS):
        raise APIError(400, f"invalid think value: {str(think)[:20]}")
    return None if think is None else think is not False


def check_think(body: dict[str, Any], view: ModelView) -> None:
    """A think request is refused for a model that does not think (also on a load)."""
    if think_of(body) and "thinking" not in view.record.config.capabilities:
        raise ChatError(f'"{view.name}" does not support thinking')


def check_options(body: dict[str, Any]) -> None:
    """Options are typed before anything else, also where nothing is sampled (a load, an
    embedding)."""
    merge_options(body.get("options"))


def logprobs_of(body: dict[str, Any]) -> int | None:
    top = body.get("top_logprobs")
    if top is not None and (
        isinstance(top, bool) or not isinstance(top, int) or not 0 <= top <= 20
    ):
        raise APIError(400, "top_logprobs must be between 0 and 20")
    return (top or 0) if body.get("logprobs") or top else None


def messages_of(value: Any) -> list[Message]:
    """Ollama messages (checked as JSON first) as dialect-free messages."""
    check_messages(value)
    out = []
    for raw in value:
        calls = [
            CallSpec(c["function"]["name"], c["function"]["arguments"])
            for c in template_tool_calls(raw.get("tool_calls"))
        ]
        out.append(
            Message(
                role=raw["role"].lower(),
                content=raw.get("content") or "",
                thinking=raw.get("thinking") or None,
                tool_calls=calls,
                tool_call_id=raw.get("tool_call_id"),
                name=raw.get("tool_name") or raw.get("name"),
                images=list(raw.get("images") or []),
            )
        )
    return out


def chat_request(body: dict[str, Any], name: str) -> ChatRequest:
    return ChatRequest(
        model=name,
        messages=messages_of(body.get("messages")),
        tools=check_tools(body.get("tools")),
        think=think_of(body),
        json_schema=schema_of(body),
        options=dict(body.get("options") or {}),
        logprobs=logprobs_of(body),
        keep_alive=keep_alive_of(body),
    )


def generate_request(body: dict[str, Any], name: str) -> ChatRequest:
    raw = bool(body.get("raw"))
    system = body.get("system") or None
    context = body.get("context") or None
    if raw and (body.get("template") or system or context):
        raise APIError(400, "raw mode does not support template, system, or context")
    if body.get("template"):
        raise APIError(400, "request templates are not supported; set the template on the model")
    if context is not None and not all(
        isinstance(t, int) and not isinstance(t, bool) for t in context
    ):
        raise APIError(400, "context must be a list of token ids")
    images = body.get("images") or []
    if not all(isinstance(i, str) for i in images):
        raise APIError(400, "images must be a list of base64 strings")
    return ChatRequest(
        model=name,
        prompts=[body.get("prompt") or ""],
        images=list(images),
        raw=raw,
        system=system,
        context=context,
        think=None if raw else think_of(body),
        json_schema=schema_of(body),
        options=dict(body.get("options") or {}),
        logprobs=logprobs_of(body),
        keep_alive=keep_alive_of(body),
    )


def ollama_tool_calls(calls: list[ToolCall]) -> list[dict[str, Any]]:
    return [
        {"id": c.id, "function": {"index": i, "name": c.name, "arguments": c.arguments}}
        for i, c in enumerate(calls)
    ]
