"""Many LoRA adapters in one batch: each adapter's greedy output inside a mixed batch equals
its output alone and peft's own generate; adapters share one resident base, wait for a
device slot when all are in use, and re-created names serve their new weights."""

from __future__ import annotations

import asyncio
import itertools
from pathlib import Path

import pytest
import torch

from ollama_compact_server.engine.config import EngineConfig, ModelSource
from ollama_compact_server.engine.local import LocalEngine
from ollama_compact_server.engine.loop import DeviceLoop
from ollama_compact_server.engine.provider import RegistryProvider
from ollama_compact_server.engine.types import FinishReason, GenerateRequest, SamplingParams
from ollama_compact_server.modeling.lora import LoraBank, LoraError, LoraWeights
from ollama_compact_server.registry.importers import import_adapter_dir, import_hf_dir
from ollama_compact_server.registry.manifest import MT_ADAPTER_FILE
from ollama_compact_server.registry.store import Registry
from tests.factory import make_lora_adapter

_ids = itertools.count()

ADAPTERS = {  # name -> make_lora_adapter options: ranks, alphas, rsLoRA and targets differ
    "pirate": {"r": 4, "alpha": 8, "seed": 1},
    "poet": {"r": 8, "alpha": 16, "seed": 2, "use_rslora": True},
    "judge": {"r": 4, "alpha": 4, "seed": 3, "target_modules": ["q_proj", "v_proj"]},
}
PROMPTS = [list(range(10, 30)), list(range(40, 47)), list(range(100, 140))]


@pytest.fixture(scope="module")
def adapter_dirs(tiny_models: dict[str, Path], tmp_path_factory: pytest.TempPathFactory):
    root = tmp_path_factory.mktemp("loras")
    dirs: dict[tuple[str, str], Path] = {}
    for family in ("llama", "gemma3"):
        for name, options in ADAPTERS.items():
            dirs[family, name] = make_lora_adapter(
                tiny_models[family], root / f"{family}-{name}", base_name="tiny", **options
            )
    return dirs


def make_registry(root: Path, base: Path, adapters: dict[str, Path]) -> Registry:
    registry = Registry(root)
    import_hf_dir(registry, base, "tiny")
    for name, directory in adapters.items():
        import_adapter_dir(registry, directory, name, "tiny")
    return registry


def start(registry: Registry, **options) -> LocalEngine:
    provider = RegistryProvider(registry, torch.device("cpu"), torch.float32)
    config = EngineConfig(
        device=torch.device("cpu"),
        dtype=torch.float32,
        slots=options.pop("slots", 8),
        capacity=256,
        prefill_chunk=16,
        **options,
    )
    models = ModelSource(provider, resolve=provider.resolve, load_adapter=provider.load_adapter)
    loop = DeviceLoop(config, models)
    loop.start()
    return LocalEngine(loop)


def greedy(n: int = 10) -> SamplingParams:
    return SamplingParams(temperature=0, repeat_penalty=1.0, max_tokens=n)


async def run(engine: LocalEngine, model: str, prompt: list[int], delay: float = 0.0, n: int = 10):
    await asyncio.sleep(delay)
    request = GenerateRequest(
        request_id=f"l{next(_ids)}", model=model, prompt_ids=prompt, sampling=greedy(n)
    )
    tokens: list[int] = []
    final = None
    async for event in engine.generate(request):
        tokens += event.token_ids
        final = event
    assert final is not None and final.finish_reason == FinishReason.LENGTH, final
    return tokens


def peft_generate(base: Path, adapter: Path | None, prompt: list[int]) -> list[int]:
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(base, attn_implementation="sdpa").eval()
    if adapter is not None:
        model = PeftModel.from_pretrained(model, adapter).eval()
    out = model.generate(
        input_ids=torch.tensor([prompt]), max_new_tokens=10, do_sample=False, repetition_penalty=1.0
    )
    return out[0, len(prompt) :].tolist()


@pytest.mark.parametrize("family", ["llama", "gemma3"])
async def test_mixed_adapter_batch_equals_solo_and_peft(
    tmp_path: Path, tiny_models: dict[str, Path], adapter_dirs, family: str
) -> None:
    dirs = {name: adapter_dirs[family, name] for name in ADAPTERS}
    registry = make_registry(tmp_path / "reg", tiny_models[family], dirs)
    engine = start(registry)
    try:
        models = ["tiny", *ADAPTERS]
        solo: dict[tuple[str, int], list[int]] = {}
        for model in models:
            for i, prompt in enumerate(PROMPTS):
                solo[model, i] = await run(engine, model, prompt)
        # every adapter changes the output, and matches peft's own generate
        for model in models:
            reference = peft_generate(tiny_models[family], dirs.get(model), PROMPTS[0])
            assert solo[model, 0] == reference, f"{model} differs from peft"
        for name in ADAPTERS:
            assert solo[name, 0] != solo["tiny", 0], f"{name} changed nothing"
        # all together, base and adapters mixed in each step, joining at different times
        jobs = [
            (model, i, run(engine, model, prompt, delay=0.002 * n))
            for n, (model, (i, prompt)) in enumerate(itertools.product(models, enumerate(PROMPTS)))
        ]
        results = await asyncio.gather(*(job for _, _, job in jobs))
        for (model, i, _), tokens in zip(jobs, results):
            assert tokens == solo[model, i], f"{model} prompt {i} differs inside a mixed batch"
        loop = engine.device_loop
        assert list(loop.workers) == ["tiny:latest"], "adapters must share the one resident base"
        assert loop.active_sequences() == 0
        adapters = loop.workers["tiny:latest"].adapters
        assert adapters is not None and all(slot.refs == 0 for slot in adapters.slots)
        names = {r.name: r for r in engine.resident()}
        assert set(names) == {"tiny:latest", *(f"{n}:latest" for n in ADAPTERS)}
        assert names["pirate:latest"].base == "tiny:latest"
    finally:
        engine.close()


async def test_more_adapters_than_device_slots_wait_their_turn(
    tmp_path: Path, tiny_models: dict[str, Path], adapter_dirs
) -> None:
    dirs = {name: adapter_dirs["llama", name] for name in ADAPTERS}
    registry = make_registry(tmp_path / "reg", tiny_models["llama"], dirs)
    engine = start(registry, max_loras=1, max_cpu_loras=0)
    try:
        solo = {name: await run(engine, name, PROMPTS[1]) for name in ADAPTERS}
        jobs = [run(engine, name, PROMPTS[1]) for _ in range(3) for name in ADAPTERS]
        jobs.append(run(engine, "tiny", PROMPTS[1]))
        results = await asyncio.gather(*jobs)
        for n, tokens in enumerate(results[:-1]):
            name = list(ADAPTERS)[n % len(ADAPTERS)]
            assert tokens == solo[name]
        adapters = engine.device_loop.workers["tiny:latest"].adapters
        assert adapters is not None
        assert adapters.stats.device_evictions >= 2
        assert len(adapters.resident()) == 1
        assert len(adapters.host) <= 1  # the one on the device (no idle ones kept)
    finally:
        engine.close()


async def test_recreated_adapter_serves_its_new_weights(
    tmp_path: Path, tiny_models: dict[str, Path], adapter_dirs
) -> None:
    registry = make_registry(
        tmp_path / "reg", tiny_models["llama"], {"style": adapter_dirs["llama", "pirate"]}
    )
    engine = start(registry)
    try:
        first = await run(engine, "style", PROMPTS[0])
        import_adapter_dir(registry, adapter_dirs["llama", "poet"], "style", "tiny")
        second = await run(engine, "style", PROMPTS[0])
        assert second != first
        expected = peft_generate(tiny_models["llama"], adapter_dirs["llama", "poet"], PROMPTS[0])
        assert second == expected
    finally:
        engine.close()


async def test_base_requests_are_unchanged_by_resident_adapters(
    tmp_path: Path, tiny_models: dict[str, Path], adapter_dirs
) -> None:
    dirs = {name: adapter_dirs["llama", name] for name in ADAPTERS}
    registry = make_registry(tmp_path / "reg", tiny_models["llama"], dirs)
    engine = start(registry)
    try:
        before = [await run(engine, "tiny", p) for p in PROMPTS]
        for name in ADAPTERS:
            await run(engine, name, PROMPTS[0])
        after = [await run(engine, "tiny", p) for p in PROMPTS]
        assert after == before
    finally:
        engine.close()


async def test_an_adapter_that_fails_to_load_fails_alone(
    tmp_path: Path, tiny_models: dict[str, Path], adapter_dirs
) -> None:
    dirs = {name: adapter_dirs["llama", name] for name in ADAPTERS}
    registry = make_registry(tmp_path / "reg", tiny_models["llama"], dirs)
    weights = registry.get("judge").manifest.files(MT_ADAPTER_FILE)
    engine = start(registry)
    try:
        blob = registry.blobs.path(weights["adapter_model.safetensors"].digest)
        blob.chmod(0o644)
        blob.write_bytes(b"corrupted")  # the digest check refuses it
        results = await asyncio.gather(
            run(engine, "pirate", PROMPTS[0]),
            run(engine, "judge", PROMPTS[0]),
            run(engine, "tiny", PROMPTS[0]),
            return_exceptions=True,
        )
        assert isinstance(results[0], list) and isinstance(results[2], list)
        assert isinstance(results[1], Exception)
        assert engine.health()
    finally:
        engine.close()


def test_bank_refuses_adapters_that_do_not_fit(tiny_models: dict[str, Path]) -> None:
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(tiny_models["llama"]).eval()
    bank = LoraBank(model, 2, torch.float32, torch.device("cpu"))
    path = "model.layers.0.self_attn.q_proj"
    q = model.get_submodule(path)
    wrong = LoraWeights(
        "k", 4, 1.0, {path: (torch.zeros(4, q.in_features + 1), torch.zeros(q.out_features, 4))}
    )
    with pytest.raises(LoraError, match="do not fit"):
        bank.load(0, wrong)
    nowhere = LoraWeights("k", 4, 1.0, {"model.norm": (torch.zeros(4, 8), torch.zeros(8, 4))})
    with pytest.raises(LoraError, match="not a projection"):
        bank.load(0, nowhere)
    assert not bank.layers  # nothing was wrapped


def test_memory_plan_reserves_the_adapter_slots(
    tmp_path: Path, tiny_models: dict[str, Path], adapter_dirs
) -> None:
    from ollama_compact_server.engine.provider import RegistrySizing

    dirs = {name: adapter_dirs["llama", name] for name in ADAPTERS}
    registry = make_registry(tmp_path / "reg", tiny_models["llama"], dirs)
    sizing = RegistrySizing(
        registry, dtype=torch.float32, num_parallel=2, context_length=256, max_loras=3
    )
    assert sizing.adapters_of("tiny") == (3, 8)  # the highest rank among its adapters
    import_hf_dir(registry, tiny_models["qwen2"], "other")
    assert sizing.adapters_of("other") == (0, 16)


@pytest.mark.parametrize("family", ["llama", "gemma3"])
def test_batched_lora_logits_match_peft(tiny_models: dict[str, Path], adapter_dirs, family: str):
    """The documented tolerance: in float32, every row of a mixed batch (two adapters and
    the bare base) has logits within 1e-4 of peft's for its own adapter."""
    import json

    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    from ollama_compact_server.engine.runner import ModelRunner
    from ollama_compact_server.modeling.lora import read_peft_adapter

    def fresh():
        return AutoModelForCausalLM.from_pretrained(
            tiny_models[family], attn_implementation="sdpa"
        ).eval()

    names = ["pirate", "poet"]
    runner = ModelRunner(
        fresh(), slots=3, capacity=64, dtype=torch.float32, device=torch.device("cpu")
    )
    bank = runner.attach_lora(2)
    for slot, name in enumerate(names):
        directory = adapter_dirs[family, name]
        config = json.loads((directory / "adapter_config.json").read_text())
        bank.load(slot, read_peft_adapter(config, directory / "adapter_model.safetensors", name))
    prompt = PROMPTS[1]
    slots = [runner.cache.allocate() for _ in range(3)]
    ours = runner.prefill_batch(slots, [prompt] * 3, [0, 1, -1])  # [3, V]
    ids = torch.tensor([prompt])
    with torch.no_grad():
        for row, name in enumerate(names):
            peft = PeftModel.from_pretrained(fresh(), adapter_dirs[family, name]).eval()
            expected = peft(input_ids=ids).logits[0, -1]
            assert (ours[row] - expected).abs().max() < 1e-4, name
        expected = fresh()(input_ids=ids).logits[0, -1]
        assert (ours[2] - expected).abs().max() < 1e-4


async def test_no_memory_for_the_adapter_slots_fails_that_request_alone(
    tmp_path: Path, tiny_models: dict[str, Path], adapter_dirs, monkeypatch: pytest.MonkeyPatch
) -> None:
    dirs = {name: adapter_dirs["llama", name] for name in ADAPTERS}
    registry = make_registry(tmp_path / "reg", tiny_models["llama"], dirs)
    engine = start(registry)
    try:
        base = await run(engine, "tiny", PROMPTS[0])

        def no_memory(self, slot, weights):
            raise RuntimeError("CUDA out of memory (injected)")

        monkeypatch.setattr(LoraBank, "load", no_memory)
        results = await asyncio.gather(
            run(engine, "pirate", PROMPTS[0]), run(engine, "tiny", PROMPTS[0]),
            return_exceptions=True,
        )  # fmt: skip
        assert isinstance(results[0], Exception) and results[1] == base
        assert engine.health() and engine.device_loop.active_sequences() == 0
        monkeypatch.undo()
        assert await run(engine, "pirate", PROMPTS[0]) != base  # and it recovers
    finally:
        engine.close()


async def test_prefill_out_of_memory_preempts_without_decoding_the_preempted(
    tmp_path: Path, tiny_models: dict[str, Path], adapter_dirs
) -> None:
    dirs = {name: adapter_dirs["llama", name] for name in ADAPTERS}
    registry = make_registry(tmp_path / "reg", tiny_models["llama"], dirs)
    engine = start(registry)
    try:
        long = await run(engine, "pirate", PROMPTS[1], n=150)
        short = await run(engine, "tiny", PROMPTS[1])
        runner = engine.device_loop.workers["tiny:latest"].runner
        real = runner.prefill_batch
        fired = []

        def prefill_batch(slots, prompts, loras=None, starts=None, media=None):
            if not fired and engine.device_loop.workers["tiny:latest"].scheduler.running:
                fired.append(1)
                raise torch.OutOfMemoryError("injected")
            return real(slots, prompts, loras, starts)

        runner.prefill_batch = prefill_batch  # type: ignore[method-assign]
        first = asyncio.create_task(run(engine, "pirate", PROMPTS[1], n=150))
        while not engine.device_loop.workers["tiny:latest"].scheduler.running:
            await asyncio.sleep(0.001)
        second = await run(engine, "tiny", PROMPTS[1])
        assert await first == long and second == short
        assert fired and engine.device_loop.stats.preemptions >= 1
    finally:
        engine.close()


async def test_adapter_embedding_with_keep_alive_zero(
    tmp_path: Path, tiny_models: dict[str, Path], adapter_dirs
) -> None:
    from ollama_compact_server.engine.types import EmbedRequest

    registry = make_registry(
        tmp_path / "reg", tiny_models["llama"], {"pirate": adapter_dirs["llama", "pirate"]}
    )
    engine = start(registry)
    try:
        event = await engine.embed(
            EmbedRequest(request_id="e1", model="pirate", inputs=[[5, 6, 7]], keep_alive=0)
        )
        assert event.embeddings and len(event.embeddings) == 1
    finally:
        engine.close()


@pytest.mark.parametrize("scheme", ["int8", "int4"])
async def test_adapters_batch_on_a_compressed_base(
    tmp_path: Path, tiny_models: dict[str, Path], adapter_dirs, scheme: str
) -> None:
    """Adapters made for the float32 parent run on its compressed variant: the LoRA bank
    wraps the compressed projections, and mixed batches still equal solo output."""
    from ollama_compact_server.jobs.compressing import compress_registry_model

    registry = make_registry(tmp_path / "reg", tiny_models["llama"], {})
    compress_registry_model(registry, "tiny", "tiny-q", scheme)
    for name in ADAPTERS:
        import_adapter_dir(registry, adapter_dirs["llama", name], f"{name}-q", "tiny-q")
    engine = start(registry)
    try:
        models = ["tiny-q", *(f"{n}-q" for n in ADAPTERS)]
        solo = {m: await run(engine, m, PROMPTS[0]) for m in models}
        assert len({tuple(v) for v in solo.values()}) == len(models)  # each adapter matters
        results = await asyncio.gather(*(run(engine, m, PROMPTS[0]) for m in models * 2))
        for model, tokens in zip(models * 2, results):
            assert tokens == solo[model], model
        worker = engine.device_loop.workers["tiny-q:latest"]
        assert worker.runner.lora is not None
        wrapped = next(iter(worker.runner.lora.layers.values()))
        assert type(wrapped.base).__name__ != "Linear"  # the compressed module itself
    finally:
        engine.close()


async def test_an_adapter_loads_while_a_base_stream_keeps_producing_tokens(
    tmp_path: Path, tiny_models: dict[str, Path], adapter_dirs, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Adapters load on first use without pausing other requests: the adapter's read from
    disk is held open until a running base-model stream has produced 20 more tokens (it
    gives up after 5 s, which fails the test: the stream paused during the load)."""
    import threading

    registry = make_registry(
        tmp_path / "reg", tiny_models["llama"], {"pirate": adapter_dirs["llama", "pirate"]}
    )
    loading, enough, loaded = threading.Event(), threading.Event(), threading.Event()
    real = RegistryProvider.load_adapter

    def slow_load(self: RegistryProvider, ref):
        loading.set()
        enough.wait(5)
        loaded.set()
        return real(self, ref)

    monkeypatch.setattr(RegistryProvider, "load_adapter", slow_load)
    engine = start(registry)
    try:
        base_solo = await run(engine, "tiny", PROMPTS[0], n=120)
        during: list[int] = []
        streamed: list[int] = []

        async def base_stream() -> None:
            request = GenerateRequest(
                request_id="base-stream", model="tiny", prompt_ids=PROMPTS[0], sampling=greedy(120)
            )
            async for event in engine.generate(request):
                streamed.extend(event.token_ids)
                if loading.is_set() and not loaded.is_set():
                    during.extend(event.token_ids)
                    if len(during) >= 20:
                        enough.set()

        stream = asyncio.create_task(base_stream())
        while not streamed:
            await asyncio.sleep(0.001)
        adapter = await run(engine, "pirate", PROMPTS[0])
        await stream
        assert len(during) >= 20, "the base stream paused while the adapter loaded"
        assert streamed == base_solo
        expected = peft_generate(tiny_models["llama"], adapter_dirs["llama", "pirate"], PROMPTS[0])
        assert adapter == expected
    finally:
        enough.set()
        engine.close()


async def test_different_adapters_and_the_base_decode_in_one_step(
    tmp_path: Path, tiny_models: dict[str, Path], adapter_dirs
) -> None:
    """Heterogeneous batching really happens: the runner's decode steps are recorded with
    each row's adapter slot, and one step holds two different adapters and the bare base,
    while every request's greedy output equals its output alone."""
    dirs = {name: adapter_dirs["llama", name] for name in ("pirate", "poet")}
    registry = make_registry(tmp_path / "reg", tiny_models["llama"], dirs)
    engine = start(registry)
    try:
        models = ["tiny", "pirate", "poet"]
        solo = {m: await run(engine, m, PROMPTS[0], n=20) for m in models}
        assert len({tuple(t) for t in solo.values()}) == 3
        runner = engine.device_loop.workers["tiny:latest"].runner
        real = runner.decode
        steps: list[list[int]] = []

        def decode(slots, tokens, positions, loras=None, offsets=None):
            steps.append(list(loras or []))
            return real(slots, tokens, positions, loras)

        runner.decode = decode  # type: ignore[method-assign]
        results = await asyncio.gather(*(run(engine, m, PROMPTS[0], n=20) for m in models))
        assert dict(zip(models, results)) == solo
        mixed = [s for s in steps if -1 in s and len({x for x in s if x >= 0}) >= 2]
        assert mixed, f"no decode step mixed two adapters and the base: {steps[:5]}"
    finally:
        engine.close()


async def test_a_request_is_resolved_once_and_off_the_device_thread(
    tmp_path: Path, tiny_models: dict[str, Path], adapter_dirs
) -> None:
    """The engine front names the base and the adapter once per request, on a worker
    thread: the device thread never reads the registry or hashes a manifest for it."""
    import threading

    dirs = {name: adapter_dirs["llama", name] for name in ADAPTERS}
    registry = make_registry(tmp_path / "reg", tiny_models["llama"], dirs)
    engine = start(registry)
    models = engine.device_loop.models
    assert models.resolve is not None
    real = models.resolve
    calls: list[tuple[str, str]] = []

    def resolve(name: str):
        calls.append((name, threading.current_thread().name))
        return real(name)

    object.__setattr__(models, "resolve", resolve)  # a frozen dataclass
    try:
        await run(engine, "pirate", PROMPTS[0])
        await run(engine, "tiny", PROMPTS[0])
    finally:
        engine.close()
    assert [name for name, _ in calls] == ["pirate", "tiny"]
    assert not any(thread.startswith("ocs-engine") for _, thread in calls)
