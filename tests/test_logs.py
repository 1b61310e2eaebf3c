"""Request log lines: with OCS_LOG_JSON, one parseable JSON line per HTTP request with its
id, route, status and durations, and for model requests the model, adapter, tokens in and
out, prompt-eval and eval seconds."""

from __future__ import annotations

import io
import json
import logging
from collections.abc import Iterator
from pathlib import Path

import pytest

from ollama_compact_server.logs import JsonFormatter
from ollama_compact_server.registry.importers import import_adapter_dir, import_hf_dir
from ollama_compact_server.registry.store import Registry
from tests.conftest import serve_app
from tests.fakes import FakeEngine


@pytest.fixture
def json_lines() -> Iterator[io.StringIO]:
    """The request logger's output through the JSON formatter that OCS_LOG_JSON installs."""
    out = io.StringIO()
    handler = logging.StreamHandler(out)
    handler.setFormatter(JsonFormatter())
    logger = logging.getLogger("ollama_compact_server.requests")
    level = logger.level
    logger.addHandler(handler)
    logger.setLevel(logging.INFO)
    try:
        yield out
    finally:
        logger.removeHandler(handler)
        logger.setLevel(level)


async def test_one_json_line_per_request(
    tmp_path: Path,
    tiny_models: dict[str, Path],
    tiny_adapter: Path,
    json_lines: io.StringIO,
) -> None:
    registry = Registry(tmp_path / "registry")
    import_hf_dir(registry, tiny_models["llama"], "tiny-llama")
    import_adapter_dir(registry, tiny_adapter, "pirate", "tiny-llama")
    async with serve_app(registry, FakeEngine()) as served:
        client = served.raw
        ids = []
        r = await client.post(
            "/api/generate", json={"model": "pirate", "prompt": "hi", "stream": False}
        )
        ids.append(r.headers["x-request-id"])
        chat = {"model": "tiny-llama", "messages": [{"role": "user", "content": "hi"}]}
        r = await client.post("/v1/chat/completions", json=chat)
        ids.append(r.headers["x-request-id"])
        r = await client.get("/api/tags")
        ids.append(r.headers["x-request-id"])
    lines = json_lines.getvalue().splitlines()
    assert len(lines) == 3, lines
    entries = [json.loads(line) for line in lines]  # every line parses on its own
    assert [e["request_id"] for e in entries] == ids
    generate, completion, tags = entries
    assert generate["route"] == "/api/generate" and generate["status"] == 200
    assert generate["model"] == "pirate:latest" and generate["adapter"] == "pirate:latest"
    assert generate["tokens_in"] > 0 and generate["tokens_out"] == 3
    assert generate["prompt_eval_seconds"] == 0.01 and generate["eval_seconds"] == 0.02
    assert generate["seconds"] >= 0 and generate["level"] == "info" and generate["time"]
    assert completion["route"] == "/v1/chat/completions" and completion["status"] == 200
    assert completion["model"] == "tiny-llama:latest" and "adapter" not in completion
    assert completion["tokens_out"] == 3 and "eval_seconds" in completion
    assert tags["route"] == "/api/tags" and "model" not in tags
    # the plain message carries the same figures for people reading the log
    assert "prompt_eval=0.010s eval=0.020s" in generate["message"]
