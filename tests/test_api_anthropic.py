"""Anthropic's Messages API through the real anthropic SDK, in process on a fake engine:
whole and streamed answers, thinking, a tool-use round trip, count_tokens, stop reasons,
and malformed bodies answered with Anthropic's 4xx error shape."""

from __future__ import annotations

import json
from collections.abc import AsyncIterator
from pathlib import Path

import anthropic
import pytest

from ollama_compact_server.registry.importers import import_hf_dir
from ollama_compact_server.registry.store import Registry
from tests.conftest import serve_app
from tests.fakes import FakeEngine

TEMPLATE = (
    "{% if tools %}Tools: {{ tools | tojson }}\n{% endif %}"
    "{% for m in messages %}<start_of_turn>{{ m['role'] }}\n{{ m['content'] }}"
    "{% if m.tool_calls %}{{ m.tool_calls | tojson }}{% endif %}<end_of_turn>\n{% endfor %}"
    "<start_of_turn>model\n"
    "{% if enable_thinking is defined and not enable_thinking %}<think></think>{% endif %}"
)
CALL = '<tool_call>{"name": "get_weather", "arguments": {"city": "Paris"}}</tool_call>'
WEATHER = {
    "name": "get_weather",
    "description": "Weather in a city",
    "input_schema": {
        "type": "object",
        "properties": {"city": {"type": "string"}},
        "required": ["city"],
    },
}
ASK = [{"role": "user", "content": "Weather in Paris?"}]


@pytest.fixture
async def env(tmp_path: Path, tiny_models: dict[str, Path]) -> AsyncIterator[tuple]:
    registry = Registry(tmp_path / "registry")
    import_hf_dir(registry, tiny_models["llama"], "agent", template=TEMPLATE)
    import_hf_dir(registry, tiny_models["llama"], "plain")
    engine = FakeEngine("Hello there friend")
    async with serve_app(registry, engine) as served:
        yield served.anthropic, served.raw, engine


async def test_create_and_stream_text(env) -> None:
    client, _, engine = env
    reply = await client.messages.create(model="plain", max_tokens=64, messages=ASK)
    assert reply.type == "message" and reply.role == "assistant" and reply.model == "plain:latest"
    assert [b.type for b in reply.content] == ["text"]
    assert reply.content[0].text == "Hello there friend"
    assert reply.stop_reason == "end_turn" and reply.stop_sequence is None
    assert reply.usage.output_tokens == 3 and reply.usage.input_tokens > 0
    # max_tokens, the system prompt and sampling reach the engine
    request = engine.requests[-1]
    assert request.sampling.max_tokens == 64
    reply = await client.messages.create(
        model="plain",
        max_tokens=5,
        system=[{"type": "text", "text": "Be brief."}],
        messages=ASK,
        stop_sequences=["###"],
        extra_body={"temperature": 0.0, "top_k": 7},  # no longer typed in this SDK
    )
    sampling = engine.requests[-1].sampling
    assert sampling.temperature == 0.0 and sampling.top_k == 7 and sampling.stop == ["###"]

    async with client.messages.stream(model="plain", max_tokens=64, messages=ASK) as stream:
        events = [event async for event in stream]
        final = await stream.get_final_message()
    kinds = [e.type for e in events]
    assert kinds[0] == "message_start" and kinds[-1] == "message_stop"
    assert "content_block_start" in kinds and "content_block_stop" in kinds
    assert final.content[0].text == "Hello there friend" and final.stop_reason == "end_turn"
    assert final.usage.output_tokens == 3


async def test_raw_stream_events_in_order(env) -> None:
    _, raw, _ = env
    body = {"model": "plain", "max_tokens": 32, "messages": ASK, "stream": True}
    async with raw.stream("POST", "/v1/messages", json=body) as r:
        assert r.status_code == 200
        text = (await r.aread()).decode()
    names = [line[7:] for line in text.splitlines() if line.startswith("event: ")]
    assert names[:2] == ["message_start", "ping"]
    assert names[2] == "content_block_start" and names[-3:] == [
        "content_block_stop",
        "message_delta",
        "message_stop",
    ]
    datas = [json.loads(line[6:]) for line in text.splitlines() if line.startswith("data: ")]
    assert all(d["type"] == n for d, n in zip(datas, names))  # event name = data type


async def test_thinking_blocks(env) -> None:
    client, _, engine = env
    engine.script = ["<think>", "sunny", "</think>", "Yes."]
    reply = await client.messages.create(
        model="agent",
        max_tokens=64,
        messages=ASK,
        thinking={"type": "enabled", "budget_tokens": 1024},
    )
    assert [b.type for b in reply.content] == ["thinking", "text"]
    assert reply.content[0].thinking == "sunny" and reply.content[1].text == "Yes."
    async with client.messages.stream(
        model="agent",
        max_tokens=64,
        messages=ASK,
        thinking={"type": "enabled", "budget_tokens": 1024},
    ) as stream:
        events = [event async for event in stream]
        final = await stream.get_final_message()
    assert [b.type for b in final.content] == ["thinking", "text"]
    assert any(e.type == "content_block_delta" and e.delta.type == "thinking_delta" for e in events)
    # a model that cannot think answers without thinking rather than failing
    engine.script = ["Plain."]
    reply = await client.messages.create(
        model="plain",
        max_tokens=64,
        messages=ASK,
        thinking={"type": "enabled", "budget_tokens": 1024},
    )
    assert [b.type for b in reply.content] == ["text"]


async def test_tool_use_round_trip(env) -> None:
    client, _, engine = env
    engine.script = ["Let", "me", "check.", CALL]
    reply = await client.messages.create(
        model="agent", max_tokens=64, messages=ASK, tools=[WEATHER]
    )
    assert reply.stop_reason == "tool_use"
    assert [b.type for b in reply.content] == ["text", "tool_use"]
    use = reply.content[1]
    assert use.name == "get_weather" and use.input == {"city": "Paris"} and use.id
    # the tool's result goes back; the template sees the call and the result
    engine.script = ["It", "is", "18", "degrees."]
    reply = await client.messages.create(
        model="agent",
        max_tokens=64,
        tools=[WEATHER],
        messages=[
            *ASK,
            {"role": "assistant", "content": reply.content},
            {
                "role": "user",
                "content": [
                    {"type": "tool_result", "tool_use_id": use.id, "content": "18 degrees"}
                ],
            },
        ],
    )
    assert reply.content[0].text == "It is 18 degrees." and reply.stop_reason == "end_turn"
    # streamed: the call arrives as a tool_use block with input_json_delta
    engine.script = ["Let", "me", "check.", CALL]
    async with client.messages.stream(
        model="agent", max_tokens=64, messages=ASK, tools=[WEATHER]
    ) as stream:
        events = [event async for event in stream]
        final = await stream.get_final_message()
    assert final.stop_reason == "tool_use"
    assert final.content[-1].type == "tool_use" and final.content[-1].input == {"city": "Paris"}
    deltas = [e for e in events if e.type == "content_block_delta"]
    assert any(d.delta.type == "input_json_delta" for d in deltas)
    assert "<tool_call>" not in "".join(b.text for b in final.content if b.type == "text")


async def test_tool_choice_forces_a_call(env) -> None:
    client, _, engine = env
    engine.script = [CALL]
    await client.messages.create(
        model="agent",
        max_tokens=64,
        messages=ASK,
        tools=[WEATHER],
        tool_choice={"type": "tool", "name": "get_weather"},
    )
    assert engine.requests[-1].sampling.json_schema is not None  # the grammar forces it
    await client.messages.create(
        model="agent", max_tokens=64, messages=ASK, tools=[WEATHER], tool_choice={"type": "any"}
    )
    assert engine.requests[-1].sampling.json_schema is not None
    await client.messages.create(
        model="agent", max_tokens=64, messages=ASK, tools=[WEATHER], tool_choice={"type": "none"}
    )
    assert engine.requests[-1].sampling.json_schema is None
    # server tools have nothing here to run them: left out, the client tools still served
    await client.messages.create(
        model="agent",
        max_tokens=64,
        messages=ASK,
        tools=[{"type": "web_search_20250305", "name": "web_search"}, WEATHER],
        tool_choice={"type": "any"},
    )
    schema = engine.requests[-1].sampling.json_schema
    assert "get_weather" in schema and "web_search" not in schema
    with pytest.raises(anthropic.BadRequestError, match="not among the tools"):
        await client.messages.create(
            model="agent",
            max_tokens=64,
            messages=ASK,
            tools=[WEATHER],
            tool_choice={"type": "tool", "name": "nope"},
        )


async def test_stop_reasons(env) -> None:
    client, _, engine = env
    engine.finish_with = ("length", None)
    reply = await client.messages.create(model="plain", max_tokens=3, messages=ASK)
    assert reply.stop_reason == "max_tokens"
    engine.finish_with = ("stop", "###")
    reply = await client.messages.create(
        model="plain", max_tokens=30, messages=ASK, stop_sequences=["###"]
    )
    assert reply.stop_reason == "stop_sequence" and reply.stop_sequence == "###"
    # a stop string of the model's own (its end-of-turn marker) ends the turn as end_turn
    engine.finish_with = ("stop", "<end_of_turn>")
    reply = await client.messages.create(model="plain", max_tokens=30, messages=ASK)
    assert reply.stop_reason == "end_turn" and reply.stop_sequence is None


async def test_count_tokens(env) -> None:
    client, _, _ = env
    short = await client.messages.count_tokens(model="agent", messages=ASK)
    longer = await client.messages.count_tokens(
        model="agent", messages=ASK, system="You are a weather bot.", tools=[WEATHER]
    )
    assert 0 < short.input_tokens < longer.input_tokens


async def test_errors_in_anthropic_shape(env) -> None:
    client, raw, engine = env
    with pytest.raises(anthropic.NotFoundError) as info:
        await client.messages.create(model="absent", max_tokens=8, messages=ASK)
    assert info.value.body["type"] == "error"
    assert info.value.body["error"]["type"] == "not_found_error"
    bad_bodies = [
        {"model": "plain", "messages": ASK},  # max_tokens is required
        {"model": "plain", "max_tokens": 0, "messages": ASK},
        {"model": "plain", "max_tokens": "8", "messages": ASK},
        {"model": "plain", "max_tokens": 8, "messages": []},
        {"model": "plain", "max_tokens": 8, "messages": "hi"},
        {"model": "plain", "max_tokens": 8, "messages": [{"role": "wizard", "content": "x"}]},
        {"model": "plain", "max_tokens": 8, "messages": [{"role": "user", "content": 5}]},
        {"model": "plain", "max_tokens": 8, "messages": [{"role": "user", "content": [5]}]},
        {"model": "plain", "max_tokens": 8, "messages": [{"role": "user"}]},
        {"model": "plain", "max_tokens": 8, "messages": ASK, "temperature": 3},
        {"model": "plain", "max_tokens": 8, "messages": ASK, "top_k": -1},
        {"model": "plain", "max_tokens": 8, "messages": ASK, "stream": "yes"},
        {"model": "plain", "max_tokens": 8, "messages": ASK, "stop_sequences": "x"},
        {"model": "plain", "max_tokens": 8, "messages": ASK, "system": 5},
        {"model": "plain", "max_tokens": 8, "messages": ASK, "tools": [{"x": 1}]},
        {"model": "plain", "max_tokens": 8, "messages": ASK, "tools": [WEATHER]},  # no tools
        {"model": "plain", "max_tokens": 8, "messages": ASK, "tool_choice": {"type": "x"}},
        {"model": "plain", "max_tokens": 8, "messages": ASK, "thinking": {"type": 1}},
        {
            "model": "plain",
            "max_tokens": 8,
            "messages": [{"role": "user", "content": [{"type": "tool_result"}]}],
        },
        {
            "model": "plain",
            "max_tokens": 8,
            "messages": [{"role": "user", "content": [{"type": "image", "source": {}}]}],
        },
        {"model": 5, "max_tokens": 8, "messages": ASK},
    ]
    for body in bad_bodies:
        for path in ("/v1/messages", "/v1/messages/count_tokens"):
            if path.endswith("count_tokens"):
                body = {k: v for k, v in body.items() if k in ("model", "messages", "system")}
                if body.get("model") == "plain" and body.get("messages") == ASK:
                    continue
            r = await raw.post(path, json=body)
            assert 400 <= r.status_code < 500, (path, body, r.status_code, r.text)
            error = r.json()
            assert error["type"] == "error" and error["error"]["type"].endswith("_error"), error
    assert not engine.requests  # nothing refused reached the engine
    for raw_body in (b"", b"{not json", b"[1]"):
        r = await raw.post("/v1/messages", content=raw_body)
        assert r.status_code == 400 and r.json()["type"] == "error"


async def test_busy_is_overloaded_and_midstream_error_in_band(env) -> None:
    _, raw, engine = env
    engine.busy = True
    r = await raw.post("/v1/messages", json={"model": "plain", "max_tokens": 8, "messages": ASK})
    assert r.status_code == 529 and r.json()["error"]["type"] == "overloaded_error"
    engine.busy = False
    engine.fail_after = 1
    body = {"model": "plain", "max_tokens": 8, "messages": ASK, "stream": True}
    async with raw.stream("POST", "/v1/messages", json=body) as r:
        text = (await r.aread()).decode()
    assert "event: error" in text and "injected failure" in text


async def test_x_api_key_authentication(tmp_path: Path, tiny_models: dict[str, Path]) -> None:
    registry = Registry(tmp_path / "registry")
    import_hf_dir(registry, tiny_models["llama"], "plain")
    async with serve_app(registry, FakeEngine(), api_key="sesame") as served:
        body = {"model": "plain", "max_tokens": 8, "messages": ASK}
        r = await served.raw.post("/v1/messages", json=body)
        assert r.status_code == 401 and r.json()["error"]["type"] == "authentication_error"
        r = await served.raw.post(
            "/v1/messages",
            json=body,
            headers={"x-api-key": "sesame", "anthropic-version": "2023-06-01"},
        )
        assert r.status_code == 200, r.text
        r = await served.raw.post(
            "/v1/messages", json=body, headers={"Authorization": "Bearer sesame"}
        )
        assert r.status_code == 200
        r = await served.raw.get("/api/tags", headers={"x-api-key": "wrong"})
        assert r.status_code == 401
