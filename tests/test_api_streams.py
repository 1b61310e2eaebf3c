"""Stream framing and failure paths of both dialects against a fake engine: in-band errors
after the first byte, 503 before it, and abort when the client leaves."""

from __future__ import annotations

import json
from collections.abc import AsyncIterator
from pathlib import Path

import pytest

from ollama_compact_server.registry.importers import import_hf_dir
from ollama_compact_server.registry.store import Registry
from tests.conftest import serve_app
from tests.fakes import FakeEngine


@pytest.fixture
async def fake(tmp_path: Path, tiny_models: dict[str, Path]) -> AsyncIterator[tuple]:
    registry = Registry(tmp_path / "registry")
    import_hf_dir(registry, tiny_models["llama"], "tiny")
    engine = FakeEngine()
    async with serve_app(registry, engine) as served:
        yield served.raw, engine


async def test_ndjson_stream_and_in_band_error(fake) -> None:
    client, engine = fake
    async with client.stream("POST", "/api/generate", json={"model": "tiny", "prompt": "hi"}) as r:
        lines = [json.loads(line) async for line in r.aiter_lines()]
    assert "".join(item.get("response", "") for item in lines) == "one two three"
    assert lines[-1]["done"] and lines[-1]["done_reason"] == "stop"
    engine.fail_after = 2
    async with client.stream(
        "POST", "/api/chat", json={"model": "tiny", "messages": [{"role": "user", "content": "x"}]}
    ) as r:
        assert r.status_code == 200
        lines = [json.loads(line) async for line in r.aiter_lines()]
    assert lines[-1] == {"error": "injected failure"}


async def test_sse_stream_error_frame_then_done(fake) -> None:
    client, engine = fake
    engine.fail_after = 1
    body = {"model": "tiny", "messages": [{"role": "user", "content": "x"}], "stream": True}
    async with client.stream("POST", "/v1/chat/completions", json=body) as r:
        data = [line[6:] async for line in r.aiter_lines() if line.startswith("data: ")]
    assert data[-1] == "[DONE]"
    assert json.loads(data[-2])["error"]["message"] == "injected failure"


async def test_busy_engine_answers_before_streaming(fake) -> None:
    client, engine = fake
    engine.busy = True
    r = await client.post("/api/generate", json={"model": "tiny", "prompt": "hi"})
    assert r.status_code == 503 and "server busy" in r.json()["error"]
    r = await client.post(
        "/v1/chat/completions",
        json={"model": "tiny", "messages": [{"role": "user", "content": "x"}]},
    )
    assert r.status_code == 429 and r.json()["error"]["type"] == "rate_limit_error"


async def test_non_streaming_error_is_a_real_status(fake) -> None:
    client, engine = fake
    engine.fail_after = 1
    r = await client.post("/api/generate", json={"model": "tiny", "prompt": "hi", "stream": False})
    assert r.status_code == 500 and r.json() == {"error": "injected failure"}


def test_stream_lines_survive_splitlines() -> None:
    """The ollama and openai Python clients split streams with httpx's aiter_lines, which
    splits like str.splitlines: U+2028, U+2029 and NEL inside generated text must not be
    sent raw (a tiny model emitted one during the 2-minute load test)."""
    import json as json_module

    from ollama_compact_server.api.streaming import stream_json

    item = {"message": {"content": "a\u2028b\u2029c\x85d\ne"}}
    line = stream_json(item)
    assert line.splitlines() == [line]
    assert json_module.loads(line) == item


async def test_a_failed_choice_aborts_the_other_choices(fake) -> None:
    """n=2 without streaming: the first choice fails, so the answer is a 500 and the
    second choice, still running, is aborted rather than left to the garbage collector."""
    client, engine = fake
    engine.fail_after, engine.fail_only = 1, 0
    engine.script = ["w"] * 10_000
    body = {"model": "tiny", "messages": [{"role": "user", "content": "x"}], "n": 2}
    r = await client.post("/v1/chat/completions", json=body)
    assert r.status_code == 500 and r.json()["error"]["message"] == "injected failure"
    assert len(engine.requests) == 2
    assert engine.requests[1].request_id in engine.aborted


async def test_stream_options_of_the_wrong_type_start_nothing(fake) -> None:
    """Once a 500 (AttributeError) after the engine streams had started."""
    client, engine = fake
    user = [{"role": "user", "content": "x"}]
    for path, base in (
        ("/v1/chat/completions", {"messages": user}),
        ("/v1/completions", {"prompt": "x"}),
    ):
        for options in ("x", [1], 1, {"include_usage": "yes"}):
            body = {"model": "tiny", **base, "stream": True, "stream_options": options, "n": 2}
            r = await client.post(path, json=body)
            assert r.status_code == 400, (path, options, r.text)
            assert set(r.json()["error"]) == {"message", "type", "param", "code"}
    assert engine.requests == []
