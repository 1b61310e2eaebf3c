"""Composition root: builds the FastAPI application from settings, wiring the registry and
(later) the engine. The only module that knows every concrete class."""

from __future__ import annotations

import asyncio
import logging
import socket
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from typing import Any

from fastapi import FastAPI
from fastapi.middleware.cors import CORSMiddleware

from . import __version__
from .api import anthropic, health, metrics, ollama, openai, ui
from .api.auth import APIKeyMiddleware
from .api.errors import CatchAll, DrainGuard, install_error_handlers
from .api.guard import LOCAL_ORIGIN, HostCheck, NetworkGuard, is_loopback_host
from .api.openai.responses_store import ResponseStore
from .engine.protocol import Engine
from .jobs import ModelJobs
from .registry.dropin import register_dropins
from .registry.store import ProgressFn, Registry
from .settings import Settings
from .threads import to_fresh_thread

log = logging.getLogger(__name__)


def startup_registry(registry: Registry, settings: Settings) -> None:
    """Checks the registry and registers the drop-in adapters (fast; no model loading)."""
    registry.root.mkdir(parents=True, exist_ok=True)
    for problem in registry.fsck():
        log.error("registry: %s", problem)
    registry.sweep()  # uploads no create used within the grace (BLOB_GRACE)
    result = register_dropins(registry, settings.adapters)
    if result.registered or result.skipped:
        log.info(
            "adapter folder: %d registered, %d unchanged, %d skipped",
            len(result.registered),
            len(result.unchanged),
            len(result.skipped),
        )


SWEEP_EVERY = 600.0  # seconds between sweeps of unused blobs


async def _sweep_now_and_then(registry: Registry) -> None:
    while True:
        await asyncio.sleep(SWEEP_EVERY)
        try:
            await asyncio.to_thread(registry.sweep)
        except Exception:  # a sweep that fails tries again next time
            log.exception("sweeping unused blobs failed")


def prepare_default_model(
    registry: Registry, settings: Settings, progress: ProgressFn | None = None
) -> None:
    """Imports the default model on first start (about a minute, once)."""
    if not settings.import_default:
        return
    from .jobs.default_model import ensure_default_model

    ensure_default_model(registry, settings.default_model, progress)


def build_engine(settings: Settings, registry: Registry) -> Engine:
    """The device loop for the configured device, sized by the memory planner."""
    from .engine.config import EngineConfig, ModelSource
    from .engine.device import (
        dtype_name,
        keep_freed_memory,
        model_dtype,
        resolve_device,
        resolve_dtype,
    )
    from .engine.local import LocalEngine
    from .engine.loop import DeviceLoop
    from .engine.planner import default_budget
    from .engine.provider import RegistryProvider, RegistrySizing
    from .modeling import cpu_kernels

    cpu_kernels.configure(settings.cpu_kernels, settings.kernel_cache)
    if not keep_freed_memory():
        log.info("large allocations map fresh pages (no glibc mallopt here)")
    device = resolve_device(settings.device)
    dtype = resolve_dtype(settings.dtype, device)  # float models'
    integer_dtype = model_dtype(settings.dtype, device, "int8")  # int8 / int4 models'
    budget = settings.memory_budget_bytes or default_budget(device.type)
    sizing = RegistrySizing(
        registry,
        dtype=dtype,
        num_parallel=settings.num_parallel,
        context_length=settings.context_length,
        max_loras=settings.max_loras,
        integer_dtype=dtype_name(integer_dtype),
    )
    provider = RegistryProvider(registry, device, settings.dtype)
    models = ModelSource(
        load=provider,
        resolve=provider.resolve,
        load_adapter=provider.load_adapter,
        estimate=sizing.estimate,
        plan=sizing.plan,
        guide=provider.guide,
    )
    loop = DeviceLoop(EngineConfig.from_settings(settings, device, dtype, budget), models)
    served = dtype_name(dtype)
    if integer_dtype != dtype:
        served += f" (int8 / int4 models in {dtype_name(integer_dtype)})"
    log.info("engine on %s in %s, memory budget %.1f GiB", device, served, budget / (1 << 30))
    loop.start()
    return LocalEngine(loop)


def host_check(settings: Settings) -> HostCheck | None:
    """The DNS-rebinding check: always while bound to loopback; on a wider address (as in
    the container) as long as no API key guards the routes, with this machine's own name
    and any address literal accepted too. Off only for a wider bind with a key."""
    loopback = is_loopback_host(settings.address.host)
    if not loopback and settings.api_key is not None:
        return None
    names = set(settings.extra_hosts)
    if not loopback:
        names.add(socket.gethostname().lower())
    return HostCheck(frozenset(names), any_ip=not loopback)


def _openapi(app: FastAPI) -> dict[str, Any]:
    """FastAPI's schema plus the components the request bodies refer to (api/wire.py)."""
    if app.openapi_schema is None:
        from fastapi.openapi.utils import get_openapi

        from .api.wire import SCHEMAS

        schema = get_openapi(title=app.title, version=app.version, routes=app.routes)
        schema.setdefault("components", {}).setdefault("schemas", {}).update(SCHEMAS)
        app.openapi_schema = schema
    return app.openapi_schema


def create_app(
    settings: Settings, *, registry: Registry | None = None, engine: Engine | None = None
) -> FastAPI:
    registry = registry or Registry(settings.models)

    @asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        await to_fresh_thread(startup_registry, registry, settings)  # torch work: threads.py
        owned = engine is None
        app.state.engine = engine if engine is not None else build_engine(settings, registry)
        from .chat.images import ImageLimits
        from .chat.service import ChatService
        from .chat.tokenizers import TokenizerCache

        limits = ImageLimits(
            max_bytes=settings.max_image_bytes,
            max_pixels=settings.max_image_pixels,
            max_images=settings.max_images,
            url_hosts=settings.image_hosts,
        )
        app.state.chat = ChatService(registry, app.state.engine, TokenizerCache(registry), limits)
        log.info("ollama-compact-server %s ready, registry at %s", __version__, registry.root)
        sweeper = asyncio.create_task(_sweep_now_and_then(registry))
        try:
            yield
        finally:
            sweeper.cancel()
            if owned:
                await asyncio.to_thread(app.state.engine.close)

    app = FastAPI(
        title="ollama-compact-server",
        version=__version__,
        lifespan=lifespan,
        docs_url=None,
        redoc_url=None,
    )
    app.state.settings = settings
    app.state.registry = registry
    app.openapi = lambda: _openapi(app)  # type: ignore[method-assign]
    install_error_handlers(app)
    app.state.draining = False
    app.state.metrics = metrics.Metrics()
    app.state.jobs = ModelJobs(registry)
    app.state.responses = ResponseStore()  # /v1/responses kept for previous_response_id
    app.state.lora_lock = asyncio.Lock()  # /v1/load_lora_adapter and unload, one at a time
    app.include_router(health.router)
    app.include_router(metrics.router)
    app.include_router(ollama.router)
    app.include_router(openai.router)
    app.include_router(anthropic.router)
    app.include_router(ui.router)
    # Starlette runs the last added middleware first: CORS answers preflights, the request
    # log counts and times everything after it, the guard checks Host and Origin, then the
    # key is checked; innermost, an unexpected error becomes a 500 that keeps the connection.
    app.add_middleware(CatchAll)
    if settings.api_key is not None:
        app.add_middleware(
            APIKeyMiddleware,
            key=settings.api_key.get_secret_value(),
            public_metrics=settings.public_metrics,
        )
    extra = settings.extra_origins
    app.add_middleware(NetworkGuard, hosts=host_check(settings), extra_origins=extra)
    app.add_middleware(DrainGuard, state=app.state)
    app.add_middleware(metrics.RequestLog, metrics=app.state.metrics)
    app.add_middleware(
        CORSMiddleware,
        allow_origin_regex=LOCAL_ORIGIN.pattern,
        allow_origins=extra,
        allow_methods=["*"],
        allow_headers=["*"],
    )
    return app
