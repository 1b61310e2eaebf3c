"""Chooses the device and dtype from the settings: auto picks CUDA when present, and the
faster dtype that keeps greedy output sensible (bfloat16 where the hardware multiplies it
natively, see docs/PERFORMANCE.md)."""

from __future__ import annotations

import torch

from ..compress.schemes import recorded
from ..modeling.hardware import cpu_has_fast_bf16
from .types import EngineError

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


def resolve_device(setting: str) -> torch.device:
    if setting == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    device = torch.device(setting)
    if device.type == "cuda":
        if torch.version.cuda is None:  # e.g. a CUDA image built without the CUDA wheels
            raise EngineError(
                f"OCS_DEVICE={setting}: no CUDA device (torch {torch.__version__} is a CPU build)"
            )
        if not torch.cuda.is_available():
            raise EngineError(f"OCS_DEVICE={setting}: no CUDA device is available")
        if device.index is not None and device.index >= torch.cuda.device_count():
            raise EngineError(
                f"OCS_DEVICE={setting}: only {torch.cuda.device_count()} CUDA device(s) present"
            )
    return device


def resolve_dtype(setting: str, device: torch.device) -> torch.dtype:
    if setting != "auto":
        return DTYPES[setting]
    if device.type == "cuda":
        return torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16
    return torch.bfloat16 if cpu_has_fast_bf16() else torch.float32


def integer_scheme(scheme: str | None) -> bool:
    """Whether our integer CPU kernels serve models of ``scheme`` (its handler says)."""
    handler = recorded(scheme)
    return handler is not None and handler.integer


def model_dtype(setting: str, device: torch.device, scheme: str | None) -> torch.dtype:
    """The dtype one model serves in (``scheme``: its compression scheme, None for a float
    model). ``auto`` on the CPU gives int8 / int4 models float32: our integer kernels and the
    C decode step take float32 activations, and in bfloat16 the same model leaves the C
    step for torch's modules (gemma3:270m as imported, one stream on an AVX512-BF16 box:
    42.6 tok/s in bfloat16 against 66.3 in float32, benchmarks/bench_servers.py). Float
    models get :func:`resolve_dtype`'s choice (bfloat16 where the CPU has it natively)."""
    if setting == "auto" and device.type == "cpu" and integer_scheme(scheme):
        return torch.float32
    return resolve_dtype(setting, device)


def dtype_name(dtype: torch.dtype) -> str:
    return {v: k for k, v in DTYPES.items()}[dtype]


def planned_dtype(setting: str, device: str, scheme: str | None = None) -> str:
    """The serving dtype's name for a plan made away from the device: the setting, or what
    auto would pick there (bfloat16 on CUDA, as on any card since Ampere; on the CPU what
    :func:`model_dtype` picks on this machine for a model of ``scheme``)."""
    if setting != "auto":
        return setting
    if device.startswith("cuda"):
        return "bfloat16"
    return dtype_name(model_dtype("auto", torch.device("cpu"), scheme))


# glibc's mallopt parameters (malloc.h)
_M_TRIM_THRESHOLD = -1
_M_MMAP_THRESHOLD = -3
KEEP_FREED_BYTES = 256 << 20


def keep_freed_memory() -> bool:
    """Lets glibc's malloc serve allocations up to 256 MiB from its heap and keep up to
    512 MiB freed there, instead of mapping fresh pages for each large one. A decode step
    of 64 rows of gemma3:270m allocates 67 MB of logits: as a fresh mapping, touching it
    costs about 37 ms of page faults, reused it costs 5 ms (same box, in one run). The
    price is a resident size that shrinks less after a model unloads (what stays is reused
    by the next). False where the C library is not glibc (nothing changes there)."""
    import ctypes
    import ctypes.util

    name = ctypes.util.find_library("c")
    if not name:
        return False
    try:
        libc = ctypes.CDLL(name)
        mallopt = libc.mallopt
    except (OSError, AttributeError):  # not glibc (musl, macOS): no mallopt
        return False
    mallopt.argtypes = [ctypes.c_int, ctypes.c_int]
    mallopt.restype = ctypes.c_int
    mmap_ok = mallopt(_M_MMAP_THRESHOLD, KEEP_FREED_BYTES) == 1
    trim_ok = mallopt(_M_TRIM_THRESHOLD, 2 * KEEP_FREED_BYTES) == 1
    return mmap_ok and trim_ok
