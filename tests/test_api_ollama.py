"""Ollama generation routes in process, with the official `ollama` Python client and raw
requests shaped like the Ollama CLI's, on a tiny model and the real engine."""

from __future__ import annotations

import json
import re
import time
from collections.abc import AsyncIterator
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

import httpx
import pytest

from ollama_compact_server.registry.importers import import_hf_dir
from ollama_compact_server.registry.store import Registry
from tests.conftest import serve_app

GREEDY = {"temperature": 0, "num_predict": 8}
RFC3339 = re.compile(r"\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d(\.\d+)?(Z|[+-]\d\d:\d\d)")


@pytest.fixture
async def app_client(tmp_path: Path, tiny_models: dict[str, Path]) -> AsyncIterator[tuple]:
    registry = Registry(tmp_path / "registry")
    import_hf_dir(registry, tiny_models["llama"], "tiny", params={"stop": ["<end_of_turn>"]})
    async with serve_app(registry, dtype="float32") as served:
        yield served.raw, served.ollama


async def ndjson_lines(response: httpx.Response) -> list[dict]:
    lines = [line async for line in response.aiter_lines()]
    assert all(line.strip() for line in lines), "no blank lines in a stream"
    return [json.loads(line) for line in lines]


async def test_generate_with_the_ollama_client(app_client) -> None:
    _, client = app_client
    result = await client.generate(model="tiny", prompt="hello world", options=GREEDY)
    assert result.done and result.done_reason == "length"
    assert result.eval_count == 8 and result.prompt_eval_count > 0
    assert isinstance(result.total_duration, int) and result.total_duration > 0
    assert result.context and len(result.context) == result.prompt_eval_count + 8
    again = await client.generate(model="tiny", prompt="hello world", options=GREEDY)
    assert again.response == result.response  # greedy is deterministic
    streamed = [
        part
        async for part in await client.generate(
            model="tiny", prompt="hello world", options=GREEDY, stream=True
        )
    ]
    assert "".join(p.response for p in streamed) == result.response
    assert streamed[-1].done and not any(p.done for p in streamed[:-1])


async def test_chat_with_the_ollama_client(app_client) -> None:
    _, client = app_client
    messages = [{"role": "user", "content": "Hi there"}]
    result = await client.chat(model="tiny", messages=messages, options=GREEDY)
    assert result.message.role == "assistant" and result.done_reason == "length"
    parts = [
        p
        async for p in await client.chat(
            model="tiny", messages=messages, options=GREEDY, stream=True
        )
    ]
    assert "".join(p.message.content for p in parts) == result.message.content
    assert parts[-1].eval_count == 8


async def test_raw_ndjson_shape(app_client) -> None:
    raw, _ = app_client
    async with raw.stream(
        "POST", "/api/generate", json={"model": "tiny", "prompt": "abc", "options": GREEDY}
    ) as r:
        assert r.status_code == 200 and r.headers["content-type"].startswith("application/x-ndjson")
        items = await ndjson_lines(r)
    final = items[-1]
    for key in (
        "model",
        "created_at",
        "response",
        "done",
        "done_reason",
        "total_duration",
        "load_duration",
        "prompt_eval_count",
        "prompt_eval_duration",
        "eval_count",
        "eval_duration",
        "context",
    ):
        assert key in final, key
    assert final["created_at"].endswith("Z")


async def test_cli_run_sequence_and_stop(app_client) -> None:
    """What `ollama run tiny` sends (interactive), then `ollama stop tiny`."""
    raw, client = app_client
    assert (await raw.head("/")).status_code == 200
    assert (await raw.post("/api/show", json={"name": "tiny", "model": ""})).status_code == 200
    loaded = (await raw.post("/api/generate", json={"model": "tiny"})).json()
    assert loaded["done_reason"] == "load" and loaded["done"] is True
    ps = (await client.ps()).models
    assert [m.model for m in ps] == ["tiny:latest"] and ps[0].size > 0 and ps[0].context_length > 0
    entry = (await raw.get("/api/ps")).json()["models"][0]
    assert re.fullmatch(r"[0-9a-f]{64}", entry["digest"]) and entry["size_vram"] >= 0
    expires = datetime.fromisoformat(entry["expires_at"].replace("Z", "+00:00"))
    assert RFC3339.fullmatch(entry["expires_at"]) and expires > datetime.now(timezone.utc)
    assert {"families", "parameter_size", "parent_model"} <= set(entry["details"])
    chat = {
        "model": "tiny",
        "messages": [{"role": "user", "content": "hey"}],
        "options": {"num_predict": 3},
    }
    async with raw.stream("POST", "/api/chat", json=chat) as r:
        items = await ndjson_lines(r)
    assert items[-1]["done"] and items[-1]["message"]["role"] == "assistant"
    unloaded = (await raw.post("/api/generate", json={"model": "tiny", "keep_alive": 0})).json()
    assert unloaded["done_reason"] == "unload"


async def test_show_has_what_clients_need(app_client) -> None:
    _, client = app_client
    info = await client.show("tiny")
    assert info.modelinfo["general.architecture"] == "llama"
    assert info.modelinfo["llama.context_length"] == 2048
    assert "completion" in info.capabilities
    assert "stop" in info.parameters and "<end_of_turn>" in info.parameters
    assert "start_of_turn" in info.template
    assert info.details.family == "llama" and info.modelfile.startswith("# Modelfile generated")


@pytest.mark.parametrize(
    ("path", "body", "status"),
    [
        ("/api/generate", {"model": "absent", "prompt": "x"}, 404),
        ("/api/chat", {"model": "absent", "messages": [{"role": "user", "content": "x"}]}, 404),
        ("/api/generate", {"model": "tiny", "prompt": "x", "options": {"temperature": "hot"}}, 400),
        ("/api/generate", {"model": "tiny", "prompt": "x", "options": {"top_p": 7}}, 400),
        ("/api/generate", {"model": "tiny", "prompt": "x", "options": {"num_predict": 10**9}}, 400),
        ("/api/generate", {"model": "tiny", "prompt": "x", "options": [1]}, 400),
        ("/api/generate", {"model": "tiny", "prompt": 5}, 400),
        ("/api/generate", {"model": "tiny", "prompt": "x", "think": True}, 400),
        ("/api/generate", {"model": "tiny", "prompt": "x", "think": "loud"}, 400),
        ("/api/generate", {"model": "tiny", "prompt": "x", "images": ["aGk="]}, 400),
        ("/api/generate", {"model": "tiny", "prompt": "x", "raw": True, "system": "s"}, 400),
        ("/api/generate", {"model": "tiny", "prompt": "x", "keep_alive": "300"}, 400),
        ("/api/generate", {"model": "tiny", "prompt": "x", "context": [-1]}, 400),
        ("/api/generate", {"model": "tiny", "prompt": "x", "context": [10**9]}, 400),
        ("/api/generate", {"model": "tiny", "prompt": "x", "context": [2**70]}, 400),
        ("/api/generate", {"model": "tiny", "prompt": "x", "context": ["a"]}, 400),
        ("/api/generate", {"model": "../../etc/passwd", "prompt": "x"}, 400),
        ("/api/chat", {"model": "tiny", "messages": [{"role": "wizard", "content": "x"}]}, 400),
        ("/api/chat", {"model": "tiny", "messages": "hello"}, 400),
        ("/api/chat", {"model": "tiny", "messages": [{"role": "user", "content": 5}]}, 400),
        (
            "/api/chat",
            {
                "model": "tiny",
                "messages": [{"role": "user", "content": "x"}],
                "tools": [{"type": "function"}],
            },
            400,
        ),
        ("/api/show", {"model": "absent"}, 404),
    ],
)
async def test_bad_requests_get_4xx(app_client, path: str, body: dict, status: int) -> None:
    raw, _ = app_client
    r = await raw.post(path, json=body)
    assert r.status_code == status, r.text
    assert "error" in r.json()


async def test_nan_and_huge_numbers(app_client) -> None:
    raw, _ = app_client
    body = '{"model": "tiny", "prompt": "x", "options": {"temperature": NaN}}'
    r = await raw.post("/api/generate", content=body)
    assert r.status_code == 400
    body = '{"model": "tiny", "prompt": "x", "options": {"seed": 1e400}}'
    r = await raw.post("/api/generate", content=body)
    assert r.status_code == 400
    assert (await raw.get("/")).status_code == 200


async def test_options_null_name_alias_and_unknown_options(app_client) -> None:
    raw, _ = app_client
    body = {"name": "tiny", "model": "", "prompt": "x", "stream": False, "options": None}
    assert (await raw.post("/api/generate", json=body)).status_code == 200
    short = {"model": "tiny", "prompt": "x", "stream": False, "options": {"num_predict": 1}}
    for extra in ({"keep_alive": 300}, {"keep_alive": "5m"}, {"format": ""}, {"format": None}):
        r = await raw.post("/api/generate", json={**short, **extra})
        assert r.status_code == 200 and r.json()["done"], (extra, r.text)
    chat = {"model": "tiny", "messages": [{"role": "user", "content": "x"}], "stream": False}
    r = await raw.post("/api/chat", json={**chat, "format": "", "keep_alive": 300})
    assert r.status_code == 200
    body = {
        "model": "tiny",
        "prompt": "x",
        "stream": False,
        "options": {"num_predict": 2, "mirostat": 1, "bogus": 3},
    }
    r = await raw.post("/api/generate", json=body)
    assert r.status_code == 200 and r.json()["eval_count"] == 2


async def test_logprobs(app_client) -> None:
    raw, _ = app_client
    body = {
        "model": "tiny",
        "prompt": "abc",
        "options": GREEDY,
        "logprobs": True,
        "top_logprobs": 2,
        "stream": False,
    }
    result = (await raw.post("/api/generate", json=body)).json()
    assert len(result["logprobs"]) == 8
    assert all(e["logprob"] <= 0 and len(e["top_logprobs"]) == 2 for e in result["logprobs"])
    async with raw.stream(
        "POST",
        "/api/chat",
        json={
            "model": "tiny",
            "messages": [{"role": "user", "content": "x"}],
            "options": GREEDY,
            "logprobs": True,
        },
    ) as r:
        items = await ndjson_lines(r)
    assert sum(len(i.get("logprobs", [])) for i in items) == 8
    r = await raw.post("/api/generate", json={**body, "top_logprobs": 50})
    assert r.status_code == 400


async def test_structured_output(app_client) -> None:
    raw, _ = app_client
    schema = {
        "type": "object",
        "properties": {
            "ok": {"type": "boolean"},
            "n": {"type": "integer", "minimum": 0, "maximum": 9},
        },
        "required": ["ok", "n"],
        "additionalProperties": False,
    }
    body = {
        "model": "tiny",
        "prompt": "answer",
        "format": schema,
        "stream": False,
        "options": {"temperature": 0, "num_predict": 60},
    }
    result = (await raw.post("/api/generate", json=body)).json()
    assert result["done_reason"] == "stop", result
    value = json.loads(result["response"])
    assert set(value) == {"ok", "n"} and isinstance(value["ok"], bool) and 0 <= value["n"] <= 9
    body["format"] = "json"
    body["options"] = {"temperature": 1.0, "seed": 3, "num_predict": 80}
    result = (await raw.post("/api/generate", json=body)).json()
    text = result["response"]
    assert text.lstrip().startswith("{")
    if result["done_reason"] == "stop":
        assert isinstance(json.loads(text), dict)
    bad = {**body, "format": {"type": "nonsense"}}
    r = await raw.post("/api/generate", json=bad)
    assert r.status_code == 400 and "schema" in r.json()["error"]
    r = await raw.post("/api/generate", json={**body, "format": 7})
    assert r.status_code == 400


async def test_metrics_and_request_ids(app_client) -> None:
    raw, _ = app_client
    r = await raw.post(
        "/api/generate", json={"model": "tiny", "prompt": "x", "options": GREEDY, "stream": False}
    )
    assert len(r.headers["x-request-id"]) == 12
    await raw.post("/api/generate", json={"model": "absent", "prompt": "x"})
    text = (await raw.get("/metrics")).text
    assert 'ocs_http_requests_total{route="/api/generate",status="200"} 1.0' in text
    assert 'ocs_http_requests_total{route="/api/generate",status="404"} 1.0' in text
    assert "ocs_generated_tokens_total 8.0" in text
    assert "ocs_time_to_first_token_seconds_count 1.0" in text
    assert "ocs_inter_token_latency_seconds_count 7.0" in text
    assert 'ocs_finished_requests_total{reason="length"} 1.0' in text
    assert "ocs_resident_models 1.0" in text and "ocs_kv_cache_free_tokens" in text


def test_engine_totals_are_prometheus_counters() -> None:
    """Totals since start are Counters (`*_total`) that only move up as the engine's figures
    grow, adapter evictions included; levels such as the queue length are Gauges."""
    from prometheus_client import generate_latest

    from ollama_compact_server.api.metrics import Metrics

    metrics = Metrics()

    def scrape(**stats: object) -> str:
        metrics.refresh(stats)
        return generate_latest(metrics.registry).decode()

    text = scrape(queued=3, tokens_generated=5, preemptions=1, evictions=0, finished={"stop": 2})
    for name in (
        "generated_tokens",
        "preemptions",
        "evictions",
        "finished_requests",
        "adapter_loads",
        "adapter_evictions",
    ):
        assert f"# TYPE ocs_{name}_total counter" in text, name
    assert "# TYPE ocs_queue_length gauge" in text and "ocs_queue_length 3.0" in text
    assert "ocs_generated_tokens_total 5.0" in text and "ocs_preemptions_total 1.0" in text
    text = scrape(
        queued=0,
        tokens_generated=12,
        preemptions=1,
        evictions=2,
        adapter_loads=4,
        adapter_device_evictions=3,
        adapter_host_evictions=1,
        finished={"stop": 3, "length": 1},
    )
    assert "ocs_queue_length 0.0" in text and "ocs_generated_tokens_total 12.0" in text
    assert "ocs_evictions_total 2.0" in text and "ocs_adapter_loads_total 4.0" in text
    assert 'ocs_adapter_evictions_total{tier="device"} 3.0' in text
    assert 'ocs_adapter_evictions_total{tier="host"} 1.0' in text
    assert 'ocs_finished_requests_total{reason="stop"} 3.0' in text
    # a new engine starts its figures at zero: the counter keeps its value, then grows again
    assert "ocs_generated_tokens_total 12.0" in scrape(tokens_generated=0)
    assert "ocs_generated_tokens_total 14.0" in scrape(tokens_generated=2)


async def wait_unloaded(engine, name: str, seconds: float = 10.0) -> bool:
    import asyncio
    import time

    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline:
        if name not in [r.name for r in engine.resident()]:
            return True
        await asyncio.sleep(0.05)
    return False


async def test_exact_go_cli_requests(tmp_path: Path, tiny_models: dict[str, Path]) -> None:
    """Byte-for-byte what the Go CLI's structs marshal to (api/types.go: prompt, suffix,
    system and template are sent empty, options null, keep_alive as a Go duration string)
    for `ollama run` (load through generate and through chat), `ollama stop`, `ollama rm`."""
    registry = Registry(tmp_path / "registry")
    import_hf_dir(registry, tiny_models["llama"], "tiny")
    async with serve_app(registry, dtype="float32") as served:
        raw, engine = served.raw, served.engine
        empty = {"prompt": "", "suffix": "", "system": "", "template": "", "options": None}
        assert (await raw.head("/")).status_code == 200
        assert (await raw.post("/api/show", json={"model": "tiny"})).status_code == 200
        loaded = await raw.post("/api/generate", json={"model": "tiny", **empty})
        assert loaded.status_code == 200 and loaded.json()["done_reason"] == "load"
        assert [r.name for r in engine.resident()] == ["tiny:latest"]
        turn = {
            "model": "tiny",
            "messages": [{"role": "user", "content": "hey"}],
            "options": {"num_predict": 3},
        }
        async with raw.stream("POST", "/api/chat", json=turn) as r:
            items = await ndjson_lines(r)
        assert items[-1]["done"] and items[-1]["eval_count"] == 3
        reloaded = await raw.post("/api/chat", json={"model": "tiny", "messages": []})
        assert reloaded.json()["done_reason"] == "load"
        assert reloaded.json()["message"] == {"role": "assistant", "content": ""}
        # ollama stop tiny
        show = await raw.post("/api/show", json={"name": "tiny", "model": ""})
        assert show.status_code == 200
        stop = {"model": "tiny", **empty, "keep_alive": "0s"}
        stopped = await raw.post("/api/generate", json=stop)
        assert stopped.status_code == 200 and stopped.json()["done_reason"] == "unload"
        assert await wait_unloaded(engine, "tiny:latest")
        # ollama rm tiny: the stop sequence, then the delete
        assert (await raw.post("/api/generate", json=stop)).json()["done_reason"] == "unload"
        deleted = await raw.request("DELETE", "/api/delete", json={"name": "tiny", "model": ""})
        assert deleted.status_code == 200
        assert (await raw.get("/api/tags")).json() == {"models": []}
        gone = await raw.request("DELETE", "/api/delete", json={"name": "tiny", "model": ""})
        assert gone.status_code == 404 and "not found" in gone.json()["error"]


async def test_delete_unloads_a_resident_model(
    tmp_path: Path, tiny_models: dict[str, Path]
) -> None:
    registry = Registry(tmp_path / "registry")
    import_hf_dir(registry, tiny_models["llama"], "tiny")
    async with serve_app(registry, dtype="float32") as served:
        raw, engine = served.raw, served.engine
        loaded = await raw.post("/api/generate", json={"model": "tiny", "keep_alive": "5m"})
        assert loaded.json()["done_reason"] == "load"
        assert [r.name for r in engine.resident()] == ["tiny:latest"]
        r = await raw.request("DELETE", "/api/delete", json={"model": "tiny"})
        assert r.status_code == 200
        assert await wait_unloaded(engine, "tiny:latest")
        assert (await raw.get("/api/ps")).json() == {"models": []}


async def test_schemas_compile_off_the_device_thread_within_a_time_cap(
    app_client, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A schema with thousands of properties took seconds to compile on the device thread,
    stalling every stream it served (issue 17, point 3): it now compiles on a grammar
    thread before the request is submitted, and one that takes too long is a 400."""
    import threading

    from ollama_compact_server.engine import constraint, local

    raw, _ = app_client
    threads: list[str] = []
    real = constraint.JsonConstraint.__init__

    def recording(self: Any, *args: Any) -> None:
        threads.append(threading.current_thread().name)
        real(self, *args)

    monkeypatch.setattr(constraint.JsonConstraint, "__init__", recording)
    body = {
        "model": "tiny",
        "prompt": "answer",
        "format": {"type": "object", "properties": {"ok": {"type": "boolean"}}},
        "stream": False,
        "options": {"temperature": 0, "num_predict": 20},
    }
    assert (await raw.post("/api/generate", json=body)).status_code == 200
    assert threads and all(name.startswith("ocs-grammar") for name in threads), threads
    r = await raw.post(
        "/api/generate", json={**body, "format": {"type": "object", "x": "y" * (600 << 10)}}
    )
    assert r.status_code == 400 and "KiB" in r.json()["error"], r.text

    def slow(*_: Any) -> Any:
        time.sleep(1.0)
        raise AssertionError("not reached in time")

    monkeypatch.setattr(local, "build_constraint", slow)
    monkeypatch.setattr(local, "GRAMMAR_SECONDS", 0.05)
    r = await raw.post("/api/generate", json=body)
    assert r.status_code == 400 and "too complex" in r.json()["error"], r.text
