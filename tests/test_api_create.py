"""Blobs and /api/create: uploads checked against their digest and streamed to disk, models
created from uploaded files, from a registry model, or as an adapter on one; no field can
name a server-side path; failures leave the registry as it was."""

from __future__ import annotations

import hashlib
import json
from collections.abc import AsyncIterator
from pathlib import Path

import ollama
import pytest

from ollama_compact_server.registry.importers import import_hf_dir
from ollama_compact_server.registry.store import Registry
from tests.conftest import serve_app, tree_hash
from tests.fakes import FakeEngine


@pytest.fixture
async def env(tmp_path: Path, tiny_models: dict[str, Path]) -> AsyncIterator[tuple]:
    registry = Registry(tmp_path / "registry")
    import_hf_dir(registry, tiny_models["llama"], "tiny", system="base system")
    async with serve_app(registry, FakeEngine()) as served:
        yield served.raw, served.ollama, registry


def digest_of(data: bytes) -> str:
    return "sha256:" + hashlib.sha256(data).hexdigest()


async def upload_dir(client: ollama.AsyncClient, directory: Path) -> dict[str, str]:
    return {
        p.name: await client.create_blob(p)
        for p in sorted(directory.iterdir())
        if p.is_file() and p.suffix != ".md"
    }


async def test_blob_upload_and_check(env) -> None:
    raw, _, registry = env
    data = b"some bytes" * 1000
    digest = digest_of(data)
    assert (await raw.head(f"/api/blobs/{digest}")).status_code == 404
    assert (await raw.post(f"/api/blobs/{digest}", content=data)).status_code == 201
    assert (await raw.post(f"/api/blobs/{digest}", content=data)).status_code == 200
    assert (await raw.head(f"/api/blobs/{digest}")).status_code == 200
    before = tree_hash(registry.root)
    r = await raw.post(f"/api/blobs/{digest_of(b'other')}", content=data)
    assert r.status_code == 400 and "digest mismatch" in r.json()["error"]
    assert tree_hash(registry.root) == before


@pytest.mark.parametrize(
    "digest",
    [
        "sha256:abc",
        "sha256:" + "0" * 65,
        "sha256:..%2F..%2Fetc%2Fpasswd",
        "md5:" + "0" * 32,
        "sha256:" + "g" * 64,
    ],
)
async def test_bad_digests(env, digest: str) -> None:
    raw, _, registry = env
    before = tree_hash(registry.root)
    for method in ("HEAD", "POST"):
        r = await raw.request(method, f"/api/blobs/{digest}", content=b"x")
        assert r.status_code in (400, 404), (method, digest, r.status_code)
    assert tree_hash(registry.root) == before


async def test_client_gone_mid_upload_leaves_nothing(env) -> None:
    raw, _, registry = env
    before = tree_hash(registry.root)

    async def body() -> AsyncIterator[bytes]:
        yield b"x" * 100_000
        raise ConnectionError("client went away")

    try:  # in process the client's error surfaces in the app's receive(): a 500 at most
        r = await raw.post(f"/api/blobs/{digest_of(b'x' * 200_000)}", content=body())
        assert r.status_code >= 400
    except ConnectionError:
        pass
    assert tree_hash(registry.root) == before


async def test_create_from_uploaded_files(env, tiny_models: dict[str, Path]) -> None:
    _, client, registry = env
    files = await upload_dir(client, tiny_models["qwen2"])
    result = await client.create(
        model="fresh:v1", files=files, system="be terse", parameters={"temperature": 0.1}
    )
    assert result.status == "success"
    record = registry.get("fresh:v1")
    assert record.config.family == "qwen2" and registry.system(record) == "be terse"
    assert registry.params(record) == {"temperature": 0.1}
    listed = [m.model for m in (await client.list()).models]
    assert "fresh:v1" in listed


async def test_create_from_a_model_overrides_text_layers(env) -> None:
    _, client, registry = env
    await client.create(
        model="derived",
        from_="tiny",
        system="new system",
        parameters={"stop": ["END"]},
        messages=[{"role": "user", "content": "hi"}, {"role": "assistant", "content": "hello"}],
        license="MIT",
    )
    derived, base = registry.get("derived"), registry.get("tiny")
    assert registry.system(derived) == "new system" and registry.system(base) == "base system"
    assert registry.params(derived)["stop"] == ["END"]
    assert registry.messages(derived)[1]["content"] == "hello"
    assert registry.license(derived) == "MIT"
    assert derived.config.parent_model == "tiny:latest"
    info = await client.show("derived")
    assert (
        info.details.parent_model == "tiny:latest" and 'SYSTEM """new system"""' in info.modelfile
    )
    # the weights are shared, not copied
    assert (
        derived.manifest.files()["model.safetensors"].digest
        == base.manifest.files()["model.safetensors"].digest
    )


async def test_create_adapter_model(env, tiny_adapter: Path) -> None:
    _, client, registry = env
    adapters = await upload_dir(client, tiny_adapter)
    await client.create(model="lora", from_="tiny", adapters=adapters)
    record = registry.get("lora")
    assert record.is_adapter and record.config.base_model == "tiny:latest"
    assert (await client.show("lora")).details.parent_model == "tiny:latest"


@pytest.mark.parametrize(
    "body",
    [
        {"model": "x", "files": {"../x.safetensors": "sha256:" + "0" * 64}},
        {"model": "x", "files": {"/etc/passwd": "sha256:" + "0" * 64}},
        {"model": "x", "files": {"dir/../../o": "sha256:" + "0" * 64}},
        {"model": "x", "files": {"config.json": "sha256:bad"}},
        {"model": "x", "files": {"config.json": "sha256:" + "0" * 64}},  # never uploaded
        {"model": "x", "files": ["config.json"]},
        {"model": "x", "from": "tiny", "path": "/etc"},
        {"model": "x", "modelfile": "FROM /etc/passwd"},
        {"model": "x", "from": "tiny", "quantize": "q5_K_M"},  # no such scheme
        {"model": "x"},
        {"model": "x", "from": "absent"},
        {"model": "../x", "from": "tiny"},
        {"model": "x", "from": "tiny", "parameters": {"temperature": "hot"}},
        {"model": "x", "from": "tiny", "messages": [{"role": "wizard", "content": "x"}]},
        {"model": "x", "from": "tiny", "license": 5},
    ],
)
async def test_bad_creates_change_nothing(env, body: dict) -> None:
    raw, _, registry = env
    before = tree_hash(registry.root)
    r = await raw.post("/api/create", json={**body, "stream": False})
    assert 400 <= r.status_code < 500, (body, r.status_code, r.text)
    assert tree_hash(registry.root) == before


async def test_create_streams_progress_and_in_band_errors(
    env, tiny_models: dict[str, Path], tmp_path: Path
) -> None:
    raw, client, registry = env
    broken = tmp_path / "broken"
    broken.mkdir()
    (broken / "config.json").write_text(json.dumps({"model_type": "llama", "auto_map": {"x": "y"}}))
    files = await upload_dir(client, broken)
    async with raw.stream("POST", "/api/create", json={"model": "bad", "files": files}) as r:
        assert r.status_code == 200
        lines = [json.loads(line) async for line in r.aiter_lines()]
    assert "custom code" in lines[-1]["error"]
    assert not registry.exists("bad")
    files = await upload_dir(client, tiny_models["llama"])
    async with raw.stream("POST", "/api/create", json={"model": "good", "files": files}) as r:
        lines = [json.loads(line) async for line in r.aiter_lines()]
    assert lines[-1] == {"status": "success"} and len(lines) > 1


async def test_push_is_refused_clearly(env) -> None:
    raw, _, _ = env
    r = await raw.post("/api/push", json={"model": "tiny"})
    assert r.status_code == 400 and "not supported" in r.json()["error"]


@pytest.mark.parametrize(
    ("template", "says"),
    [
        ("{{ .System }} {{ .Prompt }}", "Go template syntax"),
        ("{{ if .System }}<sys>{{ .System }}{{ end }}{{ .Prompt }}", "Go template syntax"),
        ("{% for m in messages %}{{ m.content }}", "does not compile"),
        ("{{ messages[0]['content'] ", "does not compile"),
        ("x" * ((1 << 20) + 1), "longer than"),
    ],
)
async def test_create_refuses_templates_that_cannot_run(env, template: str, says: str) -> None:
    raw, _, registry = env
    before = tree_hash(registry.root)
    body = {"model": "t", "from": "tiny", "template": template, "stream": False}
    r = await raw.post("/api/create", json=body)
    assert r.status_code == 400 and says in r.json()["error"], r.text[:300]
    assert tree_hash(registry.root) == before and not registry.exists("t")


async def test_create_with_a_jinja_template(env) -> None:
    raw, client, registry = env
    template = "{% for m in messages %}<{{ m['role'] }}>{{ m['content'] }}{% endfor %}<assistant>"
    await client.create(model="t", from_="tiny", template=template)
    assert registry.template(registry.get("t")) == template
    r = await raw.post(
        "/api/chat",
        json={"model": "t", "messages": [{"role": "user", "content": "x"}], "stream": False},
    )
    assert r.status_code == 200
