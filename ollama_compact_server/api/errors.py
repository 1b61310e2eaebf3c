"""Error rendering: typed errors become the dialect's error body with a real status code."""

from __future__ import annotations

import logging
from typing import Any

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse

from ..registry.errors import RegistryError

log = logging.getLogger(__name__)


class APIError(Exception):
    def __init__(self, status: int, message: str) -> None:
        super().__init__(message)
        self.status = status
        self.message = message


def error_response(status: int, message: str, path: str = "") -> JSONResponse:
    """Ollama's {"error": "..."}; on /v1 routes OpenAI's {"error": {message, type, ...}}."""
    if path.startswith("/v1/"):
        kinds = {401: "authentication_error", 429: "rate_limit_error"}
        kind = kinds.get(status, "invalid_request_error" if status < 500 else "server_error")
        code = {404: "model_not_found", 429: "rate_limit_exceeded"}.get(status)
        body = {"error": {"message": message, "type": kind, "param": None, "code": code}}
        return JSONResponse(body, status_code=status, headers=_retry(status))
    return JSONResponse({"error": message}, status_code=status, headers=_retry(status))


def _retry(status: int) -> dict[str, str] | None:
    return {"Retry-After": "1"} if status in (429, 503) else None


def install_error_handlers(app: FastAPI) -> None:
    @app.exception_handler(APIError)
    async def _api_error(request: Request, exc: APIError) -> JSONResponse:
        return error_response(exc.status, exc.message, request.url.path)

    @app.exception_handler(RegistryError)
    async def _registry_error(request: Request, exc: RegistryError) -> JSONResponse:
        return error_response(exc.status, str(exc), request.url.path)

    @app.exception_handler(RequestValidationError)
    async def _validation_error(request: Request, exc: RequestValidationError) -> JSONResponse:
        first = exc.errors()[0] if exc.errors() else {}
        where = ".".join(str(p) for p in first.get("loc", ()) if p != "body")
        message = str(first.get("msg", "invalid request"))
        return error_response(400, f"{where}: {message}" if where else message, request.url.path)

    @app.exception_handler(Exception)
    async def _unexpected(request: Request, exc: Exception) -> JSONResponse:
        log.exception("unhandled error on %s %s", request.method, request.url.path)
        return error_response(500, "internal server error", request.url.path)


class DrainGuard:
    """While the server shuts down (``app.state.draining``), new requests get a 503 in their
    dialect with ``Connection: close``; requests already running are not affected."""

    def __init__(self, app: Any, state: Any) -> None:
        self.app = app
        self.state = state

    async def __call__(self, scope: Any, receive: Any, send: Any) -> None:
        if scope["type"] == "http" and getattr(self.state, "draining", False):
            response = error_response(503, "the server is shutting down", scope.get("path", ""))
            response.headers["Connection"] = "close"
            await response(scope, receive, send)
            return
        await self.app(scope, receive, send)
