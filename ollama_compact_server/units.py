"""Units, at the bottom of the package (imports nothing of it): byte sizes and durations as
users write them (``16GiB``, ``5m``) and as the CLI and reports show them."""

from __future__ import annotations

import re

KiB, MiB, GiB = 1 << 10, 1 << 20, 1 << 30

_SIZE_UNITS = {
    "": 1,
    "b": 1,
    "k": 1000,
    "kb": 1000,
    "m": 1000**2,
    "mb": 1000**2,
    "g": 1000**3,
    "gb": 1000**3,
    "t": 1000**4,
    "tb": 1000**4,
    "kib": 1024,
    "mib": 1024**2,
    "gib": 1024**3,
    "tib": 1024**4,
}
_SIZE_RE = re.compile(r"\s*(-?[0-9]+(?:\.[0-9]+)?)\s*([a-zA-Z]*)\s*")


def parse_size(text: str | int) -> int:
    """Parses a byte size such as ``16GiB``, ``800MB``, ``12e9`` or ``1048576`` into bytes."""
    if isinstance(text, bool):
        raise ValueError("expected a size such as 16GiB")
    if isinstance(text, int):
        value, unit = float(text), ""
    else:
        match = _SIZE_RE.fullmatch(text)
        if not match:
            try:
                value, unit = float(text), ""
            except ValueError:
                raise ValueError(
                    f"{text!r} is not a size (examples: 16GiB, 800MB, 1048576)"
                ) from None
        else:
            value, unit = float(match.group(1)), match.group(2).lower()
    if unit not in _SIZE_UNITS:
        raise ValueError(f"unknown size unit {unit!r} (use B, KB, MB, GB, KiB, MiB, GiB)")
    if not (value == value) or value in (float("inf"), float("-inf")):
        raise ValueError("size must be finite")
    if value < 0:
        raise ValueError("size must not be negative")
    return int(value * _SIZE_UNITS[unit])


_DURATION_RE = re.compile(r"([0-9]*\.?[0-9]+)(ns|us|µs|ms|s|m|h)")
_DURATION_UNITS = {"ns": 1e-9, "us": 1e-6, "µs": 1e-6, "ms": 1e-3, "s": 1.0, "m": 60.0, "h": 3600.0}
_MAX_DURATION_S = 10 * 365 * 24 * 3600.0


def parse_duration(value: str | int | float | None) -> float | None:
    """Parses Ollama's keep-alive forms into seconds: a number of seconds, or a Go duration
    string (``5m``, ``1h30m``, ``-1s``). Negative means "forever" and is returned as ``None``."""
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, (str, int, float)):
        raise ValueError("expected a duration such as 5m or a number of seconds")
    if isinstance(value, (int, float)):
        seconds = float(value)
    else:
        text = value.strip()
        if not text:
            raise ValueError("empty duration")
        try:
            seconds = float(text)
        except ValueError:
            sign = -1.0 if text.startswith("-") else 1.0
            body = text.lstrip("+-")
            pos, total = 0, 0.0
            for match in _DURATION_RE.finditer(body):
                if match.start() != pos:
                    break
                total += float(match.group(1)) * _DURATION_UNITS[match.group(2)]
                pos = match.end()
            if pos != len(body) or not body:
                raise ValueError(
                    f"{value!r} is not a duration (examples: 5m, 1h30m, 30s, -1 for forever)"
                ) from None
            seconds = sign * total
    if seconds != seconds or seconds in (float("inf"),):
        raise ValueError("duration must be finite")
    if seconds < 0:
        return None
    return min(seconds, _MAX_DURATION_S)


def human_size(size: int) -> str:
    """Decimal units, as Ollama's CLI shows sizes: ``291.5 MB``."""
    value = float(size)
    for unit in ("B", "KB", "MB", "GB", "TB"):
        if value < 1000 or unit == "TB":
            return f"{value:.0f} {unit}" if unit == "B" else f"{value:.1f} {unit}"
        value /= 1000
    return f"{size} B"


def human_bytes(size: int) -> str:
    """Binary units, as the memory planner shows them: ``1.50 GiB``."""
    for unit, scale in (("GiB", GiB), ("MiB", MiB), ("KiB", KiB)):
        if size >= scale:
            return f"{size / scale:.2f} {unit}"
    return f"{size} B"
