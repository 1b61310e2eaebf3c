"""Our weight-only int8 / int4 CPU kernels (``csrc/ocs_cpu.c``, AVX2 + FMA, with
``csrc/ocs_vnni.c`` chosen at run time on CPUs with AVX512-VNNI): compiled once
with the system's C compiler into a cache folder, loaded with ctypes, used by the
compressed linears on CPU. Where they cannot be had (no compiler, no AVX2, another CPU
architecture, ``OCS_CPU_KERNELS=off``) the modules keep torch's packed kernels.

Why our own: on a 2-core AVX2 machine torch's ``_weight_int8pack_mm`` takes 24-36 ms for
gemma3:270m's output head at one row (it converts to bf16 and is bound by that), where
reading the 168 MB of int8 weights takes about 9 ms; this kernel takes 12-14 ms
(benchmarks/bench_kernels.py). llama.cpp's single stream is fast for the same reason: a
SIMD kernel that keeps up with memory.

The library is plain C (no torch headers: it compiles in about a second) with OpenMP
threads; in a process that has imported torch it binds to torch's own libgomp (the same
soname), so its threads are the calling thread's torch pool, not a second pool competing
for the cores. Every output element is computed the same way whatever the batch, so a
request's result does not depend on what else is in the batch.
"""

from __future__ import annotations

import ctypes
import hashlib
import logging
import os
import platform
import shutil
import subprocess
import tempfile
import threading
from pathlib import Path
from typing import Any

import torch

log = logging.getLogger(__name__)

CSRC = Path(__file__).resolve().parent / "csrc"
SOURCES = (CSRC / "ocs_cpu.c", CSRC / "ocs_decode.c", CSRC / "ocs_vnni.c")
HEADERS = (CSRC / "ocs.h",)
ABI_VERSION = 6
FLAGS = ("-O3", "-mavx2", "-mfma", "-mf16c", "-fopenmp", "-fPIC", "-shared", "-std=c11")
COMPILE_TIMEOUT = 120.0
INT4_MAX_GROUP = 256
# ocs_isa(): which kernels the blocked int8 / int4 products run (ocs_vnni.c where the CPU
# has AVX512-VNNI: 1.7-2.9x the AVX2 ones at 16-64 rows, the same bits)
ISA_NAMES = {0: "AVX2", 1: "AVX512-VNNI"}

_P = ctypes.c_void_p
_I = ctypes.c_int64
_C = ctypes.c_int

_lock = threading.Lock()
_state: dict[str, Any] = {"tried": False, "lib": None, "why": ""}
# set by the daemon from its settings (configure); library users get the environment's
_config: dict[str, Any] = {"enabled": None, "cache": None}


def configure(enabled: bool, cache: Path | None) -> None:
    """The daemon's settings (OCS_CPU_KERNELS, OCS_KERNEL_CACHE), before any model loads."""
    with _lock:
        _config.update(enabled=enabled, cache=cache)
        _state.update(tried=False, lib=None, why="")


def cache_dir() -> Path:
    """Where compiled kernels are kept: OCS_KERNEL_CACHE, else under the user's cache."""
    configured = _config["cache"] or os.environ.get("OCS_KERNEL_CACHE")
    if configured:
        return Path(configured).expanduser()
    base = os.environ.get("XDG_CACHE_HOME") or str(Path.home() / ".cache")
    return Path(base) / "ollama-compact" / "kernels"


def enabled() -> bool:
    if _config["enabled"] is not None:
        return bool(_config["enabled"])
    return os.environ.get("OCS_CPU_KERNELS", "true").strip().lower() not in ("off", "0", "false")


def cpu_supported() -> tuple[bool, str]:
    if platform.machine().lower() not in ("x86_64", "amd64"):
        return False, f"no kernels for {platform.machine()} CPUs"
    capability = str(torch.backends.cpu.get_cpu_capability())
    if "AVX2" not in capability and "AVX512" not in capability:
        return False, f"the CPU lacks AVX2 (torch reports {capability})"
    return True, ""


def _compiler() -> str | None:
    for candidate in (os.environ.get("CC"), "cc", "gcc", "clang"):
        if candidate and shutil.which(candidate):
            return candidate
    return None


def _library_path() -> Path:
    """Named by the sources and flags (not the compiler), so a library built ahead (as the
    Docker image does) is found on a machine without a compiler."""
    source = b"".join(path.read_bytes() for path in (*SOURCES, *HEADERS))
    key = hashlib.sha256(source + " ".join(FLAGS).encode()).hexdigest()[:16]
    return cache_dir() / f"libocs_cpu-{ABI_VERSION}-{key}.so"


def _build(compiler: str, target: Path) -> None:
    """Compiles into a temporary file beside ``target``, then renames it into place: a
    half-written library is never loaded, and concurrent builds do not collide."""
    target.parent.mkdir(parents=True, exist_ok=True, mode=0o700)
    fd, scratch = tempfile.mkstemp(prefix=".build-", suffix=".so", dir=target.parent)
    os.close(fd)
    try:
        result = subprocess.run(
            [compiler, *FLAGS, *map(str, SOURCES), "-o", scratch, "-lm"],
            capture_output=True,
            text=True,
            timeout=COMPILE_TIMEOUT,
            check=False,
        )
        if result.returncode != 0:
            raise RuntimeError(result.stderr.strip().splitlines()[-1:] or ["compiler failed"])
        os.replace(scratch, target)
    finally:
        if os.path.exists(scratch):
            os.unlink(scratch)


def _bind(lib: ctypes.CDLL) -> ctypes.CDLL:
    lib.ocs_abi_version.restype = _C
    if lib.ocs_abi_version() != ABI_VERSION:
        raise RuntimeError("kernel library of another version")
    lib.ocs_w8_mm.restype = None
    lib.ocs_w8_mm.argtypes = [_P, _I, _I, _I, _P, _P, _I, _P, _I, _C]
    lib.ocs_b8_mm.restype = _C
    lib.ocs_b8_mm.argtypes = [_P, _I, _I, _I, _P, _P, _I, _P, _I, _C]
    lib.ocs_w4_mm.restype = _C
    lib.ocs_b4_mm.restype = _C
    lib.ocs_b4_mm.argtypes = [_P, _I, _I, _I, _P, _P, _I, _I, _I, _P, _I, _C]
    lib.ocs_w4_mm.argtypes = [_P, _I, _I, _I, _P, _P, _I, _I, _I, _P, _P, _I, _C]
    lib.ocs_isa.restype = _C
    lib.ocs_isa.argtypes = []
    lib.ocs_set_isa.restype = _C
    lib.ocs_set_isa.argtypes = [_C]
    lib.ocs_decode_scratch.restype = _I
    lib.ocs_decode_scratch.argtypes = [_P, _I, _C]
    lib.ocs_decode_layer.restype = _C
    lib.ocs_decode_layer.argtypes = [_P, _P, _I, _P, _P, _P, _P, _P, _C]
    lib.ocs_decode_head.restype = _C
    lib.ocs_decode_head.argtypes = [_P, _P, ctypes.c_float, _P, _I, _I, _P, _P, _C]
    return lib


def get() -> ctypes.CDLL | None:
    """The kernel library, built and loaded on the first call (about a second; later
    processes load the cached build); None where it cannot be had (logged once)."""
    if _state["tried"]:
        return _state["lib"]
    with _lock:
        if _state["tried"]:
            return _state["lib"]
        lib, why = None, ""
        try:
            lib = _load()
        except Exception as exc:  # any failure means torch's kernels, never a crash
            why = f"{exc.__class__.__name__}: {exc}"
        if lib is None and why:
            log.warning("CPU int8/int4 kernels unavailable (%s); using torch's", why)
        _state.update(tried=True, lib=lib, why=why)
        return lib


def _load() -> ctypes.CDLL | None:
    if not enabled():
        _state["why"] = "turned off (OCS_CPU_KERNELS=false)"
        return None
    supported, why = cpu_supported()
    if not supported:
        raise RuntimeError(why)
    target = _library_path()
    if not target.is_file():
        compiler = _compiler()
        if compiler is None:
            raise RuntimeError("no C compiler (cc, gcc or clang) found")
        log.info("compiling the CPU kernels into %s", target)
        _build(compiler, target)
    lib = _bind(ctypes.CDLL(str(target)))
    _self_test(lib)
    log.info("CPU kernels: %s integer products", ISA_NAMES[lib.ocs_isa()])
    return lib


def _self_test(lib: ctypes.CDLL) -> None:
    """Both kernels against a float32 reference on a small random problem: a library that
    disagrees (a miscompiled build, a CPU that misreports) is refused, not served."""
    from ..compress import quant

    generator = torch.Generator().manual_seed(0)
    w = torch.randn(130, 96, generator=generator)
    x = torch.randn(5, 96, generator=generator)
    t8 = quant.quantize_int8(w)
    scales = t8["scales"].float()
    expected = x @ (t8["qweight"].float() * scales[:, None]).t()
    got = int8_mm(lib, x, t8["qweight"], scales)
    padded = torch.zeros(-(-130 // quant.INT8_BLOCK_N) * quant.INT8_BLOCK_N)
    padded[:130] = scales
    got8b = int8_blocked_mm(lib, x, quant.block_int8(t8["qweight"]), padded, 130)
    expected8b = blocked_int8_reference(x, t8["qweight"], scales)
    t4 = quant.quantize_int4(w, 32)
    expected4 = x @ quant.dequantize_int4(t4, 130).t()
    got4 = int4_mm(lib, x, t4["qweight"], t4["scales_zeros"], 32, 130)
    for name, a, b in (
        ("int8", got, expected),
        ("int8b", got8b, expected8b),
        ("int4", got4, expected4),
    ):
        error = float((a - b).abs().max() / b.abs().max())
        if not error < 1e-4:
            raise RuntimeError(f"the {name} kernel disagrees with its reference ({error:.2g})")


def reason() -> str:
    """Why the kernels are not in use ("" when they are or were not tried yet)."""
    return str(_state["why"])


def reset() -> None:
    """Forgets the loaded library and any configure() (tests)."""
    with _lock:
        _state.update(tried=False, lib=None, why="")
        _config.update(enabled=None, cache=None)


# ------------------------------------------------------------------------------ calls


def int8_mm(lib: ctypes.CDLL, x: torch.Tensor, qweight: torch.Tensor, scales: torch.Tensor):
    """x [M, K] float32 contiguous, qweight int8 [N, K], scales float32 [N] -> [M, N]."""
    m, k = x.shape
    n = qweight.shape[0]
    out = torch.empty((m, n), dtype=torch.float32)
    lib.ocs_w8_mm(
        x.data_ptr(),
        m,
        k,
        k,
        qweight.data_ptr(),
        scales.data_ptr(),
        n,
        out.data_ptr(),
        n,
        torch.get_num_threads(),
    )
    return out


def quantize_activations(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """What the blocked int8 kernel does to x [M, K] first: per row, blocks of 32 columns
    (zero padded) to int8 codes with one scale each -> (codes [M, Kp] float, scales
    [M, Kp / 32]); codes * scales approximates x."""
    m, k = x.shape
    kpad = -(-k // 32) * 32
    padded = torch.zeros((m, kpad), dtype=torch.float32)
    padded[:, :k] = x.float()
    blocks = padded.view(m, kpad // 32, 32)
    top = blocks.abs().amax(dim=-1)
    inv = torch.where(top > 0, 127.0 / top, torch.zeros_like(top))
    codes = torch.round(blocks * inv[..., None])
    return codes.view(m, kpad), top / 127.0


def blocked_int8_reference(
    x: torch.Tensor, qweight: torch.Tensor, scales: torch.Tensor
) -> torch.Tensor:
    """The blocked int8 kernel's result computed by torch, in float64: x quantized as
    quantize_activations does, exact integer block sums, times the scales."""
    codes, d = quantize_activations(x)
    m, kpad = codes.shape
    n, k = qweight.shape
    w = torch.zeros((n, kpad), dtype=torch.float64)
    w[:, :k] = qweight.double()
    sums = torch.einsum("mbk,nbk->mnb", codes.double().view(m, -1, 32), w.view(n, -1, 32))
    return (sums * d.double()[:, None, :]).sum(-1) * scales.double()


def blocked_int4_reference(
    x: torch.Tensor, codes: torch.Tensor, scales: torch.Tensor, zeros: torch.Tensor
) -> torch.Tensor:
    """The blocked int4 kernel's result computed by torch, in float64: codes [N, K] in
    0..15, scales and zeros [N, K/G]; x quantized as quantize_activations does for the
    code products, its float group sums for the -8 and zero terms."""
    q, d = quantize_activations(x)
    m, k = x.shape
    n, groups = scales.shape
    g = k // groups
    sums = torch.einsum("mbk,nbk->mnb", q.double().view(m, -1, 32), codes.double().view(n, -1, 32))
    acc = (sums * d.double()[:, None, :]).view(m, n, groups, g // 32).sum(-1)  # [M, N, K/G]
    xs = x.double().view(m, groups, g).sum(-1)[:, None, :]  # [M, 1, K/G]
    s, z = scales.double()[None], zeros.double()[None]
    return (s * (acc - 8 * xs) + z * xs).sum(-1)


def int8_blocked_mm(
    lib: ctypes.CDLL, x: torch.Tensor, blocked: torch.Tensor, scales: torch.Tensor, n: int
) -> torch.Tensor:
    """x [M, K] float32 contiguous, blocked int8 [Npad / 64, Kp / 4, 64, 4] (see
    quant.block_int8), scales float32 [Npad] -> [M, n]. x is quantized per row in blocks
    of 32 columns on the way (see ocs_cpu.c)."""
    m, k = x.shape
    out = torch.empty((m, n), dtype=torch.float32)
    status = lib.ocs_b8_mm(
        x.data_ptr(),
        m,
        k,
        k,
        blocked.data_ptr(),
        scales.data_ptr(),
        n,
        out.data_ptr(),
        n,
        torch.get_num_threads(),
    )
    if status != 0:
        raise RuntimeError("out of memory: no room for the quantized activations")
    return out


def int4_mm(
    lib: ctypes.CDLL,
    x: torch.Tensor,
    packed: torch.Tensor,
    scales_zeros: torch.Tensor,
    group_size: int,
    out_features: int,
) -> torch.Tensor:
    """x [M, K] float32 contiguous; packed uint8 [Npad, K/2] (torch's CPU int4 layout);
    scales_zeros bf16 [K/G, Npad, 2] -> [M, out_features]."""
    m, k = x.shape
    npad = packed.shape[0]
    out = torch.empty((m, out_features), dtype=torch.float32)
    xsum = torch.empty((m, k // group_size), dtype=torch.float32)
    status = lib.ocs_w4_mm(
        x.data_ptr(),
        m,
        k,
        k,
        packed.data_ptr(),
        scales_zeros.data_ptr(),
        npad,
        out_features,
        group_size,
        xsum.data_ptr(),
        out.data_ptr(),
        out_features,
        torch.get_num_threads(),
    )
    if status != 0:
        raise ValueError(f"int4 kernel: unsupported group size {group_size}")
    return out


def int4_blocked_mm(
    lib: ctypes.CDLL,
    x: torch.Tensor,
    blocked: torch.Tensor,
    scales_zeros: torch.Tensor,
    group_size: int,
    out_features: int,
) -> torch.Tensor:
    """x [M, K] float32 contiguous; blocked uint8 [Npad / 64, K / 8, 64, 4] (see
    quant.block_int4); scales_zeros bf16 [K/G, Npad, 2] -> [M, out_features]. x is
    quantized per row in blocks of 32 columns on the way (see ocs_cpu.c)."""
    m, k = x.shape
    out = torch.empty((m, out_features), dtype=torch.float32)
    status = lib.ocs_b4_mm(
        x.data_ptr(),
        m,
        k,
        k,
        blocked.data_ptr(),
        scales_zeros.data_ptr(),
        blocked.shape[0] * blocked.shape[2],  # Npad: blocks x 64 rows
        out_features,
        group_size,
        out.data_ptr(),
        out_features,
        torch.get_num_threads(),
    )
    if status != 0:
        raise RuntimeError("out of memory: no room for the quantized activations")
    return out
