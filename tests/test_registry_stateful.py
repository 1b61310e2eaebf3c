"""A stateful property test of the registry (issue 17, "keep it found"): uploads, creates,
adapter creates, copies and deletes in random order, each write failing at a random step
(ENOSPC) or abandoned half-way as by kill -9 (no commit, no rollback, temporary files left),
and restarts. After every step: every manifest's blobs exist and hash, `names` and `get`
agree with what the model expects, and after a restart's sweep nothing unreferenced stays."""

from __future__ import annotations

import errno
import os
import time
from pathlib import Path
from typing import Any

import pytest
from hypothesis import HealthCheck, settings
from hypothesis import strategies as st
from hypothesis.stateful import RuleBasedStateMachine, initialize, invariant, precondition, rule

from ollama_compact_server.registry import blobs as blobs_module
from ollama_compact_server.registry import fsutil
from ollama_compact_server.registry.errors import InUse, StorageError
from ollama_compact_server.registry.fsutil import TMP_PREFIX
from ollama_compact_server.registry.manifest import MT_ADAPTER_FILE, MT_FILE, ModelConfig
from ollama_compact_server.registry.store import Registry
from tests.reliability import record

NAMES = st.sampled_from(["a", "b", "c", "ns/d", "e:v2"])
PAYLOADS = st.sampled_from([b"w1", b"w2", b"w3", b"shared", b"adapter-1", b"adapter-2"])
FAIL_AT = st.one_of(st.none(), st.integers(min_value=1, max_value=10))


class Failures:
    """Makes the n-th file-system call (mkstemp, fsync, replace) of one operation fail."""

    def __init__(self) -> None:
        self.patch = pytest.MonkeyPatch()

    def arm(self, fail_at: int | None) -> None:
        if fail_at is None:
            return
        calls = {"n": 0}

        def failing(real: Any) -> Any:
            def wrapper(*args: Any, **kwargs: Any) -> Any:
                calls["n"] += 1
                if calls["n"] == fail_at:
                    raise OSError(errno.ENOSPC, "No space left on device")
                return real(*args, **kwargs)

            return wrapper

        self.patch.setattr(os, "replace", failing(os.replace))
        self.patch.setattr(os, "fsync", failing(os.fsync))
        self.patch.setattr(fsutil.tempfile, "mkstemp", failing(fsutil.tempfile.mkstemp))
        self.patch.setattr(blobs_module.tempfile, "mkstemp", failing(blobs_module.tempfile.mkstemp))

    def disarm(self) -> None:
        self.patch.undo()


class RegistryMachine(RuleBasedStateMachine):
    root: Path

    @initialize(root=st.just(None))
    def start(self, root: Any) -> None:
        import tempfile

        self.root = Path(tempfile.mkdtemp(prefix="ocs-stateful-"))
        self.registry = Registry(self.root)
        self.models: dict[str, tuple[bytes, str | None]] = {}  # display -> (payload, base)
        self.failures = Failures()

    def key(self, name: str) -> str:
        from ollama_compact_server.registry.names import ModelName

        return ModelName.parse(name).display()

    def attempt(self, fail_at: int | None, action: Any) -> bool:
        """Runs an action with a failure armed; True if it completed."""
        record(
            "Registry operations in random order, ENOSPC at random steps, kill -9, restarts",
            "tests/test_registry_stateful.py",
            1,
        )
        self.failures.arm(fail_at)
        try:
            action()
        except StorageError:
            return False
        finally:
            self.failures.disarm()
        return True

    @rule(payload=PAYLOADS, fail_at=FAIL_AT)
    def upload(self, payload: bytes, fail_at: int | None) -> None:
        self.attempt(fail_at, lambda: self.registry.blobs.put_bytes(payload))

    @rule(name=NAMES, payload=PAYLOADS, fail_at=FAIL_AT)
    def create(self, name: str, payload: bytes, fail_at: int | None) -> None:
        def action() -> None:
            with self.registry.transaction() as txn:
                txn.add_bytes(MT_FILE, payload, filename="model.safetensors")
                txn.commit(name, ModelConfig(architecture="TestForCausalLM", family="test"))

        key = self.key(name)
        if key in self.dependents_of_any() and key in self.models:
            return  # replacing a base under its adapters is not this test's subject
        if self.attempt(fail_at, action):
            self.models[key] = (payload, None)

    @precondition(lambda self: any(base is None for _, base in self.models.values()))
    @rule(name=NAMES, payload=PAYLOADS, fail_at=FAIL_AT, data=st.data())
    def create_adapter(self, name: str, payload: bytes, fail_at: int | None, data: Any) -> None:
        bases = sorted(k for k, (_, base) in self.models.items() if base is None)
        base = data.draw(st.sampled_from(bases))
        key = self.key(name)
        if key == base or key in self.dependents_of_any():
            return

        def action() -> None:
            with self.registry.transaction() as txn:
                txn.add_bytes(MT_ADAPTER_FILE, payload, filename="adapter_model.safetensors")
                config = ModelConfig(
                    architecture="TestForCausalLM", family="test", kind="adapter", base_model=base
                )
                txn.commit(name, config)

        if self.attempt(fail_at, action):
            self.models[key] = (payload, base)

    @precondition(lambda self: bool(self.models))
    @rule(destination=NAMES, fail_at=FAIL_AT, data=st.data())
    def copy(self, destination: str, fail_at: int | None, data: Any) -> None:
        source = data.draw(st.sampled_from(sorted(self.models)))
        key = self.key(destination)
        if key in self.dependents_of_any():
            return
        if self.attempt(fail_at, lambda: self.registry.copy(source, destination)):
            self.models[key] = self.models[source]

    @precondition(lambda self: bool(self.models))
    @rule(fail_at=FAIL_AT, data=st.data())
    def delete(self, fail_at: int | None, data: Any) -> None:
        name = data.draw(st.sampled_from(sorted(self.models)))
        dependents = [k for k, (_, base) in self.models.items() if base == name]
        try:
            done = self.attempt(fail_at, lambda: self.registry.delete(name))
        except InUse as exc:
            assert dependents and all(d in str(exc) for d in dependents[:5])
            return
        assert not dependents, f"deleted {name} under {dependents}"
        if done:
            del self.models[name]

    @rule(payload=PAYLOADS, name=NAMES)
    def abandoned(self, payload: bytes, name: str) -> None:
        """kill -9 mid-create: blobs stored, a temporary file half-written, no manifest."""
        txn = self.registry.transaction().__enter__()  # never exited: no rollback either
        txn.add_bytes(MT_FILE, payload, filename="model.safetensors")
        (self.registry.blobs.dir / f"{TMP_PREFIX}crashed").write_bytes(b"half")
        del txn

    @rule()
    def restart(self) -> None:
        """A new process on the same root: start-up checks, then the sweep past its grace."""
        self.registry = Registry(self.root)
        assert self.registry.fsck() == []
        past = time.time() - 7200
        for path in self.registry.blobs.dir.iterdir() if self.registry.blobs.dir.is_dir() else []:
            os.utime(path, (past, past))
        self.registry.sweep()
        referenced = set().union(*(r.manifest.digests() for r in self.registry.models()))
        assert self.registry.blobs.all_digests() == referenced
        leftovers = [p for p in self.root.rglob(TMP_PREFIX + "*")]
        assert not leftovers, leftovers

    def dependents_of_any(self) -> set[str]:
        return {base for _, base in self.models.values() if base is not None}

    @invariant()
    def consistent(self) -> None:
        if not hasattr(self, "registry"):
            return
        listed = {n.display() for n in self.registry.names()}
        assert listed == set(self.models), (listed, set(self.models))
        for model in self.registry.models():
            payload, base = self.models[model.name.display()]
            for digest in model.manifest.digests():
                self.registry.blobs.verify(digest)
            files = model.manifest.files(MT_ADAPTER_FILE if base else MT_FILE)
            (layer,) = files.values()
            assert self.registry.blobs.read_bytes(layer.digest) == payload
            assert model.config.base_model == base

    def teardown(self) -> None:
        import shutil

        self.failures.disarm()
        if hasattr(self, "root"):
            shutil.rmtree(self.root, ignore_errors=True)


RegistryMachine.TestCase.settings = settings(
    max_examples=int(os.environ.get("OCS_STATEFUL_EXAMPLES", "40")),
    stateful_step_count=30,
    deadline=None,
    suppress_health_check=list(HealthCheck),
    derandomize=True,
    database=None,
)
test_registry_stays_consistent = RegistryMachine.TestCase
