"""Network defaults: DNS-rebinding Host check, foreign origins, CORS, body cap, busy
answers with Retry-After, health and readiness, and no open bind without a key."""

from __future__ import annotations

import os
import subprocess
import sys
from collections.abc import AsyncIterator
from pathlib import Path

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
