"""vLLM's runtime adapter routes: /v1/load_lora_adapter registers an adapter folder of the
drop-in folder (or an adapter model of the registry) under a name and preloads it, served
as the same adapter imported normally; /v1/unload_lora_adapter takes the name away; paths
leading anywhere but into the drop-in folder are refused with the registry unchanged."""

from __future__ import annotations

import asyncio
import shutil
from pathlib import Path
from typing import Any

import pytest

from ollama_compact_server.registry.importers import import_adapter_dir, import_hf_dir
from ollama_compact_server.registry.runtime_lora import RUNTIME_KIND
from ollama_compact_server.registry.store import Registry
from tests.conftest import serve_app, tree_hash
from tests.factory import make_lora_adapter
from tests.fakes import FakeEngine

GREEDY = {"temperature": 0, "max_tokens": 8}


@pytest.fixture
def staged(tmp_path: Path, tiny_models: dict[str, Path]) -> Path:
    """An adapter folder outside the drop-in folder, on base 'tiny'."""
    return make_lora_adapter(
        tiny_models["llama"], tmp_path / "staging" / "pirate", base_name="tiny"
    )


@pytest.fixture
def other(tmp_path: Path, tiny_models: dict[str, Path]) -> Path:
    """Another adapter (other weights) on base 'tiny', outside the drop-in folder."""
    return make_lora_adapter(
        tiny_models["llama"], tmp_path / "staging" / "poet", seed=2, base_name="tiny"
    )


@pytest.fixture
def registry(tmp_path: Path, tiny_models: dict[str, Path], staged: Path) -> Registry:
    registry = Registry(tmp_path / "registry")
    import_hf_dir(registry, tiny_models["llama"], "tiny")
    import_adapter_dir(registry, staged, "ref", "tiny")  # the same adapter, imported normally
    return registry


async def chat(raw: Any, model: str) -> Any:
    body = {"model": model, "messages": [{"role": "user", "content": "Hello"}], **GREEDY}
    return await raw.post("/v1/chat/completions", json=body)


async def load(raw: Any, name: str, path: str, **extra: Any) -> Any:
    return await raw.post(
        "/v1/load_lora_adapter", json={"lora_name": name, "lora_path": path, **extra}
    )


async def test_load_serve_unload(
    registry: Registry, staged: Path, other: Path, tmp_path: Path
) -> None:
    folder = tmp_path / "adapters"
    folder.mkdir()
    async with serve_app(registry, dtype="float32", adapters=folder) as served:
        raw = served.raw
        # the gateway's syncer drops the folder in after the start, then loads it
        shutil.copytree(staged, folder / "pirate-v1")
        r = await load(raw, "sql", "pirate-v1")
        assert r.status_code == 200, r.text
        assert r.text == "Success: LoRA adapter 'sql' added successfully."
        record = registry.get("sql")
        assert record.is_adapter and record.config.base_model == "tiny:latest"
        assert record.config.source["kind"] == RUNTIME_KIND
        # preloaded: the base is resident and the adapter sits in a device slot
        ps = {m["name"] for m in (await raw.get("/api/ps")).json()["models"]}
        assert {"tiny:latest", "sql:latest"} <= ps
        ours, reference, base = [await chat(raw, m) for m in ("sql", "ref", "tiny")]
        for response in (ours, reference, base):
            assert response.status_code == 200, response.text
        text = ours.json()["choices"][0]["message"]["content"]
        assert text == reference.json()["choices"][0]["message"]["content"]
        assert text != base.json()["choices"][0]["message"]["content"]
        # an absolute path under the folder is the same folder
        r = await load(raw, "sql-abs", str(folder / "pirate-v1"))
        assert r.status_code == 200, r.text

        # the same name and adapter again (each replica on a shared registry loads it): 200
        digest = registry.get("sql").digest
        for path in ("pirate-v1", "ref"):
            r = await load(raw, "sql", path)
            assert r.status_code == 200, r.text
        assert registry.get("sql").digest == digest
        # other weights under the name: vLLM's 400, unless in place
        shutil.copytree(other, folder / "poet")
        r = await load(raw, "sql", "poet")
        assert r.status_code == 400
        assert "has already been loaded" in r.json()["error"]["message"]
        assert registry.get("sql").digest == digest
        r = await load(raw, "sql", "poet", load_inplace=True)
        assert r.status_code == 200, r.text
        replaced = await chat(raw, "sql")
        assert replaced.json()["choices"][0]["message"]["content"] != text
        r = await load(raw, "sql", "pirate-v1", load_inplace=True)
        assert r.status_code == 200, r.text
        again = await chat(raw, "sql")
        assert again.json()["choices"][0]["message"]["content"] == text
        # a name made otherwise is never replaced
        r = await load(raw, "ref", "pirate-v1", load_inplace=True)
        assert r.status_code == 400 and "already exists" in r.json()["error"]["message"]

        # a registry adapter model as lora_path: a second name on its layers
        r = await load(raw, "alias", "ref")
        assert r.status_code == 200, r.text
        assert registry.get("alias").manifest.layers == registry.get("ref").manifest.layers
        alias = await chat(raw, "alias")
        assert alias.json()["choices"][0]["message"]["content"] == text
        r = await load(raw, "nope", "tiny")  # a base model is no adapter
        assert r.status_code == 400 and "not a LoRA adapter" in r.json()["error"]["message"]

        # unload: the name goes, and with it the model
        for name in ("sql", "sql-abs", "alias"):
            r = await raw.post("/v1/unload_lora_adapter", json={"lora_name": name})
            assert r.status_code == 200, r.text
            assert r.text == f"Success: LoRA adapter '{name}' removed successfully."
            assert not registry.exists(name)
        r = await chat(raw, "sql")
        assert r.status_code == 404, r.text
        r = await raw.post("/v1/unload_lora_adapter", json={"lora_name": "sql"})
        assert r.status_code == 404
        assert r.json()["error"]["message"] == "The lora adapter 'sql' cannot be found."
        r = await raw.post("/v1/unload_lora_adapter", json={"lora_name": "tiny"})
        assert r.status_code == 404  # a base model is no adapter
        # an adapter made otherwise is only evicted from the device
        r = await raw.post("/v1/unload_lora_adapter", json={"lora_name": "ref"})
        assert r.status_code == 200 and "evicted" in r.text
        assert registry.exists("ref")
        for _ in range(100):  # the engine takes it out on its next step
            ps = {m["name"] for m in (await raw.get("/api/ps")).json()["models"]}
            if "ref:latest" not in ps:
                break
            await asyncio.sleep(0.05)
        assert "ref:latest" not in ps
        assert (await chat(raw, "ref")).status_code == 200
        # the folder the adapter came from is left as it was
        assert (folder / "pirate-v1" / "adapter_model.safetensors").is_file()


async def test_paths_outside_the_folder_are_refused(
    registry: Registry, staged: Path, tmp_path: Path
) -> None:
    folder = tmp_path / "adapters"
    folder.mkdir()
    async with serve_app(registry, engine=FakeEngine(), adapters=folder) as served:
        raw = served.raw
        # made after the start (the drop-in folder is registered at startup)
        (folder / "link").symlink_to(staged, target_is_directory=True)  # leads out
        half = folder / "half"  # its weights are a link out of the folder
        half.mkdir()
        shutil.copy(staged / "adapter_config.json", half / "adapter_config.json")
        (half / "adapter_model.safetensors").symlink_to(staged / "adapter_model.safetensors")
        based = folder / "based"  # a BASE file that is a link out of the folder
        shutil.copytree(staged, based)
        (based / "BASE").symlink_to(tmp_path / "registry" / ".lock")
        (folder / "file.txt").write_text("not a folder")
        (folder / "empty").mkdir()
        before = tree_hash(registry.root)
        names = [r.name.display() for r in registry.models()]
        for path in (
            "../staging/pirate",
            "pirate/../../staging/pirate",
            str(staged),
            str(folder / ".." / "staging" / "pirate"),
            "link",
            "half",
            "based",
            "file.txt",
            "empty",
            "missing",
            str(folder),
            ".",
            "/etc",
            "bad\x00path",
        ):
            r = await load(raw, "evil", path)
            assert r.status_code == 400, (path, r.text)
            error = r.json()["error"]
            assert error["type"] == "invalid_request_error"
            assert str(tmp_path) not in error["message"].replace(repr(path)[1:-1], ""), path
        r = await load(raw, "evil", "")
        assert r.status_code == 400 and "must be provided" in r.json()["error"]["message"]
        r = await load(raw, "bad name!", "pirate")
        assert r.status_code == 400
        r = await raw.post("/v1/load_lora_adapter", json={"lora_name": "x"})
        assert r.status_code == 400  # lora_path missing
        r = await raw.post("/v1/load_lora_adapter", json={"lora_name": 1, "lora_path": "x"})
        assert r.status_code == 400
        assert tree_hash(registry.root) == before
        assert [r.name.display() for r in registry.models()] == names


async def test_no_adapters_folder_only_registry_names(registry: Registry) -> None:
    async with serve_app(registry, engine=FakeEngine(), adapters=None) as served:
        r = await load(served.raw, "x", "somewhere")
        assert r.status_code == 400 and "OCS_ADAPTERS" in r.json()["error"]["message"]
        r = await load(served.raw, "x", "ref")
        assert r.status_code == 200, r.text
        assert served.engine.loaded == {"x:latest": served.engine.loaded["x:latest"]}


async def test_behind_the_key_and_the_setting(registry: Registry, tmp_path: Path) -> None:
    async with serve_app(registry, engine=FakeEngine(), api_key="k") as served:
        r = await load(served.raw, "x", "ref")
        assert r.status_code == 401
        r = await served.raw.post("/v1/unload_lora_adapter", json={"lora_name": "ref"})
        assert r.status_code == 401
        r = await served.raw.post(
            "/v1/load_lora_adapter",
            json={"lora_name": "x", "lora_path": "ref"},
            headers={"Authorization": "Bearer k"},
        )
        assert r.status_code == 200, r.text
    async with serve_app(registry, engine=FakeEngine(), runtime_lora=False) as served:
        r = await load(served.raw, "y", "ref")
        assert r.status_code == 404 and "OCS_RUNTIME_LORA" in r.json()["error"]["message"]
        r = await served.raw.post("/v1/unload_lora_adapter", json={"lora_name": "x"})
        assert r.status_code == 404
        assert registry.exists("x")  # unchanged while off
