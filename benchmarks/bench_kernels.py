"""The weight-only CPU kernels side by side on gemma3:270m's shapes (hidden 640,
intermediate 2048, vocab 262144) at 1, 4, 16 and 64 rows, in one run: float32 F.linear,
torch's packed kernels (bf16 activations; int4 in the layout torch packs on this CPU) and
ours (ollama_compact_server/modeling/csrc/ocs_cpu.c): the float-activation kernels over the
stored layouts ("f32 x") and the integer ones the daemon serves with, over the runtime
layouts, activations rounded to int8 per block of 32 ("int8 x"). On a CPU with
AVX512-VNNI those run ocs_vnni.c, and the AVX2 kernels are timed beside them.

    .venv/bin/python benchmarks/bench_kernels.py
"""

from __future__ import annotations

import sys
import time
from collections.abc import Callable
from pathlib import Path

import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from ollama_compact_server.compress import quant
from ollama_compact_server.modeling import cpu_kernels


def ms(fn: Callable[..., object], *args: object, repeat: int = 10) -> float:
    for _ in range(2):
        fn(*args)
    started = time.perf_counter()
    for _ in range(repeat):
        fn(*args)
    return (time.perf_counter() - started) / repeat * 1e3


def main() -> int:
    threads = torch.get_num_threads()
    lib = cpu_kernels.get()
    if lib is None:
        print(f"our kernels are unavailable here: {cpu_kernels.reason()}")
        return 1
    print(
        f"command: {' '.join(sys.argv)}  (torch {torch.__version__}, {threads} threads, "
        f"CPU capability {torch.backends.cpu.get_cpu_capability()})"
    )
    vnni = lib.ocs_set_isa(1) == 1
    print(f"served integer kernels: {'AVX512-VNNI' if vnni else 'AVX2'}")
    print(
        "| N x K | rows | f32 F.linear ms | int8 torch ms | int8 ours, f32 x | int8 ours, int8 x "
        "| int8 torch / served | int8 AVX2 / VNNI | int4 torch ms | int4 ours, f32 x "
        "| int4 ours, int8 x | int4 torch / served | int4 AVX2 / VNNI |"
    )
    print("|---|---|---|---|---|---|---|---|---|---|---|---|---|")
    torch.manual_seed(0)
    int8_mm, int4_mm = torch._weight_int8pack_mm, torch._weight_int4pack_mm_for_cpu
    for n, k in ((2048, 640), (640, 2048), (262144, 640)):
        w = torch.randn(n, k) * 0.02
        q8, s8 = quant.quantize_int8(w).values()
        s8f = s8.float()
        b8 = quant.block_int8(q8)
        s8p = torch.zeros(b8.shape[0] * quant.INT8_BLOCK_N)
        s8p[:n] = s8f
        t4 = quant.quantize_int4(w, 32)
        q4, sz4 = t4["qweight"], t4["scales_zeros"]
        b4 = quant.block_int4(q4)
        codes = quant.unpack_int4_rows(q4, torch.arange(q4.shape[0])).to(torch.int32)
        theirs = torch._convert_weight_to_int4pack_for_cpu(codes, 1)
        repeat = 3 if n > 100_000 else 20
        for batch in (1, 4, 16, 64):
            x = torch.randn(batch, k)
            xb = x.bfloat16()
            f32 = ms(F.linear, x, w, repeat=repeat)
            t8 = ms(int8_mm, xb, q8, s8, repeat=repeat)
            o8 = ms(cpu_kernels.int8_mm, lib, x, q8, s8f, repeat=repeat)
            i8 = ms(cpu_kernels.int8_blocked_mm, lib, x, b8, s8p, n, repeat=repeat)
            t4_ms = ms(int4_mm, xb, theirs, 32, sz4, repeat=repeat)
            o4 = ms(cpu_kernels.int4_mm, lib, x, q4, sz4, 32, n, repeat=repeat)
            i4 = ms(cpu_kernels.int4_blocked_mm, lib, x, b4, sz4, 32, n, repeat=repeat)
            v8 = v4 = "-"
            if vnni:  # the same products on the AVX2 kernels
                lib.ocs_set_isa(0)
                a8 = ms(cpu_kernels.int8_blocked_mm, lib, x, b8, s8p, n, repeat=repeat)
                a4 = ms(cpu_kernels.int4_blocked_mm, lib, x, b4, sz4, 32, n, repeat=repeat)
                lib.ocs_set_isa(1)
                v8, v4 = f"{a8 / i8:.2f}x", f"{a4 / i4:.2f}x"
            print(
                f"| {n} x {k} | {batch} | {f32:.3f} | {t8:.3f} | {o8:.3f} | {i8:.3f} "
                f"| {t8 / i8:.2f}x | {v8} | {t4_ms:.3f} | {o4:.3f} | {i4:.3f} "
                f"| {t4_ms / i4:.2f}x | {v4} |"
            )
    return 0


if __name__ == "__main__":
    sys.exit(main())
