"""Load: 64 concurrent streaming clients against the real daemon in process (uvicorn on a
loopback port, the engine app.py builds, a tiny model), half Ollama /api/chat NDJSON and half
OpenAI /v1/chat/completions SSE, a quarter of them hanging up early. Every finished stream is
well-formed and complete, every abandoned one is aborted in the engine, nothing is logged as
an error, and the daemon answers normally afterwards."""

from __future__ import annotations

import asyncio
import json
import logging
import os
import time
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import httpx
import pytest

from ollama_compact_server.app import create_app
from ollama_compact_server.jobs.importing import import_path
from ollama_compact_server.registry.importers import import_hf_dir
from ollama_compact_server.registry.store import Registry
from ollama_compact_server.settings import Settings
from tests.conftest import running_server
from tests.reliability import record

CLIENTS = 64
NEW_TOKENS = 24  # asked by clients that read to the end
LONG = 700  # asked by clients that hang up: far more than they wait for
HANG_UP_AFTER = 3  # chunks read before hanging up


@dataclass
class Daemon:
    url: str
    app: Any


@pytest.fixture
async def daemon(
    tmp_path: Path, tiny_models: dict[str, Path], tiny_adapter: Path
) -> AsyncIterator[Daemon]:
    registry = Registry(tmp_path / "registry")
    import_hf_dir(registry, tiny_models["llama"], "tiny")
    import_hf_dir(registry, tiny_models["qwen2"], "tiny2")  # a second base model
    import_path(registry, tiny_adapter, "tiny-lora", base="tiny")  # an adapter on the first
    settings = Settings(
        models=registry.root,
        adapters=None,
        import_default=False,
        dtype="float32",
        device="cpu",
        context_length=1024,
        num_parallel=16,
    )
    app = create_app(settings, registry=registry)
    async with running_server(app, settings) as port:
        yield Daemon(f"http://127.0.0.1:{port}", app)


@dataclass
class Outcome:
    index: int
    dialect: str
    hung_up: bool
    status: int = 0
    items: list[Any] = field(default_factory=list)
    model: str = "tiny"


def chat_body(index: int, tokens: int) -> list[dict[str, str]]:
    return [{"role": "user", "content": f"Client {index}: tell me about the sea."}]


async def ollama_client(
    http: httpx.AsyncClient, index: int, hang_up: bool, model: str = "tiny"
) -> Outcome:
    out = Outcome(index, "ollama", hang_up, model=model)
    tokens = LONG if hang_up else NEW_TOKENS
    body = {
        "model": model,
        "messages": chat_body(index, tokens),
        "options": {"num_predict": tokens, "temperature": 0.7, "seed": index},
    }
    async with http.stream("POST", "/api/chat", json=body) as response:
        out.status = response.status_code
        async for line in response.aiter_lines():
            if line.strip():
                out.items.append(json.loads(line))
            if hang_up and len(out.items) >= HANG_UP_AFTER:
                break  # leaving the block closes the connection mid-stream
    return out


async def openai_client(
    http: httpx.AsyncClient, index: int, hang_up: bool, model: str = "tiny"
) -> Outcome:
    out = Outcome(index, "openai", hang_up, model=model)
    body = {
        "model": model,
        "messages": chat_body(index, NEW_TOKENS),
        "max_tokens": LONG if hang_up else NEW_TOKENS,
        "temperature": 0.7,
        "seed": index,
        "stream": True,
        "stream_options": {"include_usage": index % 8 == 1},
    }
    async with http.stream("POST", "/v1/chat/completions", json=body) as response:
        out.status = response.status_code
        async for line in response.aiter_lines():
            if not line.strip() or line.startswith(":"):
                continue  # SSE comments (sse-starlette's keep-alive pings) are for proxies
            assert line.startswith("data: "), line
            data = line[len("data: ") :]
            out.items.append(data if data == "[DONE]" else json.loads(data))
            if hang_up and len(out.items) >= HANG_UP_AFTER:
                break
    return out


async def anthropic_client(
    http: httpx.AsyncClient, index: int, hang_up: bool, model: str = "tiny"
) -> Outcome:
    out = Outcome(index, "anthropic", hang_up, model=model)
    body = {
        "model": model,
        "messages": chat_body(index, NEW_TOKENS),
        "max_tokens": LONG if hang_up else NEW_TOKENS,
        "temperature": 0.7,
        "stream": True,
    }
    async with http.stream("POST", "/v1/messages", json=body) as response:
        out.status = response.status_code
        async for line in response.aiter_lines():
            if line.startswith("data: "):
                out.items.append(json.loads(line[len("data: ") :]))
            if hang_up and len(out.items) >= HANG_UP_AFTER:
                break
    return out


def check_anthropic(out: Outcome) -> None:
    assert out.status == 200
    kinds = [item["type"] for item in out.items]
    assert "error" not in kinds, out.items
    assert kinds[0] == "message_start" and kinds[-1] == "message_stop", kinds
    stop = next(i for i in out.items if i["type"] == "message_delta")["delta"]["stop_reason"]
    assert stop in ("end_turn", "max_tokens", "stop_sequence")


def check_ollama(out: Outcome) -> None:
    assert out.status == 200
    *chunks, last = out.items
    assert not any("error" in item for item in out.items), out.items
    for item in chunks:
        assert item["done"] is False and item["model"] == f"{out.model}:latest"
        assert item["message"]["role"] == "assistant"
        assert isinstance(item["message"]["content"], str)
    assert last["done"] is True and last["done_reason"] in ("stop", "length")
    assert 0 < last["eval_count"] <= NEW_TOKENS and last["prompt_eval_count"] > 0
    if last["done_reason"] == "length":
        assert last["eval_count"] == NEW_TOKENS
    assert last["total_duration"] >= last["eval_duration"] > 0


def check_openai(out: Outcome) -> None:
    assert out.status == 200
    assert out.items[-1] == "[DONE]" and "[DONE]" not in out.items[:-1]
    chunks = out.items[:-1]
    assert not any("error" in chunk for chunk in chunks), chunks
    assert len({chunk["id"] for chunk in chunks}) == 1
    assert all(chunk["object"] == "chat.completion.chunk" for chunk in chunks)
    with_choices = [chunk for chunk in chunks if chunk["choices"]]
    assert with_choices[0]["choices"][0]["delta"].get("role") == "assistant"
    finishes = [c["choices"][0]["finish_reason"] for c in with_choices]
    assert finishes[-1] in ("stop", "length") and all(f is None for f in finishes[:-1])
    usage = [chunk for chunk in chunks if chunk.get("usage")]
    if out.index % 8 == 1:  # asked for usage: one last chunk with it and no choices
        assert len(usage) == 1 and chunks[-1] is usage[0] and not usage[0]["choices"]
        tokens = usage[0]["usage"]["completion_tokens"]
        assert 0 < tokens <= NEW_TOKENS
        assert tokens == NEW_TOKENS or finishes[-1] == "stop"


async def test_64_streaming_clients(daemon: Daemon, caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.WARNING)
    limits = httpx.Limits(max_connections=CLIENTS + 8, max_keepalive_connections=0)
    timeout = httpx.Timeout(60.0)
    started = time.monotonic()
    async with httpx.AsyncClient(base_url=daemon.url, limits=limits, timeout=timeout) as http:
        jobs = []
        for index in range(CLIENTS):
            hang_up = index % 4 == 0
            client = ollama_client if index % 2 == 0 else openai_client
            jobs.append(client(http, index, hang_up))
        outcomes = await asyncio.gather(*jobs)
        elapsed = time.monotonic() - started

        finished = [o for o in outcomes if not o.hung_up]
        hung_up = [o for o in outcomes if o.hung_up]
        assert len(finished) == 48 and len(hung_up) == 16
        for out in finished:
            (check_ollama if out.dialect == "ollama" else check_openai)(out)
        for out in hung_up:
            assert out.status == 200 and len(out.items) == HANG_UP_AFTER  # left mid-stream

        # every abandoned stream is aborted: nothing left running or queued in the engine
        loop = daemon.app.state.engine.device_loop
        deadline = time.monotonic() + 10
        while (loop.active_sequences() or loop.queued()) and time.monotonic() < deadline:
            await asyncio.sleep(0.05)
        assert loop.active_sequences() == 0 and loop.queued() == 0
        counts = loop.snapshot()["finished"]
        assert counts.get("abort", 0) == len(hung_up), counts
        assert counts.get("length", 0) + counts.get("stop", 0) == len(finished), counts
        assert not counts.get("error"), counts

        # healthy afterwards: probes answer and a new request streams to the end
        assert (await http.get("/health")).status_code == 200
        assert (await http.get("/ready")).status_code in (200, 503)  # no default model here
        after = await ollama_client(http, 1000, hang_up=False)
        check_ollama(after)
        metrics = (await http.get("/metrics")).text
        assert "ocs_" in metrics

    problems = [r for r in caplog.records if r.levelno >= logging.ERROR]
    assert not problems, [r.getMessage() for r in problems]
    print(f"\n64 clients ({len(finished)} complete, {len(hung_up)} hung up) in {elapsed:.1f}s")
    assert elapsed < 60


CHECKS = {"ollama": check_ollama, "openai": check_openai, "anthropic": check_anthropic}
DIALECTS = (ollama_client, openai_client, anthropic_client)
SOAK_MODELS = ("tiny", "tiny2", "tiny-lora")
SUSTAIN_SECONDS = float(os.environ.get("OCS_LOAD_SECONDS", "120"))


def rss_bytes() -> int:
    """Resident set size of this process (the daemon runs in it), from /proc."""
    with open("/proc/self/statm") as statm:
        return int(statm.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


def open_files() -> int:
    return len(os.listdir("/proc/self/fd"))


@pytest.mark.e2e
@pytest.mark.skipif(not Path("/proc/self/statm").exists(), reason="needs /proc for memory")
async def test_soak_64_clients_three_dialects_two_models_and_an_adapter(
    daemon: Daemon, caplog: pytest.LogCaptureFixture
) -> None:
    """The soak (issue 17): 64 clients keep streaming for OCS_LOAD_SECONDS (120 by default;
    CI runs it; set it higher for a longer soak) over the Ollama, OpenAI and Anthropic
    dialects, two base models and an adapter on one of them, each client hanging up
    mid-stream at random one time in four: no 5xx, every finished stream complete, no error
    logged, no sequence left running, and memory and open files flat."""
    import gc
    import random

    caplog.set_level(logging.WARNING)
    rng = random.Random(7)
    limits = httpx.Limits(max_connections=CLIENTS + 8, max_keepalive_connections=0)
    counts = {"complete": 0, "hung_up": 0, "server_errors": 0}
    samples: list[tuple[int, int]] = []
    models: dict[str, int] = {}

    async with httpx.AsyncClient(
        base_url=daemon.url, limits=limits, timeout=httpx.Timeout(60.0)
    ) as http:

        async def client(index: int, stop_at: float) -> None:
            n = 0
            while time.monotonic() < stop_at:
                hang_up = rng.random() < 0.25
                model = rng.choice(SOAK_MODELS)
                dialect = DIALECTS[(index + n) % len(DIALECTS)]
                out = await dialect(http, index * 10_000 + n, hang_up, model)
                n += 1
                models[model] = models.get(model, 0) + 1
                if out.status >= 500:
                    counts["server_errors"] += 1
                if hang_up:
                    assert out.status == 200
                    counts["hung_up"] += 1
                else:
                    CHECKS[out.dialect](out)
                    counts["complete"] += 1

        warm_until = time.monotonic() + min(20.0, SUSTAIN_SECONDS / 4)
        await asyncio.gather(*(client(i, warm_until) for i in range(CLIENTS)))
        gc.collect()
        samples.append((rss_bytes(), open_files()))  # after warm-up: caches and pools built
        stop_at = time.monotonic() + SUSTAIN_SECONDS
        await asyncio.gather(*(client(i, stop_at) for i in range(CLIENTS)))
        gc.collect()
        samples.append((rss_bytes(), open_files()))

        loop = daemon.app.state.engine.device_loop
        deadline = time.monotonic() + 10
        while (loop.active_sequences() or loop.queued()) and time.monotonic() < deadline:
            await asyncio.sleep(0.05)
        assert loop.active_sequences() == 0 and loop.queued() == 0
        for name, worker in loop.workers.items():
            assert worker.runner.cache.used == 0, name
        assert not loop.snapshot()["finished"].get("error")
        assert (await http.get("/health")).status_code == 200

    problems = [r for r in caplog.records if r.levelno >= logging.ERROR]
    assert not problems, [r.getMessage() for r in problems]
    (rss_before, files_before), (rss_after, files_after) = samples
    print(
        f"\n{counts['complete']} complete and {counts['hung_up']} hung-up streams in "
        f"{SUSTAIN_SECONDS:.0f}s over {models}; RSS {rss_before >> 20} -> {rss_after >> 20} MiB, "
        f"open files {files_before} -> {files_after}"
    )
    record(
        f"Soak: 64 clients, 3 dialects, 2 models + adapter, 1 in 4 hang up, "
        f"{SUSTAIN_SECONDS:.0f} s",
        "tests/test_load.py",
        counts["complete"] + counts["hung_up"],
        server_errors=counts["server_errors"],
        leaks=f"RSS {(rss_after - rss_before) / (1 << 20):+.0f} MiB, "
        f"files {files_after - files_before:+d}",
    )
    assert counts["server_errors"] == 0
    assert counts["complete"] > CLIENTS and counts["hung_up"] > 0
    assert all(models.get(m, 0) > 0 for m in SOAK_MODELS), models
    assert rss_after - rss_before < 64 << 20, "memory grew under steady load"
    assert files_after - files_before <= 8, "open files grew under steady load"
