"""The official ollama, openai and anthropic clients against the daemon started as a
process on a free loopback port (tiny model registry): every generation endpoint of every
dialect, streaming and not, and the process survives malformed requests."""

from __future__ import annotations

from pathlib import Path

import anthropic
import httpx
import ollama
import openai
import pytest

from ollama_compact_server.registry.importers import import_hf_dir
from ollama_compact_server.registry.store import Registry
from tests.conftest import Daemon, free_port

AGENT_TEMPLATE = (
    "{% if tools %}<tools>{{ tools | tojson }}</tools>\n{% endif %}{% for m in messages %}"
    "<|im_start|>{{ m['role'] }}\n{{ m['content'] }}{% if m.tool_calls %}<tool_call>"
    "{{ m.tool_calls | tojson }}</tool_call>{% endif %}<|im_end|>\n{% endfor %}"
    "<|im_start|>assistant\n"
)
CITY_SCHEMA = {
    "type": "object",
    "properties": {"city": {"type": "string", "enum": ["Paris", "Rome"]}},
    "required": ["city"],
    "additionalProperties": False,
}


@pytest.fixture(scope="module")
def daemon(tmp_path_factory: pytest.TempPathFactory, tiny_models: dict[str, Path]):
    root = tmp_path_factory.mktemp("daemon")
    registry = Registry(root / "models")
    import_hf_dir(registry, tiny_models["llama"], "tiny")
    import_hf_dir(registry, tiny_models["llama"], "agent", template=AGENT_TEMPLATE)
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
    assert sorted(m.model for m in client.list().models) == ["agent:latest", "tiny:latest"]
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
    assert sorted(m.id for m in client.models.list().data) == ["agent:latest", "tiny:latest"]
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


def test_openai_responses(daemon: Daemon) -> None:
    client = openai.OpenAI(base_url=daemon.url + "/v1", api_key="unused", max_retries=0)
    r = client.responses.create(model="tiny", input="hi", max_output_tokens=4, temperature=0)
    assert r.status == "incomplete" and r.usage.output_tokens == 4
    assert r.output[0].type == "message"
    with client.responses.stream(
        model="tiny", input="hi", max_output_tokens=4, temperature=0
    ) as stream:
        events = list(stream)
    # cut by max_output_tokens: response.incomplete ends the stream, as OpenAI sends it
    assert events[0].type == "response.created" and events[-1].type == "response.incomplete"
    text = "".join(e.delta for e in events if e.type == "response.output_text.delta")
    assert text == r.output_text  # greedy: streamed equals whole
    follow = client.responses.create(
        model="tiny", input="more", max_output_tokens=2, previous_response_id=r.id
    )
    assert follow.previous_response_id == r.id and follow.usage.input_tokens > r.usage.input_tokens
    with pytest.raises(openai.BadRequestError):
        client.responses.create(model="tiny", input=[{"type": "mystery"}])


def test_anthropic_client(daemon: Daemon) -> None:
    client = anthropic.Anthropic(base_url=daemon.url, api_key="unused", max_retries=0)
    ask = [{"role": "user", "content": "hi"}]
    message = client.messages.create(
        model="tiny", max_tokens=4, messages=ask, extra_body={"temperature": 0}
    )
    assert message.stop_reason == "max_tokens" and message.usage.output_tokens == 4
    with client.messages.stream(
        model="tiny", max_tokens=4, messages=ask, extra_body={"temperature": 0}
    ) as stream:
        kinds = [event.type for event in stream]
        final = stream.get_final_message()
    assert kinds[0] == "message_start" and kinds[-1] == "message_stop"
    assert final.content[0].text == message.content[0].text  # greedy: streamed equals whole
    assert client.messages.count_tokens(model="tiny", messages=ask).input_tokens > 0
    with pytest.raises(anthropic.NotFoundError):
        client.messages.create(model="absent", max_tokens=4, messages=ask)
    with pytest.raises(anthropic.BadRequestError):
        client.messages.create(model="tiny", max_tokens=0, messages=ask)


def test_tool_use_round_trips(daemon: Daemon) -> None:
    """A forced call (the grammar makes even the random-weight model write one), its result
    sent back, and an answer: through the anthropic SDK and the Responses API."""
    claude = anthropic.Anthropic(base_url=daemon.url, api_key="unused", max_retries=0)
    tool = {"name": "get_weather", "description": "Weather", "input_schema": CITY_SCHEMA}
    ask = [{"role": "user", "content": "Weather in Paris?"}]
    called = claude.messages.create(
        model="agent", max_tokens=100, messages=ask, tools=[tool],
        tool_choice={"type": "tool", "name": "get_weather"},
    )  # fmt: skip
    assert called.stop_reason == "tool_use"
    use = called.content[-1]
    assert use.type == "tool_use" and use.input["city"] in ("Paris", "Rome")
    answer = claude.messages.create(
        model="agent", max_tokens=5, tools=[tool],
        messages=[
            *ask,
            {"role": "assistant", "content": called.content},
            {"role": "user", "content": [
                {"type": "tool_result", "tool_use_id": use.id, "content": "18 C"},
            ]},
        ],
    )  # fmt: skip

    def prompt(usage: anthropic.types.Usage) -> int:  # cache reads are counted apart
        return usage.input_tokens + (usage.cache_read_input_tokens or 0)

    assert prompt(answer.usage) > prompt(called.usage)
    client = openai.OpenAI(base_url=daemon.url + "/v1", api_key="unused", max_retries=0)
    function = {"type": "function", "name": "get_weather", "parameters": CITY_SCHEMA}
    first = client.responses.create(
        model="agent", input="Weather in Paris?", tools=[function], tool_choice="required",
        max_output_tokens=100,
    )  # fmt: skip
    call = next(item for item in first.output if item.type == "function_call")
    assert call.name == "get_weather"
    second = client.responses.create(
        model="agent", tools=[function], max_output_tokens=5,
        input=[
            {"role": "user", "content": "Weather in Paris?"},
            {"type": "function_call", "call_id": call.call_id, "name": call.name,
             "arguments": call.arguments},
            {"type": "function_call_output", "call_id": call.call_id, "output": "18 C"},
        ],
    )  # fmt: skip
    assert second.status in ("completed", "incomplete")
    assert second.usage.input_tokens > first.usage.input_tokens


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
        b'{"model": "tiny", "max_tokens": 1, "messages": [{"role": "user", "content": [{}]}]}',
        b'{"model": "tiny", "max_tokens": 1, "messages": [{"role": "user"}], "system": [1]}',
        b'{"model": "tiny", "input": [{"role": "user", "content": [{"type": 5}]}]}',
        b'{"model": "tiny", "input": "x", "tools": [{"type": "function", "name": 5}]}',
        b'{"model": "tiny", "input": "x", "text": {"format": {"type": "json_schema"}}}',
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
        "/v1/responses",
        "/v1/messages",
        "/v1/messages/count_tokens",
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
