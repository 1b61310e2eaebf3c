"""Host memory while loading a registry model the way the engine does (one process per
dtype, so each peak is its own): weights bytes, resident memory before and after, and the
process's peak resident memory.

    .venv/bin/python benchmarks/bench_load.py [--registry DIR] [--model NAME] [--dtypes float32,bfloat16]
"""

from __future__ import annotations

import argparse
import resource
import subprocess
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent


def rss_mib() -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) // 1024
    return -1


def measure(registry_dir: Path, model: str, dtype_name: str) -> None:
    import torch

    from ollama_compact_server.modeling.loader import load_causal_lm
    from ollama_compact_server.registry.store import Registry

    registry = Registry(registry_dir)
    record = registry.get(model)
    before = rss_mib()
    started = time.perf_counter()
    loaded = load_causal_lm(registry, record, dtype=getattr(torch, dtype_name))
    seconds = time.perf_counter() - started
    after = rss_mib()
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss // 1024  # KiB on Linux
    weights = sum(p.numel() * p.element_size() for p in loaded.parameters()) >> 20
    files = record.size >> 20
    print(
        f"| {dtype_name} | {files} | {weights} | {before} | {after} | {peak} | "
        f"{peak - before} | {seconds:.1f} |",
        flush=True,
    )


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--registry", type=Path, default=REPO / ".cache" / "test-registry")
    parser.add_argument("--model", default="gemma3:270m")
    parser.add_argument("--dtypes", default="float32,bfloat16")
    parser.add_argument("--one", default=None, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.one:
        measure(args.registry, args.model, args.one)
        return 0
    print(f"command: {' '.join(sys.argv)}")
    print("| dtype | registry MiB | weights MiB | RSS before | RSS after | peak RSS | peak - before | load s |")
    print("|---|---|---|---|---|---|---|---|")
    for dtype in args.dtypes.split(","):
        subprocess.run(
            [sys.executable, __file__, "--registry", str(args.registry), "--model", args.model,
             "--one", dtype],
            check=True,
        )  # fmt: skip
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
