"""Replicas on Ray Serve: one HTTP ingress, N daemon replicas, routed by model.

``ollama-compact serve --ray --replicas N`` (or ``serve run ollama_compact_server.serve_ray:app``)
deploys two Serve deployments:

- ``Ingress`` takes every HTTP request (all our dialects unchanged: Ollama, OpenAI, Anthropic,
  the web page), reads the request's model name (the JSON body's ``model`` field; none -> any
  replica) and forwards the request, headers unchanged (Host, Origin, Authorization: the app's
  own guards run on the replica), to a ``Replica`` through a DeploymentHandle with
  ``multiplexed_model_id=model``: Ray Serve's model multiplexing sends it to a replica that
  already holds that model, a new model to the least loaded one. ``OCS_RAY_ROUTING=round_robin``
  forwards without a model id instead (Serve's model-blind default: the baseline of
  ``benchmarks/bench_scale.py``).
- ``Replica`` runs our real app in process (``create_app`` with its own engine, its lifespan
  started once) and executes the forwarded request against it through ASGI, streaming the
  response back chunk by chunk (NDJSON and SSE pass through as they are produced) with its
  status and headers plus ``x-ocs-replica``. Its resident set is bounded like the daemon's:
  ``max_num_models_per_replica`` is ``OCS_MAX_LOADED_MODELS`` plus the adapter slots
  (``OCS_MAX_LORAS``); a model Serve evicts is unloaded from the engine.

The registry is shared: every replica reads its settings from the environment as the daemon
does, so all see one ``OCS_MODELS`` path (a shared volume across machines). Management calls
(create, copy, delete, pull) need no special routing: any replica does them on disk and the
others see the result. ``/api/ps`` answers for the replica that served it (not yet the whole
deployment). ``ray`` is imported lazily: the package works without the ``ray`` extra.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import os
from collections.abc import AsyncIterator, MutableMapping
from typing import Any, cast

from .settings import Settings, load_settings

log = logging.getLogger(__name__)

REPLICA_HEADER = "x-ocs-replica"
_HOP_BY_HOP = {b"content-length", b"transfer-encoding", b"connection"}


def model_of(method: str, body: bytes) -> str:
    """The multiplexed model id of a request: the JSON body's ``model`` (or ``name``, as
    /api/show takes it) for POSTs; empty (any replica) otherwise or when unreadable."""
    if method != "POST" or not body:
        return ""
    try:
        data = json.loads(body)
    except ValueError:
        return ""
    if not isinstance(data, dict):
        return ""
    model = data.get("model") or data.get("name") or ""
    return model if isinstance(model, str) else ""


class _Resident:
    """One multiplexed model id held by a replica; Serve calls ``__del__`` on eviction."""

    def __init__(self, app: Any, model: str) -> None:
        self.app = app
        self.model = model

    def __del__(self) -> None:
        app, self.app = getattr(self, "app", None), None
        engine = getattr(getattr(app, "state", None), "engine", None)
        if engine is not None:
            with contextlib.suppress(Exception):
                engine.unload(self.model)


class ReplicaServer:
    """Our app in process, driven request by request through ASGI (the Replica's body)."""

    def __init__(self, overrides: dict[str, Any] | None = None) -> None:
        from .app import create_app

        self.settings: Settings = load_settings(**(overrides or {}))
        self.app = create_app(self.settings)
        self.replica_id = os.environ.get("OCS_REPLICA_ID") or f"pid{os.getpid()}"
        self._lifespan: contextlib.AsyncExitStack | None = None
        self._started = asyncio.Lock()

    @property
    def max_models(self) -> int:
        return self.settings.max_loaded_models + self.settings.max_loras

    async def start(self) -> None:
        async with self._started:
            if self._lifespan is None:
                stack = contextlib.AsyncExitStack()
                await stack.enter_async_context(self.app.router.lifespan_context(self.app))
                self._lifespan = stack

    async def stop(self) -> None:
        if self._lifespan is not None:
            stack, self._lifespan = self._lifespan, None
            await stack.aclose()

    async def load(self, model: str) -> _Resident:
        """Serve's multiplexed "load": warm the model on this replica's engine (best effort: a
        name the registry lacks is left for the request itself to answer 404)."""
        await self.start()
        with contextlib.suppress(Exception):
            await self.app.state.engine.load(model)
        return _Resident(self.app, model)

    async def call(self, request: dict[str, Any]) -> AsyncIterator[Any]:
        """Runs one forwarded request; yields the head ``{"status", "headers"}``, then the body
        chunks as the app sends them. Closing the generator (client gone) cancels the call."""
        await self.start()
        scope = {
            "type": "http",
            "asgi": {"version": "3.0", "spec_version": "2.3"},
            "http_version": "1.1",
            "method": request["method"],
            "scheme": "http",
            "path": request["path"],
            "raw_path": request["path"].encode(),
            "root_path": "",
            "query_string": request["query_string"],
            "headers": [(bytes(k), bytes(v)) for k, v in request["headers"]],
            "client": tuple(request["client"]) if request.get("client") else None,
            "server": tuple(request["server"]) if request.get("server") else None,
            "state": {},
        }
        out: asyncio.Queue[MutableMapping[str, Any] | None] = asyncio.Queue()
        disconnected = asyncio.Event()
        body_sent = False

        async def receive() -> dict[str, Any]:
            nonlocal body_sent
            if not body_sent:
                body_sent = True
                return {"type": "http.request", "body": request["body"], "more_body": False}
            await disconnected.wait()
            return {"type": "http.disconnect"}

        async def send(message: MutableMapping[str, Any]) -> None:
            await out.put(message)

        async def run() -> None:
            try:
                await self.app(scope, receive, send)
            finally:
                await out.put(None)

        task = asyncio.create_task(run())
        try:
            while True:
                message = await out.get()
                if message is None:
                    break
                if message["type"] == "http.response.start":
                    headers = [
                        (bytes(k), bytes(v))
                        for k, v in message.get("headers", [])
                        if bytes(k).lower() not in _HOP_BY_HOP
                    ]
                    headers.append((REPLICA_HEADER.encode(), self.replica_id.encode()))
                    yield {"status": message["status"], "headers": headers}
                elif message["type"] == "http.response.body":
                    chunk = message.get("body", b"")
                    if chunk:
                        yield bytes(chunk)
                    if not message.get("more_body", False):
                        break
            await task
        finally:
            disconnected.set()
            if not task.done():
                task.cancel()
                with contextlib.suppress(BaseException):
                    await task


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
    max_models = settings.max_loaded_models + settings.max_loras

    @serve.deployment(
        name="Replica",
        num_replicas=replicas,
        ray_actor_options={"num_cpus": replica_cpus},
        max_ongoing_requests=64,
    )
    class Replica:
        def __init__(self, overrides: dict[str, Any] | None) -> None:
            with contextlib.suppress(Exception):
                os.environ.setdefault(
                    "OCS_REPLICA_ID", serve.get_replica_context().replica_id.unique_id
                )
            self.server = ReplicaServer(overrides)
            server = self.server

            async def load(model_id: str) -> _Resident:
                return await server.load(model_id)

            self.get_model = serve.multiplexed(max_num_models_per_replica=max_models)(load)

        async def handle(self, request: dict[str, Any]) -> AsyncIterator[Any]:
            model = serve.get_multiplexed_model_id()
            if model:
                await self.get_model(model)
            async for item in self.server.call(request):
                yield item

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
            self.replica = replica

        async def __call__(self, request: Request) -> Response:
            body = await request.body()
            model = model_of(request.method, body) if by_model else ""
            forwarded = {
                "method": request.method,
                "path": request.url.path,
                "query_string": request.scope.get("query_string", b""),
                "headers": list(request.scope.get("headers", [])),
                "body": body,
                "client": list(request.client) if request.client else None,
                "server": list(request.scope["server"]) if request.scope.get("server") else None,
            }
            handle = self.replica.options(multiplexed_model_id=model, stream=True)
            stream = handle.handle.remote(forwarded)
            head = await stream.__anext__()

            async def rest() -> AsyncIterator[bytes]:
                try:
                    async for chunk in stream:
                        yield chunk
                finally:
                    stream.cancel()

            response = StreamingResponse(rest(), status_code=head["status"])
            response.raw_headers = list(head["headers"])
            return response

    return cast(Any, Ingress).bind(cast(Any, Replica).bind(overrides))


def serve_ray(settings: Settings, replicas: int, overrides: dict[str, Any]) -> int:
    """``ollama-compact serve --ray``: a local Ray cluster (or ``RAY_ADDRESS``'s), the
    application on Serve's proxy bound like the daemon (127.0.0.1:11434 by default)."""
    import signal
    import sys
    import threading

    from .server import open_bind_refusal

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
