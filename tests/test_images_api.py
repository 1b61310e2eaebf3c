"""Images through every dialect (issue 16, the input layer): Ollama's base64 ``images``,
OpenAI's ``image_url`` parts, Responses' ``input_image``, Anthropic's image blocks. A
text-only model refuses them with a 400 naming it, in each dialect's error shape; for a
model whose record has the ``vision`` capability every image is decoded, in order and with
its message, before anything is rendered, and every bad image is a 400 before the engine
hears of the request.

Here the vision model is a tiny Qwen2-VL (its own template and image processor), answered
by the fake engine; tests/test_vision_api.py runs the real engine."""

from __future__ import annotations

import base64
import io
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import anthropic
import ollama
import openai
import pytest
from PIL import Image

from ollama_compact_server.api.anthropic.wire import MessagesRequest
from ollama_compact_server.api.ollama.wire import ChatRequestWire, GenerateRequestWire
from ollama_compact_server.api.openai.responses_wire import ResponsesRequest
from ollama_compact_server.api.openai.wire import ChatCompletionRequest
from ollama_compact_server.chat.images import ImageLimits
from ollama_compact_server.chat.service import ChatService
from ollama_compact_server.chat.tokenizers import TokenizerCache
from ollama_compact_server.chat.turn import ChatRequest
from ollama_compact_server.registry.importers import import_hf_dir
from ollama_compact_server.registry.store import Registry
from tests.conftest import Served, serve_app
from tests.fakes import FakeEngine
from tests.test_api_anthropic import TEMPLATE


def png_bytes(width: int = 6, height: int = 4, color: tuple[int, int, int] = (9, 99, 199)) -> bytes:
    out = io.BytesIO()
    Image.new("RGB", (width, height), color).save(out, "PNG")
    return out.getvalue()


PNG = png_bytes()
B64 = base64.b64encode(PNG).decode()
DATA_URI = "data:image/png;base64," + B64
PATH = "/v1/chat/completions"


@pytest.fixture
def registry(
    tmp_path: Path, tiny_models: dict[str, Path], tiny_vision_models: dict[str, Path]
) -> Registry:
    registry = Registry(tmp_path / "registry")
    import_hf_dir(registry, tiny_models["llama"], "tiny", template=TEMPLATE)
    import_hf_dir(registry, tiny_vision_models["qwen2_vl"], "seer")
    return registry


@pytest.fixture
async def served(registry: Registry) -> AsyncIterator[Served]:
    async with serve_app(registry, FakeEngine("I see blue"), max_images=4) as served:
        yield served


# One request per dialect route, with two images: ``image`` is what each carries.
def bodies(model: str, image: dict[str, Any] | str | None = None) -> dict[str, dict[str, Any]]:
    uri = image if isinstance(image, str) else DATA_URI
    b64 = image if isinstance(image, str) else B64
    return {
        "/api/chat": {
            "model": model,
            "stream": False,
            "messages": [
                {"role": "user", "content": "first", "images": [B64]},
                {"role": "assistant", "content": "ok"},
                {"role": "user", "content": "What is this?", "images": [b64]},
            ],
        },
        "/api/generate": {"model": model, "prompt": "What?", "stream": False, "images": [B64, b64]},
        "/v1/chat/completions": {
            "model": model,
            "messages": [
                {
                    "role": "user",
                    "content": [
                        {"type": "image_url", "image_url": {"url": DATA_URI, "detail": "low"}},
                        {"type": "text", "text": "What is "},
                        {"type": "image_url", "image_url": {"url": uri}},
                        {"type": "text", "text": "this?"},
                    ],
                }
            ],
        },
        "/v1/responses": {
            "model": model,
            "input": [
                {
                    "role": "user",
                    "content": [
                        {"type": "input_text", "text": "What is this?"},
                        {"type": "input_image", "image_url": DATA_URI},
                        {"type": "input_image", "image_url": uri, "detail": "auto"},
                    ],
                }
            ],
        },
        "/v1/messages": {
            "model": model,
            "max_tokens": 8,
            "messages": [
                {
                    "role": "user",
                    "content": [
                        {
                            "type": "image",
                            "source": {"type": "base64", "media_type": "image/png", "data": B64},
                        },
                        {"type": "text", "text": "What is this?"},
                        image
                        if isinstance(image, dict)
                        else {
                            "type": "image",
                            "source": {"type": "base64", "media_type": "image/png", "data": b64},
                        },
                    ],
                }
            ],
        },
    }


def error_message(path: str, body: dict[str, Any]) -> str:
    """The message of each dialect's error body, its shape checked."""
    if path.startswith("/api/"):
        assert set(body) == {"error"} and isinstance(body["error"], str), body
        return str(body["error"])
    if path == "/v1/messages":
        assert body["type"] == "error" and body["error"]["type"] == "invalid_request_error", body
        return str(body["error"]["message"])
    assert body["error"]["type"] == "invalid_request_error", body
    return str(body["error"]["message"])


async def test_a_text_only_model_refuses_images_in_every_dialect(served: Served) -> None:
    for path, body in bodies("tiny").items():
        r = await served.raw.post(path, json=body)
        assert r.status_code == 400, (path, r.text)
        assert error_message(path, r.json()) == '"tiny:latest" does not support vision', path
    r = await served.raw.post("/v1/messages/count_tokens", json=bodies("tiny")["/v1/messages"])
    assert r.status_code == 400 and "does not support vision" in r.text
    assert not served.engine.requests


async def test_a_vision_model_takes_images_in_every_dialect(served: Served) -> None:
    for path, body in bodies("seer").items():
        r = await served.raw.post(path, json=body)
        assert r.status_code == 200, (path, r.text)
    assert len(served.engine.requests) == len(bodies("seer"))


BAD = {
    "not base64": ("@@@", "image 2: the image is not valid base64"),
    "not an image": (base64.b64encode(b"hello").decode(), "image 2: not an image"),
    "truncated": (
        base64.b64encode(png_bytes(64, 64)[:100]).decode(),
        "image 2: the image is broken or truncated",
    ),
}


@pytest.mark.parametrize("case", sorted(BAD))
async def test_a_bad_image_is_a_400_naming_it_before_the_engine(served: Served, case: str) -> None:
    b64, words = BAD[case]
    for path, body in bodies("seer", b64).items():
        if path in ("/v1/chat/completions", "/v1/responses"):
            body = bodies("seer", "data:image/png;base64," + b64)[path]
        r = await served.raw.post(path, json=body)
        assert r.status_code == 400, (path, r.text)
        assert error_message(path, r.json()).startswith(words), (path, r.text)
    assert not served.engine.requests


async def test_data_uris_remote_urls_and_the_count_cap(served: Served) -> None:
    cases = {
        "data:text/plain;base64," + B64: "image 2: text/plain is not an image type",
        "data:image/png," + B64: "image 2: a data: URI image must be base64",
        "https://example.com/cat.png": "image 2: remote image URLs are not fetched",
        "file:///etc/passwd": "image 2: remote image URLs are not fetched",
    }
    for uri, words in cases.items():
        for path in ("/v1/chat/completions", "/v1/responses"):
            r = await served.raw.post(path, json=bodies("seer", uri)[path])
            assert r.status_code == 400 and error_message(path, r.json()).startswith(words), r.text
    url_block = {"type": "image", "source": {"type": "url", "url": "https://example.com/a.png"}}
    r = await served.raw.post("/v1/messages", json=bodies("seer", url_block)["/v1/messages"])
    assert r.status_code == 400 and "remote image URLs are not fetched" in r.text
    pdf = {"type": "image", "source": {"type": "base64", "media_type": "text/html", "data": B64}}
    r = await served.raw.post("/v1/messages", json=bodies("seer", pdf)["/v1/messages"])
    assert r.status_code == 400 and "image 2: text/html is not an image type" in r.text
    five = {"model": "seer", "prompt": "x", "stream": False, "images": [B64] * 5}
    r = await served.raw.post("/api/generate", json=five)
    assert (
        r.status_code == 400 and r.json()["error"] == "too many images: 5 (at most 4 per request)"
    )
    assert not served.engine.requests


async def test_malformed_image_parts_are_400s(served: Served) -> None:
    cases = [
        ("/v1/chat/completions", {"role": "user", "content": [{"type": "image_url"}]}),
        (
            "/v1/chat/completions",
            {"role": "user", "content": [{"type": "image_url", "image_url": 5}]},
        ),
        ("/v1/chat/completions", {"role": "user", "content": [{"type": "input_audio"}]}),
    ]
    for path, message in cases:
        r = await served.raw.post(path, json={"model": "seer", "messages": [message]})
        assert r.status_code == 400, r.text
    for content in ([{"type": "input_image"}], [{"type": "input_image", "file_id": "file-1"}]):
        r = await served.raw.post(
            "/v1/responses", json={"model": "seer", "input": [{"role": "user", "content": content}]}
        )
        assert r.status_code == 400 and "input_image" in r.text, r.text
    for block in (
        {"type": "image"},
        {"type": "image", "source": {"type": "base64", "data": B64}},
        {"type": "image", "source": {"type": "file", "file_id": "f"}},
        {"type": "document", "source": {"type": "base64", "media_type": "application/pdf"}},
    ):
        body = {
            "model": "seer",
            "max_tokens": 8,
            "messages": [{"role": "user", "content": [block]}],
        }
        r = await served.raw.post("/v1/messages", json=body)
        assert r.status_code == 400 and r.json()["type"] == "error", r.text
    assert not served.engine.requests


# ------------------------------------------------------------------------------ order


async def prepared_pictures(registry: Registry, request: ChatRequest) -> list[tuple[Any, ...]]:
    service = ChatService(registry, FakeEngine(), TokenizerCache(registry), ImageLimits())
    prepared = await service.prepare(request)
    return [(p.index, p.message, p.width, p.format) for p in prepared.pictures]


async def test_every_dialect_hands_the_pictures_on_in_order_with_their_message(
    registry: Registry,
) -> None:
    small, large = base64.b64encode(png_bytes(2, 2)).decode(), base64.b64encode(png_bytes(9, 9))
    big = large.decode()
    wires = bodies("seer", big)
    requests = {
        "ollama chat": ChatRequestWire.model_validate(wires["/api/chat"]).to_chat_request(),
        "ollama generate": GenerateRequestWire.model_validate(
            wires["/api/generate"]
        ).to_chat_request(),
        "openai": ChatCompletionRequest.model_validate(
            bodies("seer", "data:image/png;base64," + big)["/v1/chat/completions"]
        ).to_chat_request(),
        "responses": ResponsesRequest.model_validate(
            {**bodies("seer", "data:image/png;base64," + big)["/v1/responses"], "instructions": "s"}
        ).to_chat_request([]),
        "anthropic": MessagesRequest.model_validate(
            {**wires["/v1/messages"], "system": "s"}
        ).to_chat_request(),
    }
    expected_message = {
        "ollama chat": (0, 2),
        "ollama generate": (None, None),
        "openai": (0, 0),
        "responses": (1, 1),  # after the instructions' system message
        "anthropic": (1, 1),
    }
    for name, request in requests.items():
        pictures = await prepared_pictures(registry, request)
        first, second = expected_message[name]
        assert pictures == [(0, first, 6, "PNG"), (1, second, 9, "PNG")], name
    assert small  # the two sizes tell the images apart


# ------------------------------------------------------------------------------ clients


async def test_the_official_clients_send_images(served: Served) -> None:
    with pytest.raises(ollama.ResponseError) as refused:
        await served.ollama.chat(
            model="tiny", messages=[{"role": "user", "content": "What?", "images": [PNG]}]
        )
    assert refused.value.status_code == 400
    assert refused.value.error == '"tiny:latest" does not support vision'
    with pytest.raises(ollama.ResponseError):
        await served.ollama.generate(model="tiny", prompt="What?", images=[PNG])
    reply = await served.ollama.chat(
        model="seer", messages=[{"role": "user", "content": "What?", "images": [PNG]}]
    )
    assert reply.message.content == "I see blue"
    answer = await served.ollama.generate(model="seer", prompt="What?", images=[PNG])
    assert answer.response == "I see blue"

    content: Any = [
        {"type": "text", "text": "What is this?"},
        {"type": "image_url", "image_url": {"url": DATA_URI}},
    ]
    with pytest.raises(openai.BadRequestError) as bad:
        await served.openai.chat.completions.create(
            model="tiny", messages=[{"role": "user", "content": content}]
        )
    assert bad.value.status_code == 400 and "does not support vision" in str(bad.value.message)
    done = await served.openai.chat.completions.create(
        model="seer", messages=[{"role": "user", "content": content}]
    )
    assert done.choices[0].message.content == "I see blue"
    response = await served.openai.responses.create(
        model="seer",
        input=[
            {
                "role": "user",
                "content": [
                    {"type": "input_text", "text": "What is this?"},
                    {"type": "input_image", "image_url": DATA_URI, "detail": "auto"},
                ],
            }
        ],
    )
    assert response.output_text == "I see blue"

    blocks: Any = [
        {"type": "image", "source": {"type": "base64", "media_type": "image/png", "data": B64}},
        {"type": "text", "text": "What is this?"},
    ]
    with pytest.raises(anthropic.BadRequestError) as no:
        await served.anthropic.messages.create(
            model="tiny", max_tokens=8, messages=[{"role": "user", "content": blocks}]
        )
    assert "does not support vision" in str(no.value.message)
    message = await served.anthropic.messages.create(
        model="seer", max_tokens=8, messages=[{"role": "user", "content": blocks}]
    )
    assert message.content[0].text == "I see blue"  # type: ignore[union-attr]
    assert len(served.engine.requests) == 5


# ------------------------------------------------------------------------------ settings


async def test_image_url_hosts_reach_the_chat_layer(registry: Registry) -> None:
    from tests.test_images import serving_images

    with serving_images() as (base, seen):
        url = base + "/cat.png"
        for hosts, status in (("", 400), ("localhost, example.com", 400), ("127.0.0.1", 200)):
            async with serve_app(registry, FakeEngine(), image_url_hosts=hosts) as served:
                r = await served.raw.post(PATH, json=bodies("seer", url)[PATH])
                assert r.status_code == status, (hosts, r.text)
        assert seen == ["/cat.png"]  # fetched only where the host was named


def test_image_settings_are_checked() -> None:
    from ollama_compact_server.settings import Settings, SettingsError, load_settings

    settings = Settings(image_url_hosts=" Images.Example.com ,[::1], 127.0.0.1. ,")
    assert settings.image_hosts == frozenset({"images.example.com", "::1", "127.0.0.1"})
    assert Settings().max_image_bytes == 20 << 20 and Settings().image_hosts == frozenset()
    for bad in (
        {"image_url_hosts": "https://example.com"},
        {"image_url_hosts": "example.com:8080"},
        {"image_url_hosts": "example.com/x"},
        {"max_image_size": "0"},
        {"max_image_size": "2GiB"},
        {"max_image_pixels": 0},
        {"max_image_pixels": 10**9},
        {"max_images": 0},
    ):
        with pytest.raises(SettingsError):
            load_settings(**bad)


def test_kept_responses_bound_the_images_they_hold() -> None:
    from ollama_compact_server.api.openai.responses_store import ResponseStore, Stored
    from ollama_compact_server.chat.images import ImageData
    from ollama_compact_server.chat.turn import Message

    def stored(size: int) -> Stored:
        return Stored("seer", [Message("user", "q", images=[ImageData.of_base64("A" * size)])])

    store = ResponseStore(capacity=10, image_bytes=1000)
    store.put("big", stored(1001))
    assert store.get("big") is None  # more than the whole bound: not kept
    for name in ("a", "b", "c"):
        store.put(name, stored(400))
    assert store.get("a") is None and store.get("b") and store.get("c")
