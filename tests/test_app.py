"""The daemon in process: registry routes answer like Ollama's, bad input gets 4xx."""

from __future__ import annotations

import re
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

import httpx

from ollama_compact_server.registry.importers import import_hf_dir
from ollama_compact_server.registry.store import Registry


async def test_root_and_version(client: httpx.AsyncClient) -> None:
    r = await client.get("/")
    assert r.status_code == 200 and r.text == "Ollama is running"
    assert (await client.head("/")).status_code == 200
    version = (await client.get("/api/version")).json()["version"]
    assert version.count(".") == 2


async def test_tags_copy_delete(
    client: httpx.AsyncClient, registry: Registry, tiny_models: dict[str, Path]
) -> None:
    assert (await client.get("/api/tags")).json() == {"models": []}
    import_hf_dir(registry, tiny_models["llama"], "tiny")
    models = (await client.get("/api/tags")).json()["models"]
    assert len(models) == 1
    entry = models[0]
    assert entry["name"] == entry["model"] == "tiny:latest"
    assert len(entry["digest"]) == 64 and entry["size"] > 0
    assert entry["modified_at"].endswith("Z")
    assert entry["details"]["family"] == "llama" and entry["details"]["format"] == "safetensors"
    assert entry["details"]["quantization_level"] == "F32"
    assert re.fullmatch(r"[0-9a-f]{64}", entry["digest"])
    details = entry["details"]
    assert details["families"] == ["llama"] and "parent_model" in details
    assert re.fullmatch(r"\d+(\.\d)?[KMB]", details["parameter_size"])
    r = await client.post("/api/copy", json={"source": "tiny", "destination": "copy:v1"})
    assert r.status_code == 200 and r.content == b""
    assert {m["name"] for m in (await client.get("/api/tags")).json()["models"]} == {
        "tiny:latest",
        "copy:v1",
    }
    # the CLI sends "model": "" beside "name"
    r = await client.request("DELETE", "/api/delete", json={"model": "", "name": "COPY:v1"})
    assert r.status_code == 200
    r = await client.request("DELETE", "/api/delete", json={"model": "copy:v1"})
    assert r.status_code == 404 and "not found" in r.json()["error"]


async def test_bad_requests_are_4xx(client: httpx.AsyncClient) -> None:
    cases = [
        ("POST", "/api/copy", b""),
        ("POST", "/api/copy", b"[1,2]"),
        ("POST", "/api/copy", b"{not json"),
        ("POST", "/api/copy", b'{"source": "../x", "destination": "y"}'),
        ("POST", "/api/copy", b'{"source": 5, "destination": "y"}'),
        ("POST", "/api/copy", b'{"source": "absent", "destination": "y"}'),
        ("DELETE", "/api/delete", b'{"model": "../../etc/passwd"}'),
        ("DELETE", "/api/delete", b"{}"),
    ]
    for method, path, body in cases:
        r = await client.request(method, path, content=body)
        assert 400 <= r.status_code < 500, (path, body, r.status_code)
        assert "error" in r.json()


def walk_routes(routes: Sequence[Any], prefix: str = "") -> Iterator[tuple[str, str]]:
    """(method, path) of every route, descending into included routers: FastAPI before 0.165
    copies an included router's routes into `app.routes`, 0.165 keeps one wrapper per
    `include_router` (`_IncludedRouter`, with `original_router` and its `include_context`)."""
    for route in routes:
        inner = getattr(route, "original_router", None)
        if inner is not None:
            context = getattr(route, "include_context", None)
            yield from walk_routes(inner.routes, prefix + getattr(context, "prefix", ""))
        elif hasattr(route, "routes"):  # a Mount or a plain sub-router
            yield from walk_routes(route.routes, prefix + getattr(route, "path", ""))
        else:
            for method in getattr(route, "methods", None) or ():
                yield method, prefix + route.path


def test_route_walk_sees_flat_and_wrapped_routers() -> None:
    from fastapi import APIRouter, FastAPI

    inner = APIRouter()
    inner.add_api_route("/b", lambda: None, methods=["POST"])
    outer = APIRouter()
    outer.include_router(inner, prefix="/in")
    app = FastAPI()
    app.include_router(outer, prefix="/out")
    app.add_api_route("/a", lambda: None, methods=["GET"])
    assert {("POST", "/out/in/b"), ("GET", "/a")} <= set(walk_routes(app.routes))


async def test_api_key_guards_every_route_but_the_probes(tmp_path: Path) -> None:
    from asgi_lifespan import LifespanManager

    from ollama_compact_server.app import create_app
    from ollama_compact_server.settings import Settings

    settings = Settings(
        models=tmp_path / "r", adapters=None, import_default=False, api_key="s3cret"
    )
    app = create_app(settings)
    public = {("GET", "/"), ("HEAD", "/"), ("GET", "/health"), ("HEAD", "/health")}
    # the web page's files (no data in them; tests/test_ui.py): public; its JSON routes not
    page = {(m, p) for m, p in walk_routes(app.routes) if p.startswith("/ui") and "/api/" not in p}
    assert len(page) == 5, page
    routes = set(walk_routes(app.routes)) - public - page
    # the walk can never go quietly empty: every documented path is in it, and the daemon
    # has more than 20 guarded routes
    documented = {path for path in app.openapi()["paths"]} - {"/", "/health"}
    assert documented <= {re.sub(r":[^}]*}", "}", path) for _, path in routes}  # {p:path}
    assert len(routes) >= 20, sorted(routes)
    async with LifespanManager(app):
        transport = httpx.ASGITransport(app=app)
        async with httpx.AsyncClient(transport=transport, base_url="http://127.0.0.1") as c:
            for method, path in sorted(public):
                assert (await c.request(method, path)).status_code == 200, (method, path)
            for method, template in sorted(routes):
                path = re.sub(r"\{[^}]*\}", "x", template)
                r = await c.request(method, path)
                assert r.status_code == 401, (method, path)
                r = await c.request(method, path, headers={"Authorization": "Bearer wrong"})
                assert r.status_code == 401, (method, path)
                assert r.headers["www-authenticate"] == "Bearer"
                if method != "HEAD":  # the dialect's error body
                    error = r.json()["error"]
                    assert isinstance(error, dict) == path.startswith("/v1/"), path
            ok = await c.get("/api/tags", headers={"Authorization": "Bearer s3cret"})
            assert ok.status_code == 200


async def test_a_copy_answers_under_its_own_name(
    client: httpx.AsyncClient, registry: Registry, tiny_models: dict[str, Path]
) -> None:
    """A copy has the same manifest as its source; its replies still name the copy."""
    import_hf_dir(registry, tiny_models["llama"], "tiny")
    r = await client.post("/api/copy", json={"source": "tiny", "destination": "twin"})
    assert r.status_code == 200
    for name in ("tiny:latest", "twin:latest"):
        body = {"model": name, "prompt": "Hi", "stream": False, "options": {"num_predict": 2}}
        r = await client.post("/api/generate", json=body)
        assert r.status_code == 200 and r.json()["model"] == name, r.text
