"""Content-addressed blob store: files named by the sha256 of their bytes, verified on write
and on read. :meth:`BlobStore.path` is the only place that turns a digest into a path."""

from __future__ import annotations

import contextlib
import hashlib
import os
import re
import tempfile
from collections.abc import Callable, Iterable
from pathlib import Path

from .errors import BlobNotFound, DigestMismatch, InvalidDigest
from .fsutil import TMP_PREFIX, age, fsync_dir, storage_error

DIGEST_RE = re.compile(r"sha256[:-]([0-9a-fA-F]{64})")
CHUNK = 1 << 20

Progress = Callable[[int], None]


def normalize_digest(digest: object) -> str:
    """Returns ``sha256:<64 lowercase hex>`` or raises :class:`InvalidDigest`."""
    if not isinstance(digest, str):
        raise InvalidDigest("invalid digest format")
    match = DIGEST_RE.fullmatch(digest)
    if not match:
        raise InvalidDigest("invalid digest format")
    return "sha256:" + match.group(1).lower()


def sha256_file(path: Path, progress: Progress | None = None) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        while block := handle.read(CHUNK):
            digest.update(block)
            if progress:
                progress(len(block))
    return "sha256:" + digest.hexdigest()


class BlobStore:
    def __init__(self, root: Path) -> None:
        self.dir = root / "blobs"

    def path(self, digest: str) -> Path:
        """The file of a digest (validated; never outside the blobs directory)."""
        hexpart = normalize_digest(digest).split(":", 1)[1]
        return self.dir / f"sha256-{hexpart}"

    def has(self, digest: str) -> bool:
        path = self.path(digest)
        return path.is_file() and not path.is_symlink()

    def size(self, digest: str) -> int:
        try:
            return self.path(digest).lstat().st_size
        except FileNotFoundError:
            raise BlobNotFound(f'blob "{normalize_digest(digest)}" not found') from None

    def put_stream(
        self,
        chunks: Iterable[bytes],
        expected: str | None = None,
        progress: Progress | None = None,
    ) -> tuple[str, bool]:
        """Streams bytes into the store. Returns (digest, created). With ``expected`` set, bytes
        that hash otherwise are refused and leave nothing behind."""
        if expected is not None:
            expected = normalize_digest(expected)
        try:
            self.dir.mkdir(parents=True, exist_ok=True)
            fd, tmp_name = tempfile.mkstemp(prefix=TMP_PREFIX, dir=self.dir)
        except OSError as exc:
            raise storage_error(exc) from exc
        tmp = Path(tmp_name)
        try:
            hasher = hashlib.sha256()
            with os.fdopen(fd, "wb") as handle:
                for chunk in chunks:
                    hasher.update(chunk)
                    handle.write(chunk)
                    if progress:
                        progress(len(chunk))
                handle.flush()
                os.fsync(handle.fileno())
            digest = "sha256:" + hasher.hexdigest()
            if expected is not None and digest != expected:
                raise DigestMismatch(f'digest mismatch, expected "{expected}", got "{digest}"')
            target = self.path(digest)
            if self.has(digest):
                tmp.unlink()
                return digest, False
            os.replace(tmp, target)
            fsync_dir(self.dir)
            return digest, True
        except BaseException as exc:
            with contextlib.suppress(OSError):
                tmp.unlink()
            if isinstance(exc, OSError):
                raise storage_error(exc) from exc
            raise

    def begin_upload(self, expected: str) -> Upload:
        """An upload written piece by piece (from a request body), checked at the end."""
        return Upload(self, normalize_digest(expected))

    def put_file(self, source: Path, progress: Progress | None = None) -> tuple[str, bool]:
        """Copies a local file into the store (hashing while copying). A file that is a
        blob of this store already (an uploaded file a create names, reached through a
        link) is only hashed: no second copy, no second helping of disk space."""
        resolved = Path(source).resolve()
        if resolved.parent == self.dir.resolve() and DIGEST_RE.fullmatch(resolved.name):
            digest = normalize_digest(resolved.name)
            actual = sha256_file(resolved, progress)
            if actual != digest:
                raise DigestMismatch(f"blob {digest} is corrupt (hashes to {actual})")
            self.touch(digest)
            return digest, False

        def chunks() -> Iterable[bytes]:
            with open(source, "rb") as handle:
                while block := handle.read(CHUNK):
                    yield block

        return self.put_stream(chunks(), progress=progress)

    def put_bytes(self, data: bytes) -> tuple[str, bool]:
        return self.put_stream([data])

    def read_bytes(self, digest: str, limit: int = 64 << 20) -> bytes:
        """Reads a small blob whole, verifying its digest."""
        path = self.path(digest)
        try:
            if path.is_symlink():
                raise BlobNotFound(f'blob "{normalize_digest(digest)}" not found')
            with open(path, "rb") as handle:
                data = handle.read(limit + 1)
        except FileNotFoundError:
            raise BlobNotFound(f'blob "{normalize_digest(digest)}" not found') from None
        if len(data) > limit:
            raise DigestMismatch(f"blob {normalize_digest(digest)} is larger than expected")
        actual = "sha256:" + hashlib.sha256(data).hexdigest()
        if actual != normalize_digest(digest):
            raise DigestMismatch(f"blob {normalize_digest(digest)} is corrupt (hashes to {actual})")
        return data

    def verify(self, digest: str, progress: Progress | None = None) -> Path:
        """Checks that a blob's bytes still hash to its name; returns its path."""
        path = self.path(digest)
        if not self.has(digest):
            raise BlobNotFound(f'blob "{normalize_digest(digest)}" not found')
        actual = sha256_file(path, progress)
        if actual != normalize_digest(digest):
            raise DigestMismatch(f"blob {normalize_digest(digest)} is corrupt (hashes to {actual})")
        return path

    def touch(self, digest: str) -> None:
        """Marks a blob as just used (the sweep spares blobs younger than its grace)."""
        with contextlib.suppress(OSError):
            os.utime(self.path(digest))

    def age(self, digest: str) -> float:
        """Seconds since the blob was written or last touched."""
        return age(self.path(digest))

    def remove(self, digest: str) -> None:
        with contextlib.suppress(FileNotFoundError):
            self.path(digest).unlink()

    def all_digests(self) -> set[str]:
        if not self.dir.is_dir():
            return set()
        found = set()
        for entry in self.dir.iterdir():
            name = entry.name
            if name.startswith("sha256-") and DIGEST_RE.fullmatch(name):
                found.add(normalize_digest(name))
        return found


class Upload:
    """Bytes arriving in pieces for one expected digest: hashed and written to a temporary
    file in the blobs directory, renamed into place only if the digest matches."""

    def __init__(self, store: BlobStore, expected: str) -> None:
        self.store = store
        self.expected = expected
        self.hasher = hashlib.sha256()
        self.size = 0
        try:
            store.dir.mkdir(parents=True, exist_ok=True)
            fd, name = tempfile.mkstemp(prefix=TMP_PREFIX, dir=store.dir)
        except OSError as exc:
            raise storage_error(exc) from exc
        self.tmp = Path(name)
        self.handle = os.fdopen(fd, "wb")

    def write(self, data: bytes) -> None:
        try:
            self.hasher.update(data)
            self.handle.write(data)
            self.size += len(data)
        except OSError as exc:
            self.abort()
            raise storage_error(exc) from exc

    def commit(self) -> bool:
        """Returns True when a new blob was stored, False when it already existed."""
        try:
            self.handle.flush()
            os.fsync(self.handle.fileno())
            self.handle.close()
            digest = "sha256:" + self.hasher.hexdigest()
            if digest != self.expected:
                raise DigestMismatch(f'digest mismatch, expected "{self.expected}", got "{digest}"')
            if self.store.has(digest):
                self.tmp.unlink()
                return False
            os.replace(self.tmp, self.store.path(digest))
            fsync_dir(self.store.dir)
            return True
        except OSError as exc:
            self.abort()
            raise storage_error(exc) from exc
        except BaseException:
            self.abort()
            raise

    def abort(self) -> None:
        with contextlib.suppress(OSError):
            self.handle.close()
        with contextlib.suppress(OSError):
            self.tmp.unlink()
