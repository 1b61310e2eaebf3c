"""Read deadlines and a connection limit (issue 17, point 5), over real uvicorn on
loopback with the daemon's own protocol: a client trickling headers or a body is cut off
with a 408, and past the connection limit requests get a 503 at once."""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import pytest

from ollama_compact_server import protocol
from ollama_compact_server.app import create_app
from ollama_compact_server.registry.store import Registry
from ollama_compact_server.settings import Settings
from tests.conftest import running_server
from tests.fakes import FakeEngine
from tests.reliability import record

HEADER_TIMEOUT = 0.6
SLOW = "Slow clients: silent, headers or body trickled"


@pytest.fixture
async def port(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> AsyncIterator[int]:
    monkeypatch.setattr(protocol, "BODY_GRACE", 1.0)
    monkeypatch.setattr(protocol, "CHECK_EVERY", 0.2)
    registry = Registry(tmp_path / "registry")
    settings = Settings(
        models=registry.root,
        adapters=None,
        import_default=False,
        header_timeout=HEADER_TIMEOUT,
        max_connections=4,
    )
    app = create_app(settings, registry=registry, engine=FakeEngine())
    async with running_server(app, settings) as number:
        yield number


async def until_closed(reader: asyncio.StreamReader, limit: float = 10.0) -> tuple[bytes, float]:
    start = time.monotonic()
    data = await asyncio.wait_for(reader.read(), limit)
    return data, time.monotonic() - start


async def trickle(writer: asyncio.StreamWriter, pieces: list[bytes], every: float) -> None:
    for piece in pieces:
        try:
            writer.write(piece)
            await writer.drain()
        except ConnectionError:
            return
        await asyncio.sleep(every)


async def test_headers_sent_slowly_get_a_408(port: int) -> None:
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    lines = [b"GET /api/version HTTP/1.1\r\n"] + [b"x-pad: %d\r\n" % i for i in range(100)]
    sender = asyncio.create_task(trickle(writer, lines, 0.1))
    data, took = await until_closed(reader)
    sender.cancel()
    assert data.startswith(b"HTTP/1.1 408") and took < HEADER_TIMEOUT + 2, (data, took)
    record(SLOW, "tests/test_connections.py", 1)


async def test_a_silent_connection_is_closed(port: int) -> None:
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    data, took = await until_closed(reader)
    assert data.startswith(b"HTTP/1.1 408") and took < HEADER_TIMEOUT + 2
    writer.close()
    record(SLOW, "tests/test_connections.py", 1)


async def test_a_trickled_body_is_cut_off(port: int) -> None:
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    head = b"POST /api/show HTTP/1.1\r\nhost: 127.0.0.1\r\ncontent-length: 1000\r\n\r\n"
    sender = asyncio.create_task(trickle(writer, [head] + [b" "] * 999, 0.1))
    data, took = await until_closed(reader)
    sender.cancel()
    assert b"408" in data.split(b"\r\n", 1)[0] and took < 5, (data[:200], took)
    record(SLOW, "tests/test_connections.py", 1)


async def test_normal_requests_keep_their_connection(port: int) -> None:
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    for _ in range(3):
        writer.write(b"GET /api/version HTTP/1.1\r\nhost: 127.0.0.1\r\n\r\n")
        await writer.drain()
        head = await asyncio.wait_for(reader.readuntil(b"\r\n\r\n"), 5)
        assert head.startswith(b"HTTP/1.1 200")
        length = int(
            next(h for h in head.split(b"\r\n") if h.lower().startswith(b"content-len")).split(
                b":"
            )[1]
        )
        await reader.readexactly(length)
        await asyncio.sleep(HEADER_TIMEOUT * 1.5)  # idle between requests: keep-alive bounds it
    writer.close()


async def test_past_the_connection_limit_requests_get_a_503(port: int) -> None:
    idle: list[Any] = [await asyncio.open_connection("127.0.0.1", port) for _ in range(4)]
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    writer.write(b"GET /api/version HTTP/1.1\r\nhost: 127.0.0.1\r\n\r\n")
    await writer.drain()
    head = await asyncio.wait_for(reader.readuntil(b"\r\n\r\n"), 5)
    assert head.startswith(b"HTTP/1.1 503"), head
    for _, w in idle:
        w.close()
    writer.close()
