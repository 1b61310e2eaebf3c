"""Liveness and readiness probes."""

from __future__ import annotations

from fastapi import APIRouter, Request
from fastapi.responses import JSONResponse

router = APIRouter()


@router.get("/health")
@router.head("/health")
async def health(request: Request) -> JSONResponse:
    """Liveness: the process answers and the engine loop is alive."""
    engine = getattr(request.app.state, "engine", None)
    alive = engine is not None and engine.health()
    return JSONResponse(
        {"status": "ok" if alive else "engine down"}, status_code=200 if alive else 503
    )


@router.get("/ready")
async def ready(request: Request) -> JSONResponse:
    """Readiness: the engine is alive and the default model is in the registry (loadable)."""
    engine = getattr(request.app.state, "engine", None)
    settings = request.app.state.settings
    registry = request.app.state.registry
    if engine is None or not engine.health():
        return JSONResponse({"status": "engine not running"}, status_code=503)
    if not registry.exists(settings.default_model):
        return JSONResponse(
            {"status": f"default model {settings.default_model} missing"}, status_code=503
        )
    return JSONResponse({"status": "ready"})
