"""Chat templates: Jinja from the registry (never from a request), rendered in a sandbox with
a hard cap on time and on the size of every string or list the template builds."""

from __future__ import annotations

import json
import math
import re
import time
from collections.abc import Callable, Iterator
from contextvars import ContextVar
from datetime import datetime
from functools import lru_cache, wraps
from typing import Any

from jinja2 import TemplateError as JinjaError
from jinja2 import nodes
from jinja2.sandbox import ImmutableSandboxedEnvironment
from jinja2.visitor import NodeTransformer

from .errors import ChatError

MAX_SECONDS = 2.0
MAX_CHARS = 8 << 20  # also the most items in a list a template builds
MAX_INT_BITS = 1 << 16  # integers past ~20 000 digits: pow / multiply would stall the thread

_deadline: ContextVar[float] = ContextVar("template_deadline", default=math.inf)

# printf widths or precisions of 7+ digits (or taken from an argument: "*"), and str.format
# widths of 7+ digits or nested replacement fields: each would allocate before any check
_BIG_PERCENT = re.compile(r"%[#0 +\-]*(?:\*|\d{7,})|%[#0 +\-]*\d*\.(?:\*|\d{7,})")
_BIG_FORMAT = re.compile(r"\{[^{}]*:[^{}]*(?:\d{7,}|\{)")


class TemplateError(ChatError):
    """The template failed or ran past its caps; the message is safe to show."""


def _raise(message: str) -> None:
    raise TemplateError(f"chat template error: {message}")


def _tick() -> None:
    if time.monotonic() > _deadline.get():
        raise TemplateError("chat template took too long to render")


def _too_big(count: float) -> None:
    if count > MAX_CHARS:
        raise TemplateError("chat template output is too large")


def _sized(value: Any) -> Any:
    """Checks what a concatenation, filter or call built (each is at most a few times the
    size of capped inputs, so checking afterwards bounds memory)."""
    _tick()
    if isinstance(value, (str, list, tuple)):
        _too_big(len(value))
    return value


class _Ticking:
    """A loop's iterable that checks the deadline before each item; a loop without any
    output (``{% for a in range(n) %}{% for b in range(n) %}{% endfor %}...``) ends too."""

    def __init__(self, iterable: Any) -> None:
        self.iterable = iterable

    def __iter__(self) -> Iterator[Any]:
        for item in self.iterable:
            _tick()
            yield item

    def __len__(self) -> int:
        return len(self.iterable)  # TypeError without one: LoopContext then counts


def _ticking(iterable: Any) -> _Ticking:
    return _Ticking(iterable)


def _call(name: str, arg: nodes.Expr, lineno: int) -> nodes.Call:
    return nodes.Call(nodes.Name(name, "load", lineno=lineno), [arg], [], None, None, lineno=lineno)


class _Guard(NodeTransformer):
    """Rewrites a parsed template: every loop iterates through ``_ocs_ticking``, every
    concatenation (``~``) and filter result passes through ``_ocs_sized``."""

    def visit_For(self, node: nodes.For) -> nodes.Node:
        self.generic_visit(node)
        node.iter = _call("_ocs_ticking", node.iter, node.lineno)  # type: ignore[arg-type]
        return node

    def visit_Concat(self, node: nodes.Concat) -> nodes.Node:
        self.generic_visit(node)
        return _call("_ocs_sized", node, node.lineno)

    def visit_Filter(self, node: nodes.Filter) -> nodes.Node:
        self.generic_visit(node)
        if node.node is None:  # the filter of a {% filter %} or {% set %} block
            return node
        return _call("_ocs_sized", node, node.lineno)

    def visit_FilterBlock(self, node: nodes.FilterBlock) -> nodes.Node:
        node.body = [self.visit(child) for child in node.body]
        return node

    def visit_AssignBlock(self, node: nodes.AssignBlock) -> nodes.Node:
        node.body = [self.visit(child) for child in node.body]
        return node


def _check_binop(operator: str, left: Any, right: Any) -> None:
    """Refuses, before computing it, a product or power that would be huge."""
    if operator == "*":
        for seq, times in ((left, right), (right, left)):
            if isinstance(seq, (str, list, tuple)) and isinstance(times, int):
                _too_big(len(seq) * max(times, 0))
        ints = isinstance(left, int) and isinstance(right, int)
        if ints and left.bit_length() + right.bit_length() > MAX_INT_BITS:
            raise TemplateError("chat template number is too large")
    elif operator == "**":
        ints = isinstance(left, int) and isinstance(right, int) and right > 0
        if ints and abs(left) > 1 and left.bit_length() * right > MAX_INT_BITS:
            raise TemplateError("chat template number is too large")
    elif operator == "%" and isinstance(left, str) and _BIG_PERCENT.search(left):
        raise TemplateError("chat template format width is too large")


def _check_call(obj: Any, args: tuple[Any, ...]) -> None:
    """Refuses string methods whose result size is given by an argument, before the call."""
    target = getattr(obj, "__wrapped__", obj)  # the sandbox wraps str.format
    owner = getattr(target, "__self__", None)
    if not isinstance(owner, str):
        return
    name = getattr(target, "__name__", "")
    first = args[0] if args else None
    if name in ("center", "ljust", "rjust", "zfill") and isinstance(first, int):
        _too_big(first)
    elif name == "expandtabs":
        _too_big(len(owner) + owner.count("\t") * (first if isinstance(first, int) else 8))
    elif name == "replace" and len(args) >= 2 and isinstance(first, str):
        grow = owner.count(first) if first else len(owner) + 1
        _too_big(len(owner) + grow * len(str(args[1])))
    elif name == "join" and isinstance(first, (list, tuple, dict, str, range)):
        _too_big(len(owner) * len(first))
    elif name in ("format", "format_map") and _BIG_FORMAT.search(owner):
        raise TemplateError("chat template format width is too large")


class _Sandbox(ImmutableSandboxedEnvironment):
    """Jinja's immutable sandbox, plus the deadline on every call, attribute and item
    access and loop step, and size checks on ``*``, ``**``, ``%`` and ``+``."""

    intercepted_binops = frozenset({"*", "**", "%", "+"})

    def call_binop(self, context: Any, operator: str, left: Any, right: Any) -> Any:
        _tick()
        _check_binop(operator, left, right)
        return _sized(super().call_binop(context, operator, left, right))

    def call(__self, __context: Any, __obj: Any, *args: Any, **kwargs: Any) -> Any:
        _tick()
        _check_call(__obj, args)
        return _sized(super().call(__context, __obj, *args, **kwargs))

    def getattr(self, obj: Any, attribute: str) -> Any:
        _tick()
        return super().getattr(obj, attribute)

    def getitem(self, obj: Any, argument: Any) -> Any:
        _tick()
        return super().getitem(obj, argument)


def _tojson(value: Any, indent: int | None = None, ensure_ascii: bool = False) -> str:
    if indent is not None and (not isinstance(indent, int) or not 0 <= indent <= 16):
        raise TemplateError("chat template tojson indent must be between 0 and 16")
    return json.dumps(value, indent=indent, ensure_ascii=ensure_ascii)


def _guarded_filters(filters: dict[str, Callable[..., Any]]) -> None:
    """Filters whose arguments set the size of the result, checked before they run."""
    center, indent, fmt = filters["center"], filters["indent"], filters["format"]

    @wraps(center)
    def checked_center(value: Any, width: int = 80) -> Any:
        if isinstance(width, int):
            _too_big(width)
        return center(value, width)

    @wraps(indent)
    def checked_indent(s: Any, width: int | str = 4, *args: Any, **kwargs: Any) -> Any:
        step = width if isinstance(width, int) else len(str(width))
        _too_big(len(str(s)) + (str(s).count("\n") + 1) * step)
        return indent(s, width, *args, **kwargs)

    @wraps(fmt)
    def checked_format(value: Any, *args: Any, **kwargs: Any) -> Any:
        if isinstance(value, str) and _BIG_PERCENT.search(value):
            raise TemplateError("chat template format width is too large")
        return fmt(value, *args, **kwargs)

    filters.update(center=checked_center, indent=checked_indent, format=checked_format)


@lru_cache(maxsize=64)
def _compile(source: str) -> Any:
    env = _Sandbox(trim_blocks=True, lstrip_blocks=True)
    env.filters["tojson"] = _tojson
    _guarded_filters(env.filters)
    env.globals["raise_exception"] = _raise
    env.globals["strftime_now"] = lambda fmt: datetime.now().strftime(fmt)
    env.globals["_ocs_ticking"] = _ticking
    env.globals["_ocs_sized"] = _sized
    try:
        tree = _Guard().visit(env.parse(source))
        return env.from_string(tree)
    except JinjaError as exc:
        raise TemplateError(f"chat template does not compile: {exc}") from None
    except (RecursionError, MemoryError):
        raise TemplateError("chat template is too deeply nested to compile") from None


def check(source: str) -> None:
    """Raises TemplateError when ``source`` is no Jinja template that compiles."""
    _compile(source)


def render(source: str, **context: Any) -> str:
    """Renders ``source`` with ``context``; stops past MAX_SECONDS or MAX_CHARS."""
    template = _compile(source)
    token = _deadline.set(time.monotonic() + MAX_SECONDS)
    pieces: list[str] = []
    size = 0
    try:
        for piece in template.generate(**context):
            pieces.append(piece)
            size += len(piece)
            _too_big(size)
            _tick()
    except TemplateError:
        raise
    except (JinjaError, TypeError, ValueError, KeyError, IndexError, AttributeError) as exc:
        raise TemplateError(f"chat template error: {exc}") from None
    except (OverflowError, ZeroDivisionError, ArithmeticError) as exc:
        raise TemplateError(f"chat template error: {exc}") from None
    except RecursionError:
        raise TemplateError("chat template recursed too deeply") from None
    except MemoryError:
        raise TemplateError("chat template ran out of memory") from None
    finally:
        _deadline.reset(token)
    return "".join(pieces)


def plain_chat(messages: list[dict[str, Any]]) -> str:
    """Fallback for models without a template: role-labelled lines and an open answer."""
    lines = [f"{m['role'].capitalize()}: {m.get('content', '')}" for m in messages]
    return "\n".join([*lines, "Assistant:"])
