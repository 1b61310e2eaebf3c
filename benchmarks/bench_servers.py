"""Our daemon against ``transformers serve --continuous-batching``, server to server, in one run.

Both servers run as subprocesses on this machine, one after the other (never at once), on
the same model (gemma3:270m from the local registry; transformers serve reads the same
safetensors through a directory of links), in the same dtype, and get the same requests from
the same client: OpenAI ``/v1/completions`` with ``stream: true``, greedy (temperature 0),
``max_tokens`` new tokens, story-opening prompts. For each concurrency C the client sends
``max(C, R)`` requests with C of them in flight at any time and measures

- aggregate generated tokens per second: the completion tokens every server reports in its
  usage, summed, over the wall time of the round;
- time to first token, p50 and p99, from sending a request to its first text chunk.

Neither server is told to ignore end-of-sequence tokens, so a request may end early; the
report counts what each server really generated (the ``tokens`` column).

Run it from the repository root::

    .venv/bin/python benchmarks/bench_servers.py                   # C = 1, 16, 64
    .venv/bin/python benchmarks/bench_servers.py --concurrency 16 --requests 16 --json out.json

Options: ``--registry PATH`` (default ``.cache/test-registry``), ``--model NAME``,
``--dtype bfloat16|float32``, ``--concurrency 1,16,64``, ``--requests 16``,
``--new-tokens 64``, ``--servers ours,transformers-cb``, ``--json OUT``.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import os
import platform
import shlex
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from collections.abc import Sequence
from dataclasses import asdict, dataclass
from pathlib import Path

import httpx

sys.path.insert(0, str(Path(__file__).resolve().parent))
from bench_engine import STORY_OPENINGS, on_fresh_thread, open_registry, percentile

from ollama_compact_server.modeling.loader import model_dir

ROOT = Path(__file__).resolve().parent.parent
READY_TIMEOUT = 600.0


@dataclass
class Round:
    server: str
    concurrency: int
    requests: int
    tokens: int
    short: int  # requests that ended before max_tokens
    seconds: float
    tokens_per_s: float
    ttft_p50_ms: float
    ttft_p99_ms: float


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def say(message: str) -> None:
    print(f"[servers] {message}", file=sys.stderr, flush=True)


# ------------------------------------------------------------------------------ servers


@dataclass
class Server:
    name: str
    command: list[str]
    env: dict[str, str]
    model: str  # the "model" field of each request
    port: int


def our_server(registry: Path, model: str, dtype: str, slots: int, port: int) -> Server:
    env = {
        "OLLAMA_HOST": f"127.0.0.1:{port}",
        "OCS_MODELS": str(registry),
        "OCS_DEFAULT_MODEL": model,
        "OCS_IMPORT_DEFAULT": "false",
        "OCS_DTYPE": dtype,
        "OCS_DEVICE": "cpu",  # transformers serve runs with --device cpu too
        "OCS_NUM_PARALLEL": str(slots),
        "OCS_MAX_QUEUE": str(max(256, 4 * slots)),
        "OCS_LOG_LEVEL": "warning",
    }
    command = [sys.executable, "-m", "ollama_compact_server", "serve"]
    return Server("ours", command, env, model, port)


def transformers_server(directory: Path, dtype: str, port: int) -> Server:
    command = [
        shutil.which("transformers") or str(Path(sys.executable).parent / "transformers"),
        "serve",
        str(directory),
        "--continuous-batching",
        "--dtype",
        dtype,
        "--device",
        "cpu",
        "--host",
        "127.0.0.1",
        "--port",
        str(port),
    ]
    return Server("transformers-cb", command, {}, str(directory), port)


def start(server: Server, log: Path) -> subprocess.Popen[bytes]:
    # our settings come from this run alone, not from OCS_* variables of the calling shell
    inherited = {k: v for k, v in os.environ.items() if not k.startswith("OCS_")}
    env = {**inherited, **server.env}
    say(f"starting {server.name}: {shlex.join(server.command)}")
    with log.open("wb") as out:
        return subprocess.Popen(
            server.command, env=env, cwd=ROOT, stdout=out, stderr=subprocess.STDOUT
        )


def stop(process: subprocess.Popen[bytes]) -> None:
    if process.poll() is None:
        process.send_signal(signal.SIGTERM)
        try:
            process.wait(30)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait()


async def wait_ready(server: Server, process: subprocess.Popen[bytes], log: Path) -> None:
    deadline = time.monotonic() + READY_TIMEOUT
    async with httpx.AsyncClient(timeout=5.0) as client:
        while time.monotonic() < deadline:
            if process.poll() is not None:
                raise SystemExit(f"{server.name} exited:\n{log.read_text()[-3000:]}")
            try:
                reply = await client.get(f"http://127.0.0.1:{server.port}/v1/models")
                if reply.status_code == 200:
                    return
            except httpx.HTTPError:
                pass
            await asyncio.sleep(0.5)
    raise SystemExit(f"{server.name} was not ready after {READY_TIMEOUT:.0f} s")


# ------------------------------------------------------------------------------ client


async def one_request(
    client: httpx.AsyncClient, server: Server, prompt: str, new_tokens: int
) -> tuple[int, float]:
    """Streams one completion; returns (completion tokens, seconds to the first text)."""
    body = {
        "model": server.model,
        "prompt": prompt,
        "max_tokens": new_tokens,
        "temperature": 0,
        "stream": True,
        "stream_options": {"include_usage": True},
    }
    sent = time.perf_counter()
    first: float | None = None
    chunks = 0
    usage: int | None = None
    url = f"http://127.0.0.1:{server.port}/v1/completions"
    async with client.stream("POST", url, json=body) as reply:
        if reply.status_code != 200:
            raise RuntimeError(f"{server.name}: HTTP {reply.status_code}: {await reply.aread()!r}")
        async for line in reply.aiter_lines():
            if not line.startswith("data:"):
                continue  # blank separators and keep-alive comments
            data = line[5:].strip()
            if data == "[DONE]":
                break
            event = json.loads(data)
            if event.get("usage"):
                usage = int(event["usage"]["completion_tokens"])
            for choice in event.get("choices") or []:
                if choice.get("text"):
                    chunks += 1
                    if first is None:
                        first = time.perf_counter()
    ttft = (first if first is not None else time.perf_counter()) - sent
    return (usage if usage is not None else chunks), ttft


async def run_round(
    server: Server, prompts: list[str], concurrency: int, new_tokens: int
) -> tuple[list[int], list[float], float]:
    counts = [0] * len(prompts)
    ttfts = [0.0] * len(prompts)
    pending = iter(range(len(prompts)))
    limits = httpx.Limits(max_connections=concurrency + 4, max_keepalive_connections=concurrency)
    async with httpx.AsyncClient(timeout=httpx.Timeout(600.0), limits=limits) as client:

        async def worker() -> None:
            for i in pending:
                counts[i], ttfts[i] = await one_request(client, server, prompts[i], new_tokens)

        started = time.perf_counter()
        await asyncio.gather(*(worker() for _ in range(concurrency)))
        return counts, ttfts, time.perf_counter() - started


async def bench_server(
    server: Server,
    log: Path,
    concurrencies: Sequence[int],
    requests: int,
    new_tokens: int,
) -> list[Round]:
    process = start(server, log)
    rounds: list[Round] = []
    try:
        await wait_ready(server, process, log)
        await run_round(server, [STORY_OPENINGS[0], STORY_OPENINGS[1]], 2, 8)  # warm-up
        for c in concurrencies:
            prompts = [STORY_OPENINGS[i % len(STORY_OPENINGS)] for i in range(max(c, requests))]
            say(f"{server.name}: C={c}, {len(prompts)} requests x {new_tokens} tokens")
            counts, ttfts, seconds = await run_round(server, prompts, c, new_tokens)
            tokens = sum(counts)
            rounds.append(
                Round(
                    server.name,
                    c,
                    len(prompts),
                    tokens,
                    sum(1 for n in counts if n < new_tokens),
                    seconds,
                    tokens / seconds,
                    percentile(ttfts, 0.5) * 1000,
                    percentile(ttfts, 0.99) * 1000,
                )
            )
            say(f"  {tokens / seconds:.1f} tok/s")
    finally:
        stop(process)
    return rounds


# ------------------------------------------------------------------------------ main


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--registry", type=Path, default=ROOT / ".cache" / "test-registry")
    parser.add_argument("--model", default="gemma3:270m")
    parser.add_argument("--dtype", default="bfloat16", choices=["bfloat16", "float32"])
    parser.add_argument("--concurrency", default="1,16,64")
    parser.add_argument("--requests", type=int, default=16)
    parser.add_argument("--new-tokens", type=int, default=64)
    parser.add_argument("--servers", default="ours,transformers-cb")
    parser.add_argument("--json", type=Path)
    args = parser.parse_args(argv)
    args.concurrency = [int(c) for c in args.concurrency.split(",")]
    args.servers = [s.strip() for s in args.servers.split(",") if s.strip()]
    unknown = set(args.servers) - {"ours", "transformers-cb"}
    if unknown:
        parser.error(f"unknown servers: {sorted(unknown)}")
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    command = shlex.join([sys.executable, *(sys.argv if argv is None else ["bench", *argv])])
    registry = on_fresh_thread(open_registry, args.registry, args.model)
    rounds: list[Round] = []
    with contextlib.ExitStack() as stack:
        scratch_dir = Path(stack.enter_context(tempfile.TemporaryDirectory(prefix="ocs-bench-")))
        for name in args.servers:
            port = free_port()
            if name == "ours":
                server = our_server(
                    args.registry, args.model, args.dtype, max(args.concurrency), port
                )
            else:  # the registry's verified files, linked into a directory
                view = stack.enter_context(model_dir(registry, registry.get(args.model)))
                server = transformers_server(view, args.dtype, port)
            log = scratch_dir / f"{name}.log"
            rounds += asyncio.run(
                bench_server(server, log, args.concurrency, args.requests, args.new_tokens)
            )

    print(f"command: {command}")
    print(f"machine: {platform.machine()} {os.cpu_count()} CPUs; dtype {args.dtype}")
    print()
    print("| server | C | requests | tokens | ended early | tok/s | TTFT p50 ms | TTFT p99 ms |")
    print("|---|---|---|---|---|---|---|---|")
    for r in rounds:
        print(
            f"| {r.server} | {r.concurrency} | {r.requests} | {r.tokens} | {r.short} | "
            f"{r.tokens_per_s:.1f} | {r.ttft_p50_ms:.0f} | {r.ttft_p99_ms:.0f} |"
        )
    by = {(r.server, r.concurrency): r for r in rounds}
    ratios = {}
    for c in args.concurrency:
        ours, theirs = by.get(("ours", c)), by.get(("transformers-cb", c))
        if ours and theirs:
            ratios[f"ours / transformers-cb at C={c}"] = ours.tokens_per_s / theirs.tokens_per_s
    if ratios:
        print()
        for label, value in ratios.items():
            print(f"{label}: {value:.2f}x")
    if args.json is not None:
        payload = {"command": command, "rounds": [asdict(r) for r in rounds], "ratios": ratios}
        args.json.write_text(json.dumps(payload, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
