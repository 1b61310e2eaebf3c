"""OpenAI's wire shapes (chat completions, legacy completions, embeddings): the JSON types
of each route's fields, their ranges, and the fields turned into a dialect-free
``ChatRequest``."""

from __future__ import annotations

import json
import math
from typing import Any

from ...chat.options import stop_list
from ...chat.tools import ToolCall, check_tools, template_tool_calls
from ...chat.turn import CallSpec, ChatRequest, Message, ToolChoice
from ...engine.types import ANY_JSON_OBJECT
from ..common import check_fields
from ..errors import APIError

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
    # vLLM's sampling extensions
    "top_k": ("integer",),
    "min_p": ("number",),
    "repetition_penalty": ("number",),
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


def checked(body: dict[str, Any], fields: dict[str, tuple[str, ...]]) -> None:
    """Types first (any field), then the small shapes the streaming code reads."""
    check_fields(body, fields)
    options = body.get("stream_options")
    if options is not None and not isinstance(options.get("include_usage", False), bool):
        raise APIError(400, "stream_options.include_usage must be true or false")
    integer(body, "n", 1, MAX_N)
    if "best_of" in fields:
        integer(body, "best_of", 1, MAX_N)
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


def number(
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


def integer(body: dict[str, Any], key: str, low: int, high: int) -> int | None:
    value = body.get(key)
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, int):
        raise APIError(400, f"{key} must be an integer")
    if not low <= value <= high:
        raise APIError(400, f"{key} must be between {low} and {high}")
    return value


def response_schema(value: Any) -> str | None:
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


def logit_bias_of(value: Any) -> dict[int, float]:
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


def messages_of(value: Any) -> list[Message]:
    """OpenAI messages (string or content-part arrays) as dialect-free messages."""
    if not isinstance(value, list) or not value:
        raise APIError(400, "messages must be a non-empty array")
    out = []
    for message in value:
        if not isinstance(message, dict):
            raise APIError(400, "each message must be an object")
        role = message.get("role")
        if not isinstance(role, str):
            raise APIError(400, "each message needs a role")
        role = "system" if role == "developer" else role.lower()
        content = text_of(message.get("content"))
        for key in ("tool_call_id", "name", "reasoning_content"):
            if message.get(key) is not None and not isinstance(message[key], str):
                raise APIError(400, f"message {key} must be a string")
        calls = [
            CallSpec(c["function"]["name"], c["function"]["arguments"], c.get("id"))
            for c in template_tool_calls(message.get("tool_calls"))
        ]
        out.append(
            Message(
                role=role,
                content=content,
                thinking=message.get("reasoning_content") or None,
                tool_calls=calls,
                tool_call_id=message.get("tool_call_id"),
                name=message.get("name"),
            )
        )
    return out


def text_of(content: Any) -> str:
    """A message's content: a string, or an array of text parts joined."""
    if content is None:
        return ""
    if isinstance(content, list):
        texts = []
        for part in content:
            if not isinstance(part, dict) or part.get("type") not in ("text", "input_text"):
                kind = part.get("type") if isinstance(part, dict) else type(part).__name__
                raise APIError(400, f"content parts of type {str(kind)[:20]!r} are not supported")
            text = part.get("text")
            if not isinstance(text, str):
                raise APIError(400, "a text content part needs a text string")
            texts.append(text)
        return "".join(texts)
    if not isinstance(content, str):
        raise APIError(400, "message content must be a string or an array of parts")
    return content


def tool_choice_of(value: Any) -> tuple[ToolChoice, str | None]:
    """OpenAI's tool_choice (checked by ``checked``): none, auto, required or a function."""
    if value is None or value == "auto":
        return ToolChoice.AUTO, None
    if value == "none":
        return ToolChoice.NONE, None
    if value == "required":
        return ToolChoice.REQUIRED, None
    return ToolChoice.REQUIRED, value["function"]["name"]


def sampling_options(body: dict[str, Any], max_keys: tuple[str, ...]) -> dict[str, Any]:
    """OpenAI's sampling fields in Ollama's option names (merged over the model's
    parameters and the defaults by the chat service)."""
    max_tokens = None
    for key in max_keys:
        if body.get(key) is not None:
            max_tokens = integer(body, key, 0, 1 << 20)
    options: dict[str, Any] = {
        "temperature": number(body, "temperature", 0.0, 2.0, None),
        "top_p": number(body, "top_p", 0.0, 1.0, None),
        "presence_penalty": number(body, "presence_penalty", -2.0, 2.0, None),
        "frequency_penalty": number(body, "frequency_penalty", -2.0, 2.0, None),
        "seed": integer(body, "seed", -(2**63), 2**63 - 1),
        "num_predict": max_tokens,
        # vLLM's extensions, in Ollama's names
        "top_k": integer(body, "top_k", -1, 1_000_000),
        "min_p": number(body, "min_p", 0.0, 1.0, None),
        "repeat_penalty": number(body, "repetition_penalty", 0.01, 100.0, None),
    }
    if body.get("stop") is not None:
        options["stop"] = stop_list(body["stop"])
    return {k: v for k, v in options.items() if v is not None}


def chat_request(body: dict[str, Any]) -> ChatRequest:
    """A checked (``checked(body, CHAT_FIELDS)``) chat completion request."""
    logprobs = None
    if body.get("logprobs") or body.get("top_logprobs") is not None:
        if body.get("top_logprobs") is not None and not body.get("logprobs"):
            raise APIError(400, "top_logprobs needs logprobs: true")
        logprobs = integer(body, "top_logprobs", 0, 20) or 0
    choice, name = tool_choice_of(body.get("tool_choice"))
    effort = body.get("reasoning_effort")
    return ChatRequest(
        model=model_of(body),
        messages=messages_of(body.get("messages")),
        tools=check_tools(body.get("tools")),
        tool_choice=choice,
        tool_name=name,
        think=None if effort is None else effort not in ("none", "minimal"),
        think_strict=False,
        json_schema=response_schema(body.get("response_format")),
        options=sampling_options(body, ("max_tokens", "max_completion_tokens")),
        logit_bias=logit_bias_of(body.get("logit_bias")),
        logprobs=logprobs,
        n=integer(body, "n", 1, MAX_N) or 1,
    )


def completion_request(body: dict[str, Any]) -> ChatRequest:
    """A checked (``checked(body, COMPLETION_FIELDS)``) legacy completion request."""
    prompt = body.get("prompt")
    prompts = [prompt] if isinstance(prompt, str) else prompt
    if not isinstance(prompts, list) or not prompts or not all(isinstance(p, str) for p in prompts):
        raise APIError(400, "prompt must be a string or a non-empty array of strings")
    if len(prompts) > MAX_PROMPTS:
        raise APIError(400, f"at most {MAX_PROMPTS} prompts per request")
    if body.get("suffix"):
        raise APIError(400, "suffix (infill) is not supported by this model")
    options = sampling_options(body, ("max_tokens",))
    if body.get("max_tokens") is None:
        options["num_predict"] = 16  # OpenAI's default for completions
    logprobs = integer(body, "logprobs", 0, 20)
    if options["num_predict"] == 0 and not body.get("echo"):
        raise APIError(400, "max_tokens 0 needs echo")
    return ChatRequest(
        model=model_of(body),
        prompts=list(prompts),
        raw=True,
        options=options,
        logit_bias=logit_bias_of(body.get("logit_bias")),
        logprobs=logprobs,
        echo=bool(body.get("echo")),
        n=integer(body, "n", 1, MAX_N) or 1,
    )


def model_of(body: dict[str, Any]) -> str:
    name = body.get("model")
    if not isinstance(name, str) or not name.strip():
        raise APIError(400, "model is required")
    return name


def openai_tool_calls(calls: list[ToolCall], streaming: bool = False) -> list[dict[str, Any]]:
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
