"""Replicas on Ray Serve: routing by model (affinity) against model-blind routing, in one run.

A local Ray cluster on 127.0.0.1 runs ``serve_ray``'s application with ``--replicas`` (2) CPU
replicas on a scratch registry holding ``--models`` (4) variants of one model (``gemma3:270m``
from ``--registry``, created as ``scale-0`` ... ``scale-3`` with their own default ``seed``
parameter: the same weights on disk, four models to the engine, each load a real one: digest
check, weights, KV cache). Every replica keeps at most ``--max-loaded`` (2) models
(``OCS_MAX_LOADED_MODELS``), so the deployment can hold all four models only if each replica
holds its own two.

The same request mix (``--requests`` streamed ``/api/generate`` requests, each for a model
drawn at random with ``--seed``, ``--clients`` of them in flight) is sent once per routing
mode, each to a freshly deployed application (fresh replicas, nothing loaded):

- **model** (``OCS_RAY_ROUTING=model``, the default): the request's model is Ray Serve's
  multiplexed model id;
- **round_robin**: no model id, Serve's default replica choice (power of two choices: the
  replica with the shorter queue, ties at random), the model-blind baseline.

With ``--rounds`` above 1 the modes alternate (model, round_robin, round_robin, model, ...).
Measured per mode: model loads on each replica (read from the deployment's ``/metrics``, which
the ingress merges from every replica with a ``replica`` label: ``ocs_evictions_total +
ocs_resident_models``, every model made resident since start), how
many replicas served each model, time to first token p50 / p99 (client side, from sending
the request to the first NDJSON line with text) and the wall time of the whole mix.

Run from the repository root::

    .venv/bin/python benchmarks/bench_scale.py                # 96 requests, 8 clients
    .venv/bin/python benchmarks/bench_scale.py --quick        # smoke run (16 requests)
    .venv/bin/python benchmarks/bench_scale.py --registry /path/to/registry --rounds 2

Options: ``--registry PATH`` (default ``.cache/test-registry``; ``gemma3:270m`` is imported
from the bundled package when missing), ``--model NAME``, ``--models 4``, ``--replicas 2``,
``--max-loaded 2``, ``--requests 96``, ``--clients 8``, ``--new-tokens 16``, ``--seed 0``,
``--rounds 1``, ``--timeout 180``, ``--ray-env NAME=VALUE`` (for every Ray actor; repeatable),
``--json OUT``.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import platform
import random
import shlex
import socket
import statistics
import sys
import tempfile
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import httpx

sys.path.insert(0, str(Path(__file__).resolve().parent))
from bench_engine import STORY_OPENINGS, open_registry, percentile

ROOT = Path(__file__).resolve().parent.parent
MODES = ("model", "round_robin")
READY_TIMEOUT = 300.0


def say(message: str) -> None:
    print(f"[scale] {message}", file=sys.stderr, flush=True)


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


@dataclass
class Run:
    routing: str
    round: int
    requests: int
    errors: int
    seconds: float
    ttft_p50_ms: float
    ttft_p99_ms: float
    loads: dict[str, int]  # replica -> models made resident since the replica started
    served: dict[str, dict[str, int]] = field(default_factory=dict)  # model -> replica -> n
    # per request, in the order sent: (model, replica, sent at s, time to first token s)
    trace: list[tuple[str, str, float, float | None]] = field(default_factory=list)

    @property
    def total_loads(self) -> int:
        return sum(self.loads.values())

    @property
    def replicas_per_model(self) -> float:
        """Replicas that answered each model's requests (a request that got no answer, "?",
        names none), averaged over the models."""
        counts = [len(set(r) - {"?"}) for r in self.served.values()]
        return statistics.mean(counts) if counts else 0.0


# ------------------------------------------------------------------------------ cluster


def scratch_registry(source: Any, model: str, count: int, root: Path) -> list[str]:
    """``count`` variants of ``model`` (``scale-0`` ...) in a copy of ``source`` at ``root``:
    each is ``model`` with its own default ``seed`` parameter (as ``ollama create`` with
    ``FROM model`` and ``PARAMETER seed i`` makes it), so each has its own manifest and is
    loaded on its own, while the weight blobs are shared on disk. (Plain copies under new
    names would not do: the chat layer caches a model's view by manifest digest, so
    identical manifests are served as the first name and share one resident model.)"""
    import shutil

    from ollama_compact_server.jobs.create import CreateSpec, create_model
    from ollama_compact_server.registry.names import ModelName
    from ollama_compact_server.registry.store import Registry

    def link_or_copy(src: str, dst: str) -> None:
        try:
            os.link(src, dst)  # same filesystem: no 300 MB copy
        except OSError:
            shutil.copy2(src, dst)

    shutil.copytree(source.root, root, copy_function=link_or_copy)
    registry = Registry(root)
    names = []
    for i in range(count):
        name = f"scale-{i}"
        spec = CreateSpec(ModelName.parse(name), from_=model, parameters={"seed": i})
        create_model(registry, spec, lambda *_: None)
        names.append(name)
    return names


def start_ray(replicas: int, env: dict[str, str]) -> None:
    """A local cluster on loopback; ``env`` goes to every actor (e.g. Serve's router knobs
    ``RAY_SERVE_QUEUE_LENGTH_RESPONSE_DEADLINE_S``, which the ingress's router reads)."""
    import ray

    pythonpath = os.pathsep.join(p for p in (str(ROOT), os.environ.get("PYTHONPATH")) if p)
    ray.init(
        num_cpus=replicas + 1,
        include_dashboard=False,
        _node_ip_address="127.0.0.1",
        # one torch thread per replica: the replicas share the machine's cores
        runtime_env={"env_vars": {"PYTHONPATH": pythonpath, "OMP_NUM_THREADS": "1", **env}},
        log_to_driver=False,
    )


def deploy(routing: str, replicas: int, overrides: dict[str, Any], port: int) -> str:
    """A fresh application (its replicas start empty); returns the base URL once it answers."""
    from ray import serve

    from ollama_compact_server.serve_ray import build_app

    app = build_app(replicas, overrides, replica_cpus=1.0, routing=routing)
    serve.run(app, name="scale", route_prefix="/", blocking=False)
    base = f"http://127.0.0.1:{port}"
    deadline = time.monotonic() + READY_TIMEOUT
    seen: set[str] = set()
    with httpx.Client(base_url=base, timeout=60) as client:
        while len(seen) < replicas:  # every replica up (its app's lifespan started)
            try:
                r = client.get("/api/version")
                if r.status_code == 200 and "x-ocs-replica" in r.headers:
                    seen.add(r.headers["x-ocs-replica"])
            except httpx.HTTPError:
                pass
            if time.monotonic() > deadline:
                raise TimeoutError(f"Serve did not come up ({len(seen)} replicas answered)")
            time.sleep(0.2 if seen else 1.0)
    return base


def undeploy() -> None:
    from ray import serve

    serve.delete("scale")


async def loads_per_replica(client: httpx.AsyncClient, replicas: int) -> dict[str, int]:
    """Every model made resident on each replica since it started (evictions plus resident
    models), from the deployment's /metrics: the ingress merges every replica's series,
    labelled ``replica``. Asked again (at most 100 times) until every replica is in it."""
    from prometheus_client.parser import text_string_to_metric_families

    loads: dict[str, int] = {}
    for _ in range(100):
        try:
            r = await client.get("/metrics", timeout=10)
        except httpx.TimeoutException:
            continue
        r.raise_for_status()
        loads = {}
        for family in text_string_to_metric_families(r.text):
            for sample in family.samples:
                if sample.name in ("ocs_evictions_total", "ocs_resident_models"):
                    replica = sample.labels.get("replica", "?")
                    loads[replica] = loads.get(replica, 0) + int(sample.value)
        if len(loads) == replicas:
            break
    else:
        say(f"  only {len(loads)} of {replicas} replicas answered /metrics")
    return loads


# ------------------------------------------------------------------------------ requests


async def one(
    client: httpx.AsyncClient, model: str, prompt: str, new_tokens: int
) -> tuple[float | None, str, bool]:
    """One streamed /api/generate; (time to first token, replica or "?", ok). A request
    that times out (the client's ``--timeout``) is not ok."""
    body = {
        "model": model,
        "prompt": prompt,
        "stream": True,
        "options": {"temperature": 0, "num_predict": new_tokens, "num_ctx": 256},
    }
    started = time.perf_counter()
    ttft = None
    replica = "?"
    ok = False
    try:
        async with client.stream("POST", "/api/generate", json=body) as r:
            replica = r.headers.get("x-ocs-replica", "?")
            if r.status_code != 200:
                await r.aread()
                return None, replica, False
            async for line in r.aiter_lines():
                if not line:
                    continue
                item = json.loads(line)
                if "error" in item:
                    return ttft, replica, False
                if ttft is None and item.get("response"):
                    ttft = time.perf_counter() - started
                ok = ok or bool(item.get("done"))
    except httpx.TimeoutException:
        say(f"  {model}: timed out on replica {replica} after {time.perf_counter() - started:.0f}s")
        return ttft, replica, False
    return ttft, replica, ok


async def run_mix(
    base: str,
    routing: str,
    round_: int,
    mix: list[tuple[str, str]],
    clients: int,
    new_tokens: int,
    replicas: int,
    timeout: float,
) -> Run:
    limits = httpx.Limits(max_connections=clients + 4)
    async with httpx.AsyncClient(base_url=base, timeout=timeout, limits=limits) as client:
        queue: asyncio.Queue[tuple[str, str]] = asyncio.Queue()
        for job in mix:
            queue.put_nowait(job)
        ttfts: list[float] = []
        served: dict[str, dict[str, int]] = {}
        trace: list[tuple[str, str, float, float | None]] = []
        errors = 0

        async def worker() -> None:
            nonlocal errors
            while not queue.empty():
                model, prompt = queue.get_nowait()
                sent = time.perf_counter() - started
                try:
                    ttft, replica, ok = await one(client, model, prompt, new_tokens)
                except (httpx.HTTPError, ValueError) as exc:
                    say(f"  {model}: {exc.__class__.__name__}: {exc}")
                    errors += 1
                    continue
                errors += not ok
                trace.append((model, replica, round(sent, 3), ttft and round(ttft, 3)))
                if ttft is not None:
                    ttfts.append(ttft)
                per_model = served.setdefault(model, {})
                per_model[replica] = per_model.get(replica, 0) + 1

        started = time.perf_counter()
        await asyncio.gather(*(worker() for _ in range(clients)))
        seconds = time.perf_counter() - started
        loads = await loads_per_replica(client, replicas)
    return Run(
        routing=routing,
        round=round_,
        requests=len(mix),
        errors=errors,
        seconds=seconds,
        ttft_p50_ms=percentile(ttfts, 0.5) * 1000,
        ttft_p99_ms=percentile(ttfts, 0.99) * 1000,
        loads=loads,
        served=served,
        trace=trace,
    )


# ------------------------------------------------------------------------------ main


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--registry", type=Path, default=Path(".cache/test-registry"))
    parser.add_argument("--model", default="gemma3:270m")
    parser.add_argument("--models", type=int, default=4, help="copies of --model served [4]")
    parser.add_argument("--replicas", type=int, default=2)
    parser.add_argument(
        "--max-loaded", type=int, default=2, help="OCS_MAX_LOADED_MODELS per replica [2]"
    )
    parser.add_argument("--requests", type=int, default=96)
    parser.add_argument("--clients", type=int, default=8, help="requests in flight [8]")
    parser.add_argument("--new-tokens", type=int, default=16)
    parser.add_argument("--seed", type=int, default=0, help="the request mix's order")
    parser.add_argument(
        "--timeout", type=float, default=180, help="seconds a request may take [180]"
    )
    parser.add_argument(
        "--rounds", type=int, default=1, help="runs per mode, alternating the order [1]"
    )
    parser.add_argument(
        "--ray-env",
        action="append",
        default=[],
        metavar="NAME=VALUE",
        help="an environment variable for every Ray actor (repeatable), e.g. "
        "RAY_SERVE_QUEUE_LENGTH_RESPONSE_DEADLINE_S=1",
    )
    parser.add_argument("--json", type=Path, default=None, help="write every run here")
    parser.add_argument("--quick", action="store_true", help="smoke run (16 requests)")
    args = parser.parse_args(argv)
    if args.quick:
        args.requests, args.clients, args.new_tokens, args.rounds = 16, 4, 4, 1
    if any("=" not in item for item in args.ray_env):
        parser.error("--ray-env takes NAME=VALUE")
    ray_env = dict(item.split("=", 1) for item in args.ray_env)
    if min(args.models, args.replicas, args.max_loaded, args.requests, args.clients) < 1:
        parser.error("--models, --replicas, --max-loaded, --requests, --clients must be >= 1")

    try:
        import ray
        from ray import serve
    except ImportError:
        raise SystemExit(
            "bench_scale needs Ray Serve: pip install 'ollama-compact-server[ray]'"
        ) from None

    rng = random.Random(args.seed)  # noqa: S311  # a reproducible order, not a secret
    source = open_registry(args.registry, args.model)
    runs: list[Run] = []
    with tempfile.TemporaryDirectory(prefix="ocs-bench-scale-") as scratch:
        say(f"copying {args.model} into a scratch registry as {args.models} models")
        names = scratch_registry(source, args.model, args.models, Path(scratch) / "registry")
        mix = [
            (rng.choice(names), STORY_OPENINGS[i % len(STORY_OPENINGS)])
            for i in range(args.requests)
        ]
        overrides = {
            "models": str(Path(scratch) / "registry"),
            "adapters": None,
            "import_default": False,
            "device": "cpu",
            "max_loaded_models": args.max_loaded,
            "max_loras": 1,  # no adapters here: Serve's per-replica cap is max_loaded + 1
            "num_parallel": args.clients,
            "context_length": 256,
            "keep_alive": "-1",  # only the max_loaded cap unloads models
            "log_level": "warning",
        }
        port = free_port()
        say(f"starting a local Ray cluster on 127.0.0.1 ({args.replicas} replicas)")
        start_ray(args.replicas, ray_env)
        try:
            serve.start(http_options={"host": "127.0.0.1", "port": port})
            for round_ in range(args.rounds):
                order = MODES if round_ % 2 == 0 else MODES[::-1]
                for routing in order:
                    say(f"round {round_ + 1}: deploying with routing={routing}")
                    started = time.perf_counter()
                    base = deploy(routing, args.replicas, overrides, port)
                    say(f"  replicas up in {time.perf_counter() - started:.0f}s; sending the mix")
                    run = asyncio.run(
                        run_mix(
                            base,
                            routing,
                            round_ + 1,
                            mix,
                            args.clients,
                            args.new_tokens,
                            args.replicas,
                            args.timeout,
                        )
                    )
                    say(
                        f"  {run.seconds:.1f}s, loads {run.loads}, TTFT p50 "
                        f"{run.ttft_p50_ms:.0f} ms p99 {run.ttft_p99_ms:.0f} ms, "
                        f"{run.errors} errors"
                    )
                    runs.append(run)
                    if args.json is not None:  # after every run: a partial run keeps its data
                        write_json(args.json, runs)
                    undeploy()
        finally:
            serve.shutdown()
            ray.shutdown()
    report(args, runs)
    return 0


def write_json(path: Path, runs: list[Run]) -> None:
    path.write_text(
        json.dumps([{**asdict(r), "total_loads": r.total_loads} for r in runs], indent=1)
    )


def report(args: argparse.Namespace, runs: list[Run]) -> None:
    import torch

    print()
    print(f"command: {shlex.join([sys.executable.rsplit('/', 1)[-1], *sys.argv])}")
    print(
        f"machine: {platform.machine()}, {os.cpu_count()} cores, torch {torch.__version__}, "
        f"load average {os.getloadavg()[0]:.1f} at the end; ray {_ray_version()}; "
        f"{args.replicas} CPU replicas (1 torch thread each), {args.models} copies of "
        f"{args.model}, OCS_MAX_LOADED_MODELS={args.max_loaded} per replica; {args.requests} "
        f"streamed /api/generate requests x {args.new_tokens} tokens, {args.clients} in flight, "
        f"models drawn with seed {args.seed}; {args.rounds} round(s)"
        + (f"; Ray env {' '.join(args.ray_env)}" if args.ray_env else "")
    )
    print()
    print(
        "| routing | round | model loads (per replica) | replicas per model | "
        "TTFT p50 | TTFT p99 | wall | errors |"
    )
    print("|---|---|---|---|---|---|---|---|")
    for run in runs:
        per = " + ".join(str(n) for _, n in sorted(run.loads.items()))
        print(
            f"| {run.routing} | {run.round} | {run.total_loads} ({per}) | "
            f"{run.replicas_per_model:.1f} | {run.ttft_p50_ms:.0f} ms | "
            f"{run.ttft_p99_ms:.0f} ms | {run.seconds:.1f} s | {run.errors} |"
        )
    print()
    by_mode = {m: [r for r in runs if r.routing == m] for m in MODES}
    if all(by_mode.values()):

        def median(mode: str, key: str) -> float:
            return float(statistics.median(getattr(r, key) for r in by_mode[mode]))

        parts = []
        for label, key in (
            ("model loads", "total_loads"),
            ("TTFT p50", "ttft_p50_ms"),
            ("TTFT p99", "ttft_p99_ms"),
            ("wall", "seconds"),
        ):
            a, b = median("model", key), median("round_robin", key)
            parts.append(f"{label} {b / a:.2f}x" if a else f"{label} {b:g} / 0")
        print("round_robin / model (median over rounds): " + ", ".join(parts))


def _ray_version() -> str:
    import ray

    return str(ray.__version__)


if __name__ == "__main__":
    sys.exit(main())
