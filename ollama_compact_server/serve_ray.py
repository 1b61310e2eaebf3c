"""Replicas on Ray Serve: one HTTP ingress, N daemon replicas, routed by model.

``ollama-compact serve --ray --replicas N`` (or ``serve run ollama_compact_server.serve_ray:app``)
deploys two Serve deployments:

- ``Ingress`` takes every HTTP request (all our dialects unchanged: Ollama, OpenAI, Anthropic,
  the web page), reads the request's model name (the JSON body's ``model`` field) and
  forwards the request, headers unchanged (Host, Origin, Authorization: the app's own guards
  run on the replica), to a ``Replica`` through a DeploymentHandle with
  ``multiplexed_model_id`` the registry's name for that model: Ray Serve's model multiplexing
  sends it to a replica that already holds that model, a new model to the least loaded one.
  A name the registry lacks (or none) gets no id: any replica, which answers its 404.
  ``OCS_RAY_ROUTING=round_robin`` forwards without a model id instead (Serve's model-blind
  default: the baseline of ``benchmarks/bench_scale.py``).
- ``Replica`` runs our real app in process (``create_app`` with its own engine, its lifespan
  started with the replica: Serve routes to it, and its health check passes, only once the
  engine runs) and executes the forwarded request against it through ASGI, streaming the
  response back chunk by chunk (NDJSON and SSE pass through as they are produced) with its
  status and headers plus ``x-ocs-replica``. Its resident set is bounded like the daemon's:
  the model ids are base models (an adapter model's requests carry its base's id and take
  an adapter slot on that replica), ``max_num_models_per_replica`` is
  ``OCS_MAX_LOADED_MODELS``, and a model Serve evicts is unloaded from the engine.

The registry is shared: every replica reads its settings from the environment as the daemon
does, so all see one ``OCS_MODELS`` path (a shared volume across machines). Management calls
(create, copy, delete, pull) need no special routing: any replica does them on disk and the
others see the result. ``/api/ps`` and ``/metrics`` describe the whole deployment (every
live replica asked through ``handle.broadcast``, see ``Ingress.fan_out``); ``/api/tags``
reads the shared registry, the same on every replica. The ingress holds at most the
daemon's cap on a JSON body (32 MiB, 413 past it) and streams ``/api/blobs`` uploads to the
shared registry itself, a chunk at a time (Serve's proxy in front reads ahead without
back-pressure: README). ``ray`` is imported lazily: the package works without the ``ray``
extra; replica.py and ingress.py hold what needs no ray.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
from collections.abc import AsyncIterator
from typing import Any, cast

from .ingress import (
    BLOB_PREFIX,
    FAN_OUT_TIMEOUT,
    FANNED_OUT,
    BodyTooLarge,
    merge,
    model_id,
    model_of,
    read_capped,
    too_large,
)
from .replica import REPLICA_HEADER, ReplicaServer, _Resident, drive, scope_of
from .settings import Settings, load_settings

__all__ = ["REPLICA_HEADER", "ReplicaServer", "build_app", "model_of", "serve_ray"]

log = logging.getLogger(__name__)


async def gather_answers(broadcast: Any, timeout: float) -> list[Any]:
    """The answers of a ``handle.broadcast`` from the replicas that answer within
    ``timeout``: one that is slow, restarting or gone is left out, not an error. (Serve's
    ``results_async`` fails as a whole on one slow replica, so each is awaited alone.)"""
    fetch = getattr(broadcast, "_fetch_replica_results_async", None)
    if fetch is None:  # another Ray version: all or nothing
        try:
            answers = await broadcast.results_async(timeout_s=timeout, return_exceptions=True)
        except TimeoutError:
            return []
        return [a for a in answers if not isinstance(a, BaseException)]
    try:
        results = await asyncio.wait_for(fetch(), timeout)
    except Exception:  # no replica yet, or none reachable
        log.warning("no replica to ask", exc_info=True)
        return []

    async def one(result: Any) -> Any:
        try:
            return await asyncio.wait_for(result.get_async(), timeout)
        except Exception as exc:  # a replica that is slow, failing or gone: left out
            log.warning("a replica did not answer in %.0f s: %r", timeout, exc)
            return None

    answers = await asyncio.gather(*(one(r) for r in results))
    return [a for a in answers if a is not None]


def build_app(
    replicas: int = 1,
    overrides: dict[str, Any] | None = None,
    replica_cpus: float = 1.0,
    routing: str | None = None,
) -> Any:
    """The Serve application (``serve.run`` it): ``replicas`` daemon replicas behind one ingress.
    ``routing`` (else ``OCS_RAY_ROUTING``): ``"model"`` forwards with the request's model as the
    multiplexed model id; ``"round_robin"`` without one (Serve's default replica choice)."""
    from ray import serve
    from starlette.requests import Request
    from starlette.responses import Response, StreamingResponse

    settings = load_settings(
        **{**(overrides or {}), **({"ray_routing": routing} if routing else {})}
    )
    by_model = settings.ray_routing == "model"
    max_models = settings.max_loaded_models  # ids are base models (ingress.model_id)

    @serve.deployment(
        name="Replica",
        num_replicas=replicas,
        ray_actor_options={"num_cpus": replica_cpus},
        max_ongoing_requests=64,
    )
    class Replica:
        async def __init__(self, overrides: dict[str, Any] | None) -> None:  # type: ignore[misc]  # Serve awaits it
            with contextlib.suppress(Exception):
                os.environ.setdefault(
                    "OCS_REPLICA_ID", serve.get_replica_context().replica_id.unique_id
                )
            self.server = ReplicaServer(overrides)
            server = self.server

            async def load(model_id: str) -> _Resident:
                return await server.load(model_id)

            self.get_model = serve.multiplexed(max_num_models_per_replica=max_models)(load)
            # Started now, not on the first request: Serve sends none until this returns.
            await self.server.start()

        async def check_health(self) -> None:
            """Serve's periodic health check: a dead engine loop gets the replica replaced."""
            if not self.server.healthy():
                raise RuntimeError(f"replica {self.server.replica_id}: engine not running")

        async def handle(self, request: dict[str, Any]) -> AsyncIterator[Any]:
            model = serve.get_multiplexed_model_id()
            if model:
                await self.get_model(model)
            async for item in self.server.call(request):
                yield item

        async def whole(self, request: dict[str, Any]) -> dict[str, Any]:
            return await self.server.whole(request)

        def model_ids(self) -> tuple[str, list[str]]:
            """This replica's id and the multiplexed model ids it holds (for operators:
            ``serve.get_deployment_handle("Replica", app).broadcast("model_ids")``)."""
            return self.server.replica_id, sorted(self.server.model_ids)

        async def __del__(self) -> None:
            await self.server.stop()

    # Serve's default max_ongoing_requests (5) would cap the whole deployment at 5 requests
    # in flight (streams hold theirs to the end): the ingress takes what the replicas take
    @serve.deployment(
        name="Ingress",
        num_replicas=1,
        ray_actor_options={"num_cpus": 0},
        max_ongoing_requests=64 * replicas,
    )
    class Ingress:
        def __init__(self, replica: Any) -> None:
            from .app import create_app
            from .registry.store import Registry

            self.replica = replica
            self.settings = load_settings(**(overrides or {}))
            self.registry = Registry(self.settings.models)
            # The app without its lifespan (no engine): the ingress answers /api/blobs with
            # it, streaming uploads to the shared registry as the daemon does.
            self.local = create_app(self.settings, registry=self.registry)

        async def __call__(self, request: Request) -> Response:
            forwarded = {
                "method": request.method,
                "path": request.url.path,
                "query_string": request.scope.get("query_string", b""),
                "headers": list(request.scope.get("headers", [])),
                "body": b"",
                "client": list(request.client) if request.client else None,
                "server": list(request.scope["server"]) if request.scope.get("server") else None,
            }
            path = forwarded["path"]
            if path.startswith(BLOB_PREFIX):
                local = drive(self.local, scope_of(forwarded), request.receive, "ingress")
                return await respond(local, lambda: local.aclose())
            try:
                body = await read_capped(request.stream(), request.headers.get("content-length"))
            except BodyTooLarge:
                return cast(Response, too_large(path))
            forwarded["body"] = body
            if request.method == "GET" and path in FANNED_OUT:
                return await self.fan_out(path, forwarded)
            model = ""
            if by_model:
                model = await asyncio.to_thread(model_id, self.registry, request.method, body)
            handle = self.replica.options(multiplexed_model_id=model, stream=True)
            stream = handle.handle.remote(forwarded)
            return await respond(stream, stream.cancel)

        async def fan_out(self, path: str, forwarded: dict[str, Any]) -> Response:
            """/api/ps and /metrics of the whole deployment: every live replica answers its
            own (through its guards, with the caller's headers); the answers are merged. A
            refusal (401, 403) is passed on as it is."""
            broadcast = self.replica.broadcast("whole", forwarded)
            answers = await gather_answers(broadcast, FAN_OUT_TIMEOUT)
            if not answers:
                return cast(Response, _unavailable(path))
            refusal = next((a for a in answers if a["status"] != 200), None)
            if refusal is not None:
                response = Response(refusal["body"], status_code=refusal["status"])
                response.raw_headers = list(refusal["headers"])
                return response
            body, media_type = merge(path, answers)
            replicas = ",".join(sorted(a["replica"] for a in answers))
            return Response(body, media_type=media_type, headers={REPLICA_HEADER: replicas})

    async def respond(stream: Any, close: Any) -> Response:
        """A streaming response of a head-then-chunks stream; ``close`` ends the stream
        when the client has gone (or the response is done)."""
        head = await stream.__anext__()

        async def rest() -> AsyncIterator[bytes]:
            try:
                async for chunk in stream:
                    yield chunk
            finally:
                await _maybe_await(close())

        response = StreamingResponse(rest(), status_code=head["status"])
        response.raw_headers = list(head["headers"])
        return response

    return cast(Any, Ingress).bind(cast(Any, Replica).bind(overrides))


def _unavailable(path: str) -> Any:
    from .api.errors import error_response

    return error_response(503, "no replica answered in time", path)


async def _maybe_await(value: Any) -> None:
    if asyncio.iscoroutine(value):
        await value


def serve_ray(settings: Settings, replicas: int, overrides: dict[str, Any]) -> int:
    """``ollama-compact serve --ray``: a local Ray cluster (or ``RAY_ADDRESS``'s), the
    application on Serve's proxy bound like the daemon (127.0.0.1:11434 by default)."""
    import signal
    import sys
    import threading

    from .server import open_bind_refusal, prepare_registry

    address = settings.address
    refusal = open_bind_refusal(settings)
    if refusal is not None:
        print(refusal, file=sys.stderr)
        return 2
    try:
        import ray
        from ray import serve
    except ImportError:
        print(
            "Error: --ray needs Ray Serve: pip install 'ollama-compact-server[ray]'",
            file=sys.stderr,
        )
        return 2
    if os.environ.get("RAY_ADDRESS"):
        ray.init(address=os.environ["RAY_ADDRESS"])
    else:
        # The replicas of a local cluster share this machine's registry: the default model
        # is imported here first, with the daemon's progress and errors (the replicas then
        # find it; on a remote cluster the first replica imports it).
        if prepare_registry(settings) is None:
            return 1
        ray.init(include_dashboard=False, _node_ip_address="127.0.0.1")
    serve.start(http_options={"host": address.host, "port": address.port})
    serve.run(build_app(replicas, overrides), name="ollama-compact", route_prefix="/")
    log.info("Ray Serve: %d replicas listening on %s", replicas, address.url)
    stop = threading.Event()
    for sig in (signal.SIGINT, signal.SIGTERM):  # both end the cluster this command started
        signal.signal(sig, lambda *_: stop.set())
    try:
        while not stop.wait(1):
            pass
    finally:
        serve.shutdown()
        ray.shutdown()
    return 0


def _module_app() -> Any:
    """For ``serve run ollama_compact_server.serve_ray:app`` (settings and OCS_REPLICAS from the
    environment); built on first access so importing this module needs no ray."""
    return build_app(int(os.environ.get("OCS_REPLICAS", "1")))


def __getattr__(name: str) -> Any:
    if name == "app":
        return _module_app()
    raise AttributeError(name)
