"""/api/pull against a fake Hugging Face hub on loopback (HF_ENDPOINT): progress lines, the
pulled model in the registry, and a network failure or wrong bytes leaving it unchanged."""

from __future__ import annotations

import hashlib
import json
import threading
import time
from collections.abc import AsyncIterator, Iterator
from pathlib import Path

import pytest
import uvicorn
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import JSONResponse, Response, StreamingResponse
from starlette.routing import Route

from ollama_compact_server.registry.store import Registry
from tests.conftest import free_port, serve_app, tree_hash
from tests.fakes import FakeEngine
from tests.reliability import record


class FakeHub:
    def __init__(self, repos: dict[str, Path]) -> None:
        self.repos = repos
        self.corrupt: set[str] = set()
        self.cut: set[str] = set()
        self.redirect: dict[str, str] = {}  # file name -> Location
        self.downloads = 0
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        app = Starlette(
            routes=[
                Route("/api/models/{org}/{repo}/tree/{revision}", self.tree),
                Route("/{org}/{repo}/resolve/{revision}/{path:path}", self.resolve),
            ]
        )
        self.server = uvicorn.Server(
            uvicorn.Config(app, host="127.0.0.1", port=self.port, log_level="error")
        )

    async def tree(self, request: Request) -> Response:
        repo = f"{request.path_params['org']}/{request.path_params['repo']}"
        if repo not in self.repos:
            return JSONResponse({"error": "Repository not found"}, status_code=404)
        entries = []
        for path in sorted(self.repos[repo].iterdir()):
            data = path.read_bytes()
            entry = {
                "type": "file",
                "path": path.name,
                "size": len(data),
                "oid": hashlib.sha1(data).hexdigest(),
            }
            if path.suffix == ".safetensors":
                entry["lfs"] = {
                    "oid": hashlib.sha256(data).hexdigest(),
                    "size": len(data),
                    "pointerSize": 130,
                }
            entries.append(entry)
        return JSONResponse(entries)

    async def resolve(self, request: Request) -> Response:
        repo = f"{request.path_params['org']}/{request.path_params['repo']}"
        path = self.repos[repo] / request.path_params["path"]
        if path.name in self.redirect and "moved" not in request.query_params:
            return Response(status_code=302, headers={"location": self.redirect[path.name]})
        self.downloads += 1
        data = path.read_bytes()
        if path.name in self.corrupt:
            data = data[:-1] + bytes([data[-1] ^ 1])
        if path.name in self.cut:

            async def broken() -> AsyncIterator[bytes]:
                yield data[: len(data) // 2]
                raise ConnectionError("connection reset")

            return StreamingResponse(broken(), headers={"content-length": str(len(data))})
        return Response(data)

    def __enter__(self) -> FakeHub:
        self.thread = threading.Thread(target=self.server.run, daemon=True)
        self.thread.start()
        for _ in range(100):
            if self.server.started:
                return self
            time.sleep(0.05)
        raise RuntimeError("fake hub did not start")

    def __exit__(self, *exc: object) -> None:
        self.server.should_exit = True
        self.thread.join(5)


@pytest.fixture
def hub(
    tiny_models: dict[str, Path], monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> Iterator[FakeHub]:
    import huggingface_hub.constants

    repo = tmp_path / "hub-repo"
    repo.mkdir()
    for path in tiny_models["llama"].iterdir():
        if path.is_file():
            (repo / path.name).write_bytes(path.read_bytes())
    (repo / "pytorch_model.bin").write_bytes(b"not fetched")  # pickle beside safetensors
    with FakeHub({"org/tiny": repo}) as fake:
        monkeypatch.setenv("HF_ENDPOINT", fake.url)
        monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", False)
        yield fake


@pytest.fixture
async def api(tmp_path: Path) -> AsyncIterator[tuple]:
    registry = Registry(tmp_path / "registry")
    async with serve_app(registry, FakeEngine()) as served:
        yield served.raw, served.ollama, registry


async def test_pull_from_the_hub(hub: FakeHub, api) -> None:
    raw, client, registry = api
    async with raw.stream("POST", "/api/pull", json={"model": "hf.co/org/tiny"}) as r:
        lines = [json.loads(line) async for line in r.aiter_lines()]
    assert lines[0]["status"] == "pulling manifest" and lines[-1] == {"status": "success"}
    progress = [line for line in lines if "total" in line]
    assert progress and all(line["digest"].startswith("sha256:") for line in progress)
    assert any(line["completed"] == line["total"] for line in progress)
    record = registry.get("hf.co/org/tiny:latest")
    assert record.config.source["ref"] == "org/tiny" and "org/tiny" in record.config.aliases
    assert "pytorch_model.bin" not in record.manifest.files()
    # the python client, non-streaming
    assert (await client.pull("hf.co/org/tiny")).status == "success"


async def test_failed_pulls_leave_the_registry_unchanged(hub: FakeHub, api) -> None:
    raw, _, registry = api
    before = tree_hash(registry.root)
    hub.cut.add("model.safetensors")
    async with raw.stream("POST", "/api/pull", json={"model": "hf.co/org/tiny"}) as r:
        lines = [json.loads(line) async for line in r.aiter_lines()]
    assert "error" in lines[-1]
    assert tree_hash(registry.root) == before
    hub.cut.clear()
    hub.corrupt.add("model.safetensors")
    r = await raw.post("/api/pull", json={"model": "hf.co/org/tiny", "stream": False})
    assert r.status_code == 502 and "digest mismatch" in r.json()["error"]
    assert tree_hash(registry.root) == before
    r = await raw.post("/api/pull", json={"model": "hf.co/org/absent", "stream": False})
    assert r.status_code == 400 and "not found" in r.json()["error"]


async def test_unreachable_hub_and_other_registries(api, monkeypatch: pytest.MonkeyPatch) -> None:
    import huggingface_hub.constants

    raw, _, registry = api
    monkeypatch.setenv("HF_ENDPOINT", f"http://127.0.0.1:{free_port()}")  # nothing listens
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", False)
    import huggingface_hub.utils._http as hub_http

    monkeypatch.setattr(hub_http.time, "sleep", lambda seconds: None)  # skip the retry backoff
    r = await raw.post("/api/pull", json={"model": "hf.co/org/tiny", "stream": False})
    assert r.status_code == 502 and "cannot reach the hub" in r.json()["error"]
    r = await raw.post("/api/pull", json={"model": "llama3.2"})
    assert r.status_code == 400 and "hf.co/ORG/REPO" in r.json()["error"]
    assert registry.models() == []


async def test_redirects_stay_on_the_hub_and_sizes_are_capped(
    hub: FakeHub, api, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Issue 17, point 12: a redirect to any other host is refused; files past the caps
    are refused from the listing, before anything is downloaded."""
    from ollama_compact_server.jobs import pull
    from ollama_compact_server.registry import fsutil

    raw, _, registry = api
    same = f"{hub.url}/org/tiny/resolve/main/model.safetensors?moved=1"
    hub.redirect["model.safetensors"] = same  # on the hub's own host: followed
    r = await raw.post("/api/pull", json={"model": "hf.co/org/tiny", "stream": False})
    assert r.status_code == 200, r.text
    registry.delete("hf.co/org/tiny:latest")
    before = tree_hash(registry.root)
    for elsewhere in (
        f"http://localhost:{hub.port}/org/tiny/resolve/main/model.safetensors?moved=1",
        "http://internal.example/secret",
    ):
        hub.redirect["model.safetensors"] = elsewhere
        r = await raw.post("/api/pull", json={"model": "hf.co/org/tiny", "stream": False})
        assert r.status_code == 502 and "another host" in r.json()["error"], r.text
        assert tree_hash(registry.root) == before
    hub.redirect.clear()
    downloads = hub.downloads
    monkeypatch.setattr(pull, "MAX_FILE_BYTES", 1000)
    r = await raw.post("/api/pull", json={"model": "hf.co/org/tiny", "stream": False})
    assert r.status_code == 400 and "larger than" in r.json()["error"], r.text
    monkeypatch.setattr(pull, "MAX_FILE_BYTES", 1 << 40)
    monkeypatch.setattr(pull, "MAX_TOTAL_BYTES", 1000)
    r = await raw.post("/api/pull", json={"model": "hf.co/org/tiny", "stream": False})
    assert r.status_code == 400 and "GiB" in r.json()["error"], r.text
    monkeypatch.setattr(pull, "MAX_TOTAL_BYTES", 1 << 40)
    monkeypatch.setattr(fsutil, "MIN_FREE", 1 << 62)
    r = await raw.post("/api/pull", json={"model": "hf.co/org/tiny", "stream": False})
    assert r.status_code == 507 and "disk space" in r.json()["error"], r.text
    assert hub.downloads == downloads and tree_hash(registry.root) == before
    record("Pull redirected off the hub, files past the caps", "tests/test_pull.py", 5)
