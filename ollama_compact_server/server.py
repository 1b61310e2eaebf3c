"""`ollama-compact serve`: prepares the registry (first-start import of the default model),
then runs the app under uvicorn."""

from __future__ import annotations

import asyncio
import logging
import socket
import sys
from collections.abc import Callable
from types import FrameType
from typing import Any

import uvicorn

from .app import create_app, prepare_default_model
from .logs import setup_logging
from .protocol import protocol_class
from .registry.errors import RegistryError
from .registry.store import Registry
from .settings import Settings

log = logging.getLogger(__name__)


class _ProgressPrinter:
    """Prints import progress on one terminal line (percent for byte counts)."""

    def __init__(self) -> None:
        self.last = ""

    def __call__(self, status: str, completed: int | None = None, total: int | None = None) -> None:
        line = status
        if completed is not None and total:
            line = f"{status} {100 * completed // total:3d}% ({completed >> 20}/{total >> 20} MiB)"
        if line != self.last:
            end = "\r" if completed is not None and completed != total else "\n"
            print(line.ljust(60), end=end, file=sys.stderr, flush=True)
            self.last = line


def open_bind_refusal(settings: Settings) -> str | None:
    """Why the daemon (or its Ray Serve ingress) must not listen where settings say: a
    non-loopback address without OCS_API_KEY; None when it may."""
    from .api.guard import is_loopback_host

    address = settings.address
    if is_loopback_host(address.host) or settings.api_key is not None:
        return None
    if settings.insecure_no_auth:
        return None
    return (
        f"Error: refusing to listen on {address.host} without OCS_API_KEY: anyone who can "
        "reach it could use and change your models. Set OCS_API_KEY, or "
        "OCS_INSECURE_NO_AUTH=true if the network is trusted."
    )


def prepare_registry(settings: Settings) -> Registry | None:
    """The registry, with the default model imported on first start (progress shown); None
    after saying why it cannot be prepared."""
    registry = Registry(settings.models)
    try:
        registry.root.mkdir(parents=True, exist_ok=True)
        prepare_default_model(registry, settings, _ProgressPrinter())
    except (RegistryError, OSError) as exc:
        print(f"Error: cannot prepare the registry at {settings.models}: {exc}", file=sys.stderr)
        return None
    return registry


def serve(settings: Settings) -> int:
    setup_logging(settings.log_level, settings.log_json)
    address = settings.address
    refusal = open_bind_refusal(settings)
    if refusal is not None:
        print(refusal, file=sys.stderr)
        return 2
    registry = prepare_registry(settings)
    if registry is None:
        return 1
    from .engine.device import resolve_device
    from .engine.types import EngineError

    try:
        resolve_device(settings.device)  # e.g. OCS_DEVICE=cuda on a machine without CUDA
    except EngineError as exc:
        print(f"Error: {exc}", file=sys.stderr)
        return 2
    app = create_app(settings, registry=registry)
    log.info("listening on %s (web page: %s/ui/)", address.url, address.client_url.rstrip("/"))
    GracefulServer(
        uvicorn_config(app, settings, address.host, address.port),
        drain_timeout=settings.shutdown_timeout,
        on_timeout=lambda: close_engine(app),
        on_drain=lambda: setattr(app.state, "draining", True),
    ).run()
    log.info("stopped")
    return 0


def uvicorn_config(app: Any, settings: Settings, host: str, port: int) -> uvicorn.Config:
    """How the daemon runs under uvicorn: its own h11 protocol with read deadlines
    (protocol.py) and the connection limit; tests serve the app the same way."""
    return uvicorn.Config(
        app,
        host=host,
        port=port,
        log_config=None,
        access_log=False,
        lifespan="on",
        http=protocol_class(settings.header_timeout),
        # asyncio's own loop and no websockets whatever else is installed (ray[serve] brings
        # uvloop and websockets): the daemon behaves the same with or without the extras
        loop="asyncio",
        ws="none",
        limit_concurrency=settings.max_connections,
    )


def close_engine(app: Any) -> None:
    """Ends every running request with an in-band "shutting down" error (the engine's close)."""
    engine = getattr(app.state, "engine", None)
    if engine is not None:
        engine.close()


FINAL_GRACE = 5.0  # seconds handlers get to write their error event once the engine closed


class GracefulServer(uvicorn.Server):
    """uvicorn's server with a shutdown that keeps its promise. On SIGTERM or Ctrl-C it stops
    accepting connections, lets running requests of both dialects stream to their end for up
    to ``drain_timeout`` seconds, then ``on_timeout`` ends what is left with an in-band error
    event (the handlers get FINAL_GRACE seconds to write it before their tasks are cancelled),
    runs the lifespan shutdown and exits with status 0 (no re-raised signal).

    uvicorn's own graceful shutdown is not enough: sse-starlette, which frames the OpenAI
    streams, watches uvicorn's exit flag and ends every SSE stream the moment a signal
    arrives, and uvicorn's timeout cancels handlers without a word to the client."""

    def __init__(
        self,
        config: uvicorn.Config,
        drain_timeout: float,
        on_timeout: Callable[[], None] = lambda: None,
        on_drain: Callable[[], None] = lambda: None,
    ) -> None:
        config.timeout_graceful_shutdown = None  # the drain below bounds the wait itself
        super().__init__(config)
        self.drain_timeout = drain_timeout
        self.on_timeout = on_timeout
        self.on_drain = on_drain  # new requests on open connections now get a 503

    def handle_exit(self, sig: int, frame: FrameType | None) -> None:
        super().handle_exit(sig, frame)
        self._captured_signals.clear()

    async def shutdown(self, sockets: list[socket.socket] | None = None) -> None:
        log.info(
            "shutting down: no new connections; running requests get up to %gs",
            self.drain_timeout,
        )
        self.on_drain()
        for server in self.servers:
            server.close()
        for sock in sockets or []:
            sock.close()
        for connection in list(self.server_state.connections):
            connection.shutdown()  # idle ones close now, busy ones after their response
        if not await self._drained(self.drain_timeout):
            log.warning(
                "shutdown timeout: ending %d running request(s) with an error",
                len(self.server_state.connections),
            )
            await asyncio.to_thread(self.on_timeout)
            if not await self._drained(FINAL_GRACE):
                # last resort: cancel what is left (SSE streams included: they end with
                # their request, api/streaming.py)
                for task in self.server_state.tasks:
                    task.cancel(msg="shutdown timeout")
                await self._drained(1.0)
        if not self.force_exit:
            await self.lifespan.shutdown()

    async def _drained(self, timeout: float) -> bool:
        """Waits until no connection or task is left (or a second Ctrl-C); False on timeout."""
        loop = asyncio.get_running_loop()
        deadline = loop.time() + timeout
        while self.server_state.connections or self.server_state.tasks:
            if self.force_exit:
                return True
            if loop.time() >= deadline:
                return False
            await asyncio.sleep(0.05)
        for server in self.servers:
            await server.wait_closed()
        return True
