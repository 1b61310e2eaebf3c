"""Tools on the request side: a request's function definitions and the tool calls of its
history, checked; ``ToolCall``, a call found in model output (toolcalls.py finds them)."""

from __future__ import annotations

import json
import secrets
import string
from dataclasses import dataclass, field
from typing import Any

from .errors import ChatError


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


MAX_TOOLS = 128


class ToolError(ChatError):
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
