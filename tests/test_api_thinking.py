"""Thinking models: reasoning between <think> and </think> comes back as `thinking`, apart
from the answer, streaming and not; think:false turns it off; other models refuse think."""

from __future__ import annotations

from collections.abc import AsyncIterator
from pathlib import Path

import pytest

from ollama_compact_server.chat.thinking import ThinkSplitter, split_thinking
from ollama_compact_server.registry.importers import import_hf_dir
from ollama_compact_server.registry.store import Registry
from tests.conftest import serve_app
from tests.fakes import FakeEngine

TEMPLATE = (
    "{% for m in messages %}<start_of_turn>{{ m['role'] }}\n{{ m['content'] }}"
    "<end_of_turn>\n{% endfor %}"
    "<start_of_turn>model\n{% if enable_thinking is defined and not enable_thinking %}"
    "<think>\n\n</think>\n\n{% endif %}"
)
SCRIPT = "<think>Two plus two is four.</think> The answer is 4."
ASK = [{"role": "user", "content": "2+2?"}]


@pytest.fixture
async def env(tmp_path: Path, tiny_models: dict[str, Path]) -> AsyncIterator[tuple]:
    registry = Registry(tmp_path / "registry")
    import_hf_dir(registry, tiny_models["llama"], "thinker", template=TEMPLATE)
    import_hf_dir(registry, tiny_models["llama"], "plain")
    engine = FakeEngine(SCRIPT)
    async with serve_app(registry, engine) as served:
        yield served.raw, served.ollama, engine


def test_splitter() -> None:
    assert split_thinking(SCRIPT) == ("Two plus two is four.", "The answer is 4.")
    assert split_thinking("no thinking here") == ("", "no thinking here")
    assert split_thinking("reasoning</think>answer", inside=True) == ("reasoning", "answer")
    splitter = ThinkSplitter()
    pieces = [splitter.feed(p) for p in ("<thi", "nk>ab", "c</thi", "nk>  An", "swer")]
    assert "".join(t for t, _ in pieces) == "abc" and "".join(c for _, c in pieces) == "Answer"


async def test_thinking_in_chat_and_generate(env) -> None:
    raw, client, _ = env
    assert "thinking" in (await client.show("thinker")).capabilities
    reply = await client.chat(model="thinker", messages=ASK)
    assert (
        reply.message.thinking == "Two plus two is four."
        and reply.message.content == "The answer is 4."
    )
    parts = [p async for p in await client.chat(model="thinker", messages=ASK, stream=True)]
    assert "".join(p.message.thinking or "" for p in parts) == "Two plus two is four."
    assert "".join(p.message.content for p in parts).strip() == "The answer is 4."
    out = await client.generate(model="thinker", prompt="2+2?")
    assert out.thinking == "Two plus two is four." and out.response == "The answer is 4."
    off = await client.chat(model="thinker", messages=ASK, think=False)
    assert off.message.thinking is None and "<think>" in off.message.content
    for level in ("high", "low", True):
        body = {"model": "thinker", "messages": ASK, "think": level, "stream": False}
        r = await raw.post("/api/chat", json=body)
        assert r.status_code == 200 and r.json()["message"]["thinking"] == "Two plus two is four."
    r = await raw.post("/api/generate", json={"model": "thinker", "prompt": "x", "think": "high"})
    assert r.status_code == 200
    load = {"model": "plain", "think": True}
    r = await raw.post("/api/generate", json=load)  # a load checks think too
    assert r.status_code == 400 and "does not support thinking" in r.json()["error"]
    r = await raw.post("/api/generate", json={**load, "keep_alive": 0})  # an unload does not
    assert r.status_code == 200 and r.json()["done_reason"] == "unload"
    r = await raw.post("/api/chat", json={"model": "plain", "messages": ASK, "think": True})
    assert r.status_code == 400 and "does not support thinking" in r.json()["error"]
    reply = await client.chat(model="plain", messages=ASK)  # no thinking: text as is
    assert reply.message.content == SCRIPT


async def test_openai_reasoning_content(tmp_path: Path, tiny_models: dict[str, Path]) -> None:
    registry = Registry(tmp_path / "registry2")
    import_hf_dir(registry, tiny_models["llama"], "thinker", template=TEMPLATE)
    async with serve_app(registry, FakeEngine(SCRIPT)) as served:
        result = await served.openai.chat.completions.create(model="thinker", messages=ASK)
        message = result.choices[0].message
        assert message.content == "The answer is 4."
        assert message.model_extra["reasoning_content"] == "Two plus two is four."
        stream = await served.openai.chat.completions.create(
            model="thinker", messages=ASK, stream=True
        )
        chunks = [c async for c in stream if c.choices]
        reasoning = "".join(
            (c.choices[0].delta.model_extra or {}).get("reasoning_content") or "" for c in chunks
        )
        content = "".join(c.choices[0].delta.content or "" for c in chunks)
        assert reasoning == "Two plus two is four." and content.strip() == "The answer is 4."
        off = await served.openai.chat.completions.create(
            model="thinker", messages=ASK, reasoning_effort="none"
        )
        assert "<think>" in off.choices[0].message.content
