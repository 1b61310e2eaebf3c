"""The registry lock is held only briefly (issue 17, points 2 and 9): blobs are written
without it, copy and delete run off the event loop, a blob in a transaction in flight is
never collected, and a base model stays while adapter models depend on it."""

from __future__ import annotations

import asyncio
import threading
from pathlib import Path

import pytest

from ollama_compact_server.jobs.importing import import_path
from ollama_compact_server.registry.errors import InUse
from ollama_compact_server.registry.manifest import MT_FILE, ModelConfig
from ollama_compact_server.registry.store import Registry
from tests.conftest import serve_app
from tests.fakes import FakeEngine


def model(registry: Registry, name: str, payload: bytes) -> None:
    with registry.transaction() as txn:
        txn.add_bytes(MT_FILE, payload, filename="model.safetensors")
        txn.commit(name, ModelConfig(architecture="TestForCausalLM", family="test"))


def test_a_transaction_in_flight_does_not_hold_the_lock(tmp_path: Path) -> None:
    registry = Registry(tmp_path / "r")
    model(registry, "a", b"weights of a")
    inside, finish = threading.Event(), threading.Event()
    errors: list[BaseException] = []

    def slow_import() -> None:
        try:
            with registry.transaction() as txn:
                txn.add_bytes(MT_FILE, b"weights of a", filename="model.safetensors")  # shared
                txn.add_bytes(MT_FILE, b"big new weights", filename="extra.safetensors")
                inside.set()
                assert finish.wait(10)  # the long copy of a big file
                txn.commit("b", ModelConfig(architecture="TestForCausalLM", family="test"))
        except BaseException as exc:
            errors.append(exc)

    worker = threading.Thread(target=slow_import)
    worker.start()
    assert inside.wait(10)
    # none of these waits for the import; deleting "a" keeps the blob "b" will use
    registry.copy("a", "a2")
    registry.delete("a")
    registry.delete("a2")
    assert registry.names() == []
    finish.set()
    worker.join(10)
    assert not errors
    record = registry.get("b")
    for digest in record.manifest.digests():
        registry.blobs.verify(digest)


def test_a_failed_transaction_keeps_blobs_another_one_holds(tmp_path: Path) -> None:
    registry = Registry(tmp_path / "r")
    config = ModelConfig(architecture="TestForCausalLM", family="test")
    with registry.transaction() as keeper:
        with pytest.raises(RuntimeError), registry.transaction() as failing:
            failing.add_bytes(MT_FILE, b"shared bytes", filename="w.safetensors")  # created
            keeper.add_bytes(MT_FILE, b"shared bytes", filename="w.safetensors")  # found
            raise RuntimeError("injected")
        keeper.commit("kept", config)
    for digest in registry.get("kept").manifest.digests():
        registry.blobs.verify(digest)


async def test_copy_and_delete_do_not_block_the_event_loop(tmp_path: Path) -> None:
    registry = Registry(tmp_path / "r")
    model(registry, "a", b"weights")
    async with serve_app(registry, FakeEngine()) as served:
        held, release = threading.Event(), threading.Event()

        def hold() -> None:
            with registry.locked():
                held.set()
                release.wait(10)

        holder = threading.Thread(target=hold)
        holder.start()
        assert held.wait(10)
        copy = asyncio.create_task(
            served.raw.post("/api/copy", json={"source": "a", "destination": "b"})
        )
        await asyncio.sleep(0.1)
        assert not copy.done()  # waits for the lock ...
        assert (await served.raw.get("/api/version")).status_code == 200  # ... off the loop
        release.set()
        assert (await copy).status_code == 200
        holder.join(10)
        r = await served.raw.request("DELETE", "/api/delete", json={"model": "b"})
        assert r.status_code == 200 and not registry.exists("b")


async def test_a_base_with_adapter_models_is_not_deleted(
    tmp_path: Path, tiny_models: dict[str, Path], tiny_adapter: Path
) -> None:
    registry = Registry(tmp_path / "r")
    import_path(registry, tiny_models["llama"], "base")
    import_path(registry, tiny_adapter, "tuned", base="base")
    with pytest.raises(InUse, match="tuned"):
        registry.delete("base")
    async with serve_app(registry, FakeEngine()) as served:
        r = await served.raw.request("DELETE", "/api/delete", json={"model": "base"})
        assert r.status_code == 409 and "tuned" in r.json()["error"], r.text
        assert registry.exists("base")
        r = await served.raw.request("DELETE", "/api/delete", json={"model": "tuned"})
        assert r.status_code == 200
        r = await served.raw.request("DELETE", "/api/delete", json={"model": "base"})
        assert r.status_code == 200 and registry.names() == []
