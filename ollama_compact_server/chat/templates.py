"""Chat templates: Jinja from the registry (never from a request), rendered in a sandbox with
a cap on time and on output size."""

from __future__ import annotations

import json
import time
from datetime import datetime
from functools import lru_cache
from typing import Any

from jinja2 import TemplateError as JinjaError
from jinja2.sandbox import ImmutableSandboxedEnvironment

MAX_SECONDS = 2.0
MAX_CHARS = 8 << 20


class TemplateError(ValueError):
    """The template failed or ran past its caps; the message is safe to show."""


def _raise(message: str) -> None:
    raise TemplateError(f"chat template error: {message}")


def _tojson(value: Any, indent: int | None = None, ensure_ascii: bool = False) -> str:
    return json.dumps(value, indent=indent, ensure_ascii=ensure_ascii)


@lru_cache(maxsize=64)
def _compile(source: str) -> Any:
    env = ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True)
    env.filters["tojson"] = _tojson
    env.globals["raise_exception"] = _raise
    env.globals["strftime_now"] = lambda fmt: datetime.now().strftime(fmt)
    try:
        return env.from_string(source)
    except JinjaError as exc:
        raise TemplateError(f"chat template does not compile: {exc}") from None


def render(source: str, **context: Any) -> str:
    """Renders ``source`` with ``context``; stops past MAX_SECONDS or MAX_CHARS."""
    template = _compile(source)
    deadline = time.monotonic() + MAX_SECONDS
    pieces: list[str] = []
    size = 0
    try:
        for piece in template.generate(**context):
            pieces.append(piece)
            size += len(piece)
            if size > MAX_CHARS:
                raise TemplateError("chat template output is too large")
            if time.monotonic() > deadline:
                raise TemplateError("chat template took too long to render")
    except TemplateError:
        raise
    except (JinjaError, TypeError, ValueError, KeyError, IndexError, AttributeError) as exc:
        raise TemplateError(f"chat template error: {exc}") from None
    return "".join(pieces)


def plain_chat(messages: list[dict[str, Any]]) -> str:
    """Fallback for models without a template: role-labelled lines and an open answer."""
    lines = [f"{m['role'].capitalize()}: {m.get('content', '')}" for m in messages]
    return "\n".join([*lines, "Assistant:"])
