"""Embeddings from a generative model's hidden states (mean-pooled, normalised), through
/api/embed, /api/embeddings and /v1/embeddings, with the real engine on a tiny model."""

from __future__ import annotations

import base64
import math
import struct
from collections.abc import AsyncIterator
from pathlib import Path

import pytest

from ollama_compact_server.registry.importers import import_hf_dir
from ollama_compact_server.registry.store import Registry
from tests.conftest import serve_app


@pytest.fixture
async def clients(tmp_path: Path, tiny_models: dict[str, Path]) -> AsyncIterator[tuple]:
    registry = Registry(tmp_path / "registry")
    import_hf_dir(registry, tiny_models["gemma3"], "tiny")
    async with serve_app(registry, dtype="float32") as served:
        yield served.raw, served.ollama, served.openai


def norm(v: list[float]) -> float:
    return math.sqrt(sum(x * x for x in v))


async def test_ollama_embed(clients) -> None:
    _, client, _ = clients
    one = await client.embed(model="tiny", input="hello world")
    assert len(one.embeddings) == 1 and len(one.embeddings[0]) == 64
    assert abs(norm(one.embeddings[0]) - 1) < 1e-4
    many = await client.embed(model="tiny", input=["hello world", "a different text entirely"])
    assert len(many.embeddings) == 2
    assert (
        max(abs(a - b) for a, b in zip(many.embeddings[0], one.embeddings[0])) < 1e-4
    )  # batch == alone
    assert many.embeddings[0] != many.embeddings[1]
    legacy = await client.embeddings(model="tiny", prompt="hello world")
    assert max(abs(a - b) for a, b in zip(legacy.embedding, one.embeddings[0])) < 1e-4


async def test_openai_embeddings(clients) -> None:
    _, _, oai = clients
    result = await oai.embeddings.create(model="tiny", input=["hello", "world"])
    assert [d.index for d in result.data] == [0, 1] and result.usage.prompt_tokens > 0
    assert abs(norm(result.data[0].embedding) - 1) < 1e-4
    short = await oai.embeddings.create(model="tiny", input="hello", dimensions=8)
    assert len(short.data[0].embedding) == 8 and abs(norm(short.data[0].embedding) - 1) < 1e-4
    b64 = await oai.embeddings.create(model="tiny", input="hello", encoding_format="base64")
    raw = base64.b64decode(b64.data[0].embedding)
    decoded = struct.unpack(f"<{len(raw) // 4}f", raw)
    plain = await oai.embeddings.create(model="tiny", input="hello")
    assert max(abs(a - b) for a, b in zip(decoded, plain.data[0].embedding)) < 1e-6
    tokens = await oai.embeddings.create(model="tiny", input=[[10, 11, 12]])
    assert len(tokens.data) == 1


async def test_empty_input_loads_and_bad_input(clients) -> None:
    raw, _, _ = clients
    r = await raw.post("/api/embed", json={"model": "tiny", "input": []})
    assert r.status_code == 200 and r.json()["embeddings"] == []
    assert [m["name"] for m in (await raw.get("/api/ps")).json()["models"]] == ["tiny:latest"]
    for path, body in [
        ("/api/embed", {"model": "tiny", "input": 5}),
        ("/api/embed", {"model": "absent", "input": "x"}),
        ("/api/embed", {"model": "tiny", "input": "x" * 10000, "truncate": False}),
        ("/api/embed", {"model": "tiny", "input": ["x"] * 1000}),
        ("/api/embeddings", {"model": "tiny", "prompt": 3}),
        ("/v1/embeddings", {"model": "tiny", "input": [[10**9]]}),
        ("/v1/embeddings", {"model": "tiny", "input": []}),
        ("/v1/embeddings", {"model": "tiny", "input": "x", "encoding_format": "hex"}),
    ]:
        r = await raw.post(path, json=body)
        assert 400 <= r.status_code < 500, (path, body, r.status_code, r.text)
