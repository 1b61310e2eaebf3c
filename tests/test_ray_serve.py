"""Replicas on Ray Serve (serve_ray.py): a local Ray cluster on loopback, two CPU replicas of
the real app on the tiny llama and two adapters, requests through Serve's HTTP proxy."""

from __future__ import annotations

import json
import os
import socket
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest

from ollama_compact_server.registry.importers import import_adapter_dir, import_hf_dir
from ollama_compact_server.registry.store import Registry
from ollama_compact_server.serve_ray import REPLICA_HEADER, model_of
from tests.conftest import serve_app
from tests.factory import make_lora_adapter

ray = pytest.importorskip("ray")  # the `ray` extra; CI's dev extra installs it

REPO = Path(__file__).resolve().parents[1]
CHAT = {"messages": [{"role": "user", "content": "Hello there"}], "stream": True}
OPTIONS = {"temperature": 0, "num_predict": 8, "repeat_penalty": 1.0}


def test_model_of_reads_the_body() -> None:
    assert model_of("POST", b'{"model": "tiny", "prompt": "x"}') == "tiny"
    assert model_of("POST", b'{"name": "poet"}') == "poet"
    assert model_of("POST", b"not json") == ""
    assert model_of("GET", b"") == ""


@pytest.mark.parametrize(("routing", "expected"), [("model", "tiny"), ("round_robin", "")])
async def test_the_routing_switch_sets_the_multiplexed_model_id(
    routing: str, expected: str
) -> None:
    """OCS_RAY_ROUTING / build_app(routing=...): the ingress forwards with the request's model as
    the multiplexed model id, or with none (Serve's model-blind default, the benchmark's
    baseline). The ingress class is driven directly, with a fake replica handle."""
    from starlette.requests import Request

    from ollama_compact_server.serve_ray import build_app

    app = build_app(2, {"import_default": False}, routing=routing)
    ingress_class = app._bound_deployment.func_or_class
    seen: dict[str, object] = {}

    class Stream:
        def __init__(self) -> None:
            self.items = iter([{"status": 200, "headers": []}, b"ok"])

        def __aiter__(self) -> Stream:
            return self

        async def __anext__(self) -> object:
            try:
                return next(self.items)
            except StopIteration:
                raise StopAsyncIteration from None

        def cancel(self) -> None:
            pass

    class Handle:
        def options(self, **kwargs: object) -> Handle:
            seen.update(kwargs)
            return self

        @property
        def handle(self) -> Handle:
            return self

        def remote(self, request: dict) -> Stream:
            return Stream()

    body = json.dumps({"model": "tiny", "prompt": "Hi"}).encode()

    async def receive() -> dict:
        return {"type": "http.request", "body": body, "more_body": False}

    scope = {
        "type": "http",
        "method": "POST",
        "path": "/api/generate",
        "query_string": b"",
        "headers": [],
        "server": ("127.0.0.1", 80),
    }
    response = await ingress_class(Handle())(Request(scope, receive))
    assert response.status_code == 200
    assert seen["multiplexed_model_id"] == expected


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


@pytest.fixture(scope="module")
def registry(tmp_path_factory: pytest.TempPathFactory, tiny_models: dict[str, Path]) -> Registry:
    root = tmp_path_factory.mktemp("ray")
    registry = Registry(root / "registry")
    import_hf_dir(registry, tiny_models["llama"], "tiny")
    for name, seed in (("pirate", 1), ("poet", 2)):
        adapter = make_lora_adapter(tiny_models["llama"], root / name, seed=seed, base_name="tiny")
        import_adapter_dir(registry, adapter, name, "tiny")
    return registry


@pytest.fixture(scope="module")
def cluster(registry: Registry) -> Iterator[str]:
    from ray import serve

    from ollama_compact_server.serve_ray import build_app

    port = free_port()
    pythonpath = os.pathsep.join(p for p in (str(REPO), os.environ.get("PYTHONPATH")) if p)
    ray.init(
        num_cpus=3,
        include_dashboard=False,
        _node_ip_address="127.0.0.1",
        runtime_env={"env_vars": {"PYTHONPATH": pythonpath, "OMP_NUM_THREADS": "1"}},
        log_to_driver=False,
    )
    try:
        serve.start(http_options={"host": "127.0.0.1", "port": port})
        overrides = {
            "models": str(registry.root),
            "adapters": None,
            "import_default": False,
            "device": "cpu",
        }
        serve.run(
            build_app(2, overrides, replica_cpus=1.0), name="ocs", route_prefix="/", blocking=False
        )
        base = f"http://127.0.0.1:{port}"
        with httpx.Client(base_url=base, timeout=120) as client:
            import time

            deadline = time.monotonic() + 180
            while True:
                try:
                    if client.get("/api/tags").status_code == 200:
                        break
                except httpx.HTTPError:
                    pass
                if time.monotonic() > deadline:
                    raise TimeoutError("Serve did not come up")
                time.sleep(1)
        yield base
    finally:
        serve.shutdown()
        ray.shutdown()


@pytest.mark.ray
async def test_dialects_stream_through_and_match_the_plain_app(
    cluster: str, registry: Registry
) -> None:
    async with serve_app(registry) as served:
        plain_ollama = await served.raw.post(
            "/api/chat", json={"model": "pirate", **CHAT, "options": OPTIONS}
        )
        plain_openai = await served.raw.post(
            "/v1/chat/completions",
            json={"model": "poet", **CHAT, "temperature": 0, "max_tokens": 8},
        )
    expected_ollama = "".join(
        json.loads(line)["message"]["content"] for line in plain_ollama.text.splitlines()
    )

    async with httpx.AsyncClient(base_url=cluster, timeout=120) as client:
        async with client.stream(
            "POST", "/api/chat", json={"model": "pirate", **CHAT, "options": OPTIONS}
        ) as r:
            assert r.status_code == 200, await r.aread()
            assert r.headers["content-type"].startswith("application/x-ndjson")
            assert r.headers[REPLICA_HEADER]
            raw = [chunk async for chunk in r.aiter_raw() if chunk]
        lines = [json.loads(line) for line in b"".join(raw).splitlines() if line]
        assert len(lines) > 2 and lines[-1]["done"]
        assert len(raw) > 1  # streamed through in pieces, not buffered into one body
        assert "".join(line["message"]["content"] for line in lines) == expected_ollama

        r = await client.post(
            "/v1/chat/completions",
            json={"model": "poet", **CHAT, "temperature": 0, "max_tokens": 8},
        )
        assert r.status_code == 200
        assert r.headers["content-type"].startswith("text/event-stream")
        assert r.text.rstrip().endswith("data: [DONE]")
        assert r.text == plain_openai.text or _sse_content(r.text) == _sse_content(
            plain_openai.text
        )

        # Host passes through unchanged: the app's own guard answers on the replica
        assert (await client.get("/api/tags", headers={"Host": "evil.example"})).status_code == 403
        tags = await client.get("/api/tags")
        assert {m["name"].split(":")[0] for m in tags.json()["models"]} >= {
            "tiny",
            "pirate",
            "poet",
        }


def _sse_content(text: str) -> str:
    out = []
    for line in text.splitlines():
        if line.startswith("data: {"):
            for choice in json.loads(line[6:])["choices"]:
                out.append(choice.get("delta", {}).get("content") or "")
    return "".join(out)


@pytest.mark.ray
async def test_requests_for_a_model_keep_their_replica(cluster: str) -> None:
    """Once a replica has loaded a model and reported it (Serve pushes a replica's model ids to
    the routers asynchronously: a second request right after the first may not know yet),
    that model's requests stay on it."""
    import asyncio

    async with httpx.AsyncClient(base_url=cluster, timeout=120) as client:
        for model in ("pirate", "tiny"):
            r = await client.post(
                "/api/generate",
                json={"model": model, "prompt": "Hi", "stream": False, "options": OPTIONS},
            )
            assert r.status_code == 200, r.text
        await asyncio.sleep(3)
        seen: dict[str, set[str]] = {}
        for _ in range(4):
            for model in ("pirate", "tiny"):
                r = await client.post(
                    "/api/generate",
                    json={"model": model, "prompt": "Hi", "stream": False, "options": OPTIONS},
                )
                assert r.status_code == 200, r.text
                seen.setdefault(model, set()).add(r.headers[REPLICA_HEADER])
        assert all(len(replicas) == 1 for replicas in seen.values()), seen


async def test_closing_the_stream_cancels_the_asgi_call() -> None:
    """A client gone (the ingress closes its stream) cancels the request on its replica: the
    generator stops and the app's call is cancelled, not left running."""
    import asyncio

    from ollama_compact_server.serve_ray import ReplicaServer

    cancelled = asyncio.Event()

    async def endless(scope: dict, receive: object, send: object) -> None:
        await send({"type": "http.response.start", "status": 200, "headers": []})  # type: ignore[operator]
        try:
            while True:
                await send({"type": "http.response.body", "body": b"x\n", "more_body": True})  # type: ignore[operator]
                await asyncio.sleep(0.01)
        except asyncio.CancelledError:
            cancelled.set()
            raise

    server = object.__new__(ReplicaServer)
    server.app = endless  # type: ignore[assignment]
    server.replica_id = "r1"
    server._lifespan = object()  # type: ignore[assignment]  # started
    server._started = asyncio.Lock()
    request = {
        "method": "POST",
        "path": "/api/chat",
        "query_string": b"",
        "headers": [(b"host", b"127.0.0.1")],
        "body": b"{}",
        "client": ["127.0.0.1", 1],
        "server": None,
    }
    stream = server.call(request)
    head = await stream.__anext__()
    assert head["status"] == 200 and (b"x-ocs-replica", b"r1") in head["headers"]
    assert await stream.__anext__() == b"x\n"
    await stream.aclose()
    await asyncio.wait_for(cancelled.wait(), 5)


@pytest.mark.ray
async def test_a_killed_replica_is_replaced(cluster: str) -> None:
    """Runs last: kills one replica's actor; Serve starts another and requests succeed."""
    import asyncio

    from ray.util import list_named_actors

    async def ask(client: httpx.AsyncClient) -> httpx.Response:
        return await client.post(
            "/api/generate",
            json={"model": "tiny", "prompt": "Hi", "stream": False, "options": OPTIONS},
        )

    names = [
        a["name"]
        for a in list_named_actors(all_namespaces=True)
        if "Replica" in a["name"] and "SERVE_REPLICA" in a["name"]
    ]
    assert len(names) == 2, names
    victim = ray.get_actor(names[0], namespace="serve")
    ray.kill(victim, no_restart=True)
    async with httpx.AsyncClient(base_url=cluster, timeout=120) as client:
        loop = asyncio.get_running_loop()
        deadline = loop.time() + 120
        while True:
            live = [
                a["name"]
                for a in list_named_actors(all_namespaces=True)
                if "Replica" in a["name"] and "SERVE_REPLICA" in a["name"]
            ]
            if len(live) == 2 and names[0] not in live:
                break
            assert loop.time() < deadline, live
            await asyncio.sleep(1)
        for _ in range(3):
            r = await ask(client)
            assert r.status_code == 200, r.text
