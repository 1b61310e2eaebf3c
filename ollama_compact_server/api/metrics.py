"""/metrics in Prometheus format: HTTP requests by route and status, and the engine's
queue, running sequences, KV use, residency, tokens, preemptions, evictions and latency
histograms; beside them the gauges Kubernetes inference gateways scrape under vLLM's names.
Each app has its own collector registry. Also one log line per request."""

from __future__ import annotations

import logging
import time
import uuid
from typing import Any

from fastapi import APIRouter, Request
from fastapi.responses import Response
from prometheus_client import (
    CONTENT_TYPE_LATEST,
    CollectorRegistry,
    Counter,
    Gauge,
    Histogram,
    generate_latest,
)
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from ..logs import REQUEST
from ..registry.names import DEFAULT_TAG

router = APIRouter()
log = logging.getLogger("ollama_compact_server.requests")

LATENCY_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60)


class Metrics:
    def __init__(self) -> None:
        self.registry = CollectorRegistry()
        r = self.registry
        self.requests = Counter(
            "ocs_http_requests", "HTTP requests", ["route", "status"], registry=r
        )
        self.duration = Histogram(
            "ocs_http_request_seconds",
            "HTTP request time",
            ["route"],
            buckets=LATENCY_BUCKETS,
            registry=r,
        )
        self.queue = Gauge("ocs_queue_length", "Requests waiting for a slot or a model", registry=r)
        self.running = Gauge(
            "ocs_running_sequences", "Sequences being decoded or prefilled", registry=r
        )
        self.kv_used = Gauge(
            "ocs_kv_cache_used_tokens", "KV cache tokens held by sequences", registry=r
        )
        self.kv_free = Gauge("ocs_kv_cache_free_tokens", "KV cache tokens free", registry=r)
        self.resident = Gauge("ocs_resident_models", "Models loaded on the device", registry=r)
        self.adapters = Gauge("ocs_resident_adapters", "LoRA adapters in device slots", registry=r)
        # engine totals since start: Counters (exposed as *_total), advanced by the change
        # since the last scrape
        self.adapter_loads = Counter(
            "ocs_adapter_loads", "LoRA adapter loads from disk", registry=r
        )
        self.adapter_evictions = Counter(
            "ocs_adapter_evictions",
            "LoRA adapters evicted, from device slots or from host memory",
            ["tier"],
            registry=r,
        )
        self.tokens = Counter("ocs_generated_tokens", "Tokens generated", registry=r)
        self.prefix_hits = Counter(
            "ocs_prefix_cache_hits",
            "Requests whose prompt began with positions the KV cache held (not computed again)",
            registry=r,
        )
        self.prefix_tokens = Counter(
            "ocs_prefix_cache_tokens", "Prompt positions taken from the KV cache", registry=r
        )
        self.preemptions = Counter("ocs_preemptions", "Sequences preempted", registry=r)
        self.evictions = Counter("ocs_evictions", "Models evicted (unloaded)", registry=r)
        self.finished = Counter(
            "ocs_finished_requests", "Requests finished, by reason", ["reason"], registry=r
        )
        self.seen: dict[str, float] = {}  # engine totals at the last scrape
        # The model-server protocol of the Gateway API Inference Extension (docs/SCALING.md):
        # vLLM's names, which its endpoint picker (EPP) reads by default. One series each,
        # for the whole engine: the EPP takes the first series of a plain gauge.
        self.vllm_waiting = Gauge(
            "vllm:num_requests_waiting", "Number of requests waiting to be processed.", registry=r
        )
        self.vllm_running = Gauge(
            "vllm:num_requests_running",
            "Number of requests in model execution batches.",
            registry=r,
        )
        self.vllm_kv_usage = Gauge(
            "vllm:kv_cache_usage_perc", "KV-cache usage. 1 means 100 percent usage.", registry=r
        )
        self.vllm_lora = Gauge(
            "vllm:lora_requests_info",
            "Running stats on lora requests.",
            ["max_lora", "waiting_lora_adapters", "running_lora_adapters"],
            registry=r,
        )
        self.ttft = Histogram(
            "ocs_time_to_first_token_seconds",
            "Time to first token",
            buckets=LATENCY_BUCKETS,
            registry=r,
        )
        self.itl = Histogram(
            "ocs_inter_token_latency_seconds",
            "Time between tokens",
            buckets=LATENCY_BUCKETS,
            registry=r,
        )

    def refresh(self, stats: dict[str, Any]) -> None:
        self.queue.set(stats.get("queued", 0))
        self.running.set(stats.get("running", 0))
        self.kv_used.set(stats.get("kv_tokens_used", 0))
        self.kv_free.set(stats.get("kv_tokens_free", 0))
        self.resident.set(stats.get("resident_models", 0))
        self.adapters.set(stats.get("resident_adapters", 0))
        for key, counter in (
            ("adapter_loads", self.adapter_loads),
            ("adapter_device_evictions", self.adapter_evictions.labels("device")),
            ("adapter_host_evictions", self.adapter_evictions.labels("host")),
            ("tokens_generated", self.tokens),
            ("prefix_hits", self.prefix_hits),
            ("prefix_tokens", self.prefix_tokens),
            ("preemptions", self.preemptions),
            ("evictions", self.evictions),
        ):
            self.advance(key, counter, stats.get(key, 0))
        for reason, count in stats.get("finished", {}).items():
            self.advance(f"finished:{reason}", self.finished.labels(reason), count)
        for value in stats.get("ttft", []):
            self.ttft.observe(value)
        for value in stats.get("itl", []):
            self.itl.observe(value)
        self.refresh_vllm(stats)

    def refresh_vllm(self, stats: dict[str, Any]) -> None:
        """vLLM's gauges as its endpoint picker reads them: requests waiting and running,
        the KV cache's used share (0..1), and the adapters of running and waiting requests
        as comma-separated label values of ``vllm:lora_requests_info``, whose value is the
        time they were read (the EPP keeps the series with the newest value). vLLM leaves
        every label combination it ever reported in place; here only the current one is
        kept, so the series do not pile up, and the newest is the only one."""
        self.vllm_waiting.set(stats.get("queued", 0))
        self.vllm_running.set(stats.get("running", 0))
        used, free = stats.get("kv_tokens_used", 0), stats.get("kv_tokens_free", 0)
        self.vllm_kv_usage.set(used / (used + free) if used + free > 0 else 0.0)
        max_loras = stats.get("max_loras", 0)
        if not max_loras:  # an engine without adapters: vLLM leaves the family empty too
            return
        running = ",".join(served_names(stats.get("running_adapters", {})))
        waiting = ",".join(served_names(stats.get("waiting_adapters", {})))
        self.vllm_lora.clear()
        self.vllm_lora.labels(str(max_loras), waiting, running).set(time.time())

    def advance(self, key: str, counter: Any, total: float) -> None:
        """Moves ``counter`` up to the engine's running ``total`` for ``key`` (a total that
        went down, from a new engine, starts over without going back)."""
        last = self.seen.get(key, 0.0)
        if total > last:
            counter.inc(total - last)
        self.seen[key] = total


def served_name(name: str) -> str:
    """A model name as clients of the OpenAI dialect (and gateways) write it: Ollama's
    default ``:latest`` tag left out, as in ``pirate`` for ``pirate:latest``."""
    return name.removesuffix(f":{DEFAULT_TAG}")


def served_names(counts: dict[str, int]) -> list[str]:
    return sorted({served_name(name) for name in counts})


@router.get("/metrics")
async def metrics(request: Request) -> Response:
    collected: Metrics = request.app.state.metrics
    engine = getattr(request.app.state, "engine", None)
    if engine is not None:
        collected.refresh(engine.stats())
    return Response(generate_latest(collected.registry), media_type=CONTENT_TYPE_LATEST)


REQUEST_ID_SCOPE = "ocs.request_id"
"""An ASGI scope key naming the request's id when someone in front chose it already (a Ray
Serve replica: the proxy's ``x-request-id``, see replica.py); the log and the response header
use it instead of a fresh one."""


class RequestLog:
    """Counts every request by route template and status, times it, and writes one log line
    (id, method, route, status, seconds, and for model requests the model, adapter, tokens
    in and out, prompt-eval and eval seconds) when the response ends."""

    def __init__(self, app: ASGIApp, metrics: Metrics) -> None:
        self.app = app
        self.metrics = metrics

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        started = time.perf_counter()
        request_id = scope.get(REQUEST_ID_SCOPE) or uuid.uuid4().hex[:12]
        status = 500
        info: dict[str, Any] = {"id": request_id}
        token = REQUEST.set(info)

        async def sending(message: Message) -> None:
            nonlocal status
            if message["type"] == "http.response.start":
                status = int(message["status"])
                message.setdefault("headers", []).append((b"x-request-id", request_id.encode()))
            await send(message)

        try:
            await self.app(scope, receive, sending)
        finally:
            route = scope.get("route")
            path = getattr(route, "path", None) or "unmatched"
            seconds = time.perf_counter() - started
            self.metrics.requests.labels(path, str(status)).inc()
            self.metrics.duration.labels(path).observe(seconds)
            REQUEST.reset(token)
            model = info.get("model")
            figures = ""
            if model is not None:
                figures = f" model={model} tokens_in={info.get('tokens_in', 0)}"
                figures += f" tokens_out={info.get('tokens_out', 0)}"
                if info.get("adapter"):
                    figures += f" adapter={info['adapter']}"
                figures += f" prompt_eval={info.get('prompt_eval_seconds', 0.0):.3f}s"
                figures += f" eval={info.get('eval_seconds', 0.0):.3f}s"
            log.info(
                "%s %s %s %d %.3fs%s",
                request_id,
                scope["method"],
                path,
                status,
                seconds,
                figures,
                extra={
                    "ocs_request_id": request_id,
                    "ocs_route": path,
                    "ocs_status": status,
                    "ocs_seconds": round(seconds, 4),
                    **{
                        f"ocs_{k}": round(v, 4) if isinstance(v, float) else v
                        for k, v in info.items()
                        if k != "id"
                    },
                },
            )
