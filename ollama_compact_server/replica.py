"""One daemon replica behind Ray Serve's ingress, without ray itself: our whole app in process
(its lifespan started when the replica starts), driven request by request over ASGI."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import re
from collections.abc import AsyncGenerator, AsyncIterator, Awaitable, Callable, MutableMapping
from typing import Any

from .api.metrics import REQUEST_ID_SCOPE
from .app import prepare_default_model
from .settings import Settings, load_settings
from .threads import to_fresh_thread

log = logging.getLogger(__name__)

REPLICA_HEADER = "x-ocs-replica"
REQUEST_ID_HEADER = b"x-request-id"
# Not passed back: the ingress's own response frames the body, and Ray's proxy adds the one
# x-request-id a reply carries (the client's, or one it made), which the app then logs too.
_DROPPED = {b"content-length", b"transfer-encoding", b"connection", REQUEST_ID_HEADER}
_PLAIN_ID = re.compile(r"[A-Za-z0-9._:-]{1,64}")

Receive = Callable[[], Awaitable[MutableMapping[str, Any]]]


def request_id_of(headers: list[tuple[bytes, bytes]]) -> str | None:
    """The request's ``x-request-id`` when it is a plain token the logs can carry as it is."""
    for key, value in headers:
        if key.lower() == REQUEST_ID_HEADER:
            text = value.decode("latin-1")
            return text if _PLAIN_ID.fullmatch(text) else None
    return None


def scope_of(request: dict[str, Any]) -> dict[str, Any]:
    """The ASGI scope of a request forwarded by the ingress (a plain dict: it crosses Ray)."""
    headers = [(bytes(k), bytes(v)) for k, v in request["headers"]]
    scope: dict[str, Any] = {
        "type": "http",
        "asgi": {"version": "3.0", "spec_version": "2.3"},
        "http_version": "1.1",
        "method": request["method"],
        "scheme": "http",
        "path": request["path"],
        "raw_path": request["path"].encode(),
        "root_path": "",
        "query_string": request["query_string"],
        "headers": headers,
        "client": tuple(request["client"]) if request.get("client") else None,
        "server": tuple(request["server"]) if request.get("server") else None,
        "state": {},
    }
    request_id = request_id_of(headers)
    if request_id is not None:
        scope[REQUEST_ID_SCOPE] = request_id
    return scope


async def drive(
    app: Any, scope: dict[str, Any], receive: Receive, replica: str
) -> AsyncGenerator[Any, None]:
    """Runs one request through ``app``; yields the head ``{"status", "headers"}`` (with
    ``x-ocs-replica: replica``), then the body chunks as the app sends them. Closing the
    generator (client gone) tells the app the client left and cancels the call."""
    out: asyncio.Queue[MutableMapping[str, Any] | None] = asyncio.Queue()
    disconnected = asyncio.Event()

    async def receiving() -> MutableMapping[str, Any]:
        if disconnected.is_set():
            return {"type": "http.disconnect"}
        return await receive()

    async def send(message: MutableMapping[str, Any]) -> None:
        await out.put(message)

    async def run() -> None:
        try:
            await app(scope, receiving, send)
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
                    if bytes(k).lower() not in _DROPPED
                ]
                headers.append((REPLICA_HEADER.encode(), replica.encode()))
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


def body_receive(body: bytes) -> tuple[Receive, asyncio.Event]:
    """An ASGI ``receive`` that gives ``body`` once, then waits for the event (the client
    gone) and says so."""
    gone = asyncio.Event()
    sent = False

    async def receive() -> MutableMapping[str, Any]:
        nonlocal sent
        if not sent:
            sent = True
            return {"type": "http.request", "body": body, "more_body": False}
        await gone.wait()
        return {"type": "http.disconnect"}

    return receive, gone


class _Resident:
    """One multiplexed model id held by a replica; Serve calls ``__del__`` on eviction."""

    def __init__(self, app: Any, model: str, held: set[str]) -> None:
        self.app = app
        self.model = model
        self.held = held
        held.add(model)

    def __del__(self) -> None:
        app, self.app = getattr(self, "app", None), None
        if app is None:
            return
        self.held.discard(self.model)
        engine = getattr(app.state, "engine", None)
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
        self.model_ids: set[str] = set()  # the multiplexed model ids Serve has this hold

    @property
    def max_models(self) -> int:
        return self.settings.max_loaded_models  # model ids are base models

    async def start(self) -> None:
        """The default model (imported once per shared registry: the others wait for the
        first and find it there), then the app's lifespan: the engine, the registry checks."""
        async with self._started:
            if self._lifespan is None:
                registry = self.app.state.registry
                await to_fresh_thread(prepare_default_model, registry, self.settings)
                stack = contextlib.AsyncExitStack()
                await stack.enter_async_context(self.app.router.lifespan_context(self.app))
                self._lifespan = stack
                log.info("replica %s ready", self.replica_id)

    def healthy(self) -> bool:
        """Started, and the engine loop alive (what /health says)."""
        engine = getattr(self.app.state, "engine", None)
        return self._lifespan is not None and engine is not None and bool(engine.health())

    async def stop(self) -> None:
        if self._lifespan is not None:
            stack, self._lifespan = self._lifespan, None
            await stack.aclose()

    async def load(self, model: str) -> _Resident:
        """Serve's multiplexed "load": warm the model on this replica's engine (best effort: a
        model that fails to load is left for the request itself to answer)."""
        await self.start()
        with contextlib.suppress(Exception):
            await self.app.state.engine.load(model)
        return _Resident(self.app, model, self.model_ids)

    async def call(self, request: dict[str, Any]) -> AsyncIterator[Any]:
        """Runs one forwarded request: the head, then the body chunks (see ``drive``)."""
        await self.start()
        receive, gone = body_receive(request["body"])
        try:
            async for item in drive(self.app, scope_of(request), receive, self.replica_id):
                yield item
        finally:
            gone.set()

    async def whole(self, request: dict[str, Any]) -> dict[str, Any]:
        """One forwarded request answered whole (for the ingress's deployment-wide views):
        ``{"replica", "status", "headers", "body"}``."""
        answer: dict[str, Any] = {"replica": self.replica_id, "status": 500, "headers": []}
        chunks: list[bytes] = []
        async for item in self.call(request):
            if isinstance(item, dict):
                answer.update(item)
            else:
                chunks.append(item)
        answer["body"] = b"".join(chunks)
        return answer
