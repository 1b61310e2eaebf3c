"""Parses Ollama Modelfiles (FROM, ADAPTER, PARAMETER, TEMPLATE, SYSTEM, MESSAGE, LICENSE)
into the fields of an `/api/create` request."""

from __future__ import annotations

import json
import re
from dataclasses import dataclass, field
from typing import Any


class ModelfileError(ValueError):
    pass


COMMANDS = ("from", "adapter", "parameter", "template", "system", "message", "license", "requires")
MESSAGE_ROLES = ("system", "user", "assistant")
LIST_PARAMETERS = ("stop",)


@dataclass
class Modelfile:
    from_: str = ""
    adapters: list[str] = field(default_factory=list)
    parameters: dict[str, Any] = field(default_factory=dict)
    template: str | None = None
    system: str | None = None
    messages: list[dict[str, str]] = field(default_factory=list)
    licenses: list[str] = field(default_factory=list)


def _value(text: str) -> str:
    """Strips one level of triple or single double quotes."""
    text = text.strip()
    if text.startswith('"""') and text.endswith('"""') and len(text) >= 6:
        return text[3:-3]
    if len(text) >= 2 and text.startswith('"') and text.endswith('"'):
        try:
            decoded = json.loads(text)
            if isinstance(decoded, str):
                return decoded
        except json.JSONDecodeError:
            return text[1:-1]
    return text


def _statements(source: str) -> list[tuple[str, str, int]]:
    """Splits a Modelfile into (command, argument, line) with triple-quoted blocks intact."""
    statements: list[tuple[str, str, int]] = []
    lines = source.splitlines()
    i = 0
    while i < len(lines):
        line = lines[i]
        stripped = line.strip()
        i += 1
        if not stripped or stripped.startswith("#"):
            continue
        match = re.match(r"^([A-Za-z]+)\s*(.*)$", stripped, re.S)
        if not match:
            raise ModelfileError(f"line {i}: cannot parse {stripped[:40]!r}")
        command, rest = match.group(1).lower(), match.group(2)
        start = i
        if rest.count('"""') == 1 or (command == "message" and rest.count('"""') == 1):
            block = [rest]
            while i < len(lines):
                block.append(lines[i])
                i += 1
                if '"""' in lines[i - 1]:
                    break
            else:
                raise ModelfileError(f"line {start}: unterminated triple-quoted string")
            rest = "\n".join(block)
        statements.append((command, rest, start))
    return statements


def parse_parameter_value(key: str, raw: str) -> Any:
    value = _value(raw)
    if key in LIST_PARAMETERS:
        return value
    for cast in (int, float):
        try:
            return cast(value)
        except ValueError:
            continue
    if value.lower() in ("true", "false"):
        return value.lower() == "true"
    return value


def parse_modelfile(source: str) -> Modelfile:
    result = Modelfile()
    for command, rest, line in _statements(source):
        if command not in COMMANDS:
            raise ModelfileError(f"line {line}: unknown command {command.upper()!r}")
        if command == "from":
            result.from_ = _value(rest)
        elif command == "adapter":
            result.adapters.append(_value(rest))
        elif command == "parameter":
            parts = rest.split(None, 1)
            if len(parts) != 2:
                raise ModelfileError(f"line {line}: PARAMETER needs a name and a value")
            key = parts[0].lower()
            value = parse_parameter_value(key, parts[1])
            if key in LIST_PARAMETERS:
                result.parameters.setdefault(key, []).append(value)
            else:
                result.parameters[key] = value
        elif command == "template":
            result.template = _value(rest)
        elif command == "system":
            result.system = _value(rest)
        elif command == "license":
            result.licenses.append(_value(rest))
        elif command == "message":
            parts = rest.split(None, 1)
            role = parts[0].lower() if parts else ""
            if role not in MESSAGE_ROLES or len(parts) != 2:
                raise ModelfileError(
                    f"line {line}: MESSAGE needs a role (system, user, assistant) and text"
                )
            result.messages.append({"role": role, "content": _value(parts[1])})
    if not result.from_:
        raise ModelfileError("no FROM line")
    return result
