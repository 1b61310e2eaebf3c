"""Network defaults: DNS-rebinding Host check, foreign origins, CORS, body cap, busy
answers with Retry-After, health and readiness, and no open bind without a key."""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import re
import subprocess
import sys
import time
from collections.abc import AsyncIterator
from pathlib import Path

import httpx
import pytest

from ollama_compact_server.api.guard import is_loopback_host
from ollama_compact_server.registry.importers import import_hf_dir
from ollama_compact_server.registry.store import Registry
from tests.conftest import serve_app
from tests.fakes import FakeEngine


@pytest.fixture
async def app_env(tmp_path: Path, tiny_models: dict[str, Path]) -> AsyncIterator[tuple]:
    registry = Registry(tmp_path / "registry")
    import_hf_dir(registry, tiny_models["llama"], "tiny")
    engine = FakeEngine()
    async with serve_app(
        registry, engine, default_model="tiny", origins="https://trusted.example"
    ) as served:
        yield served.raw, engine


@pytest.mark.parametrize(
    ("host", "ok"),
    [
        ("127.0.0.1:11434", True),
        ("localhost", True),
        ("localhost:11434", True),
        ("[::1]:11434", True),
        ("127.0.0.2", True),
        ("app.localhost:80", True),
        ("evil.example:11434", False),
        ("localhost.evil.com", False),
        (":11434", False),
        ("", False),
        ("10.0.0.5:11434", False),
    ],
)
def test_loopback_host_table(host: str, ok: bool) -> None:
    assert is_loopback_host(host) is ok


async def test_dns_rebinding_is_refused(app_env) -> None:
    client, _ = app_env
    for host in ("evil.example:11434", "localhost.evil.com", ""):
        r = await client.get("/api/tags", headers={"Host": host})
        assert r.status_code == 403, host
    assert (await client.get("/api/tags", headers={"Host": "localhost:11434"})).status_code == 200


async def test_foreign_origins_cannot_change_anything(app_env) -> None:
    client, _ = app_env
    evil = {"Origin": "https://evil.example"}
    r = await client.request("DELETE", "/api/delete", json={"model": "tiny"}, headers=evil)
    assert r.status_code == 403
    r = await client.options("/api/tags", headers={**evil, "Access-Control-Request-Method": "GET"})
    assert "access-control-allow-origin" not in r.headers
    for origin in ("http://localhost:3000", "https://trusted.example"):
        r = await client.options(
            "/api/chat", headers={"Origin": origin, "Access-Control-Request-Method": "POST"}
        )
        assert r.headers.get("access-control-allow-origin") == origin
    r = await client.post(
        "/api/copy",
        json={"source": "tiny", "destination": "t2"},
        headers={"Origin": "http://localhost:5173"},
    )
    assert r.status_code == 200


async def test_body_cap_counts_bytes_received(app_env) -> None:
    client, _ = app_env

    async def big() -> AsyncIterator[bytes]:
        for _ in range(40):
            yield b" " * (1 << 20)  # 40 MiB of whitespace, no Content-Length

    r = await client.post("/api/generate", content=big())
    assert r.status_code == 413


async def test_busy_answers_with_retry_after(app_env) -> None:
    client, engine = app_env
    engine.busy = True
    r = await client.post("/api/generate", json={"model": "tiny", "prompt": "x"})
    assert r.status_code == 503 and r.headers["retry-after"] == "1"
    r = await client.post(
        "/v1/chat/completions",
        json={"model": "tiny", "messages": [{"role": "user", "content": "x"}]},
    )
    assert r.status_code == 429 and r.headers["retry-after"] == "1"


async def test_health_and_ready(app_env, tmp_path: Path) -> None:
    client, _ = app_env
    assert (await client.get("/health")).json() == {"status": "ok"}
    assert (await client.get("/ready")).status_code == 200
    await client.request("DELETE", "/api/delete", json={"model": "tiny"})
    assert (await client.get("/ready")).status_code == 503


def test_open_bind_without_key_refuses_to_start(tmp_path: Path) -> None:
    env = {
        **os.environ,
        "OLLAMA_HOST": "0.0.0.0:11999",
        "OCS_MODELS": str(tmp_path / "m"),
        "OCS_IMPORT_DEFAULT": "false",
    }
    env.pop("OCS_API_KEY", None)
    result = subprocess.run(
        [sys.executable, "-m", "ollama_compact_server", "serve"],
        env=env,
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert result.returncode == 2 and "refusing to listen on 0.0.0.0" in result.stderr
    result = subprocess.run(
        [sys.executable, "-m", "ollama_compact_server", "serve", "--api-key", " "],
        env=env,
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert result.returncode == 2 and "OCS_API_KEY" in result.stderr


BUSY = "server busy, please try again.  maximum pending requests exceeded"


async def test_queue_limit_on_the_real_engine(tmp_path: Path, tiny_models: dict[str, Path]) -> None:
    """One slot (OCS_NUM_PARALLEL=1), a queue of 2: while a long generation holds the slot,
    a flood of both dialects gets at most 2 places; every other request is refused at once,
    Ollama's routes with 503 and Ollama's "server busy" error, OpenAI's with 429, both with
    Retry-After."""
    registry = Registry(tmp_path / "registry")
    import_hf_dir(registry, tiny_models["llama"], "tiny")
    async with serve_app(
        registry, default_model="tiny", device="cpu", num_parallel=1, max_queue=2
    ) as served:
        client, engine = served.raw, served.engine
        long = {"model": "tiny", "prompt": "hold", "stream": False}
        long["options"] = {"num_predict": 1500, "temperature": 0}
        blocker = asyncio.create_task(client.post("/api/generate", json=long))
        deadline = time.monotonic() + 30
        while engine.stats()["running"] < 1:
            assert time.monotonic() < deadline and not blocker.done()
            await asyncio.sleep(0.01)

        short = {"num_predict": 2, "temperature": 0}
        ollama_body = {"model": "tiny", "prompt": "x", "stream": False, "options": short}
        openai_body = {
            "model": "tiny",
            "messages": [{"role": "user", "content": "x"}],
            "max_tokens": 2,
            "temperature": 0,
        }

        async def timed(path: str, body: dict) -> tuple[str, httpx.Response, float]:
            started = time.monotonic()
            response = await client.post(path, json=body)
            return path, response, time.monotonic() - started

        flood = [timed("/api/generate", ollama_body) for _ in range(8)]
        flood += [timed("/api/chat", {**ollama_body, "messages": openai_body["messages"]})]
        flood += [timed("/v1/chat/completions", openai_body) for _ in range(8)]
        flood += [timed("/v1/completions", {"model": "tiny", "prompt": "x", "max_tokens": 2})]
        tasks = [asyncio.create_task(f) for f in flood]
        refused: list[tuple[str, httpx.Response, float]] = []
        while len(refused) < len(tasks) - 2:  # all but the two queued answer at once
            done = [t.result() for t in tasks if t.done()]
            refused = [(p, r, s) for p, r, s in done if r.status_code != 200]
            assert time.monotonic() < deadline, [r.status_code for _, r, _ in done]
            await asyncio.sleep(0.01)
        assert not blocker.done()  # refused while the slot was still held: no waiting
        for path, response, seconds in refused:
            assert response.headers["retry-after"] == "1", path
            assert seconds < 5, (path, seconds)
            if path.startswith("/v1/"):
                assert response.status_code == 429, path
                assert response.json()["error"]["message"] == BUSY
            else:
                assert response.status_code == 503, path
                assert response.json() == {"error": BUSY}
        assert {p.split("/")[1] for p, _, _ in refused} == {"api", "v1"}
        text = (await client.get("/metrics")).text
        assert "ocs_queue_length 2.0" in text and "ocs_running_sequences 1.0" in text
        (tokens,) = re.findall(r"^ocs_generated_tokens_total (\S+)$", text, re.M)
        assert float(tokens) > 0  # the held slot's generation, counted while it runs

        blocker.cancel()  # the client goes away: its sequence is aborted, the queue drains
        with contextlib.suppress(asyncio.CancelledError):
            await blocker
        answers = await asyncio.wait_for(asyncio.gather(*tasks), 60)
        assert [r.status_code for _, r, _ in answers].count(200) == 2
        text = (await client.get("/metrics")).text
        assert "ocs_queue_length 0.0" in text
        assert 'ocs_finished_requests_total{reason="abort"} 1.0' in text


async def test_dead_engine_loop_fails_health_and_requests_at_once(
    tmp_path: Path, tiny_models: dict[str, Path]
) -> None:
    """If the device loop dies, /health and /ready answer 503, the request it was running
    ends with an error instead of hanging, and new requests get 503 at once."""
    registry = Registry(tmp_path / "registry")
    import_hf_dir(registry, tiny_models["llama"], "tiny")
    async with serve_app(registry, default_model="tiny", device="cpu") as served:
        client, loop = served.raw, served.engine.device_loop
        assert (await client.get("/health")).status_code == 200
        assert (await client.get("/ready")).status_code == 200
        body = {"model": "tiny", "prompt": "x", "options": {"num_predict": 1500, "temperature": 0}}
        running = asyncio.create_task(client.post("/api/generate", json=body))
        deadline = time.monotonic() + 30
        while served.engine.stats()["running"] < 1:
            assert time.monotonic() < deadline and not running.done()
            await asyncio.sleep(0.01)

        def broken() -> bool:
            raise RuntimeError("injected engine failure")

        loop.step = broken  # the next iteration of the loop raises
        loop.thread.join(10)
        assert not loop.thread.is_alive() and loop.crashed is not None
        r = await client.get("/health")
        assert r.status_code == 503 and r.json() == {"status": "engine down"}
        assert (await client.head("/health")).status_code == 503
        assert (await client.get("/ready")).status_code == 503
        lines = (await asyncio.wait_for(running, 10)).text.splitlines()
        assert "error" in json.loads(lines[-1])  # ended in-band, did not hang
        started = time.monotonic()
        r = await client.post("/api/generate", json={**body, "stream": False})
        assert r.status_code == 503 and r.json() == {"error": "the engine is not running"}
        chat = {"model": "tiny", "messages": [{"role": "user", "content": "x"}]}
        r = await client.post("/v1/chat/completions", json=chat)
        assert r.status_code == 503 and "not running" in r.json()["error"]["message"]
        assert time.monotonic() - started < 5


async def test_too_many_messages_is_400_before_any_work(app_env) -> None:
    from ollama_compact_server.chat.service import MAX_MESSAGES

    client, engine = app_env
    messages = [{"role": "user", "content": "x"}] * (MAX_MESSAGES + 1)
    r = await client.post("/api/chat", json={"model": "tiny", "messages": messages})
    assert r.status_code == 400 and "too many messages" in r.json()["error"]
    r = await client.post("/v1/chat/completions", json={"model": "tiny", "messages": messages})
    assert r.status_code == 400 and "too many messages" in r.json()["error"]["message"]
    assert engine.requests == []
    r = await client.post(
        "/api/chat", json={"model": "tiny", "messages": messages[:MAX_MESSAGES], "stream": False}
    )
    # as many as allowed pass that check; together they are longer than the tiny model's
    # context, which is refused next, before any tokenizing (or any engine work)
    assert r.status_code == 400 and "context" in r.json()["error"], r.text
    assert engine.requests == []
    r = await client.post(
        "/api/chat", json={"model": "tiny", "messages": messages[:50], "stream": False}
    )
    assert r.status_code == 200


def test_insecure_flag_gets_past_the_open_bind_check(tmp_path: Path) -> None:
    """OCS_INSECURE_NO_AUTH=true lets the daemon bind 0.0.0.0 without a key: it goes on to
    prepare the registry (here a path inside a file, so it stops there with exit 1, not with
    the bind refusal's exit 2)."""
    not_a_folder = tmp_path / "file"
    not_a_folder.write_text("")
    env = {
        **os.environ,
        "OLLAMA_HOST": "0.0.0.0:11999",
        "OCS_MODELS": str(not_a_folder / "models"),
        "OCS_IMPORT_DEFAULT": "false",
        "OCS_INSECURE_NO_AUTH": "true",
    }
    env.pop("OCS_API_KEY", None)
    result = subprocess.run(
        [sys.executable, "-m", "ollama_compact_server", "serve"],
        env=env,
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert "refusing to listen" not in result.stderr
    assert result.returncode == 1 and "cannot prepare the registry" in result.stderr


def test_host_check_policies() -> None:
    from ollama_compact_server.api.guard import HostCheck

    loopback = HostCheck(frozenset({"proxy.lan"}))
    wide = HostCheck(frozenset({"ollama-compact"}), any_ip=True)
    for host in ("localhost:11434", "127.0.0.1", "[::1]:11434", "app.localhost"):
        assert loopback.allows(host) and wide.allows(host), host
    assert loopback.allows("proxy.lan:80") and loopback.allows("PROXY.LAN")
    for host in ("evil.example", "localhost.evil.com:11434", "", ":11434", "ollama-compact"):
        assert not loopback.allows(host), host
    for host in ("ollama-compact:11434", "172.18.0.2:11434", "[fd00::2]:11434", "10.0.0.5"):
        assert wide.allows(host) and not loopback.allows(host), host
    for host in ("evil.example:11434", "ollama-compact.evil.com", "", ":11434", "1.2.3.4.nip.io"):
        assert not wide.allows(host), host


@pytest.mark.parametrize(
    ("options", "host", "status"),
    [
        # the container: all interfaces, no key (compose sets OCS_INSECURE_NO_AUTH)
        ({}, "evil.example:11434", 403),
        ({}, "", 403),
        ({}, "127.0.0.1:11434", 200),  # the published port and the health check
        ({}, "localhost:11434", 200),
        ({}, "172.18.0.2:11434", 200),  # by address, from another container
        ({}, "@hostname", 200),  # by the container's own name (compose sets it)
        ({}, "ocs.internal:11434", 403),
        ({"allowed_hosts": "ocs.internal, other"}, "ocs.internal:11434", 200),
        # with a key the key guards every route and the Host check is off
        ({"api_key": "k"}, "evil.example:11434", 200),
    ],
)
async def test_host_check_without_a_key_on_a_wide_bind(
    tmp_path: Path, options: dict, host: str, status: int
) -> None:
    import socket

    from asgi_lifespan import LifespanManager

    from ollama_compact_server.app import create_app
    from ollama_compact_server.settings import Settings

    settings = Settings(
        models=tmp_path / "r",
        adapters=None,
        import_default=False,
        host="0.0.0.0:11434",
        insecure_no_auth=True,
        **options,
    )
    app = create_app(settings, engine=FakeEngine())
    headers = {"Host": socket.gethostname() if host == "@hostname" else host}
    if "api_key" in options:
        headers["Authorization"] = "Bearer k"
    async with LifespanManager(app):
        transport = httpx.ASGITransport(app=app)
        async with httpx.AsyncClient(transport=transport, base_url="http://127.0.0.1") as c:
            assert (await c.get("/api/tags", headers=headers)).status_code == status
            # the probe too: the Host check stands in front of every route
            assert (await c.get("/health", headers=headers)).status_code == status
