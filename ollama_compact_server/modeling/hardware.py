"""What this machine's CPU can do fast, read once from /proc/cpuinfo (the engine picks its
serving dtype with it, fine-tuning its training precision)."""

from __future__ import annotations

import functools
from pathlib import Path


@functools.lru_cache(maxsize=1)
def cpu_flags() -> frozenset[str]:
    try:
        text = Path("/proc/cpuinfo").read_text()
    except OSError:
        return frozenset()
    for line in text.splitlines():
        if line.startswith(("flags", "Features")):
            return frozenset(line.split(":", 1)[1].split())
    return frozenset()


def cpu_has_fast_bf16() -> bool:
    """AMX or AVX512-BF16: bfloat16 matmuls run natively (about twice float32's speed)."""
    return bool(cpu_flags() & {"amx_bf16", "avx512_bf16"})
