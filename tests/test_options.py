"""One defaults table, Ollama's: what a request without options samples with, in every
dialect, and the engine's own SamplingParams defaults agree with it."""

from __future__ import annotations

from collections.abc import AsyncIterator
from pathlib import Path

import pytest

from ollama_compact_server.chat.options import DEFAULTS, merge_options, to_sampling
from ollama_compact_server.engine.types import SamplingParams
from ollama_compact_server.registry.importers import import_hf_dir
from ollama_compact_server.registry.store import Registry
from tests.conftest import serve_app
from tests.fakes import FakeEngine

# Ollama's api/types.go DefaultOptions(), the sampling fields (MinP from its newer releases)
OLLAMA_DEFAULT_OPTIONS = {
    "num_predict": -1,
    "temperature": 0.8,
    "top_k": 40,
    "top_p": 0.9,
    "min_p": 0.0,
    "repeat_last_n": 64,
    "repeat_penalty": 1.1,
    "presence_penalty": 0.0,
    "frequency_penalty": 0.0,
    "seed": -1,
}


def test_defaults_are_ollamas() -> None:
    assert {key: DEFAULTS[key] for key in OLLAMA_DEFAULT_OPTIONS} == OLLAMA_DEFAULT_OPTIONS
    assert DEFAULTS["stop"] == []


def test_engine_defaults_agree_with_the_table() -> None:
    assert to_sampling(merge_options()) == SamplingParams()


@pytest.fixture
async def env(tmp_path: Path, tiny_models: dict[str, Path]) -> AsyncIterator[tuple]:
    registry = Registry(tmp_path / "registry")
    import_hf_dir(registry, tiny_models["llama"], "plain")
    engine = FakeEngine()
    async with serve_app(registry, engine) as served:
        yield served, engine


async def test_every_dialect_samples_with_the_same_defaults(env) -> None:
    served, engine = env
    ask = [{"role": "user", "content": "hi"}]
    await served.raw.post("/api/chat", json={"model": "plain", "messages": ask, "stream": False})
    await served.raw.post("/api/generate", json={"model": "plain", "prompt": "hi", "stream": False})
    await served.openai.chat.completions.create(model="plain", messages=ask)
    await served.openai.responses.create(model="plain", input="hi")
    await served.anthropic.messages.create(model="plain", max_tokens=4096, messages=ask)
    expected = to_sampling(merge_options())
    for request in engine.requests:
        sampling = request.sampling
        sampling.max_tokens = None  # Anthropic's max_tokens is required
        assert sampling == expected, request
