"""Tool calls in both dialects: tools rendered by the model's template, Hermes-style
<tool_call> output parsed into Ollama's and OpenAI's tool_calls, streaming and not."""

from __future__ import annotations

import json
from collections.abc import AsyncIterator
from pathlib import Path

import ollama
import openai
import pytest

from ollama_compact_server.chat.toolcalls import ToolStream, parse_tool_calls
from ollama_compact_server.registry.importers import import_hf_dir
from ollama_compact_server.registry.store import Registry
from tests.conftest import serve_app
from tests.fakes import FakeEngine

TEMPLATE = (
    "{% if tools %}Tools: {{ tools | tojson }}\n{% endif %}"
    "{% for m in messages %}<start_of_turn>{{ m['role'] }}\n{{ m['content'] }}"
    "{% if m.tool_calls %}{{ m.tool_calls | tojson }}{% endif %}<end_of_turn>\n{% endfor %}"
    "<start_of_turn>model\n"
)
SCRIPT = (
    'Let me check. <tool_call>{"name": "get_weather", "arguments": {"city": "Paris"}}</tool_call>'
)
WEATHER = {
    "type": "function",
    "function": {
        "name": "get_weather",
        "description": "Weather in a city",
        "parameters": {
            "type": "object",
            "properties": {"city": {"type": "string"}},
            "required": ["city"],
        },
    },
}
ASK = [{"role": "user", "content": "Weather in Paris?"}]


@pytest.fixture
async def env(tmp_path: Path, tiny_models: dict[str, Path]) -> AsyncIterator[tuple]:
    registry = Registry(tmp_path / "registry")
    import_hf_dir(registry, tiny_models["llama"], "agent", template=TEMPLATE)
    import_hf_dir(registry, tiny_models["llama"], "plain")
    engine = FakeEngine(SCRIPT)
    async with serve_app(registry, engine) as served:
        yield served.ollama, served.openai, engine


def test_parser_and_stream() -> None:
    text, calls = parse_tool_calls(SCRIPT)
    assert (
        text == "Let me check."
        and calls[0].name == "get_weather"
        and calls[0].arguments == {"city": "Paris"}
    )
    assert parse_tool_calls("no calls here") == ("no calls here", [])
    assert parse_tool_calls("<tool_call>{broken</tool_call>")[1] == []
    stream = ToolStream()
    pieces = [
        stream.feed(p)
        for p in ("Let me ", "check. <tool", '_call>{"name": "f", "arguments": {}}</tool_call>')
    ]
    assert "".join(pieces) == "Let me check. "
    assert [c.name for c in stream.finish()[1]] == ["f"]


async def test_ollama_tool_calls(env) -> None:
    client, _, _ = env
    reply = await client.chat(model="agent", messages=ASK, tools=[WEATHER])
    assert reply.message.content == "Let me check."
    call = reply.message.tool_calls[0]
    assert call.function.name == "get_weather" and call.function.arguments == {"city": "Paris"}
    parts = [
        p
        async for p in await client.chat(model="agent", messages=ASK, tools=[WEATHER], stream=True)
    ]
    calls = [c for p in parts for c in (p.message.tool_calls or [])]
    assert [c.function.name for c in calls] == ["get_weather"]
    assert "<tool_call>" not in "".join(p.message.content or "" for p in parts)
    # the tool's answer goes back through the template
    history = [
        *ASK,
        {
            "role": "assistant",
            "content": "",
            "tool_calls": [{"function": {"name": "get_weather", "arguments": {"city": "Paris"}}}],
        },
        {"role": "tool", "content": "18 degrees", "tool_name": "get_weather"},
    ]
    await client.chat(model="agent", messages=history, tools=[WEATHER])
    with pytest.raises(ollama.ResponseError) as info:
        await client.chat(model="plain", messages=ASK, tools=[WEATHER])
    assert "does not support tools" in str(info.value)


async def test_openai_tool_calls(env) -> None:
    _, oai, _ = env
    result = await oai.chat.completions.create(model="agent", messages=ASK, tools=[WEATHER])
    choice = result.choices[0]
    assert choice.finish_reason == "tool_calls"
    call = choice.message.tool_calls[0]
    assert call.function.name == "get_weather" and json.loads(call.function.arguments) == {
        "city": "Paris"
    }
    assert call.id.startswith("call_")
    stream = await oai.chat.completions.create(
        model="agent", messages=ASK, tools=[WEATHER], stream=True
    )
    chunks = [c async for c in stream]
    deltas = [t for c in chunks if c.choices for t in (c.choices[0].delta.tool_calls or [])]
    assert deltas[0].function.name == "get_weather" and deltas[0].index == 0
    assert chunks[-1].choices[0].finish_reason == "tool_calls"
    history = [
        *ASK,
        {
            "role": "assistant",
            "content": None,
            "tool_calls": [
                {
                    "id": "call_1",
                    "type": "function",
                    "function": {"name": "get_weather", "arguments": '{"city": "Paris"}'},
                }
            ],
        },
        {"role": "tool", "tool_call_id": "call_1", "content": "18 degrees"},
    ]
    await oai.chat.completions.create(model="agent", messages=history, tools=[WEATHER])
    plain = await oai.chat.completions.create(
        model="agent", messages=ASK, tools=[WEATHER], tool_choice="none"
    )
    assert plain.choices[0].message.content == SCRIPT  # no tools offered: text is text
    with pytest.raises(openai.BadRequestError):
        await oai.chat.completions.create(model="plain", messages=ASK, tools=[WEATHER])


CITY = {
    "type": "function",
    "function": {
        "name": "get_weather",
        "parameters": {
            "type": "object",
            "properties": {"city": {"enum": ["Paris", "Rome"]}},
            "required": ["city"],
            "additionalProperties": False,
        },
    },
}
TIME = {  # no free-form arguments: a random-weight model would fill them until max_tokens
    "type": "function",
    "function": {
        "name": "get_time",
        "parameters": {"type": "object", "properties": {}, "additionalProperties": False},
    },
}


async def test_tool_choice_forces_a_call_on_the_real_engine(
    tmp_path: Path, tiny_models: dict[str, Path]
) -> None:
    """tool_choice "required" or a named function: even a random-weight model answers with
    a well-formed call (the grammar allows nothing else); "auto" leaves it free."""
    registry = Registry(tmp_path / "registry")
    import_hf_dir(registry, tiny_models["llama"], "agent", template=TEMPLATE)
    async with serve_app(registry, dtype="float32") as served:
        client = served.openai
        for choice, names in (
            ("required", {"get_weather", "get_time"}),
            ({"type": "function", "function": {"name": "get_weather"}}, {"get_weather"}),
        ):
            for seed in (1, 2):
                r = await client.chat.completions.create(
                    model="agent", messages=ASK, tools=[CITY, TIME], tool_choice=choice,
                    max_tokens=200, temperature=1.0, seed=seed,
                )  # fmt: skip
                call = r.choices[0].message.tool_calls[0]
                assert r.choices[0].finish_reason == "tool_calls"
                assert call.function.name in names
                arguments = json.loads(call.function.arguments)
                if call.function.name == "get_weather":
                    assert arguments["city"] in ("Paris", "Rome")
        stream = await client.chat.completions.create(
            model="agent", messages=ASK, tools=[CITY], tool_choice="required",
            max_tokens=200, stream=True,
        )  # fmt: skip
        chunks = [c async for c in stream]
        calls = [tc for c in chunks if c.choices for tc in c.choices[0].delta.tool_calls or []]
        assert calls and calls[0].function.name == "get_weather"
        for bad, message in (
            ({"type": "function", "function": {"name": "nope"}}, "not among the tools"),
            ("required", "requires tools"),
        ):
            with pytest.raises(openai.BadRequestError, match=message):
                await client.chat.completions.create(
                    model="agent", messages=ASK, tool_choice=bad, max_tokens=5,
                    tools=[CITY] if message != "requires tools" else openai.NOT_GIVEN,
                )  # fmt: skip
        with pytest.raises(openai.BadRequestError, match="response_format"):
            await client.chat.completions.create(
                model="agent", messages=ASK, tools=[CITY], tool_choice="required",
                response_format={"type": "json_object"}, max_tokens=5,
            )  # fmt: skip
