"""Graceful shutdown in process (GracefulServer on a loopback port; the signal is delivered
by calling its handler): running Ollama and OpenAI streams finish after SIGTERM, no new
connection is accepted, and streams still running at the timeout end with an in-band error
in their dialect instead of a cut connection."""

from __future__ import annotations

import asyncio
import json
import signal
import time
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import httpx
import pytest
import uvicorn

from ollama_compact_server.app import create_app
from ollama_compact_server.engine.types import FinishReason, GenerateRequest, TokenEvent
from ollama_compact_server.registry.importers import import_hf_dir
from ollama_compact_server.registry.store import Registry
from ollama_compact_server.server import GracefulServer, close_engine
from ollama_compact_server.settings import Settings
from tests.conftest import free_port
from tests.fakes import FakeEngine


class SlowEngine(FakeEngine):
    """One word every ``delay`` seconds; ``close`` ends running streams as the real engine
    does (an ABORT event with "the server is shutting down")."""

    def __init__(self, words: int, delay: float) -> None:
        super().__init__(" ".join(f"w{i}" for i in range(words)))
        self.delay = delay
        self.closed = asyncio.Event()

    async def generate(self, request: GenerateRequest) -> AsyncIterator[TokenEvent]:
        for i, word in enumerate(self.script):
            if self.closed.is_set():
                yield TokenEvent(
                    finish_reason=FinishReason.ABORT, error="the server is shutting down"
                )
                return
            await asyncio.sleep(self.delay)
            yield TokenEvent(text=(" " if i else "") + word, token_ids=[i + 10])
        yield TokenEvent(finish_reason=FinishReason.STOP, completion_tokens=len(self.script))

    def close(self) -> None:
        self.closed.set()


async def start(app: Any, drain_timeout: float) -> tuple[GracefulServer, asyncio.Task, str]:
    port = free_port()
    config = uvicorn.Config(app, host="127.0.0.1", port=port, log_config=None, lifespan="on")
    server = GracefulServer(config, drain_timeout, on_timeout=lambda: close_engine(app))
    task = asyncio.create_task(server.serve())
    deadline = time.monotonic() + 30
    while not server.started:
        assert not task.done() and time.monotonic() < deadline
        await asyncio.sleep(0.02)
    return server, task, f"http://127.0.0.1:{port}"


async def ollama_stream(url: str, tokens: int, first: asyncio.Event) -> list[dict[str, Any]]:
    body = {
        "model": "tiny",
        "messages": [{"role": "user", "content": "hello"}],
        "options": {"num_predict": tokens, "temperature": 0},
    }
    items: list[dict[str, Any]] = []
    async with (
        httpx.AsyncClient(timeout=60) as http,
        http.stream("POST", url + "/api/chat", json=body) as response,
    ):
        async for line in response.aiter_lines():
            items.append(json.loads(line))
            first.set()
    return items


async def openai_stream(url: str, tokens: int, first: asyncio.Event) -> list[Any]:
    body = {
        "model": "tiny",
        "messages": [{"role": "user", "content": "hello"}],
        "max_tokens": tokens,
        "temperature": 0,
        "stream": True,
    }
    items: list[Any] = []
    async with (
        httpx.AsyncClient(timeout=60) as http,
        http.stream("POST", url + "/v1/chat/completions", json=body) as response,
    ):
        async for line in response.aiter_lines():
            if line.startswith("data: "):
                data = line[len("data: ") :]
                items.append(data if data == "[DONE]" else json.loads(data))
                first.set()
    return items


async def refused(url: str) -> bool:
    try:
        async with httpx.AsyncClient(timeout=2) as http:
            await http.get(url + "/")
    except httpx.HTTPError:
        return True
    return False


@pytest.fixture
def registry(tmp_path: Path, tiny_models: dict[str, Path]) -> Registry:
    registry = Registry(tmp_path / "registry")
    import_hf_dir(registry, tiny_models["llama"], "tiny")
    return registry


def settings_for(registry: Registry) -> Settings:
    return Settings(
        models=registry.root, adapters=None, import_default=False, dtype="float32", device="cpu"
    )


async def test_running_streams_of_both_dialects_finish_after_sigterm(registry: Registry) -> None:
    app = create_app(settings_for(registry), registry=registry)
    server, task, url = await start(app, drain_timeout=30)
    started = [asyncio.Event(), asyncio.Event()]
    tokens = 300
    streams = [
        asyncio.create_task(ollama_stream(url, tokens, started[0])),
        asyncio.create_task(openai_stream(url, tokens, started[1])),
    ]
    await asyncio.wait_for(asyncio.gather(*(e.wait() for e in started)), 60)
    assert not any(s.done() for s in streams)  # both mid-stream when the signal arrives
    server.handle_exit(signal.SIGTERM, None)
    await asyncio.sleep(0.3)
    assert await refused(url)  # no new connections
    ollama, openai = await asyncio.wait_for(asyncio.gather(*streams), 60)
    await asyncio.wait_for(task, 30)
    assert ollama[-1]["done"] is True and "error" not in ollama[-1]
    assert ollama[-1]["done_reason"] == "stop" or ollama[-1]["eval_count"] == tokens
    assert openai[-1] == "[DONE]"
    finish = [c["choices"][0]["finish_reason"] for c in openai[:-1] if c["choices"]][-1]
    assert finish in ("stop", "length") and not any("error" in c for c in openai[:-1])


async def test_streams_past_the_timeout_end_with_an_in_band_error(registry: Registry) -> None:
    engine = SlowEngine(words=400, delay=0.02)  # 8 s per stream: far past the drain timeout
    app = create_app(settings_for(registry), registry=registry, engine=engine)
    server, task, url = await start(app, drain_timeout=0.5)
    started = [asyncio.Event(), asyncio.Event()]
    streams = [
        asyncio.create_task(ollama_stream(url, 400, started[0])),
        asyncio.create_task(openai_stream(url, 400, started[1])),
    ]
    await asyncio.wait_for(asyncio.gather(*(e.wait() for e in started)), 30)
    began = time.monotonic()
    server.handle_exit(signal.SIGTERM, None)
    ollama, openai = await asyncio.wait_for(asyncio.gather(*streams), 30)
    await asyncio.wait_for(task, 30)
    assert time.monotonic() - began < 5
    assert engine.closed.is_set()
    assert ollama[-1] == {"error": "the server is shutting down"}
    assert openai[-1] == "[DONE]"
    assert "shutting down" in openai[-2]["error"]["message"]


async def test_an_idle_server_stops_at_once(registry: Registry) -> None:
    app = create_app(settings_for(registry), registry=registry, engine=FakeEngine())
    server, task, _ = await start(app, drain_timeout=30)
    began = time.monotonic()
    server.handle_exit(signal.SIGTERM, None)
    await asyncio.wait_for(task, 10)
    assert time.monotonic() - began < 2


async def test_new_requests_while_draining_get_503_in_their_dialect(registry: Registry) -> None:
    from asgi_lifespan import LifespanManager

    settings = Settings(models=registry.root, adapters=None, import_default=False)
    app = create_app(settings, registry=registry, engine=FakeEngine())
    async with LifespanManager(app):
        transport = httpx.ASGITransport(app=app)
        async with httpx.AsyncClient(transport=transport, base_url="http://127.0.0.1") as raw:
            app.state.draining = True  # what GracefulServer sets when SIGTERM arrives
            r = await raw.get("/api/tags")
            assert r.status_code == 503 and r.json() == {"error": "the server is shutting down"}
            assert r.headers["connection"] == "close" and r.headers["retry-after"] == "1"
            r = await raw.post("/v1/chat/completions", json={})
            assert r.status_code == 503 and r.json()["error"]["type"] == "server_error"
            app.state.draining = False
            assert (await raw.get("/api/tags")).status_code == 200


class CountingEngine(SlowEngine):
    """SlowEngine that records the requests whose stream was closed before its end."""

    def __init__(self, words: int, delay: float) -> None:
        super().__init__(words, delay)
        self.abandoned: list[str] = []

    async def generate(self, request: GenerateRequest) -> AsyncIterator[TokenEvent]:
        finished = False
        try:
            async for event in super().generate(request):
                finished = event.finish_reason is not None
                yield event
        finally:
            if not finished:
                self.abandoned.append(request.request_id)


async def test_a_client_that_hangs_up_aborts_its_request_in_every_dialect(
    registry: Registry,
) -> None:
    engine = CountingEngine(words=2000, delay=0.01)  # 20 s per stream unless abandoned
    app = create_app(settings_for(registry), registry=registry, engine=engine)
    server, task, url = await start(app, drain_timeout=5)
    ask = [{"role": "user", "content": "hello"}]
    requests = [
        ("/api/chat", {"model": "tiny", "messages": ask}),
        ("/v1/chat/completions", {"model": "tiny", "messages": ask, "stream": True}),
        ("/v1/responses", {"model": "tiny", "input": "hello", "stream": True}),
        ("/v1/messages", {"model": "tiny", "max_tokens": 4000, "messages": ask, "stream": True}),
    ]
    try:
        for number, (path, body) in enumerate(requests, start=1):
            async with (
                httpx.AsyncClient(timeout=30) as http,
                http.stream("POST", url + path, json=body) as response,
            ):
                assert response.status_code == 200
                async for _ in response.aiter_bytes():
                    break  # the first bytes arrived: hang up
            deadline = time.monotonic() + 5
            while len(engine.abandoned) < number:
                assert time.monotonic() < deadline, (path, engine.abandoned)
                await asyncio.sleep(0.05)
    finally:
        server.handle_exit(signal.SIGTERM, None)
        await asyncio.wait_for(task, 30)
