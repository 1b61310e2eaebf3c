"""OpenAI's Responses API through the real openai SDK, in process on a fake engine: whole
and streamed responses (the SDK's own stream accumulator checks the event order and item
identities), reasoning, function calls and their outputs, structured output, stored
responses for previous_response_id, and malformed bodies answered with OpenAI's 4xx."""

from __future__ import annotations

import json
from collections.abc import AsyncIterator
from pathlib import Path

import openai
import pytest

from ollama_compact_server.registry.importers import import_hf_dir
from ollama_compact_server.registry.store import Registry
from tests.conftest import serve_app
from tests.fakes import FakeEngine
from tests.test_api_anthropic import CALL, TEMPLATE

WEATHER = {
    "type": "function",
    "name": "get_weather",
    "description": "Weather in a city",
    "parameters": {
        "type": "object",
        "properties": {"city": {"type": "string"}},
        "required": ["city"],
    },
}


@pytest.fixture
async def env(tmp_path: Path, tiny_models: dict[str, Path]) -> AsyncIterator[tuple]:
    registry = Registry(tmp_path / "registry")
    import_hf_dir(registry, tiny_models["llama"], "agent", template=TEMPLATE)
    import_hf_dir(registry, tiny_models["llama"], "plain")
    engine = FakeEngine("Hello there friend")
    async with serve_app(registry, engine) as served:
        yield served.openai, served.raw, engine


async def test_create_text(env) -> None:
    client, _, engine = env
    r = await client.responses.create(
        model="plain", input="Say hello", instructions="Be brief.", max_output_tokens=64
    )
    assert r.object == "response" and r.status == "completed" and r.model == "plain:latest"
    assert r.output_text == "Hello there friend"
    assert [item.type for item in r.output] == ["message"]
    assert r.usage.output_tokens == 3 and r.usage.input_tokens > 0
    request = engine.requests[-1]
    assert request.sampling.max_tokens == 64
    # input items: messages with input_text / output_text parts
    r = await client.responses.create(
        model="plain",
        input=[
            {"role": "user", "content": [{"type": "input_text", "text": "Hi"}]},
            {"role": "assistant", "content": [{"type": "output_text", "text": "Hello"}]},
            {"type": "message", "role": "developer", "content": "Answer in French."},
            {"role": "user", "content": "How are you?"},
        ],
        temperature=0.0,
    )
    assert r.output_text == "Hello there friend"
    assert engine.requests[-1].sampling.temperature == 0.0
    engine.finish_with = ("length", None)
    r = await client.responses.create(model="plain", input="x", max_output_tokens=3)
    assert r.status == "incomplete" and r.incomplete_details.reason == "max_output_tokens"


async def test_stream_events(env) -> None:
    client, raw, engine = env
    async with client.responses.stream(model="plain", input="Say hello") as stream:
        events = [event async for event in stream]
        final = await stream.get_final_response()
    kinds = [e.type for e in events]
    assert kinds[:2] == ["response.created", "response.in_progress"]
    assert kinds[-1] == "response.completed"
    for expected in (
        "response.output_item.added",
        "response.content_part.added",
        "response.output_text.delta",
        "response.output_text.done",
        "response.content_part.done",
        "response.output_item.done",
    ):
        assert expected in kinds, expected
    assert final.output_text == "Hello there friend"
    numbers = [e.sequence_number for e in events]
    assert numbers == list(range(len(numbers)))
    # on the wire: every data line's type is its event name
    body = {"model": "plain", "input": "x", "stream": True}
    async with raw.stream("POST", "/v1/responses", json=body) as r:
        text = (await r.aread()).decode()
    names = [line[7:] for line in text.splitlines() if line.startswith("event: ")]
    datas = [json.loads(line[6:]) for line in text.splitlines() if line.startswith("data: ")]
    assert names and [d["type"] for d in datas] == names
    assert "[DONE]" not in text
    # an error after the headers: response.failed with the error
    engine.fail_after = 1
    async with raw.stream("POST", "/v1/responses", json=body) as r:
        text = (await r.aread()).decode()
    datas = [json.loads(line[6:]) for line in text.splitlines() if line.startswith("data: ")]
    failed = [d for d in datas if d["type"] == "response.failed"]
    assert failed and failed[0]["response"]["error"]["message"] == "injected failure"


async def test_reasoning_items(env) -> None:
    client, _, engine = env
    engine.script = ["<think>", "sunny", "</think>", "Yes."]
    r = await client.responses.create(model="agent", input="Sunny?", reasoning={"effort": "low"})
    assert [item.type for item in r.output] == ["reasoning", "message"]
    assert r.output[0].content[0].text == "sunny" and r.output_text == "Yes."
    async with client.responses.stream(
        model="agent", input="Sunny?", reasoning={"effort": "low"}
    ) as stream:
        events = [event async for event in stream]
        final = await stream.get_final_response()
    assert "response.reasoning_text.delta" in [e.type for e in events]
    assert [item.type for item in final.output] == ["reasoning", "message"]
    # reasoning effort "none" turns thinking off in the template
    await client.responses.create(model="agent", input="x", reasoning={"effort": "none"})
    assert engine.requests[-1].prompt_ids  # rendered with enable_thinking false


async def test_function_call_round_trip(env) -> None:
    client, _, engine = env
    engine.script = ["Let", "me", "check.", CALL]
    r = await client.responses.create(model="agent", input="Weather in Paris?", tools=[WEATHER])
    calls = [item for item in r.output if item.type == "function_call"]
    assert len(calls) == 1 and calls[0].name == "get_weather"
    assert json.loads(calls[0].arguments) == {"city": "Paris"} and calls[0].call_id
    engine.script = ["It", "is", "18", "degrees."]
    r = await client.responses.create(
        model="agent",
        tools=[WEATHER],
        input=[
            {"role": "user", "content": "Weather in Paris?"},
            {
                "type": "function_call",
                "call_id": calls[0].call_id,
                "name": "get_weather",
                "arguments": calls[0].arguments,
            },
            {"type": "function_call_output", "call_id": calls[0].call_id, "output": "18 C"},
        ],
    )
    assert r.output_text == "It is 18 degrees."
    # streamed: the call's arguments arrive once, whole, and the SDK's snapshot agrees
    engine.script = ["Let", "me", "check.", CALL]
    async with client.responses.stream(
        model="agent", input="Weather in Paris?", tools=[WEATHER]
    ) as stream:
        events = [event async for event in stream]
        final = await stream.get_final_response()
    kinds = [e.type for e in events]
    assert "response.function_call_arguments.delta" in kinds
    assert "response.function_call_arguments.done" in kinds
    call = next(item for item in final.output if item.type == "function_call")
    assert json.loads(call.arguments) == {"city": "Paris"}
    # tool_choice required / a named function force the call with a grammar
    await client.responses.create(model="agent", input="x", tools=[WEATHER], tool_choice="required")
    assert engine.requests[-1].sampling.json_schema is not None
    await client.responses.create(
        model="agent",
        input="x",
        tools=[WEATHER],
        tool_choice={"type": "function", "name": "get_weather"},
    )
    assert engine.requests[-1].sampling.json_schema is not None


async def test_structured_output(env) -> None:
    client, _, engine = env
    schema = {"type": "object", "properties": {"a": {"type": "integer"}}, "required": ["a"]}
    await client.responses.create(
        model="plain",
        input="x",
        text={"format": {"type": "json_schema", "name": "thing", "schema": schema}},
    )
    assert json.loads(engine.requests[-1].sampling.json_schema) == schema
    await client.responses.create(
        model="plain", input="x", text={"format": {"type": "json_object"}}
    )
    assert engine.requests[-1].sampling.json_schema == '{"type": "object"}'


async def test_previous_response_id(env) -> None:
    client, _, engine = env
    first = await client.responses.create(model="plain", input="My name is Ada.")
    await client.responses.create(
        model="plain", input="What is my name?", previous_response_id=first.id
    )
    both = engine.requests[-1].prompt_ids
    alone = engine.requests[-2].prompt_ids
    assert len(both) > len(alone)  # the earlier turn and its answer are in the prompt
    with pytest.raises(openai.NotFoundError, match="previous response"):
        await client.responses.create(model="plain", input="x", previous_response_id="resp_nope")
    unstored = await client.responses.create(model="plain", input="x", store=False)
    with pytest.raises(openai.NotFoundError):
        await client.responses.create(model="plain", input="y", previous_response_id=unstored.id)


async def test_malformed_bodies_are_openai_4xx(env) -> None:
    _, raw, engine = env
    bad_bodies = [
        {"input": "x"},
        {"model": "plain"},
        {"model": 5, "input": "x"},
        {"model": "plain", "input": 5},
        {"model": "plain", "input": []},
        {"model": "plain", "input": [5]},
        {"model": "plain", "input": [{"role": "wizard", "content": "x"}]},
        {"model": "plain", "input": [{"type": "function_call", "name": "f"}]},
        {
            "model": "plain",
            "input": [{"type": "function_call", "call_id": "c", "name": "f", "arguments": "{x"}],
        },
        {"model": "plain", "input": [{"type": "function_call_output", "output": "x"}]},
        {"model": "plain", "input": [{"type": "item_reference", "id": "x"}]},
        {"model": "plain", "input": [{"type": "mystery"}]},
        {"model": "plain", "input": "x", "max_output_tokens": 0},
        {"model": "plain", "input": "x", "max_output_tokens": "9"},
        {"model": "plain", "input": "x", "temperature": 9},
        {"model": "plain", "input": "x", "stream": "yes"},
        {"model": "plain", "input": "x", "tools": [WEATHER]},  # plain has no tools
        {"model": "agent", "input": "x", "tools": [WEATHER], "tool_choice": "sometimes"},
        {"model": "plain", "input": "x", "tool_choice": "required"},
        {"model": "plain", "input": "x", "text": {"format": {"type": "yaml"}}},
        {"model": "plain", "input": "x", "text": {"format": {"type": "json_schema"}}},
        {"model": "plain", "input": "x", "reasoning": {"effort": "extreme"}},
        {"model": "absent", "input": "x"},
    ]
    for body in bad_bodies:
        r = await raw.post("/v1/responses", json=body)
        assert 400 <= r.status_code < 500, (body, r.status_code, r.text)
        assert isinstance(r.json()["error"]["message"], str), r.text
    assert not engine.requests
    # hosted tools have nothing here to run them: left out, the turn still answers
    hosted = [{"type": "web_search"}, WEATHER]
    body = {"model": "agent", "input": "x", "tools": hosted, "tool_choice": "required"}
    r = await raw.post("/v1/responses", json=body)
    assert r.status_code == 200, r.text
    schema = engine.requests[-1].sampling.json_schema
    assert "get_weather" in schema and "web_search" not in schema
    body["tools"] = [{"type": "web_search"}]
    r = await raw.post("/v1/responses", json=body)
    assert r.status_code == 400 and "requires tools" in r.json()["error"]["message"]
