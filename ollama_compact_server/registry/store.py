"""The registry: named manifests over a content-addressed blob store, with atomic,
all-or-nothing changes and reference-counted deletion."""

from __future__ import annotations

import contextlib
import fcntl
import hashlib
import json
import logging
import os
import threading
from collections import Counter
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

from pydantic import ValidationError

from .blobs import BlobStore, Progress
from .errors import (
    InUse,
    InvalidModel,
    ModelNotFound,
    NameConflict,
    RegistryError,
    StorageError,
)
from .fsutil import TMP_PREFIX, age, atomic_write_bytes, fsync_dir
from .manifest import (
    MAX_MANIFEST_BYTES,
    MT_CONFIG,
    MT_LICENSE,
    MT_MESSAGES,
    MT_PARAMS,
    MT_SYSTEM,
    MT_TEMPLATE,
    Layer,
    Manifest,
    ModelConfig,
)
from .names import ModelName

log = logging.getLogger(__name__)


@dataclass(slots=True)
class ModelRecord:
    """A model as stored: its name, manifest, config and derived facts."""

    name: ModelName
    manifest: Manifest
    config: ModelConfig
    digest: str  # 64 hex: sha256 of the manifest bytes (what Ollama shows)
    modified_at: datetime

    @property
    def size(self) -> int:
        return self.manifest.config.size + sum(layer.size for layer in self.manifest.layers)

    @property
    def is_adapter(self) -> bool:
        return self.config.kind == "adapter"


BLOB_GRACE = 3600.0  # seconds an unused blob (an upload before its create) is kept
TMP_GRACE = 600.0  # seconds a temporary file may go unwritten before it counts as dead


class Registry:
    def __init__(self, root: Path) -> None:
        self.root = Path(root).expanduser().absolute()
        self.blobs = BlobStore(self.root)
        self.manifest_dir = self.root / "manifests"
        self._lock = threading.RLock()
        self._depth = 0  # nesting of locked() in the thread holding _lock
        # blobs that transactions in flight (in this process) hold: never collected
        self._pins: Counter[str] = Counter()
        self._pins_lock = threading.Lock()

    # ------------------------------------------------------------------ locking

    @contextlib.contextmanager
    def locked(self) -> Iterator[None]:
        """Serialises changes across threads and processes (the CLI and the daemon).
        Re-entrant within a thread: the file lock is taken once, by the outermost caller."""
        with self._lock:
            if self._depth:
                self._depth += 1
                try:
                    yield
                finally:
                    self._depth -= 1
                return
            self.root.mkdir(parents=True, exist_ok=True)
            fd = os.open(self.root / ".lock", os.O_RDWR | os.O_CREAT, 0o644)
            try:
                fcntl.flock(fd, fcntl.LOCK_EX)
                self._depth = 1
                yield
            finally:
                self._depth = 0
                fcntl.flock(fd, fcntl.LOCK_UN)
                os.close(fd)

    # ------------------------------------------------------------------ names → paths

    def _manifest_path(self, name: ModelName) -> Path:
        # ModelName's parts are validated (no '/', no '..'), so this stays under the root.
        return self.manifest_dir.joinpath(*name.parts)

    def resolve(self, name: str | ModelName) -> ModelName | None:
        """The stored name matching ``name`` case-insensitively, or None."""
        wanted = name if isinstance(name, ModelName) else ModelName.parse(name)
        exact = self._manifest_path(wanted)
        if exact.is_file() and not exact.is_symlink():
            return wanted
        current = self.manifest_dir
        found: list[str] = []
        for part in wanted.parts:
            if not current.is_dir():
                return None
            match = next(
                (e.name for e in sorted(current.iterdir()) if e.name.lower() == part.lower()),
                None,
            )
            if match is None:
                return None
            found.append(match)
            current = current / match
        if not current.is_file() or current.is_symlink():
            return None
        return ModelName(*found)

    def exists(self, name: str | ModelName) -> bool:
        return self.resolve(name) is not None

    # ------------------------------------------------------------------ reading

    def get(self, name: str | ModelName) -> ModelRecord:
        parsed = name if isinstance(name, ModelName) else ModelName.parse(name)
        stored = self.resolve(parsed)
        if stored is None:
            raise ModelNotFound(f"model '{parsed.display()}' not found")
        return self._load(stored)

    def _load(self, name: ModelName) -> ModelRecord:
        path = self._manifest_path(name)
        try:
            fd = os.open(path, os.O_RDONLY | getattr(os, "O_NOFOLLOW", 0))
            with os.fdopen(fd, "rb") as handle:
                data = handle.read(MAX_MANIFEST_BYTES + 1)
                stat = os.fstat(handle.fileno())
        except FileNotFoundError:
            raise ModelNotFound(f"model '{name.display()}' not found") from None
        except OSError as exc:
            raise InvalidModel(f"model '{name.display()}' is unreadable") from exc
        try:
            manifest = Manifest.from_bytes(data)
            config = ModelConfig.from_bytes(self.blobs.read_bytes(manifest.config.digest))
        except (ValidationError, ValueError, RegistryError) as exc:
            raise InvalidModel(f"model '{name.display()}' has a damaged manifest: {exc}") from exc
        return ModelRecord(
            name=name,
            manifest=manifest,
            config=config,
            digest=hashlib.sha256(data).hexdigest(),
            modified_at=datetime.fromtimestamp(stat.st_mtime, tz=timezone.utc),
        )

    def names(self) -> list[ModelName]:
        found: list[ModelName] = []
        if not self.manifest_dir.is_dir():
            return found
        for path in sorted(self.manifest_dir.glob("*/*/*/*")):
            if not path.is_file() or path.is_symlink() or path.name.startswith(TMP_PREFIX):
                continue
            rel = path.relative_to(self.manifest_dir).parts
            try:
                found.append(ModelName.parse(f"{rel[0]}/{rel[1]}/{rel[2]}:{rel[3]}"))
            except RegistryError:
                log.warning("ignoring manifest with an invalid name: %s", "/".join(rel))
        return found

    def models(self) -> list[ModelRecord]:
        """Every readable model; damaged manifests are logged and left out."""
        records = []
        for name in self.names():
            try:
                records.append(self._load(name))
            except RegistryError as exc:
                log.warning("skipping %s: %s", name.display(), exc)
        return records

    def read_text(self, layer: Layer | None) -> str:
        if layer is None:
            return ""
        return self.blobs.read_bytes(layer.digest).decode("utf-8", errors="replace")

    def template(self, record: ModelRecord) -> str:
        return self.read_text(record.manifest.first(MT_TEMPLATE))

    def system(self, record: ModelRecord) -> str:
        return self.read_text(record.manifest.first(MT_SYSTEM))

    def license(self, record: ModelRecord) -> str:
        return "\n".join(
            self.read_text(layer)
            for layer in record.manifest.layers
            if layer.media_type == MT_LICENSE
        )

    def params(self, record: ModelRecord) -> dict[str, Any]:
        text = self.read_text(record.manifest.first(MT_PARAMS))
        value = json.loads(text) if text else {}
        return value if isinstance(value, dict) else {}

    def messages(self, record: ModelRecord) -> list[dict[str, Any]]:
        text = self.read_text(record.manifest.first(MT_MESSAGES))
        value = json.loads(text) if text else []
        return value if isinstance(value, list) else []

    def verified_files(
        self, record: ModelRecord, media_type: str, progress: Progress | None = None
    ) -> dict[str, Path]:
        """The files of a model, each checked against its digest before it is loaded."""
        return {
            name: self.blobs.verify(layer.digest, progress)
            for name, layer in record.manifest.files(media_type).items()
        }

    # ------------------------------------------------------------------ writing

    @contextlib.contextmanager
    def transaction(self) -> Iterator[Transaction]:
        """Collects blobs for a new model; on failure every blob it created is removed
        again (unless a manifest uses it), so the registry ends byte-identical.

        The blobs are written without the registry lock (a multi-GB copy must not stop
        copies, deletes and other imports); they are pinned meanwhile, so that no garbage
        collection in this process removes them, and the commit takes the lock only to
        check them and write the manifest. (A delete in another process may still remove
        a blob this one found already stored; the commit then fails, leaving no model.)"""
        txn = Transaction(self)
        try:
            yield txn
        except BaseException:
            txn.rollback()
            raise
        finally:
            txn.release()

    def _pin(self, digest: str) -> None:
        with self._pins_lock:
            self._pins[digest] += 1

    def _unpin(self, digest: str) -> None:
        with self._pins_lock:
            self._pins[digest] -= 1
            if self._pins[digest] <= 0:
                del self._pins[digest]

    def _remove_unpinned(self, digest: str, own: int = 0) -> None:
        """Removes a blob unless a transaction (other than ``own`` pins of the caller's)
        holds it."""
        with self._pins_lock:
            if self._pins.get(digest, 0) > own:
                return
            self.blobs.remove(digest)

    def write_manifest(self, name: str | ModelName, manifest: Manifest) -> ModelRecord:
        """Points ``name`` at ``manifest`` atomically (an existing name differing only in
        case is replaced in place). All referenced blobs must already exist."""
        parsed = name if isinstance(name, ModelName) else ModelName.parse(name)
        with self.locked():
            for digest in manifest.digests():
                if not self.blobs.has(digest):
                    raise InvalidModel(f"manifest references a missing blob {digest}")
            stored = self.resolve(parsed) or parsed
            path = self._manifest_path(stored)
            if path.is_dir():
                raise NameConflict(f"model name '{parsed.display()}' is in use")
            old_digests = self._load(stored).manifest.digests() if path.is_file() else set()
            try:
                atomic_write_bytes(path, manifest.to_bytes())
            except BaseException:
                self._prune_empty_dirs(path.parent)  # leave no new empty directories
                raise
            self._collect(old_digests - manifest.digests())
            return self._load(stored)

    def copy(self, source: str | ModelName, destination: str | ModelName) -> ModelRecord:
        with self.locked():
            record = self.get(source)
            return self.write_manifest(destination, record.manifest)

    def delete(self, name: str | ModelName, keep: frozenset[str] = frozenset()) -> None:
        """Removes a name; blobs no other model uses are deleted too, except ``keep``. The
        base of adapter models stays (InUse, a 409 naming them) while they do."""
        with self.locked():
            record = self.get(name)
            dependents = self.dependents(record.name)
            if dependents:
                shown = ", ".join(dependents[:5]) + (" ..." if len(dependents) > 5 else "")
                raise InUse(
                    f"model '{record.name.display()}' is the base of {len(dependents)} adapter "
                    f"model(s): {shown}; delete those first"
                )
            path = self._manifest_path(record.name)
            path.unlink()
            fsync_dir(path.parent)
            self._prune_empty_dirs(path.parent)
            self._collect(record.manifest.digests() - keep)

    def dependents(self, name: ModelName) -> list[str]:
        """Adapter models whose base is ``name``."""
        found = []
        for record in self.models():
            base = record.config.base_model if record.is_adapter else None
            if base and record.name != name and self.resolve(base) == name:
                found.append(record.name.display())
        return sorted(found)

    def _referenced(self) -> set[str]:
        used: set[str] = set()
        for name in self.names():
            try:
                used |= Manifest.from_bytes(self._manifest_path(name).read_bytes()).digests()
            except (ValidationError, ValueError, OSError, RegistryError):
                # A damaged manifest might still reference blobs: keep everything.
                return self.blobs.all_digests()
        return used

    def _collect(self, candidates: set[str]) -> None:
        if not candidates:
            return
        for digest in candidates - self._referenced():
            self._remove_unpinned(digest)

    def _prune_empty_dirs(self, directory: Path) -> None:
        while directory != self.manifest_dir and directory.is_relative_to(self.manifest_dir):
            try:
                directory.rmdir()
            except OSError:
                return
            directory = directory.parent

    # ------------------------------------------------------------------ maintenance

    def _remove_stale_temporaries(self) -> None:
        """Temporary files not written to for TMP_GRACE: left by a crash mid-write (a live
        write, of this process or of a CLI import beside it, touches its file all along)."""
        for directory in (self.blobs.dir, self.manifest_dir):
            if directory.is_dir():
                for tmp in directory.rglob(TMP_PREFIX + "*"):
                    if age(tmp) >= TMP_GRACE:
                        with contextlib.suppress(OSError):
                            tmp.unlink()

    def sweep(self, grace: float = BLOB_GRACE) -> list[str]:
        """Removes blobs that no manifest uses and nothing touched for ``grace`` seconds
        (an upload waits that long for the create that names it), and stale temporary
        files. Returns the digests removed. A damaged manifest keeps every blob."""
        removed = []
        with self.locked():
            unused = self.blobs.all_digests() - self._referenced()
            for digest in sorted(unused):
                if self.blobs.age(digest) >= grace:
                    self._remove_unpinned(digest)
                    if not self.blobs.has(digest):
                        removed.append(digest)
            self._remove_stale_temporaries()
        for digest in removed:
            log.info("removed unused blob %s", digest)
        return removed

    def fsck(self) -> list[str]:
        """Moves unparseable manifests to ``quarantine/`` and removes stale temporary files.
        Returns a line per problem found."""
        problems = []
        with self.locked():
            self._remove_stale_temporaries()
            for name in self.names():
                try:
                    self._load(name)
                except RegistryError as exc:
                    path = self._manifest_path(name)
                    target = self.root / "quarantine" / "-".join(name.parts)
                    target.parent.mkdir(parents=True, exist_ok=True)
                    os.replace(path, target)
                    problems.append(f"{name.display()}: {exc} (moved to quarantine)")
                    log.error("quarantined damaged manifest %s: %s", name.display(), exc)
        return problems


class Transaction:
    """Blobs added for one new model; see :meth:`Registry.transaction`."""

    def __init__(self, registry: Registry) -> None:
        self.registry = registry
        self.created: set[str] = set()
        self.pinned: set[str] = set()
        self.layers: list[Layer] = []

    def _hold(self, put: Callable[[], tuple[str, bool]]) -> tuple[str, bool]:
        """Stores bytes with ``put`` and pins the blob; if a collection removed it between
        the two (it was stored already, and its last model was just deleted), stores it
        again."""
        for _ in range(3):
            digest, created = put()
            if digest not in self.pinned:
                self.registry._pin(digest)
                self.pinned.add(digest)
            if self.registry.blobs.has(digest):
                return digest, created
        raise StorageError("a blob kept disappearing while it was stored; try again")

    def add_file(
        self,
        media_type: str,
        source: Path,
        filename: str | None = None,
        progress: Progress | None = None,
    ) -> Layer:
        digest, created = self._hold(lambda: self.registry.blobs.put_file(source, progress))
        return self._layer(media_type, digest, created, filename)

    def add_bytes(self, media_type: str, data: bytes, filename: str | None = None) -> Layer:
        digest, created = self._hold(lambda: self.registry.blobs.put_bytes(data))
        return self._layer(media_type, digest, created, filename)

    def add_existing(self, layer: Layer) -> Layer:
        """Reuses a layer of another model (shared storage)."""
        if layer.digest not in self.pinned:
            self.registry._pin(layer.digest)
            self.pinned.add(layer.digest)
        if not self.registry.blobs.has(layer.digest):
            raise InvalidModel(f"missing blob {layer.digest}")
        self.layers.append(layer)
        return layer

    def _layer(self, media_type: str, digest: str, created: bool, filename: str | None) -> Layer:
        if created:
            self.created.add(digest)
        annotations = {"filename": filename} if filename else None
        layer = Layer(
            media_type=media_type,
            digest=digest,
            size=self.registry.blobs.size(digest),
            annotations=annotations,
        )
        self.layers.append(layer)
        return layer

    def commit(self, name: str | ModelName, config: ModelConfig) -> ModelRecord:
        config_layer = self.add_bytes(MT_CONFIG, config.to_bytes())
        self.layers.remove(config_layer)
        manifest = Manifest(config=config_layer, layers=self.layers)
        return self.registry.write_manifest(name, manifest)  # under the lock, briefly

    def rollback(self) -> None:
        """Removes the blobs this transaction created that no manifest and no other
        transaction uses."""
        if not self.created:
            return
        with self.registry.locked():
            used = self.registry._referenced()
            for digest in self.created - used:
                self.registry._remove_unpinned(digest, own=1 if digest in self.pinned else 0)

    def release(self) -> None:
        for digest in self.pinned:
            self.registry._unpin(digest)
        self.pinned.clear()


TEXT_MEDIA_TYPES: dict[str, str] = {
    "template": MT_TEMPLATE,
    "system": MT_SYSTEM,
    "params": MT_PARAMS,
    "messages": MT_MESSAGES,
    "license": MT_LICENSE,
}

ProgressFn = Callable[[str, int | None, int | None], None]
"""Import progress: (status, completed, total)."""
