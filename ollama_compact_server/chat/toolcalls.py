"""Tool calls in model output, in the forms the families people run were trained to write,
chosen by the model's chat template (never by its name):

- Hermes / Qwen: ``<tool_call>{"name": ..., "arguments": {...}}</tool_call>``
- Llama 3.1+: ``<|python_tag|>`` or the whole answer as ``{"name": ..., "parameters": {...}}``
- Mistral: ``[TOOL_CALLS][{"name": ..., "arguments": {...}}]`` or ``[TOOL_CALLS]name[ARGS]{...}``
- Phi-4-mini: ``<|tool_call|>[{"name": ..., "arguments": {...}}]<|/tool_call|>``
- Gemma 3: Python-style calls, ``[get_weather(city="Paris")]`` (also in a ```tool_code block)

Special tokens (``<|python_tag|>``, ``[TOOL_CALLS]``, ``<|tool_call|>``) are dropped by the
detokenizer of the real models, so calls are also found where the answer itself begins with
a JSON object or array (or a Python call list) naming an offered tool. Parsed once for every
dialect; while streaming, text that may be a call is held back until it is known."""

from __future__ import annotations

import ast
import json
import re
from dataclasses import dataclass
from typing import Any

from .tools import ToolCall, ToolError


@dataclass(frozen=True, slots=True)
class ToolFormat:
    name: str
    markers: tuple[str, ...]  # open a call anywhere in the output
    leading: tuple[str, ...]  # open a call only at the very start of the output
    closers: tuple[str, ...]  # text around calls that is no part of them
    forced: tuple[str, str] | None  # a forced call: the text before and after its JSON
    key: str  # the arguments' key in a forced call's JSON


HERMES = ToolFormat(
    "hermes", ("<tool_call>",), (), ("</tool_call>",), ("<tool_call>", "</tool_call>"), "arguments"
)
LLAMA = ToolFormat(
    "llama3", ("<|python_tag|>",), ("{",), ("<|eom_id|>", "<|eot_id|>"), None, "parameters"
)
MISTRAL = ToolFormat(
    "mistral", ("[TOOL_CALLS]",), ("[{",), ("</s>",), ("[TOOL_CALLS][", "]"), "arguments"
)
PHI4 = ToolFormat(
    "phi4",
    ("<|tool_call|>", "functools["),
    ("[{",),
    ("<|/tool_call|>",),
    ("<|tool_call|>[", "]<|/tool_call|>"),
    "arguments",
)
GEMMA = ToolFormat(
    "gemma3", ("```tool_code", "```tool_call"), ("[", "{"), ("```",), None, "parameters"
)
FORMATS = {f.name: f for f in (HERMES, LLAMA, MISTRAL, PHI4, GEMMA)}


def tool_format(template: str) -> ToolFormat:
    """The call form a chat template teaches its model (Hermes when it says nothing)."""
    if "<tool_call>" in template:
        return HERMES
    if "[TOOL_CALLS]" in template or "[AVAILABLE_TOOLS]" in template:
        return MISTRAL
    if "<|tool_call|>" in template or "<|tool|>" in template:
        return PHI4
    if "<|python_tag|>" in template or "<|start_header_id|>" in template:
        return LLAMA
    if "<start_of_turn>" in template and "tool_code" in template:
        return GEMMA
    return HERMES


# ------------------------------------------------------------------------------ parsing

HERMES_BLOCK = re.compile(r"<tool_call>\s*(.*?)\s*(?:</tool_call>|$)", re.S)
MISTRAL_ARGS = re.compile(r"([A-Za-z_][\w.-]*)\[ARGS\]")


def parse_tool_calls(
    text: str, fmt: ToolFormat = HERMES, names: frozenset[str] | None = None
) -> tuple[str, list[ToolCall]]:
    """(text outside the calls, calls). Text that only looks like calls but does not parse
    stays text; so do calls at the start of the answer that name no offered tool
    (``names``)."""
    if fmt is HERMES or (fmt.markers[0] not in text and "<tool_call>" in text):
        return _hermes(text)
    start, leading = _start(text, fmt)
    if start < 0:
        return text, []
    calls = _calls(text[start:], fmt)
    if not calls or (leading and names is not None and any(c.name not in names for c in calls)):
        return text, []
    return text[:start].strip(), calls


def _start(text: str, fmt: ToolFormat) -> tuple[int, bool]:
    """Where the calls begin (-1: nowhere), and whether by a leading character."""
    found = [i for i in (text.find(m) for m in fmt.markers) if i >= 0]
    if found:
        return min(found), False
    head = text.lstrip()
    if any(head.startswith(lead) for lead in fmt.leading):
        return len(text) - len(head), True
    return -1, False


def _hermes(text: str) -> tuple[str, list[ToolCall]]:
    if "<tool_call>" not in text:
        return text, []
    calls: list[ToolCall] = []
    for match in HERMES_BLOCK.finditer(text):
        found = _json_calls(match.group(1), strict=False)
        if not found:
            return text, []
        calls += found
    return HERMES_BLOCK.sub("", text).strip(), calls


def _calls(region: str, fmt: ToolFormat) -> list[ToolCall] | None:
    text = region
    for marker in (*fmt.markers, *fmt.closers, "```tool_code", "```tool_call", "```"):
        text = text.replace(marker, " ")
    text = text.strip()
    if fmt is PHI4 and region.lstrip().startswith("functools["):
        text = "[" + text
    if "[ARGS]" in text:
        return _mistral_args(text)
    calls = _json_calls(text, strict=True)
    if calls is None:
        calls = _pythonic(text)
    return calls


def _json_calls(text: str, strict: bool) -> list[ToolCall] | None:
    """JSON call objects (or arrays of them), one after another, separated by whitespace,
    commas or semicolons. ``strict``: the arguments' key must be there (a plain JSON
    answer is no call)."""
    decoder = json.JSONDecoder()
    calls: list[ToolCall] = []
    at = 0
    while at < len(text):
        while at < len(text) and text[at] in " \t\r\n;,":
            at += 1
        if at >= len(text):
            break
        try:
            value, at = decoder.raw_decode(text, at)
        except (json.JSONDecodeError, RecursionError):
            return None
        for item in value if isinstance(value, list) else [value]:
            call = _json_call(item, strict)
            if call is None:
                return None
            calls.append(call)
    return calls or None


def _json_call(item: Any, strict: bool) -> ToolCall | None:
    if not isinstance(item, dict):
        return None
    if isinstance(item.get("function"), dict):  # {"type": "function", "function": {...}}
        item = item["function"]
    name = item.get("name")
    key = next((k for k in ("arguments", "parameters") if k in item), None)
    if not isinstance(name, str) or not name or (strict and key is None):
        return None
    arguments = item.get(key, {}) if key else {}
    if isinstance(arguments, str):
        try:
            arguments = json.loads(arguments) if arguments.strip() else {}
        except (json.JSONDecodeError, RecursionError):
            return None
    if arguments is None:
        arguments = {}
    return ToolCall(name, arguments) if isinstance(arguments, dict) else None


def _mistral_args(text: str) -> list[ToolCall] | None:
    """``name[ARGS]{...}``, once per call (Mistral's newer tokenizers)."""
    decoder = json.JSONDecoder()
    calls = []
    for match in MISTRAL_ARGS.finditer(text):
        try:
            arguments, _ = decoder.raw_decode(text, match.end())
        except (json.JSONDecodeError, RecursionError):
            return None
        if not isinstance(arguments, dict):
            return None
        calls.append(ToolCall(match.group(1), arguments))
    return calls or None


def _pythonic(text: str) -> list[ToolCall] | None:
    """``[f(a=1, b="x"), g()]`` or ``f(a=1)``: read with the parser, never run; keyword
    arguments with literal values only."""
    if len(text) > 100_000:
        return None
    try:
        tree = ast.parse(text, mode="eval").body
    except (SyntaxError, ValueError, RecursionError, MemoryError):
        return None
    nodes = tree.elts if isinstance(tree, (ast.List, ast.Tuple)) else [tree]
    calls = []
    for node in nodes:
        if (
            isinstance(node, ast.Call)
            and isinstance(node.func, ast.Name)
            and node.func.id == "print"
        ):
            node = node.args[0] if len(node.args) == 1 else node  # print(f(...))
        if not isinstance(node, ast.Call) or node.args:
            return None
        func = node.func
        name = (
            func.id
            if isinstance(func, ast.Name)
            else func.attr
            if isinstance(func, ast.Attribute)
            else None
        )
        if name is None:
            return None
        arguments: dict[str, Any] = {}
        for keyword in node.keywords:
            if keyword.arg is None:
                return None
            try:
                arguments[keyword.arg] = ast.literal_eval(keyword.value)
            except (ValueError, SyntaxError, TypeError, RecursionError, MemoryError):
                return None
        calls.append(ToolCall(name, arguments))
    return calls or None


# ------------------------------------------------------------------------------ streaming


class ToolStream:
    """Feeds streamed text through, holding back what may be a tool call: everything from
    a marker on, and at the start of the answer what begins like a leading call."""

    def __init__(self, fmt: ToolFormat = HERMES, names: frozenset[str] | None = None) -> None:
        self.fmt = fmt
        self.names = names
        self.pending = ""
        self.capturing = False
        self.started = False  # visible text went out: leading calls are no longer possible
        self.markers = fmt.markers if fmt is HERMES else (*fmt.markers, "<tool_call>")

    def feed(self, delta: str) -> str:
        self.pending += delta
        if self.capturing:
            return ""
        if not self.started:
            head = self.pending.lstrip()
            if not head:
                return ""
            if any(head.startswith(lead) for lead in self.fmt.leading):
                self.capturing = True
                return ""
            if any(lead.startswith(head) for lead in self.fmt.leading):
                return ""  # too short to tell
            self.started = True
        found = [i for i in (self.pending.find(m) for m in self.markers) if i >= 0]
        if found:
            at = min(found)
            out, self.pending, self.capturing = self.pending[:at], self.pending[at:], True
            return out
        hold = 0
        for marker in self.markers:
            for n in range(min(len(marker) - 1, len(self.pending)), 0, -1):
                if self.pending.endswith(marker[:n]):
                    hold = max(hold, n)
                    break
        out = self.pending[: len(self.pending) - hold]
        self.pending = self.pending[len(self.pending) - hold :]
        return out

    def finish(self) -> tuple[str, list[ToolCall]]:
        """(remaining text, calls) at the end of the stream."""
        text, self.pending = self.pending, ""
        if not self.capturing:
            return text, []
        return parse_tool_calls(text, self.fmt, self.names)


# ------------------------------------------------------------------------------ forcing


def forced_call(
    tools: list[dict[str, Any]], name: str | None, fmt: ToolFormat = HERMES
) -> tuple[str, tuple[str, str] | None]:
    """The JSON schema (as text) and the texts around it that force one call, in the
    model's own form, of the tool ``name`` or of any of ``tools`` (tool_choice "required").
    Compact JSON: a forced call has no use for the whitespace a grammar would allow."""
    chosen = [t for t in tools if name is None or t["function"]["name"] == name]
    if not chosen:
        raise ToolError(f"tool_choice names '{name}', which is not among the tools")
    options = [
        {
            "type": "object",
            "properties": {
                "name": {"const": t["function"]["name"]},
                fmt.key: t["function"].get("parameters") or {"type": "object"},
            },
            "required": ["name", fmt.key],
            "additionalProperties": False,
        }
        for t in chosen
    ]
    schema = {"anyOf": options, "x-guidance": {"whitespace_flexible": False}}
    return json.dumps(schema), fmt.forced
