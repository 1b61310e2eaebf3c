"""Reads and validates safetensors headers without torch: every offset inside the file, every
size equal to its shape times its item size, no overlaps, nothing absurd."""

from __future__ import annotations

import itertools
import json
import math
import struct
from dataclasses import dataclass
from pathlib import Path

from .errors import InvalidModel

MAX_HEADER_BYTES = 100 << 20
MAX_TENSORS = 1_000_000
MAX_DIMS = 8

ITEM_SIZES = {
    "BOOL": 1,
    "U8": 1,
    "I8": 1,
    "F8_E4M3": 1,
    "F8_E5M2": 1,
    "I16": 2,
    "U16": 2,
    "F16": 2,
    "BF16": 2,
    "I32": 4,
    "U32": 4,
    "F32": 4,
    "I64": 8,
    "U64": 8,
    "F64": 8,
}
DTYPE_NAMES = {"F32": "float32", "BF16": "bfloat16", "F16": "float16", "F64": "float64"}


@dataclass(frozen=True, slots=True)
class TensorInfo:
    dtype: str
    shape: tuple[int, ...]

    @property
    def numel(self) -> int:
        return math.prod(self.shape)


def read_header(path: Path) -> tuple[dict[str, TensorInfo], dict[str, str]]:
    """Returns (tensors, metadata) of a safetensors file, or raises :class:`InvalidModel`."""
    label = path.name
    try:
        size = path.stat().st_size
        with open(path, "rb") as handle:
            head = handle.read(8)
            if len(head) != 8:
                raise InvalidModel(f"{label}: not a safetensors file (too short)")
            (header_len,) = struct.unpack("<Q", head)
            if header_len > MAX_HEADER_BYTES or 8 + header_len > size:
                raise InvalidModel(f"{label}: safetensors header length is out of range")
            raw = handle.read(header_len)
    except OSError as exc:
        raise InvalidModel(f"{label}: cannot read ({exc.strerror})") from None
    return parse_header(raw, size - 8 - header_len, label)


def parse_header(
    raw: bytes, data_size: int, label: str = "file"
) -> tuple[dict[str, TensorInfo], dict[str, str]]:
    try:
        header = json.loads(raw.decode("utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError, RecursionError):
        raise InvalidModel(f"{label}: safetensors header is not valid JSON") from None
    if not isinstance(header, dict):
        raise InvalidModel(f"{label}: safetensors header is not an object")
    metadata = header.pop("__metadata__", None) or {}
    if not isinstance(metadata, dict) or not all(
        isinstance(k, str) and isinstance(v, str) for k, v in metadata.items()
    ):
        raise InvalidModel(f"{label}: safetensors metadata must map strings to strings")
    if len(header) > MAX_TENSORS:
        raise InvalidModel(f"{label}: too many tensors")
    tensors: dict[str, TensorInfo] = {}
    spans: list[tuple[int, int]] = []
    for name, entry in header.items():
        if not isinstance(entry, dict):
            raise InvalidModel(f"{label}: tensor {name[:80]!r} has a malformed entry")
        dtype, shape, offsets = entry.get("dtype"), entry.get("shape"), entry.get("data_offsets")
        if dtype not in ITEM_SIZES:
            raise InvalidModel(
                f"{label}: tensor {name[:80]!r} has unknown dtype {str(dtype)[:20]!r}"
            )
        if (
            not isinstance(shape, list)
            or len(shape) > MAX_DIMS
            or not all(
                isinstance(d, int) and not isinstance(d, bool) and 0 <= d < 2**40 for d in shape
            )
        ):
            raise InvalidModel(f"{label}: tensor {name[:80]!r} has an invalid shape")
        if (
            not isinstance(offsets, list)
            or len(offsets) != 2
            or not all(isinstance(o, int) and not isinstance(o, bool) for o in offsets)
        ):
            raise InvalidModel(f"{label}: tensor {name[:80]!r} has invalid offsets")
        begin, end = offsets
        nbytes = math.prod(shape) * ITEM_SIZES[dtype]
        if not 0 <= begin <= end <= data_size or end - begin != nbytes:
            raise InvalidModel(
                f"{label}: tensor {name[:80]!r} lies outside the file or has the wrong size"
            )
        tensors[name] = TensorInfo(dtype, tuple(shape))
        if end > begin:
            spans.append((begin, end))
    spans.sort()
    for (_, prev_end), (begin, _) in itertools.pairwise(spans):
        if begin < prev_end:
            raise InvalidModel(f"{label}: tensors overlap")
    return tensors, metadata
