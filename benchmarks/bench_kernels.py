"""torch's packed weight-only CPU kernels against float32 F.linear, on gemma3:270m's shapes
(hidden 640, intermediate 2048, vocab 262144) at batch 1 and 16: why the runtime modules feed
them bf16 activations.

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


def ms(fn: Callable[..., object], *args: object, repeat: int = 10) -> float:
    for _ in range(2):
        fn(*args)
    started = time.perf_counter()
    for _ in range(repeat):
        fn(*args)
    return (time.perf_counter() - started) / repeat * 1e3


def main() -> int:
    threads = torch.get_num_threads()
    print(f"command: {' '.join(sys.argv)}  (torch {torch.__version__}, {threads} threads)")
    print(
        "| N x K | batch | f32 F.linear ms | int8, f32 x | int8, bf16 x "
        "| int4, f32 x | int4, bf16 x |"
    )
    print("|---|---|---|---|---|---|---|")
    torch.manual_seed(0)
    int8_mm, int4_mm = torch._weight_int8pack_mm, torch._weight_int4pack_mm_for_cpu
    for n, k in ((2048, 640), (640, 2048), (262144, 640)):
        w = torch.randn(n, k) * 0.02
        q8, s8 = quant.quantize_int8(w).values()
        q4, sz4 = quant.quantize_int4(w, 32).values()
        for batch in (1, 16):
            x = torch.randn(batch, k)
            xb = x.bfloat16()
            row = [
                ms(F.linear, x, w),
                ms(int8_mm, x, q8, s8.float()),
                ms(int8_mm, xb, q8, s8),
                ms(int4_mm, x, q4, 32, sz4.float()),
                ms(int4_mm, xb, q4, 32, sz4),
            ]
            print(f"| {n} x {k} | {batch} | " + " | ".join(f"{v:.3f}" for v in row) + " |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
