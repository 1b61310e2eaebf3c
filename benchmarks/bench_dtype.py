"""bfloat16 against float32 for our engine on gemma3:270m, in one run: aggregate tok/s at
1 and 16 concurrent requests, and each dtype's greedy continuation of one prompt (to see
that bfloat16 stays sensible). This is the measurement behind OCS_DTYPE=auto on CPU.

    .venv/bin/python benchmarks/bench_dtype.py [--registry .cache/test-registry]
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))

from bench_engine import STORY_OPENINGS, bench_engine, load, open_registry


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--registry", type=Path, default=Path(".cache/test-registry"))
    parser.add_argument("--model", default="gemma3:270m")
    parser.add_argument("--new-tokens", type=int, default=48)
    args = parser.parse_args()
    registry = open_registry(args.registry, args.model)
    print(f"command: {' '.join(sys.argv)}")
    rates: dict[str, dict[int, float]] = {}
    for dtype in (torch.float32, torch.bfloat16):
        loaded = load(registry, args.model, dtype)
        prompts = [loaded.tokenizer(p)["input_ids"] for p in STORY_OPENINGS]
        results, _ = bench_engine(
            loaded, args.model, dtype, prompts, [1, 16], 16, args.new_tokens, 512, 256
        )
        name = str(dtype).removeprefix("torch.")
        rates[name] = {r.concurrency: r.tokens_per_s for r in results}
        ids = loaded.tokenizer("Once upon a time", return_tensors="pt")
        out = loaded.model.generate(**ids, max_new_tokens=20, do_sample=False)
        text = loaded.tokenizer.decode(out[0, ids["input_ids"].shape[1] :])
        print(
            f"{name:>9}: C=1 {rates[name][1]:6.1f} tok/s  C=16 {rates[name][16]:6.1f} tok/s  "
            f"greedy: {text!r}"
        )
        del loaded
    for c in (1, 16):
        print(f"bfloat16 / float32 at C={c}: {rates['bfloat16'][c] / rates['float32'][c]:.2f}x")
    return 0


if __name__ == "__main__":
    sys.exit(main())
