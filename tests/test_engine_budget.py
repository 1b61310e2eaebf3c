"""The memory planner drives the engine: what `plan` prints is what the engine allocates,
and a small budget is honoured exactly."""

from __future__ import annotations

import asyncio
import json
from pathlib import Path

import pytest
import torch

from ollama_compact_server.engine.config import EngineConfig, ModelSource
from ollama_compact_server.engine.local import LocalEngine
from ollama_compact_server.engine.loop import DeviceLoop
from ollama_compact_server.engine.planner import kv_bytes_per_token, plan_memory, weight_bytes
from ollama_compact_server.engine.provider import RegistryProvider, RegistrySizing
from ollama_compact_server.engine.types import EngineError
from ollama_compact_server.registry.importers import import_hf_dir
from ollama_compact_server.registry.store import Registry
from tests.test_engine import PROMPTS, collect, greedy, request


def engine_for(
    registry: Registry, budget: int, context: int = 256, parallel: int = 16
) -> LocalEngine:
    sizing = RegistrySizing(
        registry, dtype=torch.float32, num_parallel=parallel, context_length=context
    )
    loop = DeviceLoop(
        EngineConfig(
            device=torch.device("cpu"), dtype=torch.float32, memory_budget=budget, prefill_chunk=32
        ),
        ModelSource(
            RegistryProvider(registry, torch.device("cpu"), torch.float32),
            estimate=sizing.estimate,
            plan=sizing.plan,
        ),
    )
    loop.start()
    return LocalEngine(loop)


async def test_small_budget_is_honoured_exactly(
    registry: Registry, tiny_models: dict[str, Path]
) -> None:
    import_hf_dir(registry, tiny_models["llama"], "tiny")
    config = json.loads((tiny_models["llama"] / "config.json").read_text())
    weights = weight_bytes(config, "float32")
    per_token = kv_bytes_per_token(config, "float32")
    budget = weights + 3 * 256 * per_token + per_token  # room for exactly three sequences
    plan = plan_memory(
        config,
        budget=budget,
        kv_dtype="float32",
        weight_format="float32",
        num_parallel=16,
        context=256,
        activation_reserve=0,
    )
    assert plan.sequences == 3 and plan.context == 256
    engine = engine_for(registry, budget)
    try:
        results = await asyncio.gather(
            *(collect(engine, request("tiny", p, greedy(8))) for p in PROMPTS)
        )
        assert all(
            len(tokens) == 8 for tokens, _, _ in results
        )  # five requests through three slots
        worker = engine.device_loop.workers["tiny"]
        cache = worker.runner.cache
        assert cache.slots == plan.sequences and cache.capacity == plan.context
        assert cache.nbytes == plan.kv_bytes
        assert worker.memory <= budget
    finally:
        engine.close()


async def test_model_larger_than_the_budget_is_refused(
    registry: Registry, tiny_models: dict[str, Path]
) -> None:
    import_hf_dir(registry, tiny_models["llama"], "tiny")
    engine = engine_for(registry, budget=64 << 10)
    try:
        with pytest.raises(EngineError) as info:
            await collect(engine, request("tiny", PROMPTS[0], greedy(4)))
        assert info.value.status == 400 and "budget" in str(info.value)
        assert engine.health()
    finally:
        engine.close()


def test_plan_command(
    tmp_path: Path, registry: Registry, tiny_models: dict[str, Path], capsys
) -> None:
    from ollama_compact_server.cli import main

    import_hf_dir(registry, tiny_models["llama"], "tiny")
    code = main(
        ["plan", "tiny", "--models", str(registry.root), "--budget", "1GiB", "--device", "cpu"]
    )
    out = capsys.readouterr().out
    assert code == 0 and "KV per token" in out and "sequences" in out
    # a config.json of a model that is not imported, and a budget it cannot fit
    llama8b = {
        "model_type": "llama",
        "hidden_size": 4096,
        "intermediate_size": 14336,
        "num_hidden_layers": 32,
        "num_attention_heads": 32,
        "num_key_value_heads": 8,
        "vocab_size": 128256,
        "max_position_embeddings": 8192,
        "tie_word_embeddings": False,
    }
    path = tmp_path / "llama-3-8b" / "config.json"
    path.parent.mkdir()
    path.write_text(json.dumps(llama8b))
    assert (
        main(["plan", str(path), "--budget", "16GiB", "--quantize", "int4", "--context", "8192"])
        == 0
    )
    assert "8192 tokens" in capsys.readouterr().out
    assert main(["plan", str(path), "--budget", "8GiB"]) == 3  # bf16 8B on 8 GiB: does not fit


async def test_plan_command_prints_what_the_engine_allocates(
    registry: Registry, tiny_models: dict[str, Path], monkeypatch: pytest.MonkeyPatch, capsys
) -> None:
    """`ollama-compact plan` and the engine's load share one planner call with the same
    inputs: the sequences x context it prints are the cache the engine then allocates."""
    import re

    from ollama_compact_server.cli import main

    import_hf_dir(registry, tiny_models["llama"], "tiny")
    config = json.loads((tiny_models["llama"] / "config.json").read_text())
    weights = weight_bytes(config, "float32")
    per_token = kv_bytes_per_token(config, "float32")
    budget = weights + 5 * 256 * per_token + 200 * per_token  # 5 sequences and some spare
    for key, value in {"DTYPE": "float32", "CONTEXT_LENGTH": "256", "NUM_PARALLEL": "16"}.items():
        monkeypatch.setenv(f"OCS_{key}", value)
    argv = ["plan", "tiny", "--models", str(registry.root), "--budget", str(budget)]
    assert main([*argv, "--device", "cpu"]) == 0
    printed = re.search(r"(\d+) sequences × (\d+) tokens", capsys.readouterr().out)
    assert printed is not None
    sequences, context = int(printed[1]), int(printed[2])
    assert (sequences, context) == (5, 256)
    engine = engine_for(registry, budget, context=256, parallel=16)
    try:
        await collect(engine, request("tiny", PROMPTS[0], greedy(2)))
        cache = engine.device_loop.workers["tiny"].runner.cache
        assert (cache.slots, cache.capacity) == (sequences, context)
    finally:
        engine.close()
