"""Why fixed slots with views: one decode step's time when the running sequences' K/V are
read as views of contiguous slots (what the engine does) against the same step when they
must be gathered from scattered slots each step (what a paged or compact-on-read cache
pays), on gemma3:270m, in one run.

    .venv/bin/python benchmarks/bench_kv.py [--registry .cache/test-registry] [--dtype bfloat16]
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import torch

from ollama_compact_server.engine.provider import RegistryProvider
from ollama_compact_server.engine.runner import ModelRunner
from ollama_compact_server.registry.store import Registry


def step_ms(runner: ModelRunner, slots: list[int], length: int, steps: int = 12) -> float:
    tokens = [5] * len(slots)
    positions = [length] * len(slots)
    for _ in range(2):
        runner.decode(slots, tokens, positions)
    started = time.perf_counter()
    for _ in range(steps):
        runner.decode(slots, tokens, positions)
    return (time.perf_counter() - started) / steps * 1000


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--registry", default=".cache/test-registry")
    parser.add_argument("--model", default="gemma3:270m")
    parser.add_argument("--dtype", default="bfloat16", choices=["float32", "bfloat16"])
    args = parser.parse_args()
    dtype = getattr(torch, args.dtype)
    loaded = RegistryProvider(Registry(Path(args.registry)), torch.device("cpu"), dtype)(args.model)
    print(f"command: {' '.join(sys.argv)}")
    print(f"{'batch':>5} {'context':>7} {'views ms':>9} {'gathered ms':>11} {'ratio':>6}")
    for batch, length in ((16, 256), (16, 1024), (64, 256), (64, 1024)):
        runner = ModelRunner(
            loaded.model,
            slots=2 * batch,
            capacity=length + 8,
            dtype=dtype,
            device=torch.device("cpu"),
        )
        for _ in range(2 * batch):
            runner.cache.allocate()
        contiguous = list(range(batch))
        scattered = list(range(0, 2 * batch, 2))  # every other slot: K/V must be gathered
        views = step_ms(runner, contiguous, length)
        gathered = step_ms(runner, scattered, length)
        print(f"{batch:>5} {length:>7} {views:>9.1f} {gathered:>11.1f} {gathered / views:>6.2f}")
        del runner
    return 0


if __name__ == "__main__":
    sys.exit(main())
