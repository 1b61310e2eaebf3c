"""Uploaded blobs (issue 17, points 8 and 10): unused ones are swept after a grace period,
uploads past the cap or the disk's free space are refused before they are written, and a
create from uploaded files does not copy them a second time."""

from __future__ import annotations

import hashlib
import os
import time
from collections import namedtuple
from pathlib import Path
from typing import Any

import pytest

from ollama_compact_server.api.ollama import jobs
from ollama_compact_server.registry import fsutil
from ollama_compact_server.registry.blobs import BlobStore
from ollama_compact_server.registry.store import Registry
from tests.conftest import serve_app
from tests.fakes import FakeEngine


def digest_of(data: bytes) -> str:
    return "sha256:" + hashlib.sha256(data).hexdigest()


def age(registry: Registry, digest: str, seconds: float) -> None:
    past = time.time() - seconds
    os.utime(registry.blobs.path(digest), (past, past))


async def test_unused_uploads_are_swept_after_the_grace(
    tmp_path: Path, tiny_models: dict[str, Path]
) -> None:
    registry = Registry(tmp_path / "r")
    async with serve_app(registry, FakeEngine()) as served:
        files = {}
        for path in sorted(tiny_models["llama"].iterdir()):
            if path.is_file():
                data = path.read_bytes()
                files[path.name] = digest_of(data)
                r = await served.raw.post(f"/api/blobs/{files[path.name]}", content=data)
                assert r.status_code == 201
        stray = b"an upload no create ever named"
        assert (await served.raw.post(f"/api/blobs/{digest_of(stray)}", content=stray)).is_success
        r = await served.raw.post("/api/create", json={"model": "m", "files": files})
        assert r.status_code == 200, r.text
        assert registry.sweep() == []  # within the grace: every blob stays
        for digest in registry.blobs.all_digests():
            age(registry, digest, 7200)
        assert registry.sweep() == [digest_of(stray)]  # only the unused one goes
        for digest in registry.get("m").manifest.digests():
            registry.blobs.verify(digest)
        # uploading a blob again restarts its grace
        assert (await served.raw.post(f"/api/blobs/{digest_of(stray)}", content=stray)).is_success
        age(registry, digest_of(stray), 7200)
        assert (await served.raw.post(f"/api/blobs/{digest_of(stray)}", content=stray)).is_success
        assert registry.sweep() == []


async def test_uploads_past_the_cap_or_the_free_space_are_refused(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    registry = Registry(tmp_path / "r")
    data = os.urandom(300_000)
    async with serve_app(registry, FakeEngine(), max_blob_size="100KiB") as served:
        r = await served.raw.post(f"/api/blobs/{digest_of(data)}", content=data)
        assert r.status_code == 413 and "cap" in r.json()["error"]

        async def chunked() -> Any:  # no Content-Length: refused as it arrives
            for start in range(0, len(data), 65536):
                yield data[start : start + 65536]

        monkeypatch.setattr(jobs, "UPLOAD_FLUSH", 65536)
        r = await served.raw.post(f"/api/blobs/{digest_of(data)}", content=chunked())
        assert r.status_code == 413
        assert not registry.blobs.dir.exists() or not list(registry.blobs.dir.iterdir())
    usage = namedtuple("usage", "total used free")
    monkeypatch.setattr(fsutil.shutil, "disk_usage", lambda _: usage(1 << 40, 0, (1 << 30) + 1000))
    async with serve_app(registry, FakeEngine()) as served:
        r = await served.raw.post(f"/api/blobs/{digest_of(data)}", content=data)
        assert r.status_code == 507 and "disk space" in r.json()["error"]
        small = b"fits"
        assert (await served.raw.post(f"/api/blobs/{digest_of(small)}", content=small)).is_success


def test_a_stored_blob_is_not_copied_again(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    store = BlobStore(tmp_path)
    digest, created = store.put_bytes(b"weights" * 1000)
    assert created
    link = tmp_path / "scratch" / "model.safetensors"
    link.parent.mkdir()
    link.symlink_to(store.path(digest))

    def no_copy(*_: Any, **__: Any) -> Any:
        raise AssertionError("copied a blob of the store into the store")

    monkeypatch.setattr(BlobStore, "put_stream", no_copy)
    assert store.put_file(link) == (digest, False)
