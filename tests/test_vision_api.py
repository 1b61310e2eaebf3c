"""Vision models through the API (issue 16), on the real engine: the official ollama, openai
and anthropic clients send images to tiny Qwen2-VL and LLaVA models, and every greedy reply
equals transformers' generate on what transformers' own processors make of the same chat
(template, placeholder expansion, pixels), alone and inside a busy batch; image tokens a
user types stay text."""

from __future__ import annotations

import asyncio
import base64
import io
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import pytest
import torch
from PIL import Image

from ollama_compact_server.chat.images import ImageData, ImageLimits
from ollama_compact_server.chat.service import ChatService
from ollama_compact_server.chat.tokenizers import TokenizerCache
from ollama_compact_server.chat.turn import ChatRequest, Message
from ollama_compact_server.registry.importers import import_hf_dir
from ollama_compact_server.registry.store import Registry
from tests.conftest import Served, serve_app
from tests.fakes import FakeEngine
from tests.vision_factory import BOI, EOI, IMAGE_PAD, IMAGE_SOFT, LLAVA_IMAGE, make_image

N = 8
GREEDY = {"temperature": 0, "num_predict": N, "repeat_penalty": 1.0}


@pytest.fixture(scope="module", params=["qwen2_vl", "llava", "gemma3", "idefics3"])
def family(request: pytest.FixtureRequest) -> str:
    return str(request.param)


@pytest.fixture
def model_dir(family: str, tiny_vision_models: dict[str, Path]) -> Path:
    return tiny_vision_models[family]


@pytest.fixture
async def served(tmp_path: Path, model_dir: Path) -> AsyncIterator[Served]:
    registry = Registry(tmp_path / "registry")
    import_hf_dir(registry, model_dir, "vl")
    async with serve_app(registry, dtype="float32") as served:
        yield served


class Reference:
    """transformers alone: the model, its tokenizer and image processor, and the
    placeholder expansion its processor class does (a string replacement before
    tokenizing)."""

    def __init__(self, model_dir: Path) -> None:
        from transformers import AutoImageProcessor, AutoModelForImageTextToText, AutoTokenizer

        self.model = AutoModelForImageTextToText.from_pretrained(model_dir).eval()
        self.tokenizer = AutoTokenizer.from_pretrained(model_dir)
        self.processor = AutoImageProcessor.from_pretrained(model_dir, backend="pil")
        self.kind = str(self.model.config.model_type)

    def reply(self, messages: list[dict[str, Any]], images: list[bytes]) -> str:
        text = self.tokenizer.apply_chat_template(
            messages, tokenize=False, add_generation_prompt=True
        )
        pictures = [Image.open(io.BytesIO(b)).convert("RGB") for b in images]
        extra: dict[str, Any] = {}
        if pictures and self.kind == "idefics3":  # its processor needs no torchvision
            from transformers.models.idefics3.processing_idefics3 import Idefics3Processor

            processor = Idefics3Processor(self.processor, self.tokenizer, image_seq_len=4)
            out = processor(
                text=[text], images=[pictures], return_tensors="pt", add_special_tokens=False
            )
            extra = {k: v for k, v in out.items() if k.startswith("pixel_")}
            text = self.tokenizer.decode(out["input_ids"][0])
        elif pictures:
            out = self.processor(images=pictures, return_tensors="pt")
            extra = dict(out)
            extra.pop("num_crops", None)
            if self.kind == "qwen2_vl":
                counts = (out["image_grid_thw"].prod(-1) // 4).tolist()
                for n in counts:
                    text = text.replace(IMAGE_PAD, "<|placeholder|>" * n, 1)
                text = text.replace("<|placeholder|>", IMAGE_PAD)
            elif self.kind == "gemma3":  # Gemma3Processor's full image sequence
                text = text.replace(BOI, f"\n\n<|placeholder|>{IMAGE_SOFT * 16}{EOI}\n\n")
                text = text.replace("<|placeholder|>", BOI)
            else:
                text = text.replace(LLAVA_IMAGE, LLAVA_IMAGE * 16)
        ids = self.tokenizer(text, return_tensors="pt", add_special_tokens=False)["input_ids"]
        image = (ids == self.model.config.image_token_id).long()
        if self.kind == "qwen2_vl" and pictures:
            extra["mm_token_type_ids"] = image.int()
        if self.kind == "gemma3":
            extra["token_type_ids"] = image
        out = self.model.generate(
            input_ids=ids,
            attention_mask=torch.ones_like(ids),
            max_new_tokens=N,
            do_sample=False,
            **extra,
        )
        return str(self.tokenizer.decode(out[0, ids.shape[1] :], skip_special_tokens=True))


@pytest.fixture
def reference(model_dir: Path) -> Reference:
    return Reference(model_dir)


def parts(text: str, count: int) -> list[dict[str, Any]]:
    return [*({"type": "image"} for _ in range(count)), {"type": "text", "text": text}]


PHOTO, OTHER = make_image(80, 60, seed=21, fmt="JPEG"), make_image(120, 90, seed=22, fmt="PNG")


async def test_the_ollama_client_sends_images(served: Served, reference: Reference) -> None:
    r = await served.ollama.chat(
        model="vl",
        messages=[{"role": "user", "content": "What is in this picture?", "images": [PHOTO]}],
        options=GREEDY,
    )
    expected = reference.reply(
        [{"role": "user", "content": parts("What is in this picture?", 1)}], [PHOTO]
    )
    assert r.message.content == expected and r.eval_count == N
    g = await served.ollama.generate(
        model="vl", prompt="Compare them.", images=[PHOTO, OTHER], options=GREEDY
    )
    two = reference.reply([{"role": "user", "content": parts("Compare them.", 2)}], [PHOTO, OTHER])
    assert g.response == two and two != expected


async def test_the_openai_and_anthropic_clients_send_images(
    served: Served, reference: Reference
) -> None:
    uri = "data:image/jpeg;base64," + base64.b64encode(PHOTO).decode()
    expected = reference.reply([{"role": "user", "content": parts("Describe it.", 1)}], [PHOTO])
    chat = await served.openai.chat.completions.create(
        model="vl",
        messages=[
            {
                "role": "user",
                "content": [
                    {"type": "image_url", "image_url": {"url": uri}},
                    {"type": "text", "text": "Describe it."},
                ],
            }
        ],
        temperature=0,
        max_tokens=N,
        extra_body={"repetition_penalty": 1.0},
    )
    assert chat.choices[0].message.content == expected
    # Anthropic's dialect has no repetition setting: its reply equals Ollama's with the
    # default one for the same image and text
    same = await served.ollama.chat(
        model="vl",
        messages=[{"role": "user", "content": "Describe it.", "images": [PHOTO]}],
        options={"temperature": 0, "num_predict": N},
    )
    claude = await served.anthropic.messages.create(
        model="vl",
        max_tokens=N,
        extra_body={"temperature": 0.0},  # no longer typed in this SDK
        messages=[
            {
                "role": "user",
                "content": [
                    {
                        "type": "image",
                        "source": {
                            "type": "base64",
                            "media_type": "image/jpeg",
                            "data": base64.b64encode(PHOTO).decode(),
                        },
                    },
                    {"type": "text", "text": "Describe it."},
                ],
            }
        ],
    )
    assert claude.content[0].text == same.message.content


async def test_image_requests_in_a_busy_batch_equal_their_replies_alone(
    served: Served, reference: Reference
) -> None:
    cases = [
        ("What is in this picture?", [PHOTO]),
        ("Hello world! How are you today?", []),
        ("What colour is it?", [OTHER]),
        ("Once upon a time there was a little model", []),
        ("Both, please.", [OTHER, PHOTO]),
    ]
    expected = [
        reference.reply([{"role": "user", "content": parts(q, len(i))}], i) for q, i in cases
    ]

    async def ask(question: str, images: list[bytes]) -> str:
        message: dict[str, Any] = {"role": "user", "content": question}
        if images:
            message["images"] = images
        r = await served.ollama.chat(model="vl", messages=[message], options=GREEDY)
        return str(r.message.content)

    assert await asyncio.gather(*(ask(q, i) for q, i in cases)) == expected


async def test_image_tokens_a_user_types_stay_text(
    tmp_path: Path, model_dir: Path, family: str
) -> None:
    """The placeholder's text in a message is encoded as text: the prompt holds only the
    sent image's positions, whichever way the typed tokens are spelled."""
    registry = Registry(tmp_path / "registry")
    import_hf_dir(registry, model_dir, "vl")
    service = ChatService(registry, FakeEngine(), TokenizerCache(registry), ImageLimits())
    # what the template writes for an image, and the tokens the image becomes
    typed = {"qwen2_vl": IMAGE_PAD, "gemma3": BOI}.get(family, LLAVA_IMAGE)
    soft = {"qwen2_vl": IMAGE_PAD, "gemma3": IMAGE_SOFT}.get(family, LLAVA_IMAGE)
    message = Message("user", f"look {typed}{soft} here", images=[ImageData(raw=PHOTO)])
    prepared = await service.prepare(ChatRequest(model="vl", messages=[message]))
    tokenizer = service.tokenizers(registry.get("vl"))
    placeholder, token = tokenizer.convert_tokens_to_ids([typed, soft])
    (ids,) = prepared.prompts
    (images,) = prepared.images
    assert images and ids.count(token) == sum(i.length for i in images)  # Idefics3: tiles
    for image in images:
        assert set(ids[image.start : image.start + image.length]) == {token}
    if placeholder != token:
        assert ids.count(placeholder) == 1
    after = tokenizer.decode(ids[images[-1].start + images[-1].length :])
    assert f"look {typed}{soft} here" in after
    # with no image at all, typed tokens are text and the engine takes the prompt
    alone = await service.prepare(ChatRequest(model="vl", messages=[Message("user", typed + soft)]))
    assert placeholder not in alone.prompts[0] and token not in alone.prompts[0]


async def test_images_with_a_raw_prompt_are_refused(served: Served) -> None:
    """A raw prompt has no template to place images with: a 400 before the engine."""
    data = base64.b64encode(PHOTO).decode()
    r = await served.raw.post(
        "/api/generate",
        json={"model": "vl", "prompt": "Hi", "raw": True, "images": [data], "stream": False},
    )
    assert r.status_code == 400 and "without raw" in r.json()["error"]
