"""Ollama dialect routes (`/`, `/api/*`): translate Ollama's request and response shapes to
and from the shared chat service, and frame streams as NDJSON."""

from __future__ import annotations

import asyncio
import json
import logging
import re
import time
import uuid
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass
from datetime import datetime, timedelta, timezone
from typing import Any

from fastapi import APIRouter, Request
from fastapi.responses import JSONResponse, PlainTextResponse, Response, StreamingResponse

from .. import __version__
from ..chat.options import OptionError, merge_options
from ..chat.service import (
    ChatError,
    ChatService,
    Completion,
    ModelView,
    check_messages,
    embed_inputs,
)
from ..chat.templates import TemplateError
from ..chat.templates import check as check_template
from ..chat.thinking import ThinkSplitter, split_thinking
from ..chat.tools import (
    ToolCall,
    ToolError,
    ToolStream,
    check_tools,
    parse_tool_calls,
    template_tool_calls,
)
from ..compress.schemes import SchemeError
from ..compress.schemes import resolve as resolve_scheme
from ..engine.types import (
    ANY_JSON_OBJECT,
    DEFAULT,
    EmbedRequest,
    EngineError,
    KeepAlive,
    TokenEvent,
    TokenLogprob,
)
from ..modeling.compressing import precheck as precheck_compression
from ..modeling.create import CreateSpec, check_file_map, create_model
from ..modeling.pull import hub_repo, pull_model
from ..registry.blobs import normalize_digest
from ..registry.errors import InvalidName, RegistryError
from ..registry.evals import read_eval
from ..registry.names import ModelName
from ..registry.store import ModelRecord, Registry
from ..settings import parse_duration
from ..threads import to_fresh_thread
from .common import chat_service, check_fields, json_body, registry_of, stream_json
from .errors import APIError

log = logging.getLogger(__name__)
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
    # A resident copy goes too, as soon as no request uses it (the engine's unload waits
    # for idle); a later model of the same name then loads its own weights.
    chat_service(request).engine.unload(name.display())
    return Response(status_code=200)


def not_found() -> JSONResponse:
    return JSONResponse({"error": "not found"}, status_code=404)


# ------------------------------------------------------------------------------ generation


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


def metrics(done: Completion, started: float) -> dict[str, Any]:
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


@dataclass
class Thinking:
    """How a thinking model's output is split: where its reasoning goes in a chunk, and
    whether the prompt already opened the <think> block."""

    put: Callable[[dict[str, Any], str], None]
    inside: bool = False


async def thinking_for(
    service: ChatService,
    view: ModelView,
    prompt_ids: list[int],
    think: bool | None,
    put: Callable[[dict[str, Any], str], None],
) -> Thinking | None:
    if not think:
        return None
    return Thinking(put, await service.opens_thinking(view, prompt_ids))


def put_generate_thinking(item: dict[str, Any], text: str) -> None:
    item["thinking"] = text


def put_chat_thinking(item: dict[str, Any], text: str) -> None:
    item["message"]["thinking"] = text


def model_view(service: ChatService, body: dict[str, Any]) -> ModelView:
    """The request's model (`model` or `name`), or the dialect's 400/404."""
    try:
        return service.model(model_field(body))
    except ChatError as exc:
        raise APIError(exc.status, str(exc)) from None


def think_flag(body: dict[str, Any], view: ModelView) -> bool | None:
    """Ollama's think: for a thinking model on unless false; refused for other models."""
    think = body.get("think")
    if not (think is None or isinstance(think, bool) or think in ("low", "medium", "high", "max")):
        raise APIError(400, f"invalid think value: {str(think)[:20]}")
    capable = "thinking" in view.record.config.capabilities
    if think not in (None, False) and not capable:
        raise APIError(400, f'"{view.name}" does not support thinking')
    return (think is not False) if capable else None


def check_common(body: dict[str, Any], view: ModelView) -> None:
    think_flag(body, view)
    options = body.get("options")
    if options is not None and not isinstance(options, dict):
        raise APIError(400, "options must be an object")
    schema_of(body)


def ndjson(items: AsyncIterator[dict[str, Any]]) -> StreamingResponse:
    async def lines() -> AsyncIterator[bytes]:
        try:
            async for item in items:
                yield (stream_json(item) + "\n").encode()
        except (EngineError, ChatError, TemplateError) as exc:
            yield (json.dumps({"error": str(exc)}) + "\n").encode()
        except Exception:
            log.exception("stream failed")
            yield (json.dumps({"error": "internal error while generating"}) + "\n").encode()

    return StreamingResponse(lines(), media_type="application/x-ndjson")


async def load_or_unload(
    service: ChatService, view: ModelView, keep_alive: KeepAlive, shape: dict[str, Any]
) -> JSONResponse:
    """Empty prompt or messages: load the model, or with keep_alive 0 unload it (before
    any think check, as Ollama does)."""
    if keep_alive == 0:
        service.engine.unload(view.name)
        reason = "unload"
    else:
        try:
            await service.engine.load(view.name, keep_alive)
        except EngineError as exc:
            raise APIError(exc.status, str(exc)) from None
        reason = "load"
    return JSONResponse(
        {
            "model": view.name,
            "created_at": now_rfc3339(),
            **shape,
            "done": True,
            "done_reason": reason,
        }
    )


async def run_stream(
    service: ChatService,
    view: ModelView,
    prompt_ids: list[int],
    body: dict[str, Any],
    keep_alive: KeepAlive,
    frame: Any,
    final_extra: Any,
    tools: bool = False,
    thinking: Any = None,
) -> Response:
    """Shared by generate and chat: first event before the status is sent, then NDJSON
    chunks (or one object when stream is false). With ``tools``, tool calls in the output
    are parsed out and sent whole in a chunk of their own, as Ollama does."""
    started = time.perf_counter()
    try:
        sampling = service.sampling(view, body.get("options"))
        top = body.get("top_logprobs")
        if top is not None and (
            isinstance(top, bool) or not isinstance(top, int) or not 0 <= top <= 20
        ):
            raise APIError(400, "top_logprobs must be between 0 and 20")
        if body.get("logprobs") or top:
            sampling.logprobs = top or 0
        sampling.json_schema = schema_of(body)
        sampling.validate()
    except (OptionError, EngineError) as exc:
        raise APIError(400, str(exc)) from None
    events = service.stream(view, prompt_ids, sampling, keep_alive=keep_alive)

    async def logprobs(scores: list[TokenLogprob]) -> list[dict[str, Any]]:
        ids = [s[0] for s in scores] + [a for s in scores for a, _ in s[2]]
        texts = dict(zip(ids, await service.token_texts(view, ids)))

        def entry(token: int, value: float) -> dict[str, Any]:
            return {"token": texts[token], "logprob": value, "bytes": list(texts[token].encode())}

        return [
            {**entry(t, v), "top_logprobs": [entry(a, x) for a, x in alts]} for t, v, alts in scores
        ]

    try:
        first = await anext(events)
    except EngineError as exc:
        raise APIError(exc.status, str(exc)) from None
    except StopAsyncIteration:
        raise APIError(500, "the engine returned nothing") from None

    def final(done: Completion) -> dict[str, Any]:
        if done.error:
            return {"error": done.error}
        reason = done.finish_reason.value if done.finish_reason else "stop"
        return {
            **frame(""),
            "done": True,
            "done_reason": "stop" if reason == "abort" else reason,
            **metrics(done, started),
            **final_extra(done),
        }

    if body.get("stream") is False:
        totals = first[1]
        async for pair in events:
            totals = pair[1]
        result = final(totals)
        if "error" in result:
            raise APIError(500, result["error"])
        text = totals.text
        thought = ""
        if thinking is not None:
            thought, text = split_thinking(text, thinking.inside)
        text, calls = parse_tool_calls(text) if tools else (text, [])
        result.update(frame(text))
        if thought:
            thinking.put(result, thought)
        if calls:
            result["message"]["tool_calls"] = ollama_tool_calls(calls)
        if sampling.logprobs is not None:
            result["logprobs"] = await logprobs(totals.logprobs)
        return JSONResponse(result)

    async def items() -> AsyncIterator[dict[str, Any]]:
        pending = [first]
        held = ToolStream() if tools else None
        splitter = ThinkSplitter(thinking.inside) if thinking is not None else None
        async for pair in _chain(pending, events):
            event, totals = pair
            thought, text = splitter.feed(event.text) if splitter else ("", event.text)
            if event.finished and splitter is not None:
                more_thought, more_text = splitter.finish()
                thought, text = thought + more_thought, text + more_text
            text = held.feed(text) if held is not None else text
            if text or thought or (sampling.logprobs is not None and event.logprobs):
                item = {**frame(text), "done": False}
                if thought:
                    thinking.put(item, thought)
                if sampling.logprobs is not None and event.logprobs:
                    item["logprobs"] = await logprobs(event.logprobs)
                yield item
            if event.finished:
                if held is not None and not totals.error:
                    rest, calls = held.finish()
                    if rest or calls:
                        item = {**frame(rest), "done": False}
                        if calls:
                            item["message"]["tool_calls"] = ollama_tool_calls(calls)
                        yield item
                yield final(totals)

    return ndjson(items())


async def _chain(first: list[Any], rest: AsyncIterator[Any]) -> AsyncIterator[Any]:
    for item in first:
        yield item
    async for item in rest:
        yield item


@router.post("/api/generate")
async def generate(request: Request) -> Response:
    body = await json_body(request)
    check_fields(body, GENERATE_FIELDS)
    check_options(body)
    service = chat_service(request)
    view = model_view(service, body)
    keep_alive = keep_alive_of(body)
    prompt = body.get("prompt") or ""
    if not prompt and not body.get("images"):
        if keep_alive != 0:
            think_flag(body, view)
        return await load_or_unload(service, view, keep_alive, {"response": ""})
    check_common(body, view)
    if "completion" not in view.record.config.capabilities:
        raise APIError(400, f'"{view.name}" does not support generate')
    if body.get("images"):
        raise APIError(400, f'"{view.name}" does not support vision')
    if body.get("suffix"):
        raise APIError(400, f'"{view.name}" does not support insert')
    raw = bool(body.get("raw"))
    system = body.get("system") or None
    context = body.get("context") or None
    if raw and (body.get("template") or system or context):
        raise APIError(400, "raw mode does not support template, system, or context")
    if body.get("template"):
        raise APIError(400, "request templates are not supported; set the template on the model")
    if context is not None and (
        not isinstance(context, list)
        or not all(isinstance(t, int) and not isinstance(t, bool) for t in context)
    ):
        raise APIError(400, "context must be a list of token ids")
    try:
        think = None if raw else think_flag(body, view)
        prompt_ids = await service.generate_prompt(
            view, prompt, system=system, raw=raw, context=context, think=think
        )
    except TemplateError as exc:
        raise APIError(400, str(exc)) from None
    if context:
        vocab = len(await service.tokenizer(view))
        if any(t < 0 or t >= vocab for t in context):
            raise APIError(400, "context holds token ids outside the vocabulary")

    def frame(text: str) -> dict[str, Any]:
        return {"model": view.name, "created_at": now_rfc3339(), "response": text}

    def extra(done: Completion) -> dict[str, Any]:
        return {} if raw else {"context": [*done.prompt_ids, *done.token_ids]}

    thinking = await thinking_for(service, view, prompt_ids, think, put_generate_thinking)
    return await run_stream(
        service, view, prompt_ids, body, keep_alive, frame, extra, thinking=thinking
    )


@router.post("/api/chat")
async def chat(request: Request) -> Response:
    body = await json_body(request)
    check_fields(body, CHAT_FIELDS)
    check_options(body)
    service = chat_service(request)
    view = model_view(service, body)
    keep_alive = keep_alive_of(body)
    messages = body.get("messages")
    try:
        tools = check_tools(body.get("tools"))
    except ToolError as exc:
        raise APIError(400, str(exc)) from None
    if not messages:
        if keep_alive != 0:
            think_flag(body, view)
        return await load_or_unload(
            service, view, keep_alive, {"message": {"role": "assistant", "content": ""}}
        )
    check_common(body, view)
    if "completion" not in view.record.config.capabilities:
        raise APIError(400, f'"{view.name}" does not support chat')
    if isinstance(messages, list) and any(
        isinstance(m, dict) and m.get("images") for m in messages
    ):
        raise APIError(400, f'"{view.name}" does not support vision')
    if tools and "tools" not in view.record.config.capabilities:
        raise APIError(400, f'"{view.name}" does not support tools')
    try:
        normalized = (
            [normalize_message(m) if isinstance(m, dict) else m for m in messages]
            if isinstance(messages, list)
            else messages
        )
        think = think_flag(body, view)
        prompt_ids = await service.chat_prompt(view, normalized, tools, think)
    except (ChatError, TemplateError, ToolError) as exc:
        raise APIError(400, str(exc)) from None

    def frame(text: str) -> dict[str, Any]:
        return {
            "model": view.name,
            "created_at": now_rfc3339(),
            "message": {"role": "assistant", "content": text},
        }

    thinking = await thinking_for(service, view, prompt_ids, think, put_chat_thinking)
    return await run_stream(
        service,
        view,
        prompt_ids,
        body,
        keep_alive,
        frame,
        lambda done: {},
        tools=bool(tools),
        thinking=thinking,
    )


def normalize_message(message: dict[str, Any]) -> dict[str, Any]:
    out = {**message, "role": str(message.get("role", "")).lower()}
    if "tool_calls" in message:
        out["tool_calls"] = template_tool_calls(message["tool_calls"])
    return out


def ollama_tool_calls(calls: list[ToolCall]) -> list[dict[str, Any]]:
    return [
        {"id": c.id, "function": {"index": i, "name": c.name, "arguments": c.arguments}}
        for i, c in enumerate(calls)
    ]


# ------------------------------------------------------------------------------ show / ps


def parameters_text(params: dict[str, Any]) -> str:
    lines = []
    for key, value in params.items():
        for item in value if isinstance(value, list) else [value]:
            shown = (
                json.dumps(item)
                if isinstance(item, str)
                else str(item).lower()
                if isinstance(item, bool)
                else str(item)
            )
            lines.append(f"{key:<30} {shown}")
    return "\n".join(lines)


def model_info(view: ModelView, registry: Registry) -> dict[str, Any]:
    config = view.record.config
    arch = config.family or config.model_type or "unknown"
    hf: dict[str, Any] = {}
    base = view.record
    if view.record.is_adapter and config.base_model:
        try:
            base = registry.get(config.base_model)
        except Exception:  # the base was deleted: show what the adapter records
            base = view.record
    layer = base.manifest.files().get("config.json")
    if layer is not None:
        try:
            loaded = json.loads(registry.blobs.read_bytes(layer.digest))
            hf = loaded.get("text_config", loaded) if isinstance(loaded, dict) else {}
        except Exception:
            hf = {}
    info = {
        "general.architecture": arch,
        "general.parameter_count": config.parameter_count,
        "general.file_type": config.quantization_level,
        f"{arch}.context_length": config.context_length,
        f"{arch}.embedding_length": config.embedding_length,
    }
    for key, name in (
        ("num_hidden_layers", "block_count"),
        ("num_attention_heads", "attention.head_count"),
        ("num_key_value_heads", "attention.head_count_kv"),
        ("vocab_size", "vocab_size"),
        ("rope_theta", "rope.freq_base"),
        ("intermediate_size", "feed_forward_length"),
    ):
        if isinstance(hf.get(key), (int, float)):
            info[f"{arch}.{name}"] = hf[key]
    return info


def modelfile_text(view: ModelView) -> str:
    parts = [
        '# Modelfile generated by "ollama show"',
        "# To build a new Modelfile based on this, replace FROM with:",
        f"# FROM {view.name}",
        "",
        f"FROM {view.record.config.base_model or view.name}",
    ]
    if view.template:
        parts.append(f'TEMPLATE """{view.template}"""')
    if view.system:
        parts.append(f'SYSTEM """{view.system}"""')
    for key, value in view.params.items():
        for item in value if isinstance(value, list) else [value]:
            parts.append(f"PARAMETER {key} {item}")
    for message in view.messages:
        parts.append(f'MESSAGE {message.get("role")} """{message.get("content")}"""')
    return "\n".join(parts) + "\n"


@router.post("/api/show")
async def show(request: Request) -> dict[str, Any]:
    body = await json_body(request)
    check_fields(body, SHOW_FIELDS)
    service = chat_service(request)
    name = parse_name(model_field(body))
    try:
        view = service.model(name.display())
    except ChatError:
        raise APIError(404, f"model '{name.display()}' not found") from None
    registry = registry_of(request)
    params = dict(view.params)
    if isinstance(body.get("options"), dict):
        params.update(body["options"])
    info = model_info(view, registry)
    report = read_eval(registry, view.record)  # `ollama-compact eval`, once measured
    if report is not None:
        info.update(report.model_info())
    return {
        "license": registry.license(view.record),
        "modelfile": modelfile_text(view),
        "parameters": parameters_text(params),
        "template": view.template,
        "system": body.get("system") or view.system,
        "details": details(view.record),
        "messages": view.messages,
        "model_info": info,
        "capabilities": view.record.config.capabilities,
        "modified_at": rfc3339(view.record.modified_at),
    }


@router.get("/api/ps")
async def ps(request: Request) -> dict[str, Any]:
    service = chat_service(request)
    registry = registry_of(request)
    entries: list[dict[str, Any]] = []
    order: list[datetime] = []
    now = datetime.now(timezone.utc)
    forever = now + timedelta(days=365 * 100)
    for resident in service.engine.resident():
        if not registry.exists(resident.name):
            continue  # deleted while loaded
        record = registry.get(resident.name)
        expires = (
            forever if resident.expires_in is None else now + timedelta(seconds=resident.expires_in)
        )
        on_gpu = resident.device.startswith("cuda")
        order.append(expires)
        entries.append(
            {
                "name": record.name.display(),
                "model": record.name.display(),
                "size": resident.memory,
                "digest": record.digest,
                "details": details(record),
                "expires_at": rfc3339(expires),
                "size_vram": resident.memory if on_gpu else 0,
                "context_length": resident.context,
            }
        )
    ranked = sorted(zip(order, range(len(entries))), reverse=True)  # longest life first
    return {"models": [entries[i] for _, i in ranked]}


# ------------------------------------------------------------------------------ blobs / create


Report = Callable[[dict[str, Any]], None]


async def progress_response(
    body: dict[str, Any], run: Callable[[Report], None], failure: str
) -> Response:
    """Runs a long registry job (create, pull) on a thread, streaming its progress lines as
    NDJSON, or answering its last line alone when ``stream`` is false. A registry error
    becomes an in-band error line (or the error status without streaming)."""
    loop = asyncio.get_running_loop()
    queue: asyncio.Queue[dict[str, Any] | None] = asyncio.Queue()

    def report(item: dict[str, Any]) -> None:
        loop.call_soon_threadsafe(queue.put_nowait, item)

    async def work() -> None:
        try:
            await to_fresh_thread(run, report)  # may run torch: threads.py
            await queue.put({"status": "success"})
        except RegistryError as exc:
            await queue.put({"error": str(exc), "_status": exc.status})
        except Exception:
            log.exception("%s", failure)
            await queue.put({"error": failure, "_status": 500})
        finally:
            await queue.put(None)

    task = asyncio.create_task(work())
    if body.get("stream") is False:
        last: dict[str, Any] = {}
        while (item := await queue.get()) is not None:
            last = item
        await task
        if "error" in last:
            raise APIError(int(last.pop("_status")), last["error"])
        return JSONResponse(last)

    async def items() -> AsyncIterator[dict[str, Any]]:
        previous = None
        while (item := await queue.get()) is not None:
            item.pop("_status", None)
            if item == previous:
                continue  # the same status twice in a row says nothing new
            previous = item
            yield item
        await task

    return ndjson(items())


@router.head("/api/blobs/{digest}")
async def blob_exists(request: Request, digest: str) -> Response:
    registry = registry_of(request)
    if not registry.blobs.has(normalize_digest(digest)):
        raise APIError(404, f'blob "{digest[:80]}" not found')
    return Response(status_code=200)


@router.post("/api/blobs/{digest}")
async def blob_upload(request: Request, digest: str) -> Response:
    """Streams the body to disk (never whole in memory); bytes that do not hash to the
    digest are refused and leave nothing behind."""
    registry = registry_of(request)
    expected = normalize_digest(digest)
    if registry.blobs.has(expected):
        async for _ in request.stream():  # drain; the blob is already here
            pass
        return Response(status_code=200)
    upload = registry.blobs.begin_upload(expected)
    buffer = bytearray()
    try:
        async for chunk in request.stream():
            buffer += chunk
            if len(buffer) >= UPLOAD_FLUSH:
                await asyncio.to_thread(upload.write, bytes(buffer))
                buffer.clear()
        if buffer:
            await asyncio.to_thread(upload.write, bytes(buffer))
        created = await asyncio.to_thread(upload.commit)
    except BaseException:
        upload.abort()  # client gone, disk full, digest mismatch: nothing stays behind
        raise
    return Response(status_code=201 if created else 200)


UPLOAD_FLUSH = 4 << 20


def _text_field(body: dict[str, Any], key: str) -> str | None:
    value = body.get(key)
    if value is None:
        return None
    if not isinstance(value, str):
        raise APIError(400, f"{key} must be a string")
    return value


MAX_TEMPLATE_CHARS = 1 << 20
GO_TEMPLATE = re.compile(r"\{\{-?\s*(?:\.[A-Za-z]|(?:if|range|with|end|else|template)\b)")


def _checked_template(template: str | None) -> str | None:
    """A template given to create must compile as a Jinja chat template: refused now
    rather than failing on every chat with the model later."""
    if template is None or not template.strip():
        return template
    if len(template) > MAX_TEMPLATE_CHARS:
        raise APIError(400, f"template is longer than {MAX_TEMPLATE_CHARS >> 10} KiB")
    try:
        check_template(template)
    except TemplateError as exc:
        if GO_TEMPLATE.search(template):
            raise APIError(
                400,
                "template looks like Ollama's Go template syntax ({{ .Prompt }}, {{ if .System }}"
                "); templates here must be Jinja chat templates, as in a Hugging Face "
                "tokenizer_config.json (for example {% for m in messages %}{{ m['role'] }}: "
                "{{ m['content'] }}{% endfor %})",
            ) from None
        raise APIError(400, f"template: {exc}") from None
    return template


def create_spec(body: dict[str, Any]) -> CreateSpec:
    name = parse_name(model_field(body))
    quantize = body.get("quantize") or body.get("quantization") or None
    quantize_options = body.get("quantize_options")
    if quantize is not None:
        try:
            resolve_scheme(quantize, quantize_options)
        except SchemeError as exc:
            raise APIError(400, str(exc)) from None
        if not body.get("from") and not body.get("files"):
            raise APIError(
                400, "quantize needs 'from' (a registry model) or 'files' (uploaded weights)"
            )
    for forbidden in ("path", "modelfile"):
        if body.get(forbidden):
            raise APIError(
                400,
                f"'{forbidden}' is not accepted: upload files as blobs and name them in 'files'",
            )
    source = body.get("from")
    if source is not None and (not isinstance(source, str) or not source.strip()):
        raise APIError(400, "from must be a model name")
    if source:
        parse_name(source, "from")
    license_value = body.get("license")
    if isinstance(license_value, str):
        license_value = [license_value]
    if license_value is not None and (
        not isinstance(license_value, list) or not all(isinstance(x, str) for x in license_value)
    ):
        raise APIError(400, "license must be a string or a list of strings")
    parameters = body.get("parameters")
    if parameters is not None:
        if not isinstance(parameters, dict):
            raise APIError(400, "parameters must be an object")
        try:
            merge_options(parameters)
        except OptionError as exc:
            raise APIError(400, str(exc)) from None
    merge = body.get("merge", False)
    if not isinstance(merge, bool):
        raise APIError(400, "merge must be true or false")
    if merge and not source:
        raise APIError(400, "merge needs 'from': the adapter model to fold into its base")
    messages = body.get("messages")
    if messages is not None:
        try:
            check_messages(messages)
        except ChatError as exc:
            raise APIError(400, str(exc)) from None
    try:
        return CreateSpec(
            name=name,
            from_=source or None,
            files=check_file_map(body.get("files"), "files"),
            adapters=check_file_map(body.get("adapters"), "adapters"),
            template=_checked_template(_text_field(body, "template")),
            system=_text_field(body, "system"),
            parameters=parameters,
            messages=messages,
            license=license_value,
            merge=merge,
            quantize=quantize,
            quantize_options=quantize_options,
        )
    except RegistryError as exc:
        raise APIError(exc.status, str(exc)) from None


@router.post("/api/create")
async def create(request: Request) -> Response:
    body = await json_body(request)
    check_fields(body, JOB_FIELDS)
    spec = create_spec(body)
    registry = registry_of(request)
    if not spec.files and not spec.from_:
        raise APIError(400, "neither 'from' or 'files' was specified")
    if spec.from_ and not registry.exists(spec.from_):
        raise APIError(404, f"base model '{spec.from_}' not found")
    if spec.quantize and spec.from_:
        try:  # refusals that need no weights answer 400 before the stream starts
            await to_fresh_thread(
                precheck_compression, registry, spec.from_, spec.quantize, spec.quantize_options
            )
        except SchemeError as exc:
            raise APIError(400, str(exc)) from None

    def run(report: Report) -> None:
        def progress(status: str, completed: int | None = None, total: int | None = None) -> None:
            item: dict[str, Any] = {"status": status}
            if total:
                item.update(total=total, completed=completed or 0)
            report(item)

        create_model(registry, spec, progress)

    return await progress_response(body, run, "creating the model failed")


@router.post("/api/push")
async def push(request: Request) -> Response:
    body = await json_body(request)
    check_fields(body, JOB_FIELDS)
    name = model_field(body)
    raise APIError(
        400, f"pushing models is not supported: '{name[:100]}' stays in the local registry"
    )


# ------------------------------------------------------------------------------ embeddings


def check_options(body: dict[str, Any]) -> None:
    """Options are typed before anything else, also where nothing is sampled (a load, an
    embedding)."""
    try:
        merge_options(body.get("options"))
    except OptionError as exc:
        raise APIError(400, str(exc)) from None


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
    view = model_view(service, body)
    try:
        inputs = await embed_inputs(
            service, view, texts, truncate=body.get("truncate", True) is not False
        )
        event = await service.engine.embed(
            EmbedRequest(uuid.uuid4().hex, view.name, inputs, keep_alive=keep_alive_of(body))
        )
    except ChatError as exc:
        raise APIError(exc.status, str(exc)) from None
    except EngineError as exc:
        raise APIError(exc.status, str(exc)) from None
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
        view = model_view(service, body)
        await load_or_unload(service, view, keep_alive_of(body), {})
        return JSONResponse({"model": view.name, "embeddings": []})
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
        view = model_view(service, body)
        await load_or_unload(service, view, keep_alive_of(body), {})
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


# ------------------------------------------------------------------------------ pull


@router.post("/api/pull")
async def pull(request: Request) -> Response:
    body = await json_body(request)
    check_fields(body, JOB_FIELDS)
    name = parse_name(model_field(body))
    try:
        hub_repo(name)
    except RegistryError as exc:
        raise APIError(exc.status, str(exc)) from None
    registry = registry_of(request)
    last_sent: dict[str, int] = {}

    def run(report: Report) -> None:
        def progress(item: dict[str, Any]) -> None:
            digest = item.get("digest")
            if digest is not None:  # at most one line per file per MiB of progress
                step = int(item.get("completed", 0)) >> 20
                if last_sent.get(digest) == step and item.get("completed") != item.get("total"):
                    return
                last_sent[digest] = step
            report(item)

        pull_model(registry, name, progress)

    return await progress_response(body, run, "pulling the model failed")
