"""A small, strict reader of a GGUF file's header and tensor table (no tensor data read).

gguf-py's ``GGUFReader`` builds a numpy view per element of every metadata array, which for
a 262,144-token vocabulary takes 15-30 s; this reads the scalar keys, skips arrays (keeping
their length) and checks every tensor against the file before anything is allocated: known
type, whole blocks per row, sizes that add up, data inside the file, no overlaps.
"""

from __future__ import annotations

import itertools
import struct
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from ..registry.errors import InvalidModel

MAGIC = b"GGUF"
VERSIONS = (2, 3)
MAX_DIMS = 4
MAX_STRING = 1 << 24  # a metadata string longer than 16 MiB is not a real file
MAX_TENSORS = 1 << 20
MAX_KEYS = 1 << 16
# value types: u8 i8 u16 i16 u32 i32 f32 bool string array u64 i64 f64
_SCALARS = {0: "<B", 1: "<b", 2: "<H", 3: "<h", 4: "<I", 5: "<i", 6: "<f", 7: "<?"}
_SCALARS.update({10: "<Q", 11: "<q", 12: "<d"})
_STRING, _ARRAY = 8, 9


@dataclass(frozen=True, slots=True)
class TensorEntry:
    name: str
    shape: tuple[int, ...]  # torch order (rows first)
    qtype: Any  # gguf.GGMLQuantizationType
    offset: int  # absolute, in the file
    nbytes: int

    @property
    def kind(self) -> str:
        return str(self.qtype.name)


@dataclass
class GGUFTable:
    path: Path
    metadata: dict[str, Any] = field(default_factory=dict)  # arrays as ("array", length)
    tensors: list[TensorEntry] = field(default_factory=list)

    def data(self, entry: TensorEntry) -> np.ndarray:
        """The tensor's bytes, memory-mapped: [rows, bytes per row] (1-D tensors: [bytes])."""
        raw = np.memmap(
            self.path, dtype=np.uint8, mode="r", offset=entry.offset, shape=(entry.nbytes,)
        )
        if len(entry.shape) < 2:
            return raw
        rows = int(np.prod(entry.shape[:-1]))
        return raw.reshape(rows, entry.nbytes // rows)


class _Cursor:
    def __init__(self, blob: bytes | memoryview, name: str) -> None:
        self.blob = blob
        self.pos = 0
        self.name = name

    def take(self, fmt: str) -> Any:
        size = struct.calcsize(fmt)
        if self.pos + size > len(self.blob):
            raise InvalidModel(f"{self.name} ends inside its header (truncated GGUF file)")
        value = struct.unpack_from(fmt, self.blob, self.pos)
        self.pos += size
        return value[0] if len(value) == 1 else value

    def string(self) -> str:
        length = self.take("<Q")
        if length > MAX_STRING or self.pos + length > len(self.blob):
            raise InvalidModel(f"{self.name} has a malformed string in its header")
        raw = bytes(self.blob[self.pos : self.pos + length])
        self.pos += length
        return raw.decode("utf-8", errors="replace")

    def value(self, kind: int) -> Any:
        if kind in _SCALARS:
            return self.take(_SCALARS[kind])
        if kind == _STRING:
            return self.string()
        if kind == _ARRAY:
            inner = self.take("<I")
            count = self.take("<Q")
            if inner == _STRING:
                for _ in range(count):
                    length = self.take("<Q")
                    if length > MAX_STRING:
                        raise InvalidModel(f"{self.name} has a malformed string in its header")
                    self.pos += length
                if self.pos > len(self.blob):
                    raise InvalidModel(f"{self.name} ends inside its header (truncated GGUF file)")
            elif inner in _SCALARS:
                self.pos += count * struct.calcsize(_SCALARS[inner])
                if self.pos > len(self.blob):
                    raise InvalidModel(f"{self.name} ends inside its header (truncated GGUF file)")
            else:
                raise InvalidModel(f"{self.name} has a metadata array of unknown type {inner}")
            return ("array", count)
        raise InvalidModel(f"{self.name} has a metadata value of unknown type {kind}")


def read_table(path: Path) -> GGUFTable:
    """Reads and checks the header and tensor table of ``path`` (InvalidModel if bad)."""
    from gguf import GGML_QUANT_SIZES, GGMLQuantizationType

    path = Path(path)
    size = path.stat().st_size
    name = path.name
    mapped = np.memmap(path, dtype=np.uint8, mode="r") if size else np.zeros(0, np.uint8)
    cursor = _Cursor(memoryview(mapped.data), name)
    if bytes(mapped[:4]) != MAGIC:
        raise InvalidModel(f"{name} is not a GGUF file")
    version = cursor.take("<4xI")
    if version not in VERSIONS:
        raise InvalidModel(f"{name} is GGUF version {version}; versions 2 and 3 are read")
    count, keys = cursor.take("<QQ")
    if count > MAX_TENSORS or keys > MAX_KEYS:
        raise InvalidModel(f"{name} declares {count} tensors and {keys} keys: not a real file")
    table = GGUFTable(path)
    for _ in range(keys):
        key = cursor.string()
        table.metadata[key] = cursor.value(cursor.take("<I"))
    entries = []
    for _ in range(count):
        tensor_name = cursor.string()
        dims = cursor.take("<I")
        if not 1 <= dims <= MAX_DIMS:
            raise InvalidModel(f"{name}: tensor {tensor_name[:80]!r} has {dims} dimensions")
        ne = [cursor.take("<Q") for _ in range(dims)]
        kind, offset = cursor.take("<IQ")
        entries.append((tensor_name, ne, kind, offset))
    alignment = table.metadata.get("general.alignment", 32)
    if not isinstance(alignment, int) or alignment <= 0 or alignment & (alignment - 1):
        raise InvalidModel(f"{name} has an invalid alignment")
    start = -(-cursor.pos // alignment) * alignment
    spans = []
    for tensor_name, ne, kind, offset in entries:
        try:
            qtype = GGMLQuantizationType(kind)
            block, type_size = GGML_QUANT_SIZES[qtype]
        except (ValueError, KeyError):
            raise InvalidModel(
                f"{name}: tensor {tensor_name[:80]!r} has an unknown type {kind}"
            ) from None
        if any(d <= 0 or d > 1 << 40 for d in ne):
            raise InvalidModel(f"{name}: tensor {tensor_name[:80]!r} has a bad shape {ne}")
        if ne[0] % block:
            raise InvalidModel(
                f"{name}: tensor {tensor_name[:80]!r} rows of {ne[0]} are not whole "
                f"{qtype.name} blocks of {block}"
            )
        elements = int(np.prod(ne, dtype=np.float64))
        nbytes = elements // block * type_size
        absolute = start + offset
        if offset % alignment or absolute + nbytes > size:
            raise InvalidModel(
                f"{name}: tensor {tensor_name[:80]!r} lies outside the file "
                "(truncated, or its header declares more than it holds)"
            )
        spans.append((absolute, absolute + nbytes, tensor_name))
        table.tensors.append(
            TensorEntry(tensor_name, tuple(int(d) for d in reversed(ne)), qtype, absolute, nbytes)
        )
    spans.sort()
    for (_, end, first), (begin, _, second) in itertools.pairwise(spans):
        if begin < end:
            raise InvalidModel(f"{name}: tensors {first[:60]!r} and {second[:60]!r} overlap")
    names = [t.name for t in table.tensors]
    if len(set(names)) != len(names):
        raise InvalidModel(f"{name} names a tensor twice")
    return table
