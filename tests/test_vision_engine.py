"""Images in the engine (issue 16): a vision model's greedy reply to a prompt with images
equals transformers' own generate for the same inputs, alone, inside a busy batch of text
and image requests, across prefill chunks and with a reused prefix; the prefix cache tells
images apart by content; a prompt whose placeholders do not match its images is refused."""

from __future__ import annotations

import asyncio
import hashlib
import io
import itertools
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
import torch
from PIL import Image

from ollama_compact_server.chat.vision import ImagePlan, as_parts, with_images
from ollama_compact_server.engine.config import EngineConfig, ModelSource
from ollama_compact_server.engine.local import LocalEngine
from ollama_compact_server.engine.loop import DeviceLoop
from ollama_compact_server.engine.sequence import LoadedModel
from ollama_compact_server.engine.types import (
    EngineError,
    GenerateRequest,
    ImageInput,
    SamplingParams,
)
from ollama_compact_server.modeling.vision import (
    Idefics3,
    LlavaNext,
    Qwen2VL,
    VisionFamily,
    vision_family,
)
from tests.vision_factory import (
    MAKERS,
    make_image,
)

_ids = itertools.count()
CONFIG = EngineConfig(
    device=torch.device("cpu"), dtype=torch.float32, slots=6, capacity=512, prefill_chunk=16
)


@dataclass
class Picture:
    image: Any
    sha256: str


def picture(seed: int, width: int = 112, height: int = 112) -> Picture:
    data = make_image(width, height, seed=seed)
    return Picture(Image.open(io.BytesIO(data)).convert("RGB"), hashlib.sha256(data).hexdigest())


@pytest.fixture(scope="module", params=sorted(MAKERS))
def model_dir(request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory) -> Path:
    return MAKERS[request.param](tmp_path_factory.mktemp(request.param) / "model")


@pytest.fixture(scope="module")
def family(model_dir: Path) -> VisionFamily:
    from transformers import AutoConfig, AutoImageProcessor

    config = AutoConfig.from_pretrained(model_dir)
    processor = AutoImageProcessor.from_pretrained(model_dir, backend="pil")
    found = vision_family(config.architectures[0], config, processor)
    assert found is not None
    return found


@pytest.fixture(scope="module")
def loaded(model_dir: Path) -> LoadedModel:
    from transformers import AutoModelForImageTextToText, AutoTokenizer

    model = AutoModelForImageTextToText.from_pretrained(model_dir).eval()
    return LoadedModel(model, AutoTokenizer.from_pretrained(model_dir), stop_ids=set())


@pytest.fixture
def engine(loaded: LoadedModel):
    loop = DeviceLoop(CONFIG, ModelSource(lambda name: loaded))
    loop.start()
    yield LocalEngine(loop)
    loop.stop()


def prompt(
    loaded: LoadedModel, family: VisionFamily, text: str, pictures: list[Picture]
) -> tuple[list[int], list[ImageInput]]:
    message = as_parts(with_images({"role": "user", "content": text}, len(pictures)))
    rendered = loaded.tokenizer.apply_chat_template(
        [message], tokenize=False, add_generation_prompt=True
    )
    plan = ImagePlan(family, loaded.tokenizer, pictures)
    ids = list(loaded.tokenizer(plan.text(rendered, ""), add_special_tokens=False)["input_ids"])
    return ids, plan.inputs(ids)


def reference(loaded: LoadedModel, ids: list[int], images: list[ImageInput], n: int) -> list[int]:
    """transformers' generate for the same inputs, greedy."""
    tokens = torch.tensor([ids])
    extra: dict[str, Any] = {}
    if images:
        tiled = "pixel_attention_mask" in images[0].pixels  # Idefics3: [1, tiles, ...]
        extra = {
            k: torch.cat([i.pixels[k] for i in images], dim=1 if tiled else 0)
            for k in images[0].pixels
        }
        image = tokens == loaded.model.config.image_token_id
        if "image_grid_thw" in extra:  # Qwen2-VL's generate wants the token types too
            extra["mm_token_type_ids"] = image.int()
        if loaded.model.config.model_type == "gemma3":  # its images attend both ways
            extra["token_type_ids"] = image.long()
    out = loaded.model.generate(
        input_ids=tokens,
        attention_mask=torch.ones_like(tokens),
        max_new_tokens=n,
        do_sample=False,
        **extra,
    )
    return out[0, len(ids) :].tolist()


async def generate(
    engine: LocalEngine, ids: list[int], images: list[ImageInput], n: int = 12
) -> tuple[list[int], Any]:
    params = SamplingParams(temperature=0, repeat_penalty=1.0, max_tokens=n)
    request = GenerateRequest(f"v{next(_ids)}", "vl", ids, params, images=images)
    tokens: list[int] = []
    final = None
    async for event in engine.generate(request):
        tokens += event.token_ids
        if event.finished:
            final = event
    assert final is not None
    assert final.error is None, final.error
    return tokens, final


async def test_an_image_prompt_equals_transformers_generate(
    engine: LocalEngine, loaded: LoadedModel, family: VisionFamily
) -> None:
    ids, images = prompt(loaded, family, "What is in this picture?", [picture(1)])
    total = {Idefics3: 20, LlavaNext: 88}.get(type(family), 16)  # tiles; crops and newlines
    assert sum(i.length for i in images) == total
    assert len(ids) > CONFIG.prefill_chunk  # spans prefill chunks, and an image spans two
    assert any(i.start // 16 != (i.start + i.length - 1) // 16 for i in images)
    tokens, final = await generate(engine, ids, images)
    assert tokens == reference(loaded, ids, images, 12)
    assert final.prompt_tokens == len(ids)


async def test_two_images_in_one_prompt(
    engine: LocalEngine, loaded: LoadedModel, family: VisionFamily
) -> None:
    pics = [picture(2), picture(3, 168, 84)]
    ids, images = prompt(loaded, family, "Compare them.", pics)
    # Qwen2-VL: 168x84 resizes to 168x56, 12x4 patches; LLaVA, Gemma 3: 56x56 each;
    # Idefics3: 2x2 tiles and the whole, then 1x2 tiles and the whole, 4 tokens each
    # LLaVA-NeXT: 2x2 crops (64 patches, 8 newlines) and 1x2 (32, 4), with 16 each whole
    expected = {Qwen2VL: [16, 10], Idefics3: [4] * 8, LlavaNext: [88, 52]}.get(
        type(family), [16, 16]
    )
    assert [i.length for i in images] == expected
    tokens, _ = await generate(engine, ids, images)
    assert tokens == reference(loaded, ids, images, 12)


async def test_image_requests_inside_a_busy_batch_equal_their_output_alone(
    engine: LocalEngine, loaded: LoadedModel, family: VisionFamily
) -> None:
    cases = [
        prompt(loaded, family, "Describe it.", [picture(4)]),
        prompt(loaded, family, "Hello world! How are you today?", []),
        prompt(loaded, family, "What colour?", [picture(5, 84, 56)]),
        prompt(loaded, family, "Two of them.", [picture(6), picture(7)]),
        prompt(loaded, family, "Once upon a time there was a little model", []),
    ]
    expected = [reference(loaded, ids, images, 10) for ids, images in cases]
    results = await asyncio.gather(*(generate(engine, ids, im, 10) for ids, im in cases))
    assert [tokens for tokens, _ in results] == expected
    assert len({tuple(e) for e in expected}) == len(expected)  # images change the reply


async def test_the_prefix_cache_matches_images_by_content(
    engine: LocalEngine, loaded: LoadedModel, family: VisionFamily
) -> None:
    """The same question about the same image again reuses its K/V and answers the same;
    about another image of the same size (identical placeholder tokens) it reuses only the
    text before the image."""
    ids, images = prompt(loaded, family, "What is in this picture?", [picture(8)])
    first, _ = await generate(engine, ids, images)
    again, done2 = await generate(engine, ids, images)
    assert again == first and done2.cached_tokens == len(ids) - 1
    other_ids, other = prompt(loaded, family, "What is in this picture?", [picture(9)])
    assert other_ids == ids  # the placeholders alone cannot tell the images apart
    third, done3 = await generate(engine, other_ids, other)
    assert done3.cached_tokens == other[0].start
    assert third == reference(loaded, other_ids, other, 12) and third != first


async def test_placeholders_that_do_not_match_the_images_are_refused(
    engine: LocalEngine, loaded: LoadedModel, family: VisionFamily
) -> None:
    ids, images = prompt(loaded, family, "What is it?", [picture(10)])
    image = images[0]
    cases = [
        [ImageInput(image.digest, image.start + 1, image.length, image.pixels)],  # shifted
        [ImageInput(image.digest, image.start, image.length - 1, image.pixels)],  # short
        [ImageInput(image.digest, len(ids) - 2, image.length, image.pixels)],  # out of range
    ]
    for bad in cases:
        params = SamplingParams(temperature=0, max_tokens=4)
        request = GenerateRequest(f"v{next(_ids)}", "vl", ids, params, images=bad)
        with pytest.raises(EngineError, match="cannot take these images") as refused:
            async for _ in engine.generate(request):
                pass
        assert refused.value.status == 400
    tokens, _ = await generate(engine, ids, images, 4)  # the engine still serves
    assert tokens == reference(loaded, ids, images, 4)


async def test_a_preempted_image_request_resumes_with_the_same_reply(
    engine: LocalEngine, loaded: LoadedModel, family: VisionFamily
) -> None:
    """Out of memory in a decode step: the youngest request steps back and later prefills
    its prompt (images again) and what it generated (rotary offsets included), then goes
    on with the reply it would have given."""
    await generate(engine, *prompt(loaded, family, "Warm up.", []), 1)  # loads the model
    runner = engine.device_loop.workers["vl"].runner
    real = runner.decode
    together: list[int] = []
    fired: list[int] = []

    def decode(slots, tokens, positions, loras=None, offsets=None):  # type: ignore[no-untyped-def]
        together.append(len(slots))
        if not fired and together.count(2) == 3:  # both rows a few tokens in
            fired.append(len(slots))
            raise RuntimeError("out of memory (injected)")
        return real(slots, tokens, positions, loras, offsets)

    runner.decode = decode  # type: ignore[method-assign]
    cases = [
        prompt(loaded, family, "Describe it.", [picture(30)]),
        prompt(loaded, family, "What colour is it?", [picture(31, 84, 56)]),
    ]
    expected = [reference(loaded, ids, images, 10) for ids, images in cases]
    results = await asyncio.gather(*(generate(engine, ids, im, 10) for ids, im in cases))
    assert fired and [tokens for tokens, _ in results] == expected
