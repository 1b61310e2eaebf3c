"""Resident models: loading beside the loop, LRU eviction, keep-alive, unload, the memory
budget, and preemption when memory runs out mid-generation."""

from __future__ import annotations

import asyncio
import threading
import time
from pathlib import Path

import pytest
import torch

from ollama_compact_server.engine.config import EngineConfig, ModelSource
from ollama_compact_server.engine.local import LocalEngine
from ollama_compact_server.engine.loop import DeviceLoop
from ollama_compact_server.engine.types import EngineError, FinishReason, SamplingParams
from tests.test_engine import PROMPTS, collect, greedy, provider_for, request


def make_engine(tiny_models: dict[str, Path], **options) -> LocalEngine:
    provider = options.pop("provider", None) or provider_for(tiny_models)
    estimate = options.pop("estimate", None)
    config = EngineConfig(
        device=torch.device("cpu"),
        dtype=torch.float32,
        slots=options.pop("slots", 4),
        capacity=256,
        prefill_chunk=16,
        **options,
    )
    loop = DeviceLoop(config, ModelSource(provider, estimate=estimate))
    loop.start()
    return LocalEngine(loop)


async def wait_for(condition, timeout: float = 5.0) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        assert time.monotonic() < deadline, "condition not reached"
        await asyncio.sleep(0.02)


async def test_traffic_over_more_models_than_fit_always_finishes(
    tiny_models: dict[str, Path],
) -> None:
    """Three models, room for two, requests for all three in flight at once: every request
    ends. (A model whose load had just finished looked idle until its waiting requests were
    queued, so the next waiting load could evict it under them: they never ended. Found by
    benchmarks/bench_scale.py.)"""
    import random

    engine = make_engine(tiny_models, max_loaded_models=2)
    rng = random.Random(0)
    models = [rng.choice(["llama", "qwen2", "gemma3"]) for _ in range(48)]
    gate = asyncio.Semaphore(6)

    async def one(model: str) -> FinishReason | None:
        async with gate:
            _, _, final = await collect(engine, request(model, PROMPTS[0], greedy(6)))
            return final.finish_reason

    try:
        reasons = await asyncio.wait_for(asyncio.gather(*(one(m) for m in models)), 120)
    finally:
        engine.close()
    assert reasons == [FinishReason.LENGTH] * len(models)


async def test_lru_eviction_never_touches_a_busy_model(tiny_models: dict[str, Path]) -> None:
    engine = make_engine(tiny_models, max_loaded_models=2)
    try:
        await collect(engine, request("llama", PROMPTS[0], greedy(2)))
        await collect(engine, request("qwen2", PROMPTS[0], greedy(2)))
        await collect(engine, request("llama", PROMPTS[0], greedy(2)))  # qwen2 is now LRU
        await collect(engine, request("gemma3", PROMPTS[0], greedy(2)))
        assert sorted(r.name for r in engine.resident()) == ["gemma3", "llama"]
        # both resident models busy: a third model waits instead of evicting either
        long_a = asyncio.ensure_future(collect(engine, request("llama", PROMPTS[0], greedy(60))))
        long_b = asyncio.ensure_future(collect(engine, request("gemma3", PROMPTS[0], greedy(60))))
        await wait_for(
            lambda: all(r.busy for r in engine.resident()) and len(engine.resident()) == 2
        )
        third = asyncio.ensure_future(collect(engine, request("qwen2", PROMPTS[0], greedy(2))))
        a, b, c = await asyncio.gather(long_a, long_b, third)
        assert len(a[0]) == 60 and len(b[0]) == 60 and len(c[0]) == 2
    finally:
        engine.close()


async def test_loading_runs_beside_the_loop(tiny_models: dict[str, Path]) -> None:
    base = provider_for(tiny_models)
    gate = threading.Event()

    def slow(name: str):
        if name == "qwen2":
            gate.wait(10)  # a load that takes as long as we like
        return base(name)

    engine = make_engine(tiny_models, provider=slow)
    try:
        await collect(engine, request("llama", PROMPTS[0], greedy(2)))
        blocked = asyncio.ensure_future(collect(engine, request("qwen2", PROMPTS[0], greedy(2))))
        await asyncio.sleep(0.1)
        tokens, _, _ = await asyncio.wait_for(
            collect(engine, request("llama", PROMPTS[1], greedy(20))), timeout=10
        )
        assert len(tokens) == 20 and not blocked.done()  # llama streamed while qwen2 loaded
        gate.set()
        tokens, _, final = await blocked
        assert len(tokens) == 2 and final.load_time > 0.05
    finally:
        gate.set()
        engine.close()


async def test_keep_alive_zero_negative_and_default(tiny_models: dict[str, Path]) -> None:
    engine = make_engine(tiny_models, keep_alive=0.3)
    try:
        req = request("llama", PROMPTS[0], greedy(2))
        req.keep_alive = 0.0
        await collect(engine, req)
        await wait_for(lambda: not engine.resident())  # unloaded as soon as idle
        req = request("llama", PROMPTS[0], greedy(2))
        req.keep_alive = None  # negative keep_alive: keep forever
        await collect(engine, req)
        await asyncio.sleep(0.6)
        assert [r.name for r in engine.resident()] == ["llama"]
        assert engine.resident()[0].expires_in is None
        await collect(engine, request("llama", PROMPTS[0], greedy(2)))  # default: 0.3 s
        assert 0 < engine.resident()[0].expires_in <= 0.3
        await wait_for(lambda: not engine.resident())
    finally:
        engine.close()


async def test_bare_load_and_unload(tiny_models: dict[str, Path]) -> None:
    engine = make_engine(tiny_models)
    try:
        seconds = await engine.load("gemma3")
        assert seconds > 0 and [r.name for r in engine.resident()] == ["gemma3"]
        assert await engine.load("gemma3") == 0.0
        engine.unload("gemma3")
        await wait_for(lambda: not engine.resident())
        with pytest.raises(EngineError, match="not found"):
            await engine.load("absent")
    finally:
        engine.close()


async def test_memory_budget_too_small_for_a_model(tiny_models: dict[str, Path]) -> None:
    engine = make_engine(tiny_models, memory_budget=1 << 20, estimate=lambda name: 64 << 20)
    try:
        with pytest.raises(EngineError) as info:
            await collect(engine, request("llama", PROMPTS[0], greedy(2)))
        assert (
            info.value.status == 400 and "64 MiB" in str(info.value) and "1 MiB" in str(info.value)
        )
    finally:
        engine.close()


async def test_memory_budget_evicts_idle_models(tiny_models: dict[str, Path]) -> None:
    engine = make_engine(tiny_models, memory_budget=10 << 20, estimate=lambda name: 4 << 20)
    try:
        await collect(engine, request("llama", PROMPTS[0], greedy(2)))
        await collect(engine, request("qwen2", PROMPTS[0], greedy(2)))
        used = sum(r.memory for r in engine.resident())
        assert used <= 10 << 20
        await collect(engine, request("gemma3", PROMPTS[0], greedy(2)))
        assert sum(r.memory for r in engine.resident()) <= 10 << 20
        assert "gemma3" in [r.name for r in engine.resident()]
    finally:
        engine.close()


async def test_out_of_memory_preempts_the_youngest_and_resumes_it(
    tiny_models: dict[str, Path],
) -> None:
    engine = make_engine(tiny_models, slots=4)
    try:
        solo = [(await collect(engine, request("llama", p, greedy(24))))[0] for p in PROMPTS[:4]]
        worker = engine.device_loop.workers["llama"]
        runner = worker.runner
        real = runner.decode
        state = {"ooms": 0}

        def decode(slots, tokens, positions, loras=None, offsets=None):
            if len(slots) > 2:  # "memory" holds only two rows
                state["ooms"] += 1
                raise torch.OutOfMemoryError("CUDA out of memory (injected)")
            return real(slots, tokens, positions, loras)

        real_preempt = worker.scheduler.preempt
        victims: list[tuple[str, list[str]]] = []  # (preempted, running youngest first)

        def preempt(seq) -> None:
            youngest_first = sorted(worker.scheduler.running, key=lambda s: -s.submitted)
            victims.append((seq.request.request_id, [s.request.request_id for s in youngest_first]))
            real_preempt(seq)

        runner.decode = decode  # type: ignore[method-assign]
        worker.scheduler.preempt = preempt  # type: ignore[method-assign]
        results = await asyncio.wait_for(  # a preemption livelock fails, not hangs
            asyncio.gather(
                *(collect(engine, request("llama", p, greedy(24))) for p in PROMPTS[:4])
            ),
            120,
        )
        runner.decode = real  # type: ignore[method-assign]
        worker.scheduler.preempt = real_preempt  # type: ignore[method-assign]
        assert state["ooms"] > 0 and victims
        for victim, running in victims:  # always the youngest of the running requests
            assert victim == running[0], victims
        for (tokens, _, final), expected in zip(results, solo):
            assert final.finish_reason == FinishReason.LENGTH
            assert tokens == expected  # resumed by recompute: same greedy output
        assert engine.health()
    finally:
        engine.close()


async def test_seeded_sampling_survives_preemption(tiny_models: dict[str, Path]) -> None:
    engine = make_engine(tiny_models, slots=3)
    try:
        params = dict(temperature=0.9, top_k=40, max_tokens=20, seed=7)
        alone, _, _ = await collect(engine, request("llama", PROMPTS[2], SamplingParams(**params)))
        runner = engine.device_loop.workers["llama"].runner
        real = runner.decode
        calls = {"n": 0}

        def decode(slots, tokens, positions, loras=None, offsets=None):
            calls["n"] += 1
            if len(slots) > 1 and calls["n"] % 5 == 0:
                raise RuntimeError("out of memory (injected)")
            return real(slots, tokens, positions, loras)

        runner.decode = decode  # type: ignore[method-assign]
        results = await asyncio.gather(
            collect(engine, request("llama", PROMPTS[0], greedy(20))),
            collect(engine, request("llama", PROMPTS[2], SamplingParams(**params))),
        )
        runner.decode = real  # type: ignore[method-assign]
        assert results[1][0] == alone
    finally:
        engine.close()


async def test_each_load_runs_on_a_thread_that_exits(tiny_models: dict[str, Path]) -> None:
    """Loads run torch work beside the device thread; a thread that lived on would keep
    an OpenMP pool and slow every forward (ollama_compact_server/threads.py). Each load
    gets a new thread, and that thread is gone once its load is done."""
    base = provider_for(tiny_models)
    loaders: list[threading.Thread] = []

    def recording(name: str):
        loaders.append(threading.current_thread())
        return base(name)

    engine = make_engine(tiny_models, provider=recording)
    try:
        await collect(engine, request("llama", PROMPTS[0], greedy(2)))
        await collect(engine, request("qwen2", PROMPTS[0], greedy(2)))
        assert len(loaders) == 2 and loaders[0] is not loaders[1]
        assert all(t is not threading.main_thread() for t in loaders)
        await wait_for(lambda: not any(t.is_alive() for t in loaders))
    finally:
        engine.close()
