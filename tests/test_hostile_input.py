"""Client input that once made a 500 (issue 17, point 4): huge integer literals, integers
too big for a float field, lone surrogates. Every one is a 400 in the route's dialect, and
the connection that sent it stays usable."""

from __future__ import annotations

import json
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import pytest

from ollama_compact_server.registry.importers import import_hf_dir
from ollama_compact_server.registry.store import Registry
from tests.conftest import serve_app
from tests.fakes import FakeEngine
from tests.reliability import record

USER = [{"role": "user", "content": "hi"}]
BIG = "9" * 5000  # more digits than Python's int-string limit (4,300)
HUGE = "1" + "0" * 400  # an integer that overflows a float

CHAT = '"messages": [{"role": "user", "content": "hi"}]'
# (path, body as JSON text with %s where a field goes, the route's float / int / duration
# fields): each hostile value in each of them must be refused with a 4xx, never a 5xx
ROUTES: list[tuple[str, str, list[str], list[str], list[str]]] = [
    (
        "/api/generate",
        '{"model": "m", "prompt": "hi", "stream": false, %s}',
        ["options.temperature", "options.top_p", "options.repeat_penalty"],
        ["options.num_predict", "options.seed", "options.num_ctx"],
        ["keep_alive"],
    ),
    (
        "/api/chat",
        '{"model": "m", "stream": false, ' + CHAT + ", %s}",
        ["options.temperature", "options.min_p"],
        ["options.top_k", "options.num_predict"],
        ["keep_alive"],
    ),
    (
        "/v1/chat/completions",
        '{"model": "m", ' + CHAT + ", %s}",
        ["temperature", "top_p", "presence_penalty", "frequency_penalty"],
        ["max_tokens", "max_completion_tokens", "seed", "n", "top_logprobs"],
        [],
    ),
    ("/v1/completions", '{"model": "m", "prompt": "hi", %s}', ["temperature"], ["max_tokens"], []),
    (
        "/v1/responses",
        '{"model": "m", "input": "hi", %s}',
        ["temperature", "top_p"],
        ["max_output_tokens"],
        [],
    ),
    (
        "/v1/messages",
        '{"model": "m", ' + CHAT + ", %s}",
        ["temperature", "top_p"],
        ["max_tokens", "top_k"],
        [],
    ),
    ("/api/embed", '{"model": "m", "input": "hi", %s}', [], ["dimensions"], ["keep_alive"]),
    ("/api/show", '{"model": "m", %s}', [], [], []),
    ("/api/create", '{"model": "n", "from": "m", %s}', ["parameters.temperature"], [], []),
]
HOSTILE_FLOATS = [HUGE, "-" + HUGE, "1e400", "-1e400", BIG]
HOSTILE_INTS = [HUGE, "-" + HUGE, BIG, "1e400", "1.5"]
HOSTILE_DURATIONS = [HUGE, "-" + HUGE, BIG, "1e400", '"' + HUGE + 's"']


def field(path: str, value: str) -> str:
    """``"a.b"`` with ``value`` as ``"a": {"b": value}``."""
    head, _, rest = path.partition(".")
    return f'"{head}": ' + ("{" + field(rest, value) + "}" if rest else value)


def bodies() -> list[tuple[str, str]]:
    out = []
    for path, form, floats, ints, durations in ROUTES:
        out.append((path, form % f'"unknown_field": {BIG}'))  # anywhere in a body
        out.append((path, form % '"unknown_field": NaN'))
        for names, values in (
            (floats, HOSTILE_FLOATS),
            (ints, HOSTILE_INTS),
            (durations, HOSTILE_DURATIONS),
        ):
            for name in names:
                out += [(path, form % field(name, value)) for value in values]
        out.append((path, form % '"x": "\\ud800"'))
    return out


BODIES_WITH_SURROGATES: dict[str, dict[str, Any]] = {
    "/api/generate": {"model": "m", "prompt": "a\ud800b", "stream": False},
    "/api/chat": {"model": "m", "messages": [{"role": "user", "content": "\ud800"}]},
    "/v1/chat/completions": {"model": "m", "messages": [{"role": "user", "content": "\udc00"}]},
    "/v1/completions": {"model": "m", "prompt": "\ud800"},
    "/api/embed": {"model": "m", "input": ["ok", "\ud800"]},
    "/v1/embeddings": {"model": "m", "input": "\ud800"},
    "/api/create": {"model": "n", "from": "m", "system": "\ud800", "template": "\ud800"},
}


@pytest.fixture
async def env(tmp_path: Path, tiny_models: dict[str, Path]) -> AsyncIterator[Any]:
    registry = Registry(tmp_path / "registry")
    import_hf_dir(registry, tiny_models["llama"], "m")
    engine = FakeEngine()
    async with serve_app(registry, engine) as served:
        yield served.raw, engine


async def post(raw: Any, path: str, content: bytes, failures: list[Any]) -> None:
    """Posts; a status outside 4xx, or an exception escaping the app, is a failure."""
    try:
        r = await raw.post(path, content=content, headers={"content-type": "application/json"})
    except Exception as exc:  # the in-process transport re-raises what the app raised
        failures.append((path, content[-60:], type(exc).__name__, str(exc)[:100]))
        return
    if not 400 <= r.status_code < 500:
        failures.append((path, content[-60:], r.status_code, r.text[:160]))


async def test_hostile_numbers_and_surrogates_are_400s(env: Any) -> None:
    raw, engine = env
    failures = []
    for path, text in bodies():
        await post(raw, path, text.encode(), failures)
    for path, body in BODIES_WITH_SURROGATES.items():
        # ensure_ascii: the surrogate travels as the escape \\ud800
        await post(raw, path, json.dumps(body).encode(), failures)
    tried = len(bodies()) + len(BODIES_WITH_SURROGATES)
    record(
        "Huge integers, overflowing floats, NaN, lone surrogates in 9 routes",
        "tests/test_hostile_input.py",
        tried,
        server_errors=len(failures),
    )
    assert not failures, "\n".join(map(repr, failures))
    assert not engine.requests


async def test_an_unexpected_error_is_a_500_that_keeps_the_connection(
    tmp_path: Path, tiny_models: dict[str, Path], monkeypatch: pytest.MonkeyPatch
) -> None:
    """The exception does not escape the app (uvicorn would then drop the keep-alive
    connection): the in-process transport re-raises anything that escapes."""

    def broken(*_: Any, **__: Any) -> Any:
        raise RuntimeError("a bug")

    registry = Registry(tmp_path / "registry")
    import_hf_dir(registry, tiny_models["llama"], "m")
    monkeypatch.setattr(Registry, "models", broken)
    async with serve_app(registry, FakeEngine()) as served:
        r = await served.raw.get("/api/tags")
        assert r.status_code == 500 and r.json() == {"error": "internal server error"}
        r = await served.raw.get("/v1/models")
        assert r.status_code == 500 and r.json()["error"]["type"] == "server_error"
        assert (await served.raw.get("/")).status_code == 200
