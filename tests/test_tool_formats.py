"""Tool calls in the forms of the families people run (Hermes/Qwen, Llama 3.1, Mistral,
Phi-4-mini, Gemma 3), chosen by the model's template: parsed whole and streamed (with the
special tokens present or dropped by the detokenizer), served through every dialect with
stable indices and ids, and forced by a grammar in each family's own form."""

from __future__ import annotations

import json
from collections.abc import AsyncIterator
from pathlib import Path

import pytest

from ollama_compact_server.chat.toolcalls import (
    GEMMA,
    HERMES,
    LLAMA,
    MISTRAL,
    PHI4,
    ToolFormat,
    ToolStream,
    forced_call,
    parse_tool_calls,
    tool_format,
)
from ollama_compact_server.registry.importers import import_hf_dir
from ollama_compact_server.registry.store import Registry
from tests.conftest import serve_app
from tests.fakes import FakeEngine

# tiny templates in each family's style: the markers they teach decide the format
TEMPLATES = {
    "llama3": (
        "{% for m in messages %}<|start_header_id|>{{ m['role'] }}<|end_header_id|>\n\n"
        "{{ m['content'] }}{% if m.tool_calls %}<|python_tag|>{{ m.tool_calls | tojson }}"
        "{% endif %}<|eot_id|>{% endfor %}{% if tools %}Tools: {{ tools | tojson }}{% endif %}"
        "<|start_header_id|>assistant<|end_header_id|>\n\n"
    ),
    "mistral": (
        "{% if tools %}[AVAILABLE_TOOLS]{{ tools | tojson }}[/AVAILABLE_TOOLS]{% endif %}"
        "{% for m in messages %}[INST]{{ m['content'] }}[/INST]"
        "{% if m.tool_calls %}[TOOL_CALLS]{{ m.tool_calls | tojson }}{% endif %}{% endfor %}"
    ),
    "phi4": (
        "{% if tools %}<|system|><|tool|>{{ tools | tojson }}<|/tool|><|end|>{% endif %}"
        "{% for m in messages %}<|{{ m['role'] }}|>{{ m['content'] }}{% if m.tool_calls %}"
        "<|tool_call|>{{ m.tool_calls | tojson }}<|/tool_call|>{% endif %}<|end|>{% endfor %}"
        "<|assistant|>"
    ),
    "gemma3": (
        "{% if tools %}Call functions as [name(arg=value)] in a ```tool_code block: "
        "{{ tools | tojson }}\n{% endif %}{% for m in messages %}<start_of_turn>{{ m['role'] }}"
        "\n{{ m['content'] }}<end_of_turn>\n{% endfor %}<start_of_turn>model\n"
    ),
    "hermes": (
        "{% if tools %}<tools>{{ tools | tojson }}</tools> Answer with <tool_call>{...}"
        "</tool_call>\n{% endif %}{% for m in messages %}<|im_start|>{{ m['role'] }}\n"
        "{{ m['content'] }}<|im_end|>\n{% endfor %}<|im_start|>assistant\n"
    ),
}
PARIS = {"city": "Paris"}
# what each family writes for get_weather(city="Paris"), and again without the special
# tokens a real detokenizer drops
OUTPUTS = {
    "llama3": [
        '<|python_tag|>{"name": "get_weather", "parameters": {"city": "Paris"}}',
        '{"name": "get_weather", "parameters": {"city": "Paris"}}',
    ],
    "mistral": [
        '[TOOL_CALLS][{"name": "get_weather", "arguments": {"city": "Paris"}}]',
        '[{"name": "get_weather", "arguments": {"city": "Paris"}}]',
        '[TOOL_CALLS]get_weather[ARGS]{"city": "Paris"}',
    ],
    "phi4": [
        'Checking. <|tool_call|>[{"name": "get_weather", "arguments": {"city": "Paris"}}]'
        "<|/tool_call|>",
        '[{"name": "get_weather", "arguments": {"city": "Paris"}}]',
        'functools[{"name": "get_weather", "arguments": {"city": "Paris"}}]',
    ],
    "gemma3": [
        '[get_weather(city="Paris")]',
        '```tool_code\nget_weather(city="Paris")\n```',
        '{"name": "get_weather", "parameters": {"city": "Paris"}}',
    ],
    "hermes": ['<tool_call>{"name": "get_weather", "arguments": {"city": "Paris"}}</tool_call>'],
}
FORMATS = {f.name: f for f in (HERMES, LLAMA, MISTRAL, PHI4, GEMMA)}
NAMES = frozenset({"get_weather", "get_time"})
WEATHER = {
    "type": "function",
    "function": {
        "name": "get_weather",
        "description": "Weather in a city",
        "parameters": {"type": "object", "properties": {"city": {"type": "string"}}},
    },
}
ASK = [{"role": "user", "content": "Weather in Paris?"}]


@pytest.mark.parametrize("family", sorted(TEMPLATES))
def test_the_template_decides_the_format(family: str) -> None:
    assert tool_format(TEMPLATES[family]) is FORMATS[family]


def streamed(text: str, fmt: ToolFormat, step: int) -> tuple[str, list]:
    stream = ToolStream(fmt, NAMES)
    out = "".join(stream.feed(text[i : i + step]) for i in range(0, len(text), step))
    rest, calls = stream.finish()
    return out + rest, calls


@pytest.mark.parametrize("family", sorted(OUTPUTS))
def test_each_family_parses_whole_and_streamed(family: str) -> None:
    fmt = FORMATS[family]
    for output in OUTPUTS[family]:
        text, calls = parse_tool_calls(output, fmt, NAMES)
        assert [(c.name, c.arguments) for c in calls] == [("get_weather", PARIS)], output
        assert "get_weather" not in text
        for step in (1, 3, 1000):
            visible, calls = streamed(output, fmt, step)
            assert [(c.name, c.arguments) for c in calls] == [("get_weather", PARIS)], output
            assert visible.strip() == text, (output, step)


def test_several_calls_and_plain_answers() -> None:
    two = (
        '[TOOL_CALLS][{"name": "get_weather", "arguments": {"city": "Paris"}}, '
        '{"name": "get_time", "arguments": {}}]'
    )
    _, calls = parse_tool_calls(two, MISTRAL, NAMES)
    assert [c.name for c in calls] == ["get_weather", "get_time"]
    assert len({c.id for c in calls}) == 2
    _, calls = parse_tool_calls('[get_weather(city="Paris"), get_time()]', GEMMA, NAMES)
    assert [c.name for c in calls] == ["get_weather", "get_time"]
    llama = (
        '{"name": "get_weather", "parameters": {"city": "Paris"}}; '
        '{"name": "get_time", "parameters": {}}'
    )
    assert len(parse_tool_calls(llama, LLAMA, NAMES)[1]) == 2
    # answers that only look like calls stay text
    for fmt, text in (
        (LLAMA, '{"name": "Bob", "age": 3}'),  # JSON, but no arguments key
        (LLAMA, '{"name": "unknown_tool", "parameters": {}}'),  # no such tool offered
        (MISTRAL, "[1, 2, 3] are the numbers"),
        (GEMMA, "[1] First, the weather."),
        (GEMMA, "[__import__('os').system('true')]"),  # parsed, never run: no call
        (GEMMA, "[get_weather(open('/etc/passwd').read())]"),
        (PHI4, "<|tool_call|>[{broken<|/tool_call|>"),
        (HERMES, "no calls here"),
    ):
        visible, calls = parse_tool_calls(text, fmt, NAMES)
        assert calls == [] and visible == text, text
        assert streamed(text, fmt, 2) == (text, []), text


@pytest.mark.parametrize("family", sorted(FORMATS))
def test_forced_calls_in_each_form(family: str) -> None:
    fmt = FORMATS[family]
    schema, wrap = forced_call([WEATHER], "get_weather", fmt)
    option = json.loads(schema)["anyOf"][0]
    assert option["required"] == ["name", fmt.key]
    assert wrap == fmt.forced
    # what the grammar allows is what the parser reads back
    value = json.dumps({"name": "get_weather", fmt.key: PARIS}, separators=(",", ":"))
    before, after = wrap or ("", "")
    _, calls = parse_tool_calls(before + value + after, fmt, NAMES)
    assert [(c.name, c.arguments) for c in calls] == [("get_weather", PARIS)]


@pytest.fixture
async def env(tmp_path: Path, tiny_models: dict[str, Path]) -> AsyncIterator[tuple]:
    registry = Registry(tmp_path / "registry")
    for family, template in TEMPLATES.items():
        import_hf_dir(registry, tiny_models["llama"], family, template=template)
    engine = FakeEngine()
    async with serve_app(registry, engine) as served:
        yield served, engine


@pytest.mark.parametrize("family", sorted(TEMPLATES))
async def test_every_dialect_serves_each_family(env, family: str) -> None:
    served, engine = env
    engine.script = OUTPUTS[family][0].split(" ")
    # OpenAI chat, whole and streamed (one call, index 0, one id)
    r = await served.openai.chat.completions.create(model=family, messages=ASK, tools=[WEATHER])
    call = r.choices[0].message.tool_calls[0]
    assert r.choices[0].finish_reason == "tool_calls"
    assert (call.function.name, json.loads(call.function.arguments)) == ("get_weather", PARIS)
    chunks = [
        c
        async for c in await served.openai.chat.completions.create(
            model=family, messages=ASK, tools=[WEATHER], stream=True
        )
    ]
    pieces = [t for c in chunks if c.choices for t in c.choices[0].delta.tool_calls or []]
    assert [(p.index, p.function.name) for p in pieces] == [(0, "get_weather")]
    assert pieces[0].id and json.loads(pieces[0].function.arguments) == PARIS
    text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert "get_weather" not in text
    # Ollama
    reply = await served.ollama.chat(model=family, messages=ASK, tools=[WEATHER])
    assert reply.message.tool_calls[0].function.name == "get_weather"
    # Anthropic
    tool = {"name": "get_weather", "input_schema": WEATHER["function"]["parameters"]}
    message = await served.anthropic.messages.create(
        model=family, max_tokens=64, messages=ASK, tools=[tool]
    )
    assert message.stop_reason == "tool_use" and message.content[-1].input == PARIS
    # Responses
    response = await served.openai.responses.create(
        model=family, input="Weather in Paris?", tools=[{"type": "function", **WEATHER["function"]}]
    )
    calls = [item for item in response.output if item.type == "function_call"]
    assert [json.loads(c.arguments) for c in calls] == [PARIS]
    # a forced call is wrapped in the family's own form
    await served.openai.chat.completions.create(
        model=family, messages=ASK, tools=[WEATHER], tool_choice="required"
    )
    sampling = engine.requests[-1].sampling
    assert sampling.json_wrap == FORMATS[family].forced
    assert FORMATS[family].key in sampling.json_schema


CITY = {
    "type": "function",
    "function": {
        "name": "get_weather",
        "parameters": {
            "type": "object",
            "properties": {"city": {"type": "string", "enum": ["Paris", "Rome"]}},
            "required": ["city"],
            "additionalProperties": False,  # a random model would invent more keys
        },
    },
}


async def test_forced_calls_on_the_real_engine_in_every_family(
    tmp_path: Path, tiny_models: dict[str, Path]
) -> None:
    """The grammar writes each family's own form and the parser reads it back: even a
    random-weight model answers with a well-formed call, in every dialect."""
    registry = Registry(tmp_path / "registry")
    for family, template in TEMPLATES.items():
        import_hf_dir(registry, tiny_models["llama"], family, template=template)
    async with serve_app(registry, dtype="float32") as served:
        for family in TEMPLATES:
            r = await served.openai.chat.completions.create(
                model=family, messages=ASK, tools=[CITY], tool_choice="required",
                max_tokens=200, seed=1,
            )  # fmt: skip
            assert r.choices[0].finish_reason == "tool_calls", (family, r.choices[0].message)
            call = r.choices[0].message.tool_calls[0]
            assert call.function.name == "get_weather"
            assert json.loads(call.function.arguments)["city"] in ("Paris", "Rome")
        tool = {"name": "get_weather", "input_schema": CITY["function"]["parameters"]}
        message = await served.anthropic.messages.create(
            model="mistral", max_tokens=200, messages=ASK, tools=[tool],
            tool_choice={"type": "tool", "name": "get_weather"},
        )  # fmt: skip
        assert message.stop_reason == "tool_use"
        assert message.content[-1].input["city"] in ("Paris", "Rome")
        response = await served.openai.responses.create(
            model="gemma3", input="Weather?", max_output_tokens=200,
            tools=[{"type": "function", **CITY["function"]}], tool_choice="required",
        )  # fmt: skip
        calls = [item for item in response.output if item.type == "function_call"]
        assert calls and json.loads(calls[0].arguments)["city"] in ("Paris", "Rome")
