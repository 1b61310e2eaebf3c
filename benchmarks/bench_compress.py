"""Compressed gemma3:270m against its float32 import, in one run: bytes on disk and resident,
perplexity on held-out text (benchmarks/data/heldout.txt, never used for calibration), and
engine tokens/s at 1 and 16 concurrent requests.

    .venv/bin/python benchmarks/bench_compress.py [--schemes int8,int4,...] [--registry DIR]

The parent model's blobs are hard-linked into a scratch registry, so the source registry is
never written to.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))

from bench_engine import STORY_OPENINGS, bench_engine, load, open_registry, say

HELDOUT = Path(__file__).resolve().parent / "data" / "heldout.txt"


def scratch_registry(source: Any, model: str, root: Path) -> Any:
    from ollama_compact_server.registry.store import Registry

    registry = Registry(root)
    record = source.get(model)
    for digest in record.manifest.digests():
        path = registry.blobs.path(digest)
        path.parent.mkdir(parents=True, exist_ok=True)
        if not path.exists():
            os.link(source.blobs.path(digest), path)
    registry.write_manifest(model, record.manifest)
    return registry


def perplexity(model: Any, tokenizer: Any, text: str) -> float:
    ids = tokenizer(text, return_tensors="pt")["input_ids"]  # [1, T]
    with torch.no_grad():
        loss = model(input_ids=ids, labels=ids).loss
    return math.exp(float(loss))


def resident_bytes(model: Any) -> int:
    seen: dict[int, int] = {}
    for tensor in [*model.parameters(), *model.buffers()]:
        seen[tensor.data_ptr()] = tensor.numel() * tensor.element_size()
    return sum(seen.values())


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--registry", type=Path, default=Path(".cache/test-registry"))
    parser.add_argument("--model", default="gemma3:270m")
    parser.add_argument("--schemes", default="int8,int4,mixed,nf4,int2,lowrank,prune")
    parser.add_argument("--options", default="{}", help='JSON: {"scheme": {options}}')
    parser.add_argument("--new-tokens", type=int, default=32)
    args = parser.parse_args()
    print(f"command: {' '.join(sys.argv)}")
    options = json.loads(args.options)
    text = HELDOUT.read_text(encoding="utf-8")
    source = open_registry(args.registry, args.model)
    from ollama_compact_server.jobs.compressing import compress_registry_model

    rows = []
    with tempfile.TemporaryDirectory(prefix="ocs-bench-") as scratch:
        registry = scratch_registry(source, args.model, Path(scratch) / "registry")
        names = [("float32", args.model, 0.0)]
        for scheme in [s for s in args.schemes.split(",") if s]:
            started = time.perf_counter()
            name = f"{args.model}-{scheme.lower()}"
            compress_registry_model(registry, args.model, name, scheme, options.get(scheme))
            names.append((scheme, name, time.perf_counter() - started))
            say(f"compressed {scheme} in {names[-1][2]:.0f}s")
        for label, name, seconds in names:
            record = registry.get(name)
            disk = sum(
                layer.size
                for layer in record.manifest.layers
                if layer.filename and layer.filename.endswith(".safetensors")
            )
            loaded = load(registry, name, torch.float32)
            ppl = perplexity(loaded.model, loaded.tokenizer, text)
            resident = resident_bytes(loaded.model)
            prompts = [loaded.tokenizer(p)["input_ids"] for p in STORY_OPENINGS]
            results, _ = bench_engine(
                loaded, name, torch.float32, prompts, [1, 16], 16, args.new_tokens, 512, 256
            )
            rates = {r.concurrency: r.tokens_per_s for r in results}
            ids = loaded.tokenizer("Once upon a time", return_tensors="pt")
            out = loaded.model.generate(**ids, max_new_tokens=12, do_sample=False)
            greedy = loaded.tokenizer.decode(out[0, ids["input_ids"].shape[1] :])
            rows.append((label, disk, resident, ppl, rates[1], rates[16], seconds, greedy))
            say(f"{label}: ppl {ppl:.2f} C=1 {rates[1]:.1f} C=16 {rates[16]:.1f} {greedy!r}")
            del loaded
    base = rows[0]
    print(
        "| scheme | disk MB | disk vs f32 | resident MB | resident vs f32 | ppl | ppl vs f32 "
        "| tok/s C=1 | vs f32 | tok/s C=16 | vs f32 | compress s | greedy |"
    )
    print("|" + "---|" * 13)
    for label, disk, resident, ppl, one, many, seconds, greedy in rows:
        print(
            f"| {label} | {disk / 1e6:.0f} | {disk / base[1]:.0%} | {resident / 1e6:.0f} | "
            f"{resident / base[2]:.0%} | {ppl:.2f} | {ppl / base[3] - 1:+.1%} | {one:.1f} | "
            f"{one / base[4]:.2f}x | {many:.1f} | {many / base[5]:.2f}x | {seconds:.0f} | "
            f"{greedy!r} |"
        )
    return 0


if __name__ == "__main__":
    sys.exit(main())
