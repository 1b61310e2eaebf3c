"""Ollama's wire shapes: the JSON types of each route's fields, the request fields turned
into a dialect-free ``ChatRequest``, and the small response pieces every route shares."""

from __future__ import annotations

import json
import time
from datetime import datetime, timezone
from typing import Any

from pydantic import Field

from ...chat.images import ImageData
from ...chat.options import merge_options
from ...chat.tools import ToolCall, check_tools, template_tool_calls
from ...chat.turn import CallSpec, ChatRequest, Message, Usage
from ...engine.types import ANY_JSON_OBJECT, DEFAULT, KeepAlive
from ...registry.errors import InvalidName
from ...registry.names import ModelName
from ...registry.store import ModelRecord
from ...units import parse_duration
from ..errors import APIError
from ..wire import WireModel


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


def think_of(think: bool | str | None) -> bool | None:
    """Ollama's think: true, false or a level (which turns thinking on); absent: the
    model's default."""
    if not (think is None or isinstance(think, bool) or think in THINK_LEVELS):
        raise APIError(400, f"invalid think value: {str(think)[:20]}")
    return None if think is None else think is not False


class Named(WireModel):
    """A request that names one model: ``model``, or the deprecated ``name``."""

    model: str | None = None
    name: str | None = None

    def model_name(self) -> str:
        for value in (self.model, self.name):
            if value and value.strip():
                return value
        raise APIError(400, "model is required")


class FunctionCall(WireModel):
    name: str
    arguments: dict[str, Any] | str | None = None
    index: int | None = None


class ToolCallParam(WireModel):
    id: str | None = None
    type: str | None = None
    function: FunctionCall


class OllamaMessage(WireModel):
    role: str
    content: str | None = None
    thinking: str | None = None
    images: list[str] | None = None
    tool_calls: list[ToolCallParam] | None = Field(default=None, max_length=128)
    tool_name: str | None = None
    tool_call_id: str | None = None
    name: str | None = None

    def to_message(self) -> Message:
        calls = template_tool_calls(
            [c.model_dump(exclude_none=True) for c in self.tool_calls or []]
        )
        return Message(
            role=self.role.lower(),
            content=self.content or "",
            thinking=self.thinking or None,
            tool_calls=[CallSpec(c["function"]["name"], c["function"]["arguments"]) for c in calls],
            tool_call_id=self.tool_call_id,
            name=self.tool_name or self.name,
            images=[ImageData.of_base64(i) for i in self.images or []],
        )


class Run(Named):
    """What /api/generate and /api/chat both take."""

    format: str | dict[str, Any] | None = None
    options: dict[str, Any] | None = None
    stream: bool | None = None
    keep_alive: str | float | None = None
    think: bool | str | None = None
    logprobs: bool | None = None
    top_logprobs: int | None = Field(default=None, ge=0, le=20)
    truncate: bool | None = None
    shift: bool | None = None

    def keep(self) -> KeepAlive:
        return keep_alive_of({"keep_alive": self.keep_alive})

    def checked_think(self) -> bool | None:
        return think_of(self.think)

    def schema_text(self) -> str | None:
        return schema_of({"format": self.format})

    def scored(self) -> int | None:
        top = self.top_logprobs
        return (top or 0) if self.logprobs or top else None

    def common(self) -> dict[str, Any]:
        merge_options(self.options)  # typed before anything else, also for a load
        return {
            "model": self.model_name(),
            "think": self.checked_think(),
            "json_schema": self.schema_text(),
            "options": dict(self.options or {}),
            "logprobs": self.scored(),
            "keep_alive": self.keep(),
        }


class ChatRequestWire(Run):
    messages: list[OllamaMessage] | None = None
    tools: list[dict[str, Any]] | None = None

    def to_chat_request(self) -> ChatRequest:
        return ChatRequest(
            messages=[m.to_message() for m in self.messages or []],
            tools=check_tools(self.tools),
            **self.common(),
        )


class GenerateRequestWire(Run):
    prompt: str | None = None
    suffix: str | None = None
    system: str | None = None
    template: str | None = None
    images: list[str] | None = None
    context: list[int] | None = None
    raw: bool | None = None

    def to_chat_request(self) -> ChatRequest:
        raw = bool(self.raw)
        system = self.system or None
        context = self.context or None
        if raw and (self.template or system or context):
            raise APIError(400, "raw mode does not support template, system, or context")
        if self.template:
            raise APIError(
                400, "request templates are not supported; set the template on the model"
            )
        common = self.common()
        if raw:
            common["think"] = None
        return ChatRequest(
            prompts=[self.prompt or ""],
            images=[ImageData.of_base64(i) for i in self.images or []],
            raw=raw,
            system=system,
            context=context,
            **common,
        )


class JobRequest(Named):
    stream: bool | None = None
    insecure: bool | None = None


class CopyRequest(WireModel):
    source: str = Field(min_length=1)
    destination: str = Field(min_length=1)


class ShowRequest(Named):
    system: str | None = None
    template: str | None = None
    options: dict[str, Any] | None = None
    verbose: bool | None = None


class EmbedRequestWire(Named):
    input: str | list[str] | None = None
    truncate: bool | None = None
    options: dict[str, Any] | None = None
    keep_alive: str | float | None = None
    dimensions: int | None = Field(default=None, ge=1, le=1 << 16)

    def keep(self) -> KeepAlive:
        merge_options(self.options)  # typed, also where nothing is sampled
        return keep_alive_of({"keep_alive": self.keep_alive})


class EmbeddingsRequestWire(Named):
    prompt: str | None = None
    options: dict[str, Any] | None = None
    keep_alive: str | float | None = None

    def keep(self) -> KeepAlive:
        merge_options(self.options)
        return keep_alive_of({"keep_alive": self.keep_alive})


class CreateRequestWire(JobRequest):
    """/api/create's fields; what they mean is checked by create_spec (jobs.py)."""

    from_: str | None = Field(default=None, alias="from")
    files: dict[str, str] | None = None
    adapters: dict[str, str] | None = None
    template: str | None = None
    system: str | None = None
    parameters: dict[str, Any] | None = None
    messages: list[dict[str, Any]] | None = None
    license: str | list[str] | None = None
    merge: bool | None = None
    quantize: str | None = None
    quantization: str | None = None  # deprecated name of quantize
    quantize_options: dict[str, Any] | None = None
    path: Any = None  # refused: no field takes a server path
    modelfile: Any = None  # refused: Modelfiles are parsed by the client


class FinetuneRequestWire(JobRequest):
    """/api/finetune (our extension beside /api/create): trains an adapter model ``model``
    on the registry model ``from`` with one uploaded data file (``data``: file name ->
    blob digest, as /api/create's ``files``)."""

    from_: str | None = Field(default=None, alias="from")
    data: dict[str, str] | None = None
    format: str | None = None
    columns: dict[str, str] | None = None
    method: str | None = None
    parameters: dict[str, Any] | None = None
    resume: bool | None = None


def ollama_tool_calls(calls: list[ToolCall]) -> list[dict[str, Any]]:
    return [
        {"id": c.id, "function": {"index": i, "name": c.name, "arguments": c.arguments}}
        for i, c in enumerate(calls)
    ]
