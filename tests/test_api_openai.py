"""OpenAI dialect in process with the official `openai` client: chat and text completions,
streaming with usage, n choices, models, and OpenAI-shaped errors."""

from __future__ import annotations

import json
from collections.abc import AsyncIterator
from pathlib import Path

import openai
import pytest

from ollama_compact_server.registry.importers import import_hf_dir
from ollama_compact_server.registry.store import Registry
from tests.conftest import serve_app


@pytest.fixture
async def clients(tmp_path: Path, tiny_models: dict[str, Path]) -> AsyncIterator[tuple]:
    registry = Registry(tmp_path / "registry")
    import_hf_dir(registry, tiny_models["qwen2"], "tiny")
    async with serve_app(registry, dtype="float32") as served:
        yield served.raw, served.openai


MESSAGES = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Say hello"}]


async def test_chat_completion(clients) -> None:
    _, client = clients
    result = await client.chat.completions.create(
        model="tiny", messages=MESSAGES, max_tokens=6, temperature=0
    )
    choice = result.choices[0]
    assert choice.message.role == "assistant" and choice.finish_reason == "length"
    assert result.usage.completion_tokens == 6 and result.usage.prompt_tokens > 0
    assert result.usage.total_tokens == result.usage.prompt_tokens + 6
    again = await client.chat.completions.create(
        model="tiny", messages=MESSAGES, max_tokens=6, temperature=0
    )
    assert again.choices[0].message.content == choice.message.content


async def test_chat_streaming_with_usage(clients) -> None:
    _, client = clients
    stream = await client.chat.completions.create(
        model="tiny",
        messages=MESSAGES,
        max_tokens=6,
        temperature=0,
        stream=True,
        stream_options={"include_usage": True},
    )
    chunks = [c async for c in stream]
    assert chunks[0].choices[0].delta.role == "assistant"
    text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    finals = [
        c.choices[0].finish_reason for c in chunks if c.choices and c.choices[0].finish_reason
    ]
    assert finals == ["length"]
    assert chunks[-1].usage is not None and chunks[-1].usage.completion_tokens == 6
    whole = await client.chat.completions.create(
        model="tiny", messages=MESSAGES, max_tokens=6, temperature=0
    )
    assert text == whole.choices[0].message.content


async def test_content_parts_and_n(clients) -> None:
    _, client = clients
    parts = [
        {
            "role": "user",
            "content": [{"type": "text", "text": "Say "}, {"type": "text", "text": "hello"}],
        }
    ]
    result = await client.chat.completions.create(
        model="tiny", messages=parts, max_tokens=4, n=3, temperature=1.0, seed=5
    )
    assert [c.index for c in result.choices] == [0, 1, 2]
    assert result.usage.completion_tokens == 12
    stream = await client.chat.completions.create(
        model="tiny", messages=parts, max_tokens=4, n=2, stream=True
    )
    seen = {c.choices[0].index for c in [c async for c in stream] if c.choices}
    assert seen == {0, 1}


async def test_text_completions(clients) -> None:
    _, client = clients
    result = await client.completions.create(
        model="tiny", prompt="Once upon", max_tokens=5, temperature=0
    )
    assert result.choices[0].finish_reason == "length" and result.usage.completion_tokens == 5
    echoed = await client.completions.create(
        model="tiny", prompt="Once upon", max_tokens=5, temperature=0, echo=True
    )
    assert echoed.choices[0].text == "Once upon" + result.choices[0].text
    many = await client.completions.create(
        model="tiny", prompt=["a", "b"], max_tokens=2, temperature=0
    )
    assert len(many.choices) == 2
    stream = await client.completions.create(
        model="tiny", prompt="Once upon", max_tokens=5, temperature=0, stream=True
    )
    text = "".join([c.choices[0].text async for c in stream if c.choices])
    assert text == result.choices[0].text


async def test_models(clients) -> None:
    _, client = clients
    models = await client.models.list()
    assert [m.id for m in models.data] == ["tiny:latest"]
    assert (await client.models.retrieve("tiny:latest")).id == "tiny:latest"
    with pytest.raises(openai.NotFoundError):
        await client.models.retrieve("absent")


async def test_errors_have_openai_shape(clients) -> None:
    raw, client = clients
    with pytest.raises(openai.NotFoundError) as info:
        await client.chat.completions.create(model="absent", messages=MESSAGES)
    assert info.value.body["code"] == "model_not_found"
    cases = [
        {"model": "tiny", "messages": []},
        {"model": "tiny", "messages": "hi"},
        {"model": "tiny", "messages": MESSAGES, "temperature": 3},
        {"model": "tiny", "messages": MESSAGES, "n": 100},
        {"model": "tiny", "messages": MESSAGES, "max_tokens": -1},
        {"model": "tiny", "messages": MESSAGES, "stop": ["x"] * 50},
        {"model": "tiny", "messages": MESSAGES, "logit_bias": {"abc": 1}},
        {"model": "tiny", "messages": MESSAGES, "logit_bias": {"5": 500}},
        {"model": "tiny", "messages": MESSAGES, "logit_bias": {"999999999": 5}},
        {"model": "tiny", "messages": MESSAGES, "logit_bias": {"\uff11": 5}},
        {"model": "tiny", "messages": MESSAGES, "logit_bias": {"9" * 5000: 5}},
        {"model": "tiny", "messages": MESSAGES, "top_logprobs": 50, "logprobs": True},
        {"model": "tiny", "messages": MESSAGES, "response_format": {"type": "json_schema"}},
        {"model": "tiny", "messages": MESSAGES, "response_format": {"type": "yaml"}},
        {"model": "tiny", "messages": [{"role": "user", "content": [{"type": "image_url"}]}]},
        {"model": "tiny", "messages": MESSAGES, "max_tokens": 10**9},
        {"model": "tiny", "messages": MESSAGES, "stream": True, "stream_options": "x"},
        {"model": "tiny", "messages": MESSAGES, "stream": True, "stream_options": [1]},
        {"model": "tiny", "messages": MESSAGES, "stream": True, "n": 2, "stream_options": "x"},
        {"model": "tiny", "messages": MESSAGES, "stream": "yes"},
        {"model": "tiny", "messages": [1]},
        {"model": "tiny", "messages": MESSAGES, "tools": [{"type": "function", "function": 1}]},
        {"model": "tiny", "messages": MESSAGES, "response_format": "json_object"},
    ]
    for body in cases:
        r = await raw.post("/v1/chat/completions", json=body)
        assert 400 <= r.status_code < 500, (body, r.status_code)
        error = r.json()["error"]
        assert set(error) == {"message", "type", "param", "code"}
    for options in ("x", [1]):
        body = {"model": "tiny", "prompt": "x", "stream": True, "stream_options": options}
        r = await raw.post("/v1/completions", json=body)
        assert r.status_code == 400 and set(r.json()["error"]) == {
            "message",
            "type",
            "param",
            "code",
        }


async def test_logit_bias_steers_greedy_output(clients) -> None:
    _, client = clients
    plain = await client.completions.create(model="tiny", prompt="x", max_tokens=3, temperature=0)
    forced = await client.completions.create(
        model="tiny", prompt="x", max_tokens=3, temperature=0, logit_bias={"300": 100}
    )
    assert forced.choices[0].text != plain.choices[0].text


async def test_chat_logprobs(clients) -> None:
    _, client = clients
    result = await client.chat.completions.create(
        model="tiny", messages=MESSAGES, max_tokens=4, temperature=0, logprobs=True, top_logprobs=2
    )
    content = result.choices[0].logprobs.content
    assert len(content) == 4
    assert all(c.logprob <= 0 and len(c.top_logprobs) == 2 for c in content)
    assert "".join(c.token for c in content) == result.choices[0].message.content
    stream = await client.chat.completions.create(
        model="tiny", messages=MESSAGES, max_tokens=4, temperature=0, logprobs=True, stream=True
    )
    streamed = [c async for c in stream if c.choices and c.choices[0].logprobs]
    values = [e.logprob for c in streamed for e in c.choices[0].logprobs.content]
    assert values == pytest.approx([c.logprob for c in content], abs=1e-5)


async def test_echo_logprobs_score_the_prompt(clients, tiny_models: dict[str, Path]) -> None:
    """What lm-evaluation-harness sends to measure perplexity: echo, logprobs, max_tokens 0."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    _, client = clients
    text = "The quick brown fox jumps over the lazy dog"
    result = await client.completions.create(
        model="tiny", prompt=text, max_tokens=0, echo=True, logprobs=1
    )
    choice = result.choices[0]
    assert choice.text == text
    scores = choice.logprobs
    assert scores.token_logprobs[0] is None and all(v <= 0 for v in scores.token_logprobs[1:])
    tokenizer = AutoTokenizer.from_pretrained(tiny_models["qwen2"])
    ids = tokenizer(text)["input_ids"]
    assert len(scores.tokens) == len(ids)
    model = AutoModelForCausalLM.from_pretrained(tiny_models["qwen2"]).eval()
    with torch.no_grad():
        reference = torch.log_softmax(model(torch.tensor([ids])).logits[0].float(), dim=-1)
    expected = [float(reference[i - 1, ids[i]]) for i in range(1, len(ids))]
    assert scores.token_logprobs[1:] == pytest.approx(expected, abs=1e-3)
    assert scores.text_offset == sorted(scores.text_offset)
    generated = await client.completions.create(
        model="tiny", prompt=text, max_tokens=3, logprobs=2, temperature=0
    )
    assert len(generated.choices[0].logprobs.tokens) == 3


async def test_json_modes(clients) -> None:
    raw, client = clients
    schema = {
        "type": "object",
        "properties": {"yes": {"type": "boolean"}},
        "required": ["yes"],
        "additionalProperties": False,
    }
    result = await client.chat.completions.create(
        model="tiny",
        messages=MESSAGES,
        max_tokens=40,
        temperature=0,
        response_format={
            "type": "json_schema",
            "json_schema": {"name": "answer", "schema": schema},
        },
    )
    assert result.choices[0].finish_reason == "stop"
    assert isinstance(json.loads(result.choices[0].message.content)["yes"], bool)
    result = await client.chat.completions.create(
        model="tiny",
        messages=MESSAGES,
        max_tokens=30,
        temperature=0,
        response_format={"type": "json_object"},
    )
    assert result.choices[0].message.content.lstrip().startswith("{")
    r = await raw.post(
        "/v1/chat/completions",
        json={"model": "tiny", "messages": MESSAGES, "response_format": {"type": "xml"}},
    )
    assert r.status_code == 400
