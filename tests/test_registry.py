"""The registry store: content addressing, atomic all-or-nothing changes, shared blobs,
case-insensitive names and verification of blobs on read."""

from __future__ import annotations

import errno
import os
import time
from pathlib import Path

import pytest

from ollama_compact_server.registry import fsutil
from ollama_compact_server.registry.blobs import BlobStore, normalize_digest
from ollama_compact_server.registry.errors import (
    DigestMismatch,
    InvalidDigest,
    InvalidModel,
    ModelNotFound,
    StorageError,
)
from ollama_compact_server.registry.manifest import MT_FILE, MT_SYSTEM, ModelConfig
from ollama_compact_server.registry.store import Registry
from tests.conftest import tree_hash
from tests.reliability import record

HEX = "a" * 64


def make_model(registry: Registry, name: str, payload: bytes, system: str = "be brief"):
    with registry.transaction() as txn:
        txn.add_bytes(MT_FILE, payload, filename="model.safetensors")
        txn.add_bytes(MT_SYSTEM, system.encode())
        return txn.commit(name, ModelConfig(architecture="TestForCausalLM", family="test"))


@pytest.mark.parametrize(
    "digest",
    [
        "sha256:" + HEX[:63],
        "sha256:" + HEX + "a",
        "sha256:../" + HEX[:61],
        "../" + HEX,
        "sha256:" + HEX[:63] + "\x00",
        "%2e%2e%2f" + HEX,
        "sha512:" + HEX,
        "sha256:" + "g" * 64,
        "sha256:" + HEX + "\n",
        "",
        None,
        5,
    ],
)
def test_digest_validation(tmp_path: Path, digest: object) -> None:
    store = BlobStore(tmp_path)
    with pytest.raises(InvalidDigest):
        store.path(digest)  # type: ignore[arg-type]


def test_digest_forms_are_normalised(tmp_path: Path) -> None:
    store = BlobStore(tmp_path)
    assert normalize_digest("sha256-" + "A" * 64) == "sha256:" + "a" * 64
    assert store.path("sha256:" + HEX).name == "sha256-" + HEX


def test_blob_roundtrip_and_mismatch(tmp_path: Path) -> None:
    store = BlobStore(tmp_path)
    digest, created = store.put_bytes(b"hello")
    assert created and store.has(digest)
    assert store.put_bytes(b"hello") == (digest, False)
    assert store.read_bytes(digest) == b"hello"
    before = tree_hash(tmp_path)
    with pytest.raises(DigestMismatch):
        store.put_stream([b"other bytes"], expected="sha256:" + HEX)
    assert tree_hash(tmp_path) == before  # nothing left behind


def test_corrupt_blob_is_detected_on_read(registry: Registry) -> None:
    record = make_model(registry, "m", b"weights")
    layer = record.manifest.files()["model.safetensors"]
    registry.blobs.path(layer.digest).write_bytes(b"tampered")
    with pytest.raises(DigestMismatch):
        registry.verified_files(record, MT_FILE)


def test_create_get_list_copy_delete(registry: Registry) -> None:
    a = make_model(registry, "alpha:1", b"A-weights")
    assert registry.get("alpha:1").digest == a.digest
    assert len(a.digest) == 64
    assert registry.system(a) == "be brief"
    assert [r.name.display() for r in registry.models()] == ["alpha:1"]
    registry.copy("alpha:1", "beta")
    assert {r.name.display() for r in registry.models()} == {"alpha:1", "beta:latest"}
    # shared storage: deleting one keeps the blobs the other uses
    registry.delete("alpha:1")
    beta = registry.get("beta")
    assert registry.verified_files(beta, MT_FILE)
    registry.delete("beta")
    assert registry.models() == []
    assert registry.blobs.all_digests() == set()
    assert not any(registry.manifest_dir.rglob("*")), "empty directories are pruned"
    with pytest.raises(ModelNotFound):
        registry.get("beta")


def test_delete_keeps_blobs_shared_with_other_models(registry: Registry) -> None:
    make_model(registry, "one", b"same-weights", system="first")
    make_model(registry, "two", b"same-weights", system="second")
    registry.delete("one")
    two = registry.get("two")
    assert registry.verified_files(two, MT_FILE)
    assert registry.system(two) == "second"


def test_names_differing_only_in_case_are_one_model(registry: Registry) -> None:
    make_model(registry, "MyModel:Tag", b"v1")
    assert registry.get("mymodel:tag").name.display() == "MyModel:Tag"
    make_model(registry, "mymodel:TAG", b"v2")
    names = [r.name.display() for r in registry.models()]
    assert names == ["MyModel:Tag"]
    assert (
        len(registry.blobs.all_digests()) == 3
    )  # v2 weights, system, config; v1's weights collected


def test_overwrite_collects_replaced_blobs(registry: Registry) -> None:
    make_model(registry, "m", b"old")
    make_model(registry, "m", b"new")
    record = registry.get("m")
    digests = registry.blobs.all_digests()
    assert digests == record.manifest.digests()


def test_failed_transaction_leaves_registry_identical(registry: Registry) -> None:
    make_model(registry, "keep", b"kept")
    before = tree_hash(registry.root)
    with pytest.raises(RuntimeError), registry.transaction() as txn:
        txn.add_bytes(MT_FILE, b"fresh bytes", filename="model.safetensors")
        txn.add_bytes(MT_FILE, b"kept", filename="shared.safetensors")  # existing blob
        raise RuntimeError("injected")
    assert tree_hash(registry.root) == before


STEPS = ["mkstemp", "write", "fsync", "replace"]


@pytest.mark.parametrize("operation", ["create", "copy", "overwrite"])
@pytest.mark.parametrize("fail_at", range(12))
def test_injected_os_failure_at_every_step(
    registry: Registry, monkeypatch: pytest.MonkeyPatch, operation: str, fail_at: int
) -> None:
    """Each file-system call of an operation fails in turn (ENOSPC); the registry must stay
    byte-identical and the next operation must work."""
    make_model(registry, "base", b"base-weights")
    before = tree_hash(registry.root)
    calls = {"n": 0}

    def failing(real):
        def wrapper(*args, **kwargs):
            calls["n"] += 1
            if calls["n"] == fail_at + 1:
                raise OSError(errno.ENOSPC, "No space left on device")
            return real(*args, **kwargs)

        return wrapper

    monkeypatch.setattr(os, "replace", failing(os.replace))
    monkeypatch.setattr(os, "fsync", failing(os.fsync))
    monkeypatch.setattr(fsutil.tempfile, "mkstemp", failing(fsutil.tempfile.mkstemp))
    failed = False
    try:
        if operation == "create":
            make_model(registry, "new", b"new-weights")
        elif operation == "copy":
            registry.copy("base", "copied")
        else:
            make_model(registry, "base", b"replacement")
    except StorageError as exc:
        failed = True
        assert "disk is full" in str(exc)
    monkeypatch.undo()
    if failed:
        assert tree_hash(registry.root) == before
        assert [r.name.display() for r in registry.models()] == ["base:latest"]
    record(
        "ENOSPC at every file-system step of create, copy, overwrite",
        "tests/test_registry.py",
        1,
        registry_changes=int(failed and tree_hash(registry.root) != before),
    )
    # the registry keeps working afterwards
    make_model(registry, "after", b"after-weights")
    assert registry.get("after")


def test_write_refuses_missing_blobs(registry: Registry) -> None:
    record = make_model(registry, "m", b"x")
    manifest = record.manifest.model_copy(deep=True)
    manifest.layers[0].digest = "sha256:" + HEX
    with pytest.raises(InvalidModel):
        registry.write_manifest("other", manifest)


def test_fsck_quarantines_damaged_manifests_and_temp_files(registry: Registry) -> None:
    make_model(registry, "good", b"g")
    bad = registry.manifest_dir / "registry.ollama.ai" / "library" / "bad" / "latest"
    bad.parent.mkdir(parents=True)
    bad.write_text('{"schemaVersion": 2, "lay')  # truncated JSON, as after a power loss
    stray = registry.blobs.dir / ".tmp-123"
    stray.write_bytes(b"partial")
    live = registry.blobs.dir / ".tmp-456"  # another process is writing it
    live.write_bytes(b"partial")
    os.utime(stray, (time.time() - 3600, time.time() - 3600))  # dead since a crash
    assert [r.name.display() for r in registry.models()] == ["good:latest"]
    problems = registry.fsck()
    assert len(problems) == 1 and "bad:latest" in problems[0]
    assert not bad.exists() and not stray.exists() and live.exists()
    assert (registry.root / "quarantine").is_dir()


def test_symlinked_manifest_is_not_followed(registry: Registry, tmp_path: Path) -> None:
    target = tmp_path / "outside.json"
    target.write_text("{}")
    link = registry.manifest_dir / "registry.ollama.ai" / "library" / "evil" / "latest"
    link.parent.mkdir(parents=True)
    link.symlink_to(target)
    assert registry.resolve("evil") is None
    with pytest.raises(ModelNotFound):
        registry.get("evil")


def test_concurrent_writers_do_not_corrupt(registry: Registry) -> None:
    import threading

    errors: list[BaseException] = []

    def worker(i: int) -> None:
        try:
            for j in range(5):
                make_model(registry, f"m{i}", f"w{i}-{j}".encode())
        except BaseException as exc:  # pragma: no cover - reported below
            errors.append(exc)

    threads = [threading.Thread(target=worker, args=(i,)) for i in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert not errors
    records = registry.models()
    assert len(records) == 4
    used = set().union(*(r.manifest.digests() for r in records))
    assert registry.blobs.all_digests() == used
