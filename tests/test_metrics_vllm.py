"""The gauges Kubernetes inference gateways scrape, under vLLM's names, beside ours in
/metrics: parsed as a Prometheus text scrape, and following the real engine (a running
adapter request in running_lora_adapters, a queued one in waiting_lora_adapters)."""

from __future__ import annotations

import asyncio
import contextlib
import time
from pathlib import Path
from typing import Any

import pytest
from prometheus_client.parser import text_string_to_metric_families

from ollama_compact_server.api.metrics import Metrics
from ollama_compact_server.engine.worker import ModelWorker
from ollama_compact_server.registry.importers import import_adapter_dir, import_hf_dir
from ollama_compact_server.registry.store import Registry
from tests.conftest import serve_app
from tests.factory import make_lora_adapter

VLLM = (
    "vllm:num_requests_waiting",
    "vllm:num_requests_running",
    "vllm:kv_cache_usage_perc",
    "vllm:lora_requests_info",
)


def scrape(text: str) -> dict[str, Any]:
    """{family name: family} of a /metrics text, as a Prometheus text parser reads it."""
    return {family.name: family for family in text_string_to_metric_families(text)}


def lora_info(families: dict[str, Any]) -> dict[str, str]:
    """The labels of the sample with the newest value, as the EPP picks it."""
    samples = families["vllm:lora_requests_info"].samples
    return dict(max(samples, key=lambda s: s.value).labels)


def test_gauges_render_as_vllm_names_them() -> None:
    from prometheus_client import generate_latest

    metrics = Metrics()
    before = time.time()
    metrics.refresh(
        {
            "queued": 3,
            "running": 2,
            "kv_tokens_used": 300,
            "kv_tokens_free": 900,
            "max_loras": 8,
            "running_adapters": {"pirate:latest": 1, "org/poet:v2": 1},
            "waiting_adapters": {"pirate:latest": 2},
        }
    )
    text = generate_latest(metrics.registry).decode()
    families = scrape(text)
    for name in VLLM:
        assert families[name].type == "gauge", name
    assert "# TYPE vllm:num_requests_waiting gauge" in text
    assert families["vllm:num_requests_waiting"].samples[0].value == 3
    assert families["vllm:num_requests_running"].samples[0].value == 2
    assert families["vllm:kv_cache_usage_perc"].samples[0].value == pytest.approx(0.25)
    assert families["vllm:num_requests_waiting"].samples[0].labels == {}
    info = families["vllm:lora_requests_info"].samples
    assert len(info) == 1 and info[0].value >= before  # the time it was read
    assert info[0].labels == {
        "max_lora": "8",
        "running_lora_adapters": "org/poet:v2,pirate",
        "waiting_lora_adapters": "pirate",
    }
    # a later state replaces the series (one series, the newest)
    metrics.refresh({"max_loras": 8, "kv_tokens_used": 0, "kv_tokens_free": 0})
    families = scrape(generate_latest(metrics.registry).decode())
    assert [s.labels for s in families["vllm:lora_requests_info"].samples] == [
        {"max_lora": "8", "running_lora_adapters": "", "waiting_lora_adapters": ""}
    ]
    assert families["vllm:kv_cache_usage_perc"].samples[0].value == 0.0


@pytest.fixture
def adapter_registry(tmp_path: Path, tiny_models: dict[str, Path]) -> Registry:
    registry = Registry(tmp_path / "registry")
    import_hf_dir(registry, tiny_models["llama"], "tiny")
    for name, seed in (("pirate", 1), ("poet", 2)):
        adapter = make_lora_adapter(
            tiny_models["llama"], tmp_path / name, seed=seed, base_name="tiny"
        )
        import_adapter_dir(registry, adapter, name, "tiny")
    return registry


async def test_metrics_follow_the_engine(
    adapter_registry: Registry, monkeypatch: pytest.MonkeyPatch
) -> None:
    # a step takes at least 5 ms, so a 400-token request runs for seconds
    step = ModelWorker.step

    def slow_step(self: ModelWorker) -> bool:
        time.sleep(0.005)
        return step(self)

    monkeypatch.setattr(ModelWorker, "step", slow_step)
    async with serve_app(adapter_registry, dtype="float32", num_parallel=1) as served:
        raw = served.raw
        families = scrape((await raw.get("/metrics")).text)
        for name in VLLM[:3]:
            assert families[name].samples[0].value == 0, name

        async def complete(model: str) -> Any:
            body = {"model": model, "prompt": "Hello", "max_tokens": 400, "temperature": 0}
            return await raw.post("/v1/completions", json=body)

        # one KV slot: pirate's request runs, poet's waits for the slot
        first = asyncio.create_task(complete("pirate"))
        seen: dict[str, Any] = {}
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline:
            families = scrape((await raw.get("/metrics")).text)
            if (
                "vllm:lora_requests_info" in families
                and families["vllm:lora_requests_info"].samples
            ):
                seen = lora_info(families)
                if seen["running_lora_adapters"] == "pirate":
                    break
            await asyncio.sleep(0.05)
        assert seen.get("running_lora_adapters") == "pirate", seen
        second = asyncio.create_task(complete("poet"))
        while time.monotonic() < deadline:
            families = scrape((await raw.get("/metrics")).text)
            seen = lora_info(families)
            if seen["waiting_lora_adapters"] == "poet":
                break
            await asyncio.sleep(0.05)
        assert seen == {
            "max_lora": "8",
            "running_lora_adapters": "pirate",
            "waiting_lora_adapters": "poet",
        }
        assert families["vllm:num_requests_running"].samples[0].value == 1
        assert families["vllm:num_requests_waiting"].samples[0].value == 1
        assert families["vllm:kv_cache_usage_perc"].samples[0].value == 1.0  # the one slot
        assert len(families["vllm:lora_requests_info"].samples) == 1
        for task in (first, second):
            task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await task
        # aborted: nothing runs or waits any more
        while time.monotonic() < deadline:
            families = scrape((await raw.get("/metrics")).text)
            seen = lora_info(families)
            if not seen["running_lora_adapters"] and not seen["waiting_lora_adapters"]:
                break
            await asyncio.sleep(0.05)
        assert seen["running_lora_adapters"] == seen["waiting_lora_adapters"] == ""
        assert families["vllm:num_requests_running"].samples[0].value == 0
        assert families["vllm:num_requests_waiting"].samples[0].value == 0


async def test_public_metrics_lets_a_scraper_in_without_the_key(tmp_path: Path) -> None:
    from tests.fakes import FakeEngine

    registry = Registry(tmp_path / "registry")
    async with serve_app(registry, engine=FakeEngine(), api_key="k") as served:
        assert (await served.raw.get("/metrics")).status_code == 401
    async with serve_app(registry, engine=FakeEngine(), api_key="k", public_metrics=True) as served:
        r = await served.raw.get("/metrics")
        assert r.status_code == 200 and "vllm:num_requests_waiting" in scrape(r.text)
        assert (await served.raw.get("/v1/models")).status_code == 401  # only /metrics
        assert (await served.raw.post("/metrics")).status_code == 401
