"""`ollama-compact serve`: prepares the registry (first-start import of the default model),
then runs the app under uvicorn."""

from __future__ import annotations

import logging
import sys
from types import FrameType

import uvicorn

from .app import create_app, prepare_default_model
from .logs import setup_logging
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


def serve(settings: Settings) -> int:
    setup_logging(settings.log_level, settings.log_json)
    address = settings.address
    from .api.guard import is_loopback_host

    if (
        not is_loopback_host(address.host)
        and settings.api_key is None
        and not settings.insecure_no_auth
    ):
        print(
            f"Error: refusing to listen on {address.host} without OCS_API_KEY: anyone who can "
            "reach it could use and change your models. Set OCS_API_KEY, or "
            "OCS_INSECURE_NO_AUTH=true if the network is trusted.",
            file=sys.stderr,
        )
        return 2
    registry = Registry(settings.models)
    try:
        registry.root.mkdir(parents=True, exist_ok=True)
        prepare_default_model(registry, settings, _ProgressPrinter())
    except (RegistryError, OSError) as exc:
        print(f"Error: cannot prepare the registry at {settings.models}: {exc}", file=sys.stderr)
        return 1
    from .engine.device import resolve_device
    from .engine.types import EngineError

    try:
        resolve_device(settings.device)  # e.g. OCS_DEVICE=cuda on a machine without CUDA
    except EngineError as exc:
        print(f"Error: {exc}", file=sys.stderr)
        return 2
    app = create_app(settings, registry=registry)
    log.info("listening on %s", address.url)
    # SIGTERM/SIGINT: uvicorn stops accepting connections at once, lets running requests
    # finish for up to OCS_SHUTDOWN_TIMEOUT seconds, then the lifespan closes the engine,
    # which ends what is left with an in-band error event.
    config = uvicorn.Config(
        app,
        host=address.host,
        port=address.port,
        log_config=None,
        access_log=False,
        timeout_graceful_shutdown=settings.shutdown_timeout,
    )
    GracefulServer(config).run()
    log.info("stopped")
    return 0


class GracefulServer(uvicorn.Server):
    """uvicorn's server, except that a requested stop (SIGTERM, Ctrl-C) ends with exit
    status 0 instead of re-raising the signal after the graceful shutdown."""

    def handle_exit(self, sig: int, frame: FrameType | None) -> None:
        super().handle_exit(sig, frame)
        self._captured_signals.clear()
