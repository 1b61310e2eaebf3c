"""Every known request field of both dialects, posted with wrong types: a 4xx in the
dialect's error shape, never a 5xx, and no engine work started for a request refused."""

from __future__ import annotations

from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import pytest

from ollama_compact_server.registry.importers import import_hf_dir
from ollama_compact_server.registry.store import Registry
from tests.conftest import serve_app
from tests.fakes import FakeEngine

# mentions tools and enable_thinking: the model has both capabilities, so tool definitions
# and think levels reach the code past the capability checks
TEMPLATE = (
    "{% if tools %}Tools: {{ tools | tojson }}\n{% endif %}"
    "{% for m in messages %}<start_of_turn>{{ m['role'] }}\n{{ m['content'] }}"
    "<end_of_turn>\n{% endfor %}<start_of_turn>model\n"
    "{% if enable_thinking is defined and not enable_thinking %}<think></think>{% endif %}"
)
USER = [{"role": "user", "content": "hi"}]
TOOL = {"type": "function", "function": {"name": "f", "parameters": {"type": "object"}}}

# values of the wrong JSON type for each kind of field
NOT_STR: list[Any] = [1, 2.5, True, [], ["x"], {}, {"a": 1}]
NOT_BOOL: list[Any] = ["x", "true", 1, 2.5, [], {}]
NOT_INT: list[Any] = ["x", "1", 2.5, True, [], {}]
NOT_NUM: list[Any] = ["x", "1", True, [], {}]
NOT_OBJ: list[Any] = ["x", 1, True, [], [1]]
NOT_LIST: list[Any] = ["x", 1, True, {}, {"a": 1}]
NOT_DURATION: list[Any] = [True, [], {}, {"a": 1}, "x", "300"]
MESSAGES_BAD: list[Any] = [
    *NOT_LIST,
    [1],
    ["x"],
    [None],
    [[]],
    [{"role": 1, "content": "x"}],
    [{"role": "user", "content": 1}],
    [{"role": "user", "content": {"a": 1}}],
    [{"role": "assistant", "content": "", "tool_calls": "x"}],
    [{"role": "assistant", "content": "", "tool_calls": [1]}],
    [{"role": "assistant", "content": "", "tool_calls": [{"function": "x"}]}],
    [{"role": "assistant", "content": "", "tool_calls": [{"function": {"name": 1}}]}],
    [{"role": "tool", "content": "x", "tool_call_id": 1}],
    [{"role": "user", "content": "x", "name": 1}],
]
OLLAMA_MESSAGES_BAD: list[Any] = [
    *MESSAGES_BAD,
    [{"role": "user", "content": "x", "images": "x"}],
    [{"role": "user", "content": "x", "images": [1]}],
    [{"role": "user", "content": "x", "thinking": 1}],
]
OPENAI_MESSAGES_BAD: list[Any] = [
    *MESSAGES_BAD,
    [{"role": "user", "content": [1]}],
    [{"role": "user", "content": [{"type": "text", "text": 1}]}],
    [{"role": "user", "content": [{"type": 1}]}],
]
TOOLS_BAD: list[Any] = [
    "x",
    1,
    True,
    {"a": 1},
    [1],
    ["x"],
    [{"type": "function"}],
    [{"type": "function", "function": "x"}],
    [{"type": "function", "function": {"name": 1}}],
    [{"type": "function", "function": {"name": "f", "parameters": "x"}}],
    [{"type": "function", "function": {"name": "f", "description": 1}}],
    [{"type": 1, "function": {"name": "f"}}],
]
FORMAT_BAD: list[Any] = [1, True, [], ["json"], "yaml"]
THINK_BAD: list[Any] = [1, 2.5, [], {}, "loud"]
OPTIONS_BAD: list[Any] = [
    *NOT_OBJ,
    {"temperature": "x"},
    {"temperature": [1]},
    {"top_k": 1.5},
    {"top_k": "1"},
    {"seed": True},
    {"num_predict": {}},
    {"stop": 1},
    {"stop": [1]},
    {"stop": {"a": 1}},
    {"num_ctx": "x"},
]
LOGIT_BIAS_BAD: list[Any] = [
    "x",
    1,
    [],
    [1],
    {"x": 1},
    {"1.5": 1},
    {"-1": 1},
    {"1": "x"},
    {"1": [1]},
    {"1": True},
    {"1": None},
]
RESPONSE_FORMAT_BAD: list[Any] = [
    "x",
    "json_object",
    1,
    True,
    [],
    {"type": 1},
    {"type": "json_schema"},
    {"type": "json_schema", "json_schema": "x"},
    {"type": "json_schema", "json_schema": {"schema": "x"}},
]
STREAM_OPTIONS_BAD: list[Any] = ["x", 1, True, [], [1], {"include_usage": "x"}]
STOP_BAD: list[Any] = [1, True, {}, [1], [None], [["x"]]]

GENERATE: dict[str, list[Any]] = {
    "model": [1, True, [], {}],
    "prompt": NOT_STR,
    "suffix": NOT_STR,
    "system": NOT_STR,
    "template": NOT_STR,
    "images": ["x", 1, {}, [1], [{}]],
    "format": FORMAT_BAD,
    "options": OPTIONS_BAD,
    "context": ["x", 1, {}, ["a"], [1.5], [True], [-1], [2**70]],
    "stream": NOT_BOOL,
    "raw": NOT_BOOL,
    "keep_alive": NOT_DURATION,
    "think": THINK_BAD,
    "logprobs": NOT_BOOL,
    "top_logprobs": NOT_INT,
}
CHAT: dict[str, list[Any]] = {
    "model": [1, True, [], {}],
    "messages": OLLAMA_MESSAGES_BAD,
    "tools": TOOLS_BAD,
    "format": FORMAT_BAD,
    "options": OPTIONS_BAD,
    "stream": NOT_BOOL,
    "keep_alive": NOT_DURATION,
    "think": THINK_BAD,
    "logprobs": NOT_BOOL,
    "top_logprobs": NOT_INT,
}
EMBED: dict[str, list[Any]] = {
    "model": [1, True, [], {}],
    "input": [1, True, {}, [1.5], [None], [["x"]]],
    "truncate": NOT_BOOL,
    "options": OPTIONS_BAD,
    "keep_alive": NOT_DURATION,
    "dimensions": [*NOT_INT, 0, -1],
}
EMBEDDINGS: dict[str, list[Any]] = {
    "model": [1, True, [], {}],
    "prompt": NOT_STR,
    "options": OPTIONS_BAD,
    "keep_alive": NOT_DURATION,
}
SAMPLING: dict[str, list[Any]] = {
    "model": [1, True, [], {}],
    "max_tokens": NOT_INT,
    "temperature": NOT_NUM,
    "top_p": NOT_NUM,
    "n": NOT_INT,
    "stop": STOP_BAD,
    "seed": NOT_INT,
    "presence_penalty": NOT_NUM,
    "frequency_penalty": NOT_NUM,
    "logit_bias": LOGIT_BIAS_BAD,
    "user": NOT_STR,
    "stream": NOT_BOOL,
    "stream_options": STREAM_OPTIONS_BAD,
}
CHAT_COMPLETIONS: dict[str, list[Any]] = {
    **SAMPLING,
    "messages": OPENAI_MESSAGES_BAD,
    "max_completion_tokens": NOT_INT,
    "logprobs": NOT_BOOL,
    "top_logprobs": NOT_INT,
    "response_format": RESPONSE_FORMAT_BAD,
    "tools": TOOLS_BAD,
    "tool_choice": [1, True, [], {"type": 1}],
    "reasoning_effort": [1, True, [], {}, "loud"],
    "parallel_tool_calls": NOT_BOOL,
}
COMPLETIONS: dict[str, list[Any]] = {
    **SAMPLING,
    "prompt": [1, True, {}, [1.5], [None], [["x"]], [{}]],
    "logprobs": [*NOT_INT, -1, 50],
    "echo": NOT_BOOL,
    "suffix": NOT_STR,
    "best_of": NOT_INT,
}
OPENAI_EMBEDDINGS: dict[str, list[Any]] = {
    "model": [1, True, [], {}],
    "input": [1, True, {}, [1.5], [None], [["x"]], [[1.5]], [[True]], [[-1]]],
    "encoding_format": [1, True, [], {}, "hex"],
    "dimensions": [*NOT_INT, 0, -1],
    "user": NOT_STR,
}

SHOW: dict[str, list[Any]] = {
    "model": [1, True, [], {}],
    "system": NOT_STR,
    "template": NOT_STR,
    "options": NOT_OBJ,
    "verbose": NOT_BOOL,
}

ROUTES: list[tuple[str, dict[str, Any], dict[str, list[Any]]]] = [
    ("/api/show", {"model": "m"}, SHOW),
    # an empty prompt or messages only loads the model: its fields are checked all the same
    ("/api/generate", {"model": "m"}, {"options": OPTIONS_BAD, "think": THINK_BAD}),
    ("/api/chat", {"model": "m"}, {"options": OPTIONS_BAD, "tools": TOOLS_BAD, "think": THINK_BAD}),
    ("/api/generate", {"model": "m", "prompt": "hi"}, GENERATE),
    ("/api/chat", {"model": "m", "messages": USER, "tools": [TOOL]}, CHAT),
    ("/api/embed", {"model": "m", "input": "hi"}, EMBED),
    ("/api/embeddings", {"model": "m", "prompt": "hi"}, EMBEDDINGS),
    ("/v1/chat/completions", {"model": "m", "messages": USER, "tools": [TOOL]}, CHAT_COMPLETIONS),
    ("/v1/completions", {"model": "m", "prompt": "hi"}, COMPLETIONS),
    ("/v1/embeddings", {"model": "m", "input": "hi"}, OPENAI_EMBEDDINGS),
]


def cases() -> list[Any]:
    out = []
    for path, base, fields in ROUTES:
        for field, values in fields.items():
            out.append(pytest.param(path, base, field, values, id=f"{path}:{field}"))
    return out


@pytest.fixture
async def env(tmp_path: Path, tiny_models: dict[str, Path]) -> AsyncIterator[tuple]:
    registry = Registry(tmp_path / "registry")
    import_hf_dir(registry, tiny_models["llama"], "m", template=TEMPLATE)
    engine = FakeEngine()
    async with serve_app(registry, engine) as served:
        yield served.raw, engine


async def test_the_valid_bases_succeed(env) -> None:
    raw, _ = env
    for path, base, _ in ROUTES:
        r = await raw.post(path, json={**base, "stream": False})
        assert r.status_code == 200, (path, r.text[:300])


async def test_wrong_types_are_4xx_for_every_field(env) -> None:
    """One app for the whole table (starting an app per case would be slow)."""
    raw, engine = env
    failures = []
    for path, base, fields in ROUTES:
        for field, values in fields.items():
            for value in values:
                body = {**base, field: value}
                before = len(engine.requests)
                r = await raw.post(path, json=body)
                error = (
                    r.json().get("error")
                    if r.headers.get("content-type", "").startswith("application/json")
                    else None
                )
                ok = 400 <= r.status_code < 500 and error is not None
                if ok and path.startswith("/v1/"):
                    ok = isinstance(error, dict) and set(error) == {
                        "message",
                        "type",
                        "param",
                        "code",
                    }
                if ok and len(engine.requests) != before:
                    ok = False  # refused, yet the engine was asked to generate
                if not ok:
                    failures.append((path, field, value, r.status_code, r.text[:120]))
    assert not failures, "\n".join(map(repr, failures))
    assert (await raw.get("/")).status_code == 200
