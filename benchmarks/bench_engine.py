"""Throughput of our engine against Hugging Face ``generate``, side by side, in one run.

What it measures, on the real model ``gemma3:270m`` from a local registry (imported from the
bundled package on first use, which takes about a minute):

1. **Our engine** (``DeviceLoop`` + ``LocalEngine``, in-process, no HTTP): for each
   concurrency C (default 1, 4, 16, 64) it serves ``max(C, R)`` requests (R = ``--requests``,
   default 16) with C of them in flight at any time, and reports the aggregate generated
   tokens per second (all tokens / wall time) and the time to first token, p50 and p99
   (from the moment a request is submitted to its first token).
2. **HF generate, sequential**: the same R requests, one ``generate`` call after another,
   batch size 1, on the same model object (in the engine's dtype).
3. **HF generate, static batch**: the same R prompts as one left-padded batch, in float32
   and in the engine's dtype (once, if that is float32).

Every request is greedy (temperature 0, repeat penalty 1.0) and produces exactly
``--new-tokens`` tokens (default 64): HF runs with ``min_new_tokens == max_new_tokens`` and
the engine runs with no end-of-sequence ids, so every system generates the same amount of
work. Prompts are short story openings, cycled. Each system is warmed up with one short
request before it is timed, and HF never runs while the engine's loop is alive.

The "= HF seq" column counts the requests whose generated tokens equal HF sequential greedy
output for the same prompt (same dtype); in bfloat16, batched arithmetic may legitimately
diverge after a few tokens, so it is a sanity check, not a pass/fail.

Run it from the repository root::

    .venv/bin/python benchmarks/bench_engine.py                  # full run, several minutes
    .venv/bin/python benchmarks/bench_engine.py --quick          # smoke run (C=1,4; 4 requests)
    .venv/bin/python benchmarks/bench_engine.py --dtype float32 --concurrency 1,8,32 \\
        --new-tokens 128 --json results.json

Options: ``--registry PATH`` (default ``.cache/test-registry``), ``--model NAME``,
``--dtype float32|bfloat16`` (default bfloat16), ``--concurrency 1,4,16,64``,
``--requests 16``, ``--new-tokens 64``, ``--capacity 512`` (KV tokens per slot),
``--prefill-chunk 256``, ``--threads N`` (torch threads), ``--quick``, ``--json OUT``.
"""

from __future__ import annotations

import argparse
import asyncio
import copy
import gc
import json
import os
import platform
import shlex
import sys
import time
from collections.abc import Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import torch

STORY_OPENINGS = [
    "Once upon a time, in a village at the edge of a dark forest, there lived a girl who",
    "The lighthouse keeper had not seen a ship in forty years, until one stormy night",
    "On the morning of her twelfth birthday, Mira found a key under her pillow that",
    "Nobody in the city remembered when the clocks had stopped, but the old baker",
    "The dragon was tired of guarding gold, so one spring it decided to",
    "Captain Reyes read the message twice before she understood that the ship",
    "Deep beneath the ocean, a small robot woke up and realized that",
    "The last train out of the valley left at midnight, and Tom was running late because",
    "In the year 3021, the first human born on Mars looked up at the sky and",
    "My grandmother always said the attic was haunted, but when I finally climbed up",
    "The wizard's apprentice spilled the potion, and within seconds the cat",
    "Every winter the wolves came down from the mountains, but this year",
    "The detective stared at the empty room; the painting was gone and",
    "When the circus arrived in town, a boy named Leo snuck into the tent and",
    "The queen had one rule for her kingdom: no one may sing after dark. Then",
    "A letter with no return address arrived at the farmhouse, and inside it",
]

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16}
WARMUP_PROMPT = "Hello"
WARMUP_TOKENS = 4


# ------------------------------------------------------------------------------ results


@dataclass
class Result:
    system: str
    dtype: str
    concurrency: int
    requests: int
    tokens: int
    seconds: float
    tokens_per_s: float
    ttft_p50_ms: float | None = None
    ttft_p99_ms: float | None = None
    matches_hf_sequential: int | None = None  # requests equal to HF sequential greedy output


def percentile(values: Sequence[float], q: float) -> float:
    """The q-th quantile (0..1) with linear interpolation (numpy's default)."""
    ordered = sorted(values)
    if not ordered:
        return float("nan")
    k = (len(ordered) - 1) * q
    low = int(k)
    high = min(low + 1, len(ordered) - 1)
    return ordered[low] + (ordered[high] - ordered[low]) * (k - low)


def make_result(
    system: str,
    dtype: str,
    concurrency: int,
    tokens: int,
    requests: int,
    seconds: float,
    ttfts: Sequence[float] = (),
) -> Result:
    return Result(
        system=system,
        dtype=dtype,
        concurrency=concurrency,
        requests=requests,
        tokens=tokens,
        seconds=seconds,
        tokens_per_s=tokens / seconds if seconds > 0 else float("nan"),
        ttft_p50_ms=percentile(ttfts, 0.50) * 1000 if ttfts else None,
        ttft_p99_ms=percentile(ttfts, 0.99) * 1000 if ttfts else None,
    )


def say(message: str) -> None:
    print(f"[bench] {message}", file=sys.stderr, flush=True)


# ------------------------------------------------------------------------------ setup


def on_fresh_thread(fn: Any, *args: Any) -> Any:
    """Runs torch work on a thread that exits afterwards, as the daemon does: a thread
    that lives on keeps an OpenMP pool, and with more pooled threads than CPUs libgomp stops
    spinning in every pool, which slows the engine's device thread (see
    ollama_compact_server/threads.py). Every system here is measured that way."""
    from ollama_compact_server.threads import run_on_fresh_thread

    return run_on_fresh_thread(fn, *args).result()


def load(registry: Any, model: str, dtype: torch.dtype) -> Any:
    from ollama_compact_server.engine.provider import RegistryProvider

    started = time.perf_counter()
    loaded = on_fresh_thread(RegistryProvider(registry, torch.device("cpu"), dtype), model)
    say(
        f"loaded {model} in {str(dtype).removeprefix('torch.')} in "
        f"{time.perf_counter() - started:.1f}s"
    )
    return loaded


def open_registry(path: Path, model: str) -> Any:
    from ollama_compact_server.registry.store import Registry

    registry = Registry(path)
    if not registry.exists(model):
        from ollama_compact_server.jobs.default_model import (
            DEFAULT_NAME,
            ensure_default_model,
        )

        if model != DEFAULT_NAME:
            raise SystemExit(f"model {model!r} is not in the registry at {path}")
        say(f"{model} is not in {path}; importing it from the bundled package (about a minute)")
        on_fresh_thread(ensure_default_model, registry)
    return registry


# ------------------------------------------------------------------------------ our engine


async def engine_round(
    engine: Any,
    model: str,
    prompts: list[list[int]],
    concurrency: int,
    new_tokens: int,
    tag: str,
) -> tuple[list[list[int]], list[float], float]:
    """Serves every prompt with at most ``concurrency`` requests in flight; returns each
    request's tokens, each request's time to first token, and the wall time."""
    from ollama_compact_server.engine.types import GenerateRequest, SamplingParams

    outputs: list[list[int]] = [[] for _ in prompts]
    ttfts: list[float] = [0.0] * len(prompts)
    pending = iter(range(len(prompts)))  # shared by the workers: each takes the next index

    async def worker() -> None:
        for i in pending:
            params = SamplingParams(temperature=0.0, repeat_penalty=1.0, max_tokens=new_tokens)
            request = GenerateRequest(f"{tag}-{i}", model, list(prompts[i]), params)
            submitted = time.perf_counter()
            first: float | None = None
            async for event in engine.generate(request):
                if event.token_ids and first is None:
                    first = time.perf_counter()
                outputs[i].extend(event.token_ids)
            ttfts[i] = (first if first is not None else time.perf_counter()) - submitted

    started = time.perf_counter()
    await asyncio.gather(*(worker() for _ in range(concurrency)))
    return outputs, ttfts, time.perf_counter() - started


def bench_engine(
    loaded: Any,
    model: str,
    dtype: torch.dtype,
    prompts: list[list[int]],
    concurrencies: list[int],
    requests: int,
    new_tokens: int,
    capacity: int,
    prefill_chunk: int,
) -> tuple[list[Result], dict[int, list[list[int]]]]:
    from ollama_compact_server.engine.config import EngineConfig, ModelSource
    from ollama_compact_server.engine.local import LocalEngine
    from ollama_compact_server.engine.loop import DeviceLoop

    # No end-of-sequence ids: every request generates exactly new_tokens tokens, like HF
    # with min_new_tokens == max_new_tokens.
    serving = copy.copy(loaded)
    serving.stop_ids = set()
    config = EngineConfig(
        device=torch.device("cpu"),
        dtype=dtype,
        slots=max(concurrencies),
        capacity=capacity,
        prefill_chunk=prefill_chunk,
    )
    loop = DeviceLoop(config, ModelSource(lambda name: serving))
    engine = LocalEngine(loop)
    dtype_name = str(dtype).removeprefix("torch.")
    results: list[Result] = []
    outputs_by_c: dict[int, list[list[int]]] = {}

    async def run_all() -> None:
        warm = loaded.tokenizer(WARMUP_PROMPT)["input_ids"]
        await engine_round(engine, model, [warm], 1, WARMUP_TOKENS, "warmup")
        for c in concurrencies:
            batch = [prompts[i % len(prompts)] for i in range(max(c, requests))]
            say(f"engine: C={c}, {len(batch)} requests x {new_tokens} tokens")
            outputs, ttfts, seconds = await engine_round(
                engine, model, batch, c, new_tokens, f"c{c}"
            )
            tokens = sum(len(o) for o in outputs)
            results.append(make_result("engine", dtype_name, c, tokens, len(batch), seconds, ttfts))
            outputs_by_c[c] = outputs
            say(f"  {tokens / seconds:.1f} tok/s")

    loop.start()
    try:
        asyncio.run(run_all())
    finally:
        loop.stop()
    if loop.crashed is not None:
        raise RuntimeError("the engine loop crashed") from loop.crashed
    return results, outputs_by_c


# ------------------------------------------------------------------------------ HF generate


def generate_kwargs(tokenizer: Any, new_tokens: int) -> dict[str, Any]:
    return {
        "max_new_tokens": new_tokens,
        "min_new_tokens": new_tokens,
        "do_sample": False,
        "num_beams": 1,
        "repetition_penalty": 1.0,
        "pad_token_id": tokenizer.pad_token_id,
    }


def first_token_timer() -> Any:
    from transformers.generation.streamers import BaseStreamer

    class FirstTokenTimer(BaseStreamer):
        """generate() calls put() with the prompt, then once per new token."""

        def __init__(self) -> None:
            self.calls = 0
            self.first: float | None = None

        def put(self, value: Any) -> None:
            self.calls += 1
            if self.calls == 2:
                self.first = time.perf_counter()

        def end(self) -> None:
            pass

    return FirstTokenTimer()


@torch.inference_mode()
def bench_hf_sequential(
    loaded: Any, dtype_name: str, prompts: list[list[int]], new_tokens: int
) -> tuple[Result, list[list[int]]]:
    model, kwargs = loaded.model, generate_kwargs(loaded.tokenizer, new_tokens)
    warm = torch.tensor([loaded.tokenizer(WARMUP_PROMPT)["input_ids"]])
    model.generate(warm, **{**kwargs, "max_new_tokens": WARMUP_TOKENS, "min_new_tokens": 0})
    say(f"HF sequential ({dtype_name}): {len(prompts)} requests x {new_tokens} tokens")
    outputs: list[list[int]] = []
    ttfts: list[float] = []
    started = time.perf_counter()
    for ids in prompts:
        timer = first_token_timer()
        submitted = time.perf_counter()
        out = model.generate(torch.tensor([ids]), streamer=timer, **kwargs)
        ttfts.append((timer.first or time.perf_counter()) - submitted)
        outputs.append(out[0, len(ids) :].tolist())
    seconds = time.perf_counter() - started
    tokens = sum(len(o) for o in outputs)
    say(f"  {tokens / seconds:.1f} tok/s")
    result = make_result(
        "HF generate, sequential", dtype_name, 1, tokens, len(prompts), seconds, ttfts
    )
    return result, outputs


@torch.inference_mode()
def bench_hf_static(
    loaded: Any, dtype_name: str, texts: list[str], new_tokens: int
) -> tuple[Result, list[list[int]]]:
    model, tokenizer = loaded.model, loaded.tokenizer
    kwargs = generate_kwargs(tokenizer, new_tokens)
    side = tokenizer.padding_side
    tokenizer.padding_side = "left"
    try:
        batch = tokenizer(texts, padding=True, return_tensors="pt")
        warm = tokenizer([WARMUP_PROMPT] * len(texts), padding=True, return_tensors="pt")
    finally:
        tokenizer.padding_side = side
    model.generate(**warm, **{**kwargs, "max_new_tokens": WARMUP_TOKENS, "min_new_tokens": 0})
    say(f"HF static batch ({dtype_name}): {len(texts)} prompts x {new_tokens} tokens")
    started = time.perf_counter()
    out = model.generate(**batch, **kwargs)
    seconds = time.perf_counter() - started
    width = batch["input_ids"].shape[1]
    eos = model.generation_config.eos_token_id
    eos_ids = set(eos if isinstance(eos, list) else [eos]) - {None}
    outputs: list[list[int]] = []
    for row in out[:, width:].tolist():
        row = row[:new_tokens]
        # real tokens only: up to and including an end-of-sequence token (then padding)
        end = next((k + 1 for k, t in enumerate(row) if t in eos_ids), len(row))
        outputs.append(row[:end])
    tokens = sum(len(o) for o in outputs)
    say(f"  {tokens / seconds:.1f} tok/s")
    result = make_result(
        "HF generate, static batch", dtype_name, len(texts), tokens, len(texts), seconds
    )
    return result, outputs


# ------------------------------------------------------------------------------ report


def matches(outputs: list[list[int]], reference: list[list[int]]) -> int:
    return sum(out == reference[i % len(reference)] for i, out in enumerate(outputs))


def fmt(value: float | None, digits: int = 1) -> str:
    return "-" if value is None else f"{value:.{digits}f}"


def print_report(
    command: str,
    settings: dict[str, Any],
    results: list[Result],
    ratios: dict[str, float],
    ref_c: int,
) -> None:
    print()
    print(f"command: {command}")
    print("settings: " + ", ".join(f"{k}={v}" for k, v in settings.items() if k != "command"))
    print()
    header = (
        f"{'system':<27} {'dtype':<9} {'C':>3} {'reqs':>5} {'tokens':>7} {'wall s':>8} "
        f"{'tok/s':>8} {'TTFT p50 ms':>12} {'TTFT p99 ms':>12} {'= HF seq':>9}"
    )
    print(header)
    print("-" * len(header))
    for r in results:
        same = "-" if r.matches_hf_sequential is None else f"{r.matches_hf_sequential}/{r.requests}"
        print(
            f"{r.system:<27} {r.dtype:<9} {r.concurrency:>3} {r.requests:>5} {r.tokens:>7} "
            f"{r.seconds:>8.2f} {r.tokens_per_s:>8.1f} {fmt(r.ttft_p50_ms):>12} "
            f"{fmt(r.ttft_p99_ms):>12} {same:>9}"
        )
    print()
    print("ratios (aggregate tok/s):")
    for name, value in ratios.items():
        print(f"  {name:<45} {value:6.2f}x")
    engine = [r for r in results if r.system == "engine"]
    if engine:
        print()
        print("engine throughput over concurrency:")
        base = engine[0].tokens_per_s
        top = max(r.tokens_per_s for r in engine)
        for r in engine:
            bar = "#" * max(1, round(40 * r.tokens_per_s / top))
            print(
                f"  C={r.concurrency:<4} {r.tokens_per_s:8.1f} tok/s  "
                f"x{r.tokens_per_s / base:5.2f} vs C={engine[0].concurrency:<3} {bar}"
            )
    print()
    print(f"(engine@{ref_c} is compared with HF serving the same {settings['requests']} requests)")
    print(f"command: {command}")


# ------------------------------------------------------------------------------ main


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        description="Aggregate tok/s of our engine vs Hugging Face generate on gemma3:270m."
    )
    parser.add_argument("--registry", type=Path, default=Path(".cache/test-registry"))
    parser.add_argument("--model", default="gemma3:270m")
    parser.add_argument("--dtype", choices=sorted(DTYPES), default="bfloat16")
    parser.add_argument(
        "--concurrency", default=None, help="comma-separated C values (default 1,4,16,64)"
    )
    parser.add_argument(
        "--requests", type=int, default=None, help="requests per HF baseline (default 16)"
    )
    parser.add_argument("--new-tokens", type=int, default=64)
    parser.add_argument("--capacity", type=int, default=512, help="KV tokens per engine slot")
    parser.add_argument("--prefill-chunk", type=int, default=256)
    parser.add_argument("--threads", type=int, default=None, help="torch intra-op threads")
    parser.add_argument("--quick", action="store_true", help="smoke run: C=1,4 and 4 requests")
    parser.add_argument("--json", type=Path, default=None, metavar="OUT")
    args = parser.parse_args(argv)
    spec = args.concurrency or ("1,4" if args.quick else "1,4,16,64")
    try:
        args.concurrency = sorted({int(c) for c in spec.split(",") if c.strip()})
    except ValueError:
        parser.error(f"--concurrency takes comma-separated integers, not {spec!r}")
    if not args.concurrency or min(args.concurrency) < 1:
        parser.error("--concurrency values must be positive")
    if args.requests is None:
        args.requests = 4 if args.quick else 16
    if args.requests < 1 or args.new_tokens < 1:
        parser.error("--requests and --new-tokens must be positive")
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    command = shlex.join([sys.executable, *(sys.argv if argv is None else ["bench", *argv])])
    if args.threads:
        torch.set_num_threads(args.threads)
    import transformers

    dtype = DTYPES[args.dtype]
    texts = [STORY_OPENINGS[i % len(STORY_OPENINGS)] for i in range(args.requests)]
    settings: dict[str, Any] = {
        "command": command,
        "model": args.model,
        "dtype": args.dtype,
        "concurrency": args.concurrency,
        "requests": args.requests,
        "new_tokens": args.new_tokens,
        "capacity": args.capacity,
        "prefill_chunk": args.prefill_chunk,
        "torch_threads": torch.get_num_threads(),
        "cpus": os.cpu_count(),
        "torch": torch.__version__,
        "transformers": transformers.__version__,
        "machine": f"{platform.machine()} {platform.processor() or platform.system()}".strip(),
    }
    say(f"command: {command}")
    registry = open_registry(args.registry, args.model)
    loaded = load(registry, args.model, dtype)
    prompts = [loaded.tokenizer(t)["input_ids"] for t in texts]
    capacity = max(args.capacity, max(len(p) for p in prompts) + args.new_tokens)

    # 1. our engine, then (with its loop stopped) HF on the same model object
    results, engine_outputs = bench_engine(
        loaded,
        args.model,
        dtype,
        prompts,
        args.concurrency,
        args.requests,
        args.new_tokens,
        capacity,
        args.prefill_chunk,
    )
    sequential, reference = on_fresh_thread(
        bench_hf_sequential, loaded, args.dtype, prompts, args.new_tokens
    )
    sequential.matches_hf_sequential = sequential.requests
    for r in results:
        r.matches_hf_sequential = matches(engine_outputs[r.concurrency], reference)
    results.append(sequential)

    static: dict[str, Result] = {}
    if args.dtype != "float32":
        static[args.dtype], outs = on_fresh_thread(
            bench_hf_static, loaded, args.dtype, texts, args.new_tokens
        )
        static[args.dtype].matches_hf_sequential = matches(outs, reference)
    del loaded
    gc.collect()
    fp32 = load(registry, args.model, torch.float32)
    static["float32"], outs = on_fresh_thread(
        bench_hf_static, fp32, "float32", texts, args.new_tokens
    )
    if args.dtype == "float32":
        static["float32"].matches_hf_sequential = matches(outs, reference)
    del fp32
    gc.collect()
    results.append(static["float32"])
    if args.dtype in static and args.dtype != "float32":
        results.append(static[args.dtype])

    engine = {r.concurrency: r for r in results if r.system == "engine"}
    ref_c = args.requests if args.requests in engine else max(engine)
    at = engine[ref_c].tokens_per_s
    ratios = {
        f"engine@{ref_c} / HF sequential ({args.dtype})": at / sequential.tokens_per_s,
        f"engine@{ref_c} / HF static batch float32": at / static["float32"].tokens_per_s,
    }
    if args.dtype != "float32":
        ratios[f"engine@{ref_c} / HF static batch {args.dtype}"] = (
            at / static[args.dtype].tokens_per_s
        )
    print_report(command, settings, results, ratios, ref_c)

    if args.json is not None:
        payload = {
            "settings": settings,
            "results": [asdict(r) for r in results],
            "ratios": ratios,
            "reference_concurrency": ref_c,
        }
        args.json.write_text(json.dumps(payload, indent=2) + "\n")
        say(f"wrote {args.json}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
