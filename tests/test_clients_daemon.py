"""The official ollama and openai clients against the daemon started as a process on a
free loopback port (tiny model registry): every generation endpoint, streaming and not,
and the process survives malformed requests."""

from __future__ import annotations

from pathlib import Path

import httpx
import ollama
import openai
import pytest

from ollama_compact_server.registry.importers import import_hf_dir
from ollama_compact_server.registry.store import Registry
from tests.conftest import Daemon, free_port


@pytest.fixture(scope="module")
def daemon(tmp_path_factory: pytest.TempPathFactory, tiny_models: dict[str, Path]):
    root = tmp_path_factory.mktemp("daemon")
    registry = Registry(root / "models")
    import_hf_dir(registry, tiny_models["llama"], "tiny")
    d = Daemon(
        {
            "OCS_MODELS": str(registry.root),
            "OCS_ADAPTERS": "",
            "OCS_IMPORT_DEFAULT": "false",
            "OCS_DTYPE": "float32",
        },
        free_port(),
    )
    d.start(timeout=120)
    yield d
    d.stop()


def test_ollama_client(daemon: Daemon, tiny_models: dict[str, Path]) -> None:
    client = ollama.Client(host=daemon.url)
    assert [m.model for m in client.list().models] == ["tiny:latest"]
    out = client.generate(model="tiny", prompt="hi", options={"temperature": 0, "num_predict": 5})
    assert out.done and out.eval_count == 5
    pieces = list(
        client.generate(
            model="tiny", prompt="hi", options={"temperature": 0, "num_predict": 5}, stream=True
        )
    )
    assert pieces[-1].done and not any(p.done for p in pieces[:-1])
    assert "".join(p.response for p in pieces) == out.response
    whole = client.chat(
        model="tiny",
        messages=[{"role": "user", "content": "hi"}],
        options={"num_predict": 3},
        stream=False,
    )
    assert whole.done and whole.message.role == "assistant" and whole.eval_count == 3
    assert len(client.embeddings(model="tiny", prompt="hello").embedding) > 0
    parts = list(
        client.chat(
            model="tiny",
            messages=[{"role": "user", "content": "hi"}],
            options={"num_predict": 5},
            stream=True,
        )
    )
    assert parts[-1].done
    assert len(client.embed(model="tiny", input=["a", "b"]).embeddings) == 2
    assert client.show("tiny").modelinfo["general.architecture"] == "llama"
    assert [m.model for m in client.ps().models] == ["tiny:latest"]
    assert client.copy("tiny", "tiny2").status == "success"
    assert client.delete("tiny2").status == "success"
    with pytest.raises(ollama.ResponseError) as info:
        client.generate(model="absent", prompt="x")
    assert info.value.status_code == 404
    files = {
        p.name: client.create_blob(p)
        for p in sorted(tiny_models["llama"].iterdir())
        if p.is_file() and p.suffix != ".md"
    }
    assert client.create(model="uploaded", files=files).status == "success"
    assert "uploaded:latest" in [m.model for m in client.list().models]
    assert client.generate(model="uploaded", prompt="x", options={"num_predict": 2}).done
    assert client.delete("uploaded").status == "success"
    with pytest.raises(ollama.ResponseError) as info:
        client.push("tiny")
    assert info.value.status_code == 400 and "not supported" in str(info.value)
    version = httpx.get(daemon.url + "/api/version", timeout=10).json()
    assert isinstance(version["version"], str) and version["version"].count(".") == 2


def test_openai_client(daemon: Daemon) -> None:
    client = openai.OpenAI(base_url=daemon.url + "/v1", api_key="unused", max_retries=0)
    chat = client.chat.completions.create(
        model="tiny", messages=[{"role": "user", "content": "hi"}], max_tokens=4
    )
    assert chat.usage.completion_tokens == 4
    text = "".join(
        c.choices[0].text
        for c in client.completions.create(model="tiny", prompt="hello", max_tokens=4, stream=True)
        if c.choices
    )
    assert text
    assert client.embeddings.create(model="tiny", input="x").data[0].embedding
    assert [m.id for m in client.models.list().data] == ["tiny:latest"]
    chunks = list(
        client.chat.completions.create(
            model="tiny",
            messages=[{"role": "user", "content": "hi"}],
            max_tokens=4,
            stream=True,
            stream_options={"include_usage": True},
        )
    )
    assert chunks[0].choices[0].delta.role == "assistant"
    assert chunks[-1].choices == [] and chunks[-1].usage.completion_tokens == 4
    done = client.completions.create(model="tiny", prompt="hello", max_tokens=3, temperature=0)
    assert done.choices[0].finish_reason == "length" and done.usage.completion_tokens == 3
    assert client.models.retrieve("tiny").id == "tiny:latest"
    with pytest.raises(openai.NotFoundError):
        client.models.retrieve("absent")


def test_malformed_requests_never_5xx(daemon: Daemon) -> None:
    bodies = [
        b"[]",
        b"null",
        b"{",
        b'"x"',
        b"1e999",
        b'{"model": null}',
        b'{"model": ["x"]}',
        b'{"model": "tiny", "prompt": {"a": 1}}',
        b'{"model": "tiny", "messages": [null]}',
        b'{"model": "tiny", "prompt": "x", "options": {"num_predict": 1e300}}',
        b'{"model": "tiny", "prompt": "x", "keep_alive": {"a": 1}}',
        b'{"model": "' + b"a" * 5000 + b'", "prompt": "x"}',
        b'{"model": "tiny", "prompt": "x", "messages": [{"role": "user", "content": "x"}],'
        b' "stream": true, "stream_options": "x", "max_tokens": 1, "options": {"num_predict": 1}}',
        b'{"model": "tiny", "prompt": "x", "messages": [{"role": "user", "content": "x"}],'
        b' "stream": true, "n": 2, "stream_options": [1], "options": {"num_predict": 1}}',
        b'{"model": "tiny", "prompt": "x", "messages": [{"role": "user", "content": "x"}],'
        b' "stream": "yes", "options": {"num_ctx": "big"}}',
        b'{"model": "tiny", "messages": [{"role": "user", "content": "x"}], "tools": "x"}',
        b'{"model": "tiny", "input": "x", "options": "x", "prompt": [1]}',
    ]
    paths = [
        "/api/generate",
        "/api/chat",
        "/api/embed",
        "/api/show",
        "/api/create",
        "/api/pull",
        "/api/copy",
        "/v1/chat/completions",
        "/v1/completions",
        "/v1/embeddings",
    ]
    with httpx.Client(base_url=daemon.url, timeout=30) as http:
        for path in paths:
            for body in bodies:
                r = http.post(path, content=body)
                assert r.status_code < 500, (path, body[:60], r.status_code, r.text[:200])
                if not body.startswith(b"{") or body == b"{":  # not a JSON object at all
                    assert r.status_code == 400, (path, body)
        r = http.request("DELETE", "/api/delete", content=b"[1]")
        assert r.status_code == 400
        assert http.get("/").status_code == 200
