"""OpenAI dialect routes (`/v1/*`): translate OpenAI request and response shapes to and from
the shared chat service, and frame streams as server-sent events ending in [DONE]."""

from __future__ import annotations

import asyncio
import base64
import json
import logging
import math
import struct
import time
import uuid
from collections.abc import AsyncGenerator, AsyncIterator
from typing import Any

from fastapi import APIRouter, Request
from fastapi.responses import JSONResponse, Response
from sse_starlette.sse import EventSourceResponse

from ..chat.options import OptionError, stop_list
from ..chat.service import ChatError, ChatService, Completion, ModelView, embed_inputs
from ..chat.templates import TemplateError
from ..chat.thinking import ThinkSplitter, split_thinking
from ..chat.tools import (
    ToolCall,
    ToolError,
    ToolStream,
    check_tools,
    forced_call,
    parse_tool_calls,
    template_tool_calls,
)
from ..engine.types import (
    ANY_JSON_OBJECT,
    EmbedRequest,
    EngineBusy,
    EngineError,
    FinishReason,
    SamplingParams,
    TokenLogprob,
)
from ..registry.errors import InvalidName
from ..registry.names import ModelName
from .common import chat_service, check_fields, json_body, registry_of, stream_json
from .errors import APIError, error_response

log = logging.getLogger(__name__)
router = APIRouter(prefix="/v1")

MAX_N = 8
MAX_PROMPTS = 64

# the JSON types of each route's known fields, checked before anything else; ranges and
# nested shapes are checked where each field is read, still before any engine work
SAMPLING_FIELDS: dict[str, tuple[str, ...]] = {
    "model": ("string",),
    "max_tokens": ("integer",),
    "temperature": ("number",),
    "top_p": ("number",),
    "n": ("integer",),
    "stop": ("string", "array"),
    "seed": ("integer",),
    "presence_penalty": ("number",),
    "frequency_penalty": ("number",),
    "logit_bias": ("object",),
    "user": ("string",),
    "stream": ("boolean",),
    "stream_options": ("object",),
}
CHAT_FIELDS: dict[str, tuple[str, ...]] = {
    **SAMPLING_FIELDS,
    "messages": ("array",),
    "max_completion_tokens": ("integer",),
    "logprobs": ("boolean",),
    "top_logprobs": ("integer",),
    "response_format": ("object",),
    "tools": ("array",),
    "tool_choice": ("string", "object"),
    "parallel_tool_calls": ("boolean",),
    "reasoning_effort": ("string",),
}
COMPLETION_FIELDS: dict[str, tuple[str, ...]] = {
    **SAMPLING_FIELDS,
    "prompt": ("string", "array"),
    "logprobs": ("integer",),
    "echo": ("boolean",),
    "suffix": ("string",),
    "best_of": ("integer",),
}
EMBEDDING_FIELDS: dict[str, tuple[str, ...]] = {
    "model": ("string",),
    "input": ("string", "array"),
    "encoding_format": ("string",),
    "dimensions": ("integer",),
    "user": ("string",),
}
REASONING_EFFORTS = ("none", "minimal", "low", "medium", "high", "xhigh")
TOOL_CHOICES = ("none", "auto", "required")


def _checked(body: dict[str, Any], fields: dict[str, tuple[str, ...]]) -> None:
    """Types first (any field), then the small shapes the streaming code reads."""
    check_fields(body, fields)
    options = body.get("stream_options")
    if options is not None and not isinstance(options.get("include_usage", False), bool):
        raise APIError(400, "stream_options.include_usage must be true or false")
    _integer(body, "n", 1, MAX_N)
    if "best_of" in fields:
        _integer(body, "best_of", 1, MAX_N)
    effort = body.get("reasoning_effort")
    if effort is not None and effort not in REASONING_EFFORTS:
        raise APIError(400, "reasoning_effort must be one of " + ", ".join(REASONING_EFFORTS))
    choice = body.get("tool_choice")
    if isinstance(choice, str) and choice not in TOOL_CHOICES:
        raise APIError(400, "tool_choice must be none, auto, required or a function")
    if isinstance(choice, dict) and (
        choice.get("type") != "function"
        or not isinstance(choice.get("function"), dict)
        or not isinstance(choice["function"].get("name"), str)
    ):
        raise APIError(400, 'tool_choice must be {"type": "function", "function": {"name": ...}}')


def _number(
    body: dict[str, Any], key: str, low: float, high: float, default: float | None
) -> float | None:
    value = body.get(key)
    if value is None:
        return default
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
        raise APIError(400, f"{key} must be a number")
    if not low <= value <= high:
        raise APIError(400, f"{key} must be between {low:g} and {high:g}")
    return float(value)


def _integer(body: dict[str, Any], key: str, low: int, high: int) -> int | None:
    value = body.get(key)
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, int):
        raise APIError(400, f"{key} must be an integer")
    if not low <= value <= high:
        raise APIError(400, f"{key} must be between {low} and {high}")
    return value


def _model(service: ChatService, body: dict[str, Any]) -> ModelView:
    name = body.get("model")
    if not isinstance(name, str) or not name.strip():
        raise APIError(400, "model is required")
    try:
        ModelName.parse(name)
        return service.model(name)
    except InvalidName:
        raise APIError(404, f"The model `{name[:100]}` does not exist.") from None
    except ChatError as exc:
        if exc.status == 404:
            raise APIError(404, f"The model `{name[:100]}` does not exist.") from None
        raise APIError(exc.status, str(exc)) from None


def _generative(view: ModelView) -> ModelView:
    if "completion" not in view.record.config.capabilities:
        raise APIError(400, f"model `{view.name}` is an embedding model and does not generate")
    return view


def _sampling(
    service: ChatService, view: ModelView, body: dict[str, Any], max_key: tuple[str, ...]
) -> SamplingParams:
    """OpenAI fields over the model's parameters, the same defaults as the Ollama dialect."""
    logprobs: int | None = None
    if max_key == ("max_tokens",):  # completions: logprobs is the number of alternatives
        logprobs = _integer(body, "logprobs", 0, 20)
    elif body.get("logprobs") or body.get("top_logprobs") is not None:
        if body.get("top_logprobs") is not None and not body.get("logprobs"):
            raise APIError(400, "top_logprobs needs logprobs: true")
        logprobs = _integer(body, "top_logprobs", 0, 20) or 0
    schema = _response_schema(body.get("response_format"))
    max_tokens = None
    for key in max_key:
        if body.get(key) is not None:
            max_tokens = _integer(body, key, 0, 1 << 20)
    overrides: dict[str, Any] = {
        "temperature": _number(body, "temperature", 0.0, 2.0, None),
        "top_p": _number(body, "top_p", 0.0, 1.0, None),
        "presence_penalty": _number(body, "presence_penalty", -2.0, 2.0, None),
        "frequency_penalty": _number(body, "frequency_penalty", -2.0, 2.0, None),
        "seed": _integer(body, "seed", -(2**63), 2**63 - 1),
        "num_predict": max_tokens,
    }
    if body.get("stop") is not None:
        overrides["stop"] = body["stop"]
    try:
        if "stop" in overrides:
            stop_list(overrides["stop"])
        sampling = service.sampling(view, None, **overrides)
        sampling.logit_bias = _logit_bias(body.get("logit_bias"))
        sampling.logprobs = logprobs
        sampling.json_schema = schema
        sampling.prompt_logprobs = logprobs is not None and bool(body.get("echo"))
        sampling.validate()
    except (OptionError, EngineError) as exc:
        raise APIError(400, str(exc)) from None
    return sampling


def _response_schema(value: Any) -> str | None:
    """response_format: text, json_object (any JSON object) or json_schema."""
    if value in (None, {}) or (isinstance(value, dict) and value.get("type") == "text"):
        return None
    if not isinstance(value, dict):
        raise APIError(400, "response_format must be an object")
    if value.get("type") == "json_object":
        return ANY_JSON_OBJECT
    if value.get("type") == "json_schema":
        spec = value.get("json_schema")
        schema = spec.get("schema") if isinstance(spec, dict) else None
        if not isinstance(schema, dict):
            raise APIError(400, "response_format.json_schema.schema must be a JSON schema object")
        return json.dumps(schema)
    raise APIError(400, "response_format.type must be text, json_object or json_schema")


def _logit_bias(value: Any) -> dict[int, float]:
    if value is None:
        return {}
    if not isinstance(value, dict) or len(value) > 300:
        raise APIError(400, "logit_bias must map at most 300 token ids to numbers")
    bias: dict[int, float] = {}
    for key, amount in value.items():
        if not (key.isascii() and key.isdigit() and len(key) <= 12):
            raise APIError(400, f"logit_bias key {str(key)[:20]!r} is not a token id")
        token = int(key)
        if token < 0 or isinstance(amount, bool) or not isinstance(amount, (int, float)):
            raise APIError(400, "logit_bias values must be numbers for non-negative token ids")
        if not -100 <= amount <= 100:
            raise APIError(400, "logit_bias values must be between -100 and 100")
        bias[token] = float(amount)
    return bias


def _messages(value: Any) -> list[dict[str, Any]]:
    """OpenAI messages (string or content-part arrays) -> plain role/content messages."""
    if not isinstance(value, list) or not value:
        raise APIError(400, "messages must be a non-empty array")
    out = []
    for message in value:
        if not isinstance(message, dict):
            raise APIError(400, "each message must be an object")
        role = message.get("role")
        if role == "developer":
            role = "system"
        content = message.get("content")
        if content is None:
            content = ""
        if isinstance(content, list):
            texts = []
            for part in content:
                if not isinstance(part, dict) or part.get("type") not in ("text", "input_text"):
                    kind = part.get("type") if isinstance(part, dict) else type(part).__name__
                    raise APIError(
                        400, f"content parts of type {str(kind)[:20]!r} are not supported"
                    )
                text = part.get("text")
                if not isinstance(text, str):
                    raise APIError(400, "a text content part needs a text string")
                texts.append(text)
            content = "".join(texts)
        if not isinstance(content, str):
            raise APIError(400, "message content must be a string or an array of parts")
        entry: dict[str, Any] = {"role": role, "content": content}
        if message.get("tool_calls") is not None:
            try:
                calls = template_tool_calls(message["tool_calls"])
            except ToolError as exc:
                raise APIError(400, str(exc)) from None
            if calls:
                entry["tool_calls"] = calls
        for key in ("tool_call_id", "name"):
            if message.get(key) is None:
                continue
            if not isinstance(message[key], str):
                raise APIError(400, f"message {key} must be a string")
            entry[key] = message[key]
        out.append(entry)
    return out


async def _chat_logprobs(
    service: ChatService, view: ModelView, scores: list[TokenLogprob]
) -> dict[str, Any]:
    """OpenAI chat shape: {"content": [{token, logprob, bytes, top_logprobs}], "refusal"}."""
    ids = [s[0] for s in scores] + [a for s in scores for a, _ in s[2]]
    texts = dict(zip(ids, await service.token_texts(view, ids)))

    def entry(token: int, value: float) -> dict[str, Any]:
        text = texts[token]
        return {"token": text, "logprob": value, "bytes": list(text.encode())}

    content = [
        {**entry(token, value), "top_logprobs": [entry(a, v) for a, v in top]}
        for token, value, top in scores
    ]
    return {"content": content, "refusal": None}


async def _text_logprobs(
    service: ChatService,
    view: ModelView,
    prompt: list[TokenLogprob | None],
    scores: list[TokenLogprob],
    offset: int,
    first_id: int | None = None,
) -> dict[str, Any]:
    """Legacy completions shape: tokens, token_logprobs, top_logprobs, text_offset; with
    echo the prompt's tokens come first (the very first, ``first_id``, has no score)."""
    entries: list[TokenLogprob | None] = [*prompt, *scores]
    ids = [e[0] for e in entries if e is not None] + [a for e in entries if e for a, _ in e[2]]
    if first_id is not None:
        ids.append(first_id)
    texts = dict(zip(ids, await service.token_texts(view, ids)))
    tokens: list[str] = []
    values: list[float | None] = []
    tops: list[dict[str, float] | None] = []
    offsets: list[int] = []
    for score in entries:
        if score is None:  # the first prompt token: nothing predicts it
            tokens.append(texts.get(first_id, "") if first_id is not None else "")
            values.append(None)
            tops.append(None)
        else:
            tokens.append(texts[score[0]])
            values.append(score[1])
            tops.append({texts[a]: v for a, v in score[2]})
        offsets.append(offset)
        offset += len(tokens[-1])
    return {
        "tokens": tokens,
        "token_logprobs": values,
        "top_logprobs": tops,
        "text_offset": offsets,
    }


def _finish(reason: FinishReason | None) -> str:
    return "length" if reason == FinishReason.LENGTH else "stop"


def _usage(done: list[Completion]) -> dict[str, Any]:
    prompt = sum(c.prompt_tokens for c in done[:1]) if done else 0
    completion = sum(c.completion_tokens for c in done)
    cached = sum(c.cached_tokens for c in done[:1]) if done else 0
    return {
        "prompt_tokens": prompt,
        "completion_tokens": completion,
        "total_tokens": prompt + completion,
        "prompt_tokens_details": {"cached_tokens": cached},
    }


async def _first(stream: AsyncIterator[Any]) -> Any:
    try:
        return await anext(stream)
    except EngineBusy as exc:  # OpenAI clients back off on 429
        raise APIError(429, str(exc)) from None
    except EngineError as exc:
        raise APIError(exc.status, str(exc)) from None
    except StopAsyncIteration:
        raise APIError(500, "the engine returned nothing") from None


async def _run_choices(
    service: ChatService,
    view: ModelView,
    prompts: list[list[int]],
    sampling: SamplingParams,
    n: int,
) -> list[tuple[Any, AsyncGenerator[Any, None]]]:
    """Starts one engine request per (prompt, n) choice; each first event is awaited so
    errors surface with a status before any byte is sent."""
    streams = []
    for prompt in prompts:
        for i in range(n):
            params = SamplingParams(**{f: getattr(sampling, f) for f in sampling.__slots__})
            if params.seed is not None:
                params.seed += i
            streams.append(service.stream(view, prompt, params))
    firsts = []
    try:
        for stream in streams:
            firsts.append(await _first(stream))
    except BaseException:
        for stream in streams:
            await stream.aclose()  # abort what already started
        raise
    return list(zip(firsts, streams))


async def _merged(
    choices: list[tuple[Any, AsyncGenerator[Any, None]]],
) -> AsyncIterator[tuple[int, Any]]:
    """Interleaves several choice streams, tagging each item with its choice index."""
    queue: asyncio.Queue[tuple[int, Any]] = asyncio.Queue()
    done_marker = object()

    async def pump(index: int, first: Any, stream: AsyncGenerator[Any, None]) -> None:
        try:
            await queue.put((index, first))
            async for item in stream:
                await queue.put((index, item))
        finally:
            await stream.aclose()  # the pump owns its stream: it closes (aborts) it
            await queue.put((index, done_marker))

    tasks = [asyncio.create_task(pump(i, f, s)) for i, (f, s) in enumerate(choices)]
    remaining = len(tasks)
    try:
        while remaining:
            index, item = await queue.get()
            if item is done_marker:
                remaining -= 1
                continue
            yield index, item
    finally:
        # A client that hangs up cancels us: each pump, cancelled, closes its own stream
        # (closing a stream here while its pump is inside it fails: "aclose(): asynchronous
        # generator is already running"). Streams whose pump already ended are closed here.
        for task in tasks:
            task.cancel()
        for task, (_, stream) in zip(tasks, choices):
            if task.done():
                await stream.aclose()


def _sse(chunks: AsyncIterator[dict[str, Any]]) -> EventSourceResponse:
    async def events() -> AsyncIterator[dict[str, str]]:
        try:
            async for chunk in chunks:
                yield {"data": stream_json(chunk)}
        except (EngineError, ChatError, TemplateError) as exc:
            yield {"data": json.dumps(error_body(500, str(exc)))}
        except Exception:
            log.exception("stream failed")
            yield {"data": json.dumps(error_body(500, "internal error while generating"))}
        yield {"data": "[DONE]"}

    return EventSourceResponse(events(), ping=15)


def error_body(status: int, message: str) -> dict[str, Any]:
    body: dict[str, Any] = json.loads(bytes(error_response(status, message, "/v1/").body))
    return body


async def _complete(
    request: Request,
    body: dict[str, Any],
    view: ModelView,
    prompts: list[list[int]],
    sampling: SamplingParams,
    *,
    chat: bool,
    echo: list[str] | None = None,
    tools: bool = False,
    thinking: bool | None = None,
) -> Response:
    """``thinking``: None for models that do not think; otherwise whether the prompt
    already opened the <think> block. Reasoning then goes to reasoning_content."""
    n = _integer(body, "n", 1, MAX_N) or 1
    include_usage = bool((body.get("stream_options") or {}).get("include_usage"))
    service = chat_service(request)
    choices = await _run_choices(service, view, prompts, sampling, n)
    try:
        return await _respond(
            service,
            body,
            view,
            prompts,
            sampling,
            choices,
            n,
            include_usage,
            chat,
            echo,
            tools,
            thinking,
        )
    except BaseException:
        for _, stream in choices:  # none of them reached a response that owns it
            await stream.aclose()
        raise


async def _respond(
    service: ChatService,
    body: dict[str, Any],
    view: ModelView,
    prompts: list[list[int]],
    sampling: SamplingParams,
    choices: list[tuple[Any, AsyncGenerator[Any, None]]],
    n: int,
    include_usage: bool,
    chat: bool,
    echo: list[str] | None,
    tools: bool,
    thinking: bool | None,
) -> Response:
    """The whole answer (``stream`` false) or the SSE response that takes over the choice
    streams; until one of them returns, the caller closes the streams on any error."""
    ident = ("chatcmpl-" if chat else "cmpl-") + uuid.uuid4().hex[:24]
    created = int(time.time())
    kind = "chat.completion" if chat else "text_completion"

    if not body.get("stream"):
        finals: list[Completion] = []
        results = []
        for index, (first, stream) in enumerate(choices):
            totals = first[1]
            async for pair in stream:
                totals = pair[1]
            if totals.error:
                raise APIError(500, totals.error)
            finals.append(totals)
            text = totals.text
            scored = sampling.logprobs is not None
            if chat:
                thought = ""
                if thinking is not None:
                    thought, text = split_thinking(text, thinking)
                text, calls = parse_tool_calls(text) if tools else (text, [])
                message: dict[str, Any] = {"role": "assistant", "content": text or None}
                if thought:
                    message["reasoning_content"] = thought
                if calls:
                    message["tool_calls"] = _openai_tool_calls(calls)
                else:
                    message["content"] = text
                results.append(
                    {
                        "index": index,
                        "message": message,
                        "logprobs": await _chat_logprobs(service, view, totals.logprobs)
                        if scored
                        else None,
                        "finish_reason": "tool_calls" if calls else _finish(totals.finish_reason),
                    }
                )
            else:
                prefix = echo[index // n] if echo else ""
                results.append(
                    {
                        "index": index,
                        "text": prefix + text,
                        "logprobs": await _text_logprobs(
                            service,
                            view,
                            (totals.prompt_logprobs or []) if echo else [],
                            totals.logprobs,
                            0,
                            totals.prompt_ids[0] if echo and totals.prompt_ids else None,
                        )
                        if scored
                        else None,
                        "finish_reason": _finish(totals.finish_reason),
                    }
                )
        usage = _usage(finals)
        if len(prompts) > 1:
            usage["prompt_tokens"] = sum(len(p) for p in prompts)
            usage["total_tokens"] = usage["prompt_tokens"] + usage["completion_tokens"]
            per_prompt = max(1, len(finals) // len(prompts))  # n choices of each prompt
            cached = sum(c.cached_tokens for c in finals[::per_prompt])
            usage["prompt_tokens_details"] = {"cached_tokens": cached}
        return JSONResponse(
            {
                "id": ident,
                "object": kind,
                "created": created,
                "model": view.name,
                "system_fingerprint": "ocs",
                "choices": results,
                "usage": usage,
            }
        )

    chunk_kind = "chat.completion.chunk" if chat else "text_completion"

    def chunk(
        index: int, delta: dict[str, Any] | str, finish: str | None, logprobs: Any = None
    ) -> dict[str, Any]:
        choice: dict[str, Any] = {"index": index, "logprobs": logprobs, "finish_reason": finish}
        if chat:
            choice["delta"] = delta
        else:
            choice["text"] = delta
        return {
            "id": ident,
            "object": chunk_kind,
            "created": created,
            "model": view.name,
            "system_fingerprint": "ocs",
            "choices": [choice],
        }

    async def chunks() -> AsyncIterator[dict[str, Any]]:
        finals: list[Completion] = []
        try:
            for index in range(len(choices)):
                if chat:
                    yield chunk(index, {"role": "assistant", "content": ""}, None)
                elif echo:
                    yield chunk(index, echo[index // n], None)
        except BaseException:  # gone before _merged took the streams over: abort them here
            for _, stream in choices:
                await stream.aclose()
            raise
        offsets = [0] * len(choices)
        held = [ToolStream() for _ in choices] if tools else None
        splitters = (
            [ThinkSplitter(thinking) for _ in choices] if chat and thinking is not None else None
        )
        async for index, (event, totals) in _merged(choices):
            visible, thought = event.text, ""
            if splitters is not None:
                thought, visible = splitters[index].feed(visible)
                if event.finished:
                    more_thought, more_text = splitters[index].finish()
                    thought, visible = thought + more_thought, visible + more_text
            if thought:
                yield chunk(index, {"reasoning_content": thought}, None)
            visible = held[index].feed(visible) if held is not None else visible
            scores: Any = None
            if sampling.logprobs is not None and (event.logprobs or event.prompt_logprobs):
                if chat:
                    scores = await _chat_logprobs(service, view, event.logprobs)
                else:
                    prompt_part = (event.prompt_logprobs or []) if echo else []
                    first = prompts[index // n][0] if prompt_part else None
                    scores = await _text_logprobs(
                        service, view, prompt_part, event.logprobs, offsets[index], first
                    )
                    offsets[index] += sum(len(t) for t in scores["tokens"])
            if visible or scores is not None:
                yield chunk(index, {"content": visible} if chat else visible, None, scores)
            if event.finished:
                if totals.error:
                    raise EngineError(totals.error)
                finals.append(totals)
                calls: list[ToolCall] = []
                if held is not None:
                    rest, calls = held[index].finish()
                    if rest:
                        yield chunk(index, {"content": rest}, None)
                    if calls:
                        yield chunk(
                            index, {"tool_calls": _openai_tool_calls(calls, streaming=True)}, None
                        )
                finish = "tool_calls" if calls else _finish(totals.finish_reason)
                yield chunk(index, {} if chat else "", finish)
        if include_usage:
            usage = _usage(finals)
            yield {
                "id": ident,
                "object": chunk_kind,
                "created": created,
                "model": view.name,
                "choices": [],
                "usage": usage,
            }

    return _sse(chunks())


@router.post("/chat/completions")
async def chat_completions(request: Request) -> Response:
    body = await json_body(request)
    _checked(body, CHAT_FIELDS)
    service = chat_service(request)
    view = _generative(_model(service, body))
    messages = _messages(body.get("messages"))
    tools = _tools(body, view)
    sampling = _sampling(service, view, body, ("max_tokens", "max_completion_tokens"))
    forced = _forced_call(body, tools)
    if forced is not None:
        if sampling.json_schema is not None:
            raise APIError(
                400, "response_format cannot be combined with a tool_choice that forces a call"
            )
        sampling.json_schema, sampling.json_wrap = forced
    await _check_bias_vocab(service, view, sampling)
    think = None
    if "thinking" in view.record.config.capabilities:
        think = body.get("reasoning_effort") not in ("none", "minimal")
    try:
        prompt = await service.chat_prompt(view, messages, tools, think)
    except (ChatError, TemplateError) as exc:
        raise APIError(400, str(exc)) from None
    inside = await service.opens_thinking(view, prompt) if think else None
    return await _complete(
        request, body, view, [prompt], sampling, chat=True, tools=bool(tools), thinking=inside
    )


def _tools(body: dict[str, Any], view: ModelView) -> list[dict[str, Any]] | None:
    try:
        tools = check_tools(body.get("tools"))
    except ToolError as exc:
        raise APIError(400, str(exc)) from None
    if tools is None or body.get("tool_choice") == "none":
        return None
    if "tools" not in view.record.config.capabilities:
        raise APIError(400, f"model `{view.name}` does not support tools")
    return tools


def _forced_call(
    body: dict[str, Any], tools: list[dict[str, Any]] | None
) -> tuple[str, tuple[str, str]] | None:
    """tool_choice "required" or a named function: the grammar that makes the model call
    (one of) them; None where the model chooses."""
    choice = body.get("tool_choice")
    if choice is None or choice in ("none", "auto"):
        return None
    if not tools:
        raise APIError(400, "tool_choice requires tools")
    name = choice["function"]["name"] if isinstance(choice, dict) else None
    try:
        return forced_call(tools, name)
    except ToolError as exc:
        raise APIError(400, str(exc)) from None


def _openai_tool_calls(calls: list[ToolCall], streaming: bool = False) -> list[dict[str, Any]]:
    out = []
    for index, call in enumerate(calls):
        entry: dict[str, Any] = {
            "id": call.id,
            "type": "function",
            "function": {"name": call.name, "arguments": json.dumps(call.arguments)},
        }
        if streaming:
            entry["index"] = index
        out.append(entry)
    return out


@router.post("/completions")
async def completions(request: Request) -> Response:
    body = await json_body(request)
    _checked(body, COMPLETION_FIELDS)
    service = chat_service(request)
    view = _generative(_model(service, body))
    prompt = body.get("prompt")
    prompts = [prompt] if isinstance(prompt, str) else prompt
    if not isinstance(prompts, list) or not prompts or not all(isinstance(p, str) for p in prompts):
        raise APIError(400, "prompt must be a string or a non-empty array of strings")
    if len(prompts) > MAX_PROMPTS:
        raise APIError(400, f"at most {MAX_PROMPTS} prompts per request")
    if body.get("suffix"):
        raise APIError(400, "suffix (infill) is not supported by this model")
    sampling = _sampling(service, view, body, ("max_tokens",))
    await _check_bias_vocab(service, view, sampling)
    if body.get("max_tokens") is None:
        sampling.max_tokens = 16  # OpenAI's default for completions
    tokenized = [
        await service.generate_prompt(view, p, system=None, raw=True, context=None) for p in prompts
    ]
    echo = list(prompts) if body.get("echo") else None
    if sampling.max_tokens == 0 and echo is None:
        raise APIError(400, "max_tokens 0 needs echo")
    return await _complete(request, body, view, tokenized, sampling, chat=False, echo=echo)


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


@router.post("/embeddings")
async def embeddings(request: Request) -> Response:
    body = await json_body(request)
    check_fields(body, EMBEDDING_FIELDS)
    _integer(body, "dimensions", 1, 1 << 16)
    service = chat_service(request)
    view = _model(service, body)
    value = body.get("input")
    if isinstance(value, str):
        value = [value]
    if not isinstance(value, list) or not value:
        raise APIError(400, "input must be a non-empty string or array")
    fmt = body.get("encoding_format") or "float"
    if fmt not in ("float", "base64"):
        raise APIError(400, "encoding_format must be float or base64")
    try:
        if all(isinstance(v, str) for v in value):
            inputs = await embed_inputs(service, view, value)
        elif all(
            isinstance(v, list)
            and v
            and all(isinstance(t, int) and not isinstance(t, bool) for t in v)
            for v in value
        ):
            vocab = await _vocab_size(service, view)
            if any(t < 0 or t >= vocab for v in value for t in v):
                raise APIError(400, "input holds token ids outside the vocabulary")
            inputs = [list(v) for v in value]
        else:
            raise APIError(400, "input must be strings or arrays of token ids")
        event = await service.engine.embed(EmbedRequest(uuid.uuid4().hex, view.name, inputs))
    except ChatError as exc:
        raise APIError(exc.status, str(exc)) from None
    except EngineError as exc:
        raise APIError(exc.status, str(exc)) from None
    vectors = event.embeddings or []
    dimensions = _integer(body, "dimensions", 1, 1 << 16)
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


async def _check_bias_vocab(
    service: ChatService, view: ModelView, sampling: SamplingParams
) -> None:
    if sampling.logit_bias:
        vocab = await _vocab_size(service, view)
        if max(sampling.logit_bias) >= vocab:
            raise APIError(400, "logit_bias holds token ids outside the vocabulary")


async def _vocab_size(service: ChatService, view: ModelView) -> int:
    tokenizer = await service.tokenizer(view)
    return len(tokenizer)


def _renormalised(vector: list[float]) -> list[float]:
    norm = math.sqrt(sum(x * x for x in vector)) or 1.0
    return [x / norm for x in vector]
