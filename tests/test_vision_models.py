"""Vision models in the registry and the daemon (issue 16): Qwen2-VL and LLaVA folders import
with their image processor and the ``vision`` capability, a vision folder without its
processor settings is refused, and a vision model answers text-only requests like any other
(the same greedy tokens as transformers' generate)."""

from __future__ import annotations

import asyncio
import shutil
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import httpx
import pytest
import torch
from asgi_lifespan import LifespanManager

from ollama_compact_server.app import create_app
from ollama_compact_server.engine.config import ModelSource
from ollama_compact_server.engine.local import LocalEngine
from ollama_compact_server.engine.loop import DeviceLoop
from ollama_compact_server.engine.sequence import LoadedModel
from ollama_compact_server.engine.types import GenerateRequest, SamplingParams
from ollama_compact_server.jobs.compressing import compress_registry_model
from ollama_compact_server.modeling.loader import load_causal_lm, load_tokenizer, load_vision
from ollama_compact_server.registry.errors import InvalidModel
from ollama_compact_server.registry.importers import import_adapter_dir, import_hf_dir
from ollama_compact_server.registry.store import Registry
from ollama_compact_server.settings import Settings
from tests.test_vision_engine import CONFIG, generate, picture, reference
from tests.test_vision_engine import prompt as render
from tests.vision_factory import (
    MAKERS,
    make_image,
    make_tiny_llava,
    make_vision_lora,
)


@pytest.fixture(scope="module", params=sorted(MAKERS))
def vision_dir(request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory) -> Path:
    return MAKERS[request.param](tmp_path_factory.mktemp(request.param) / "model")


def test_a_vision_folder_imports_with_its_processor(registry: Registry, vision_dir: Path) -> None:
    record = import_hf_dir(registry, vision_dir, "vl")
    assert "vision" in record.config.capabilities and "completion" in record.config.capabilities
    assert "preprocessor_config.json" in record.manifest.files()
    vision = load_vision(registry, record)
    assert vision is not None and vision.processor is not None
    prepared = vision.prepare(vision.processor, make_image(fmt=None))
    assert prepared and all(run.length > 0 for run in prepared)
    model = load_causal_lm(registry, record)
    assert type(model).__name__ == record.config.architecture


def test_a_vision_folder_without_its_processor_settings_is_refused(
    registry: Registry, vision_dir: Path, tmp_path: Path
) -> None:
    copy = shutil.copytree(vision_dir, tmp_path / "copy")
    (copy / "preprocessor_config.json").unlink()
    with pytest.raises(InvalidModel, match=r"preprocessor_config\.json"):
        import_hf_dir(registry, copy, "vl")
    assert registry.models() == []


@pytest.fixture
async def client(tmp_path: Path, registry: Registry) -> AsyncIterator[httpx.AsyncClient]:
    """The real app in float32, so replies compare with transformers' to the token."""
    settings = Settings(
        models=registry.root, adapters=tmp_path / "adapters", import_default=False, dtype="float32"
    )
    app = create_app(settings, registry=registry)
    async with LifespanManager(app):
        transport = httpx.ASGITransport(app=app)
        async with httpx.AsyncClient(transport=transport, base_url="http://127.0.0.1:11434") as c:
            yield c


async def test_a_vision_model_answers_text_like_transformers(
    client: httpx.AsyncClient, registry: Registry, vision_dir: Path
) -> None:
    record = import_hf_dir(registry, vision_dir, "vl")
    show = (await client.post("/api/show", json={"model": "vl"})).json()
    assert "vision" in show["capabilities"]
    prompt = "Once upon a time"
    r = await client.post(
        "/api/generate",
        json={
            "model": "vl",
            "prompt": prompt,
            "raw": True,
            "stream": False,
            "options": {"temperature": 0, "num_predict": 8, "repeat_penalty": 1.0},
        },
    )
    assert r.status_code == 200, r.text
    body = r.json()
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(vision_dir)
    ids = tokenizer(prompt, return_tensors="pt")["input_ids"]
    model = load_causal_lm(registry, record)
    out = model.generate(
        input_ids=ids, attention_mask=torch.ones_like(ids), max_new_tokens=8, do_sample=False
    )
    expected = tokenizer.decode(out[0, ids.shape[1] :], skip_special_tokens=True)
    assert body["response"] == expected and body["eval_count"] == 8


@pytest.mark.parametrize("scheme", ["int8", "int4"])
def test_a_compressed_vision_model_keeps_its_tower_and_answers_images(
    registry: Registry, vision_dir: Path, scheme: str
) -> None:
    """Compression applies to the language model only; the compressed model serves image
    requests through the engine: with int8, exactly as transformers runs the same modules;
    with int4 (whose CPU kernels quantize activations, so last-bit differences of attention
    between our cache and transformers' round differently: see docs/PERFORMANCE.md on
    batch invariance) the picture steers the reply."""
    import_hf_dir(registry, vision_dir, "vl")
    record = compress_registry_model(registry, "vl", f"vl:{scheme}", scheme)
    modules = record.config.quantization
    assert modules is not None and modules.scheme == scheme
    model = load_causal_lm(registry, record, dtype=torch.float32)
    compressed = {
        n
        for n, m in model.named_modules()
        if type(m).__name__.endswith("Linear") and type(m).__name__ != "Linear"
    }
    language = ("language_model", "text_model")
    assert compressed and all(any(p in n for p in language) or n == "lm_head" for n in compressed)
    towers = [n for n, m in model.named_modules() if isinstance(m, torch.nn.Linear)]
    assert towers and all(not any(p in n for p in language) for n in towers)
    vision = load_vision(registry, record)
    loaded = LoadedModel(model, load_tokenizer(registry, record), stop_ids=set())
    ids, images = render(loaded, vision, "What is in this picture?", [picture(11)])
    other_ids, other = render(loaded, vision, "What is in this picture?", [picture(12)])

    async def run() -> list[list[int]]:
        loop = DeviceLoop(CONFIG, ModelSource(lambda name: loaded))
        loop.start()
        try:
            engine = LocalEngine(loop)
            return [
                (await generate(engine, i, im, 8))[0]
                for i, im in ((ids, images), (other_ids, other))
            ]
        finally:
            loop.stop()

    replies = asyncio.run(run())
    if scheme == "int8":
        assert replies[0] == reference(loaded, ids, images, 8)
    assert len(replies[0]) == 8 and replies[0] != replies[1]


LANGUAGE_ONLY = r".*(language_model|text_model).*\.(q_proj|v_proj)"


async def test_a_lora_adapter_on_a_vision_model_answers_images_as_peft(
    registry: Registry, vision_dir: Path, tmp_path: Path
) -> None:
    """An adapter on the language model serves image requests through the engine with
    peft's greedy tokens; the base, beside it, keeps its own."""
    from peft import PeftModel

    adapter = make_vision_lora(vision_dir, tmp_path / "lora", LANGUAGE_ONLY)
    import_hf_dir(registry, vision_dir, "vl")
    import_adapter_dir(registry, adapter, "vl-lora", "vl")
    settings = Settings(
        models=registry.root, adapters=tmp_path / "adapters", import_default=False, dtype="float32"
    )
    record = registry.get("vl")
    vision = load_vision(registry, record)
    base = load_causal_lm(registry, record, dtype=torch.float32)
    loaded = LoadedModel(base, load_tokenizer(registry, record), stop_ids=set())
    ids, images = render(loaded, vision, "What is in this picture?", [picture(13)])
    expected_base = reference(loaded, ids, images, 8)
    tuned = PeftModel.from_pretrained(base, adapter).eval()
    expected = reference(LoadedModel(tuned, loaded.tokenizer, set()), ids, images, 8)
    assert expected != expected_base
    app = create_app(settings, registry=registry)
    async with LifespanManager(app):
        engine = app.state.engine
        both = await asyncio.gather(
            collect(engine, "vl-lora:latest", ids, images),
            collect(engine, "vl:latest", ids, images),
        )
    assert both == [expected, expected_base]


def test_an_adapter_on_the_vision_tower_is_refused(
    registry: Registry, tmp_path_factory: pytest.TempPathFactory
) -> None:
    """LLaVA's CLIP tower has q_proj / v_proj too: a LoRA on every q_proj touches it, and
    only language-model adapters are served."""
    model = make_tiny_llava(tmp_path_factory.mktemp("llava-tower") / "model")
    adapter = make_vision_lora(model, tmp_path_factory.mktemp("tower") / "lora", ["q_proj"])
    import_hf_dir(registry, model, "vl")
    with pytest.raises(InvalidModel, match="vision tower"):
        import_adapter_dir(registry, adapter, "vl-lora", "vl")
    assert [r.name.display() for r in registry.models()] == ["vl:latest"]


async def collect(engine: Any, model: str, ids: list[int], images: list[Any]) -> list[int]:
    params = SamplingParams(temperature=0, repeat_penalty=1.0, max_tokens=8)
    request = GenerateRequest(f"lora-{model}", model, ids, params, images=images)
    tokens: list[int] = []
    async for event in engine.generate(request):
        tokens += event.token_ids
    return tokens
