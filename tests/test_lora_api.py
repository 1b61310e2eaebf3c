"""Adapter models through the APIs: served on their shared base, listed by /api/ps, shown
with their parent, merged into standalone models (API and CLI), embeddings refused."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from ollama_compact_server.cli import main
from ollama_compact_server.registry.importers import import_adapter_dir, import_hf_dir
from ollama_compact_server.registry.store import Registry
from tests.conftest import serve_app, tree_hash
from tests.factory import make_lora_adapter

GREEDY = {"temperature": 0, "num_predict": 8, "repeat_penalty": 1.0}


@pytest.fixture
def registry(tmp_path: Path, tiny_models: dict[str, Path]) -> Registry:
    registry = Registry(tmp_path / "registry")
    import_hf_dir(registry, tiny_models["llama"], "tiny")
    for name, seed in (("pirate", 1), ("poet", 2)):
        adapter = make_lora_adapter(
            tiny_models["llama"], tmp_path / name, seed=seed, base_name="tiny"
        )
        import_adapter_dir(registry, adapter, name, "tiny")
    return registry


def peft_embeddings(registry: Registry, name: str, texts: list[str]) -> list[list[float]]:
    from ollama_compact_server.modeling.loader import load_causal_lm, load_tokenizer

    record = registry.get(name)
    model = load_causal_lm(registry, record, dtype=torch.float32)
    tokenizer = load_tokenizer(registry, registry.get(record.config.base_model or name))
    backbone = model.get_base_model().get_decoder()
    out = []
    with torch.no_grad():
        for text in texts:
            ids = torch.tensor([tokenizer(text)["input_ids"]])
            hidden = backbone(input_ids=ids).last_hidden_state[0]
            out.append(torch.nn.functional.normalize(hidden.mean(0), dim=0).tolist())
    return out


async def generate(client, model: str) -> str:
    r = await client.post(
        "/api/generate",
        json={
            "model": model,
            "prompt": "Hello there",
            "raw": True,
            "stream": False,
            "options": GREEDY,
        },
    )
    assert r.status_code == 200, r.text
    return r.json()["response"]


async def test_adapters_share_the_base_and_show_in_ps(registry: Registry) -> None:
    async with serve_app(registry, dtype="float32") as served:
        raw = served.raw
        base = await generate(raw, "tiny")
        pirate = await generate(raw, "pirate")
        poet = await generate(raw, "poet")
        assert len({base, pirate, poet}) == 3
        ps = (await raw.get("/api/ps")).json()["models"]
        names = {m["name"] for m in ps}
        assert names == {"tiny:latest", "pirate:latest", "poet:latest"}
        assert list(served.engine.device_loop.workers) == ["tiny:latest"]
        show = (await raw.post("/api/show", json={"model": "pirate"})).json()
        assert show["details"]["parent_model"] == "tiny:latest"
        # OpenAI dialect reaches the same adapter
        chat = await served.openai.completions.create(
            model="pirate",
            prompt="Hello there",
            max_tokens=8,
            temperature=0,
            extra_body={"repetition_penalty": 1.0},  # GREEDY's, as vLLM names it
        )
        assert chat.choices[0].text == pirate
        # embeddings from an adapter model carry its adapter (peft computes the same)
        texts = ["hello world", "the adapter changes this"]
        r = await raw.post("/api/embed", json={"model": "pirate", "input": texts})
        assert r.status_code == 200, r.text
        with_adapter = r.json()["embeddings"]
        r = await raw.post("/api/embed", json={"model": "tiny", "input": texts})
        assert r.json()["embeddings"] != with_adapter
        expected = peft_embeddings(registry, "pirate", texts)
        assert torch.allclose(torch.tensor(with_adapter), torch.tensor(expected), atol=1e-4)


async def test_merge_through_the_api_and_the_cli(registry: Registry) -> None:
    async with serve_app(registry) as served:
        raw = served.raw
        adapter_output = await generate(raw, "pirate")
        r = await raw.post(
            "/api/create",
            json={"model": "pirate-merged", "from": "pirate", "merge": True, "stream": False},
        )
        assert r.status_code == 200, r.text
        record = registry.get("pirate-merged")
        assert not record.is_adapter and record.config.parent_model == "pirate:latest"
        assert record.config.source["base"] == "tiny:latest"
        assert record.config.source["adapter"] == "pirate:latest"
        assert await generate(raw, "pirate-merged") == adapter_output
        before = tree_hash(registry.root)
        r = await raw.post(
            "/api/create", json={"model": "x", "from": "tiny", "merge": True, "stream": False}
        )
        assert r.status_code == 400 and "not an adapter" in r.json()["error"]
        r = await raw.post("/api/create", json={"model": "x", "merge": "yes", "stream": False})
        assert r.status_code == 400
        assert tree_hash(registry.root) == before
    assert main(["merge", "poet", "poet-merged", "--models", str(registry.root)]) == 0
    assert registry.get("poet-merged").config.source["adapter"] == "poet:latest"
    assert main(["merge", "tiny", "nope", "--models", str(registry.root)]) == 1


async def test_loading_an_adapter_model_puts_its_adapter_on_the_device(registry: Registry) -> None:
    async with serve_app(registry) as served:
        r = await served.raw.post("/api/generate", json={"model": "poet", "stream": False})
        assert r.status_code == 200 and r.json()["done_reason"] == "load"
        names = {m["name"] for m in (await served.raw.get("/api/ps")).json()["models"]}
        assert names == {"tiny:latest", "poet:latest"}


async def test_request_log_and_metrics_name_the_adapter(
    registry: Registry, caplog: pytest.LogCaptureFixture
) -> None:
    import logging

    async with serve_app(registry) as served:
        with caplog.at_level(logging.INFO, logger="ollama_compact_server.requests"):
            await generate(served.raw, "pirate")
            await generate(served.raw, "tiny")
        lines = [r.getMessage() for r in caplog.records if "/api/generate" in r.getMessage()]
        assert any(
            "model=pirate:latest" in line
            and "adapter=pirate:latest" in line
            and "tokens_out=8" in line
            for line in lines
        ), lines
        assert any("model=tiny:latest" in line and "adapter" not in line for line in lines)
        await generate(served.raw, "poet")
        text = (await served.raw.get("/metrics")).text
        assert "ocs_resident_adapters 2.0" in text


async def test_recreated_adapter_is_listed_once_and_serves_its_new_weights(
    registry: Registry, tmp_path: Path, tiny_models: dict[str, Path]
) -> None:
    """Re-creating an adapter model drops its old weights from the device slots and host
    memory (they are not merely pushed out by LRU later)."""
    fresh = make_lora_adapter(tiny_models["llama"], tmp_path / "fresh", seed=7, base_name="tiny")
    async with serve_app(registry, dtype="float32") as served:
        raw = served.raw
        await generate(raw, "poet")
        old = await generate(raw, "pirate")
        import_adapter_dir(registry, fresh, "pirate", "tiny")  # re-create "pirate"
        new = await generate(raw, "pirate")
        assert new != old
        ps = [m["name"] for m in (await raw.get("/api/ps")).json()["models"]]
        assert sorted(ps) == ["pirate:latest", "poet:latest", "tiny:latest"], ps
        adapters = served.engine.device_loop.workers["tiny:latest"].adapters
        assert len(adapters.resident()) == 2
        assert len(adapters.host) == 2  # the old pirate weights left host memory too
    async with serve_app(registry, dtype="float32") as served:  # never saw the old weights
        assert await generate(served.raw, "pirate") == new


@pytest.fixture
def refused_adapters(
    registry: Registry, tiny_models: dict[str, Path], tmp_path: Path
) -> dict[str, Path]:
    """Adapters the tiny llama base must refuse at create time (the DoRA one is the
    ``registry`` fixture's pirate adapter with use_dora set: no magnitude vectors)."""
    import json
    import shutil

    from tests.factory import make_tiny_model

    pirate = tmp_path / "pirate"
    dora = tmp_path / "refused-dora"
    shutil.copytree(pirate, dora)
    config = json.loads((dora / "adapter_config.json").read_text())
    (dora / "adapter_config.json").write_text(json.dumps({**config, "use_dora": True}))
    wide = make_tiny_model(tmp_path / "wide", "llama", hidden_size=96)
    deep = make_tiny_model(tmp_path / "deep", "llama", num_layers=3)  # the base has 2
    return {
        "DoRA": dora,
        "does not fit": make_lora_adapter(wide, tmp_path / "refused-wide", base_name="tiny"),
        "does not have": make_lora_adapter(deep, tmp_path / "refused-deep", base_name="tiny"),
    }


async def test_adapters_that_do_not_fit_are_refused_at_create_time(
    registry: Registry, refused_adapters: dict[str, Path], capsys: pytest.CaptureFixture
) -> None:
    """A DoRA config without magnitudes, wrong shapes and modules the base lacks: 400
    with a message that says which, over HTTP and from `ollama-compact import --base`; the
    registry stays as it was."""
    from tests.fakes import FakeEngine

    async with serve_app(registry, FakeEngine()) as served:
        for message, directory in refused_adapters.items():
            adapters = {
                p.name: await served.ollama.create_blob(p)
                for p in sorted(directory.iterdir())
                if p.suffix in (".json", ".safetensors")
            }
            before = tree_hash(registry.root)  # the uploaded blobs are in it already
            r = await served.raw.post(
                "/api/create",
                json={"model": "refused", "from": "tiny", "adapters": adapters, "stream": False},
            )
            assert r.status_code == 400, (message, r.text)
            assert message in r.json()["error"], r.json()
            assert tree_hash(registry.root) == before, message
            assert not registry.exists("refused")
    capsys.readouterr()
    before = tree_hash(registry.root)
    for message, directory in refused_adapters.items():
        args = ["import", str(directory), "refused", "--base", "tiny"]
        assert main([*args, "--models", str(registry.root)]) == 1
        err = capsys.readouterr().err
        assert message in err and "Traceback" not in err, err
    assert tree_hash(registry.root) == before


async def test_deleting_an_adapter_model_frees_its_slot(registry: Registry) -> None:
    """`ollama rm` of an adapter model: its weights leave the base's device slot at once
    (the base and the other adapters stay); /api/ps no longer lists it."""
    import asyncio

    async with serve_app(registry, dtype="float32") as served:
        raw = served.raw
        await generate(raw, "pirate")
        await generate(raw, "poet")
        names = {m["name"] for m in (await raw.get("/api/ps")).json()["models"]}
        assert {"pirate:latest", "poet:latest"} <= names
        worker = served.engine.device_loop.workers["tiny:latest"]
        key = worker.adapters.current["pirate:latest"]
        r = await raw.request("DELETE", "/api/delete", json={"model": "pirate"})
        assert r.status_code == 200
        for _ in range(100):
            resident = {name for name, _, _ in worker.adapters.resident()}
            if "pirate:latest" not in resident:
                break
            await asyncio.sleep(0.05)
        assert resident == {"poet:latest"}
        assert worker.adapters.slot_of(key) < 0 and key not in worker.adapters.host
        names = {m["name"] for m in (await raw.get("/api/ps")).json()["models"]}
        assert names == {"tiny:latest", "poet:latest"}
        assert await generate(raw, "poet")  # the other adapter still serves
