"""Tool calls in model output, in the Hermes / Qwen form that most tool-trained open models
use: ``<tool_call>{"name": ..., "arguments": {...}}</tool_call>``. Parsed once for both
dialects; while streaming, text from the first ``<tool_call>`` on is held back."""

from __future__ import annotations

import json
import re
import secrets
import string
from dataclasses import dataclass, field
from typing import Any

OPEN, CLOSE = "<tool_call>", "</tool_call>"
BLOCK = re.compile(re.escape(OPEN) + r"\s*(.*?)\s*(?:" + re.escape(CLOSE) + r"|$)", re.S)


@dataclass(slots=True)
class ToolCall:
    name: str
    arguments: dict[str, Any]
    id: str = field(
        default_factory=lambda: (
            "call_"
            + "".join(secrets.choice(string.ascii_lowercase + string.digits) for _ in range(8))
        )
    )


def parse_tool_calls(text: str) -> tuple[str, list[ToolCall]]:
    """(text outside the calls, calls). Text that only looks like a call but does not parse
    stays text."""
    if OPEN not in text:
        return text, []
    calls: list[ToolCall] = []
    for match in BLOCK.finditer(text):
        try:
            value = json.loads(match.group(1))
        except json.JSONDecodeError:
            return text, []
        if not isinstance(value, dict) or not isinstance(value.get("name"), str):
            return text, []
        arguments = value.get("arguments", value.get("parameters", {}))
        if isinstance(arguments, str):
            try:
                arguments = json.loads(arguments)
            except json.JSONDecodeError:
                return text, []
        if not isinstance(arguments, dict):
            return text, []
        calls.append(ToolCall(value["name"], arguments))
    return BLOCK.sub("", text).strip(), calls


class ToolStream:
    """Feeds streamed text through, holding back what may be a tool call."""

    def __init__(self) -> None:
        self.pending = ""
        self.capturing = False

    def feed(self, delta: str) -> str:
        self.pending += delta
        if self.capturing:
            return ""
        at = self.pending.find(OPEN)
        if at >= 0:
            out, self.pending, self.capturing = self.pending[:at], self.pending[at:], True
            return out
        hold = next(
            (
                n
                for n in range(min(len(OPEN) - 1, len(self.pending)), 0, -1)
                if self.pending.endswith(OPEN[:n])
            ),
            0,
        )
        out = self.pending[: len(self.pending) - hold]
        self.pending = self.pending[len(self.pending) - hold :]
        return out

    def finish(self) -> tuple[str, list[ToolCall]]:
        """(remaining text, calls) at the end of the stream."""
        text, self.pending = self.pending, ""
        if not self.capturing:
            return text, []
        return parse_tool_calls(text)


MAX_TOOLS = 128


class ToolError(ValueError):
    """Tool definitions or tool calls of the wrong shape in a request (a 400)."""


def check_tools(tools: Any) -> list[dict[str, Any]] | None:
    """A request's tool definitions, checked: at most MAX_TOOLS function definitions, each
    with a name, and a description and parameters of the right type where given."""
    if tools is None or tools == []:
        return None
    if not isinstance(tools, list) or len(tools) > MAX_TOOLS:
        raise ToolError(f"tools must be a list of at most {MAX_TOOLS} function definitions")
    for tool in tools:
        function = tool.get("function") if isinstance(tool, dict) else None
        if (
            not isinstance(function, dict)
            or tool.get("type", "function") != "function"
            or not isinstance(function.get("name"), str)
            or not isinstance(function.get("description", ""), (str, type(None)))
            or not isinstance(function.get("parameters", {}), (dict, type(None)))
        ):
            raise ToolError(
                'each tool must be {"type": "function", "function": {"name": ..., '
                '"description": ..., "parameters": {...}}}'
            )
    return list(tools)


def template_tool_calls(calls: Any) -> list[dict[str, Any]]:
    """Tool calls from a request's history in the shape chat templates expect
    (arguments as an object). Raises ToolError for calls of the wrong shape."""
    if calls is None:
        return []
    if not isinstance(calls, list) or len(calls) > MAX_TOOLS:
        raise ToolError("tool_calls must be a list of function calls")
    out = []
    for call in calls:
        function = call.get("function") if isinstance(call, dict) else None
        if not isinstance(function, dict) or not isinstance(function.get("name"), str):
            raise ToolError("each tool call needs a function with a name")
        arguments = function.get("arguments", {})
        if isinstance(arguments, str):
            try:
                arguments = json.loads(arguments)
            except (json.JSONDecodeError, RecursionError):
                arguments = {}
        if arguments is None:
            arguments = {}
        if not isinstance(arguments, dict):
            raise ToolError("tool call arguments must be an object or a JSON string of one")
        out.append(
            {"type": "function", "function": {"name": function["name"], "arguments": arguments}}
        )
    return out


def forced_call(tools: list[dict[str, Any]], name: str | None) -> tuple[str, tuple[str, str]]:
    """The JSON schema (as text) and the wrapping tags that force one call, in the Hermes
    form, of the tool ``name`` or of any of ``tools`` (OpenAI's tool_choice "required").
    Compact JSON: a forced call has no use for the whitespace a grammar would allow."""
    chosen = [t for t in tools if name is None or t["function"]["name"] == name]
    if not chosen:
        raise ToolError(f"tool_choice names '{name}', which is not among the tools")
    options = [
        {
            "type": "object",
            "properties": {
                "name": {"const": t["function"]["name"]},
                "arguments": t["function"].get("parameters") or {"type": "object"},
            },
            "required": ["name", "arguments"],
            "additionalProperties": False,
        }
        for t in chosen
    ]
    schema = {"anyOf": options, "x-guidance": {"whitespace_flexible": False}}
    return json.dumps(schema), (OPEN, CLOSE)
