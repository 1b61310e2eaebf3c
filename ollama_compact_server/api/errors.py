"""Error rendering, once per dialect: the domain's typed errors (chat, engine, registry) and
the API's own become the dialect's error body with a real status code. The dialect is the
route's: `/v1/messages` speaks Anthropic's, other `/v1/` routes OpenAI's, the rest Ollama's."""

from __future__ import annotations

import logging
from enum import Enum
from typing import Any

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from starlette.requests import ClientDisconnect

from ..chat.errors import ChatError
from ..engine.types import EngineBusy, EngineError
from ..registry.errors import RegistryError

log = logging.getLogger(__name__)


class APIError(Exception):
    """An HTTP-level refusal (bad JSON, a wrong field type, a missing header)."""

    def __init__(self, status: int, message: str) -> None:
        super().__init__(message)
        self.status = status
        self.message = message


class Dialect(str, Enum):
    OLLAMA = "ollama"
    OPENAI = "openai"
    ANTHROPIC = "anthropic"


def dialect_of(path: str) -> Dialect:
    if path == "/v1/messages" or path.startswith("/v1/messages/"):
        return Dialect.ANTHROPIC
    if path.startswith("/v1/"):
        return Dialect.OPENAI
    return Dialect.OLLAMA


OPENAI_TYPES = {401: "authentication_error", 403: "permission_error", 429: "rate_limit_error"}
ANTHROPIC_TYPES = {
    400: "invalid_request_error",
    401: "authentication_error",
    403: "permission_error",
    404: "not_found_error",
    413: "request_too_large",
    429: "rate_limit_error",
    529: "overloaded_error",
}


def status_of(exc: BaseException, dialect: Dialect) -> int:
    """A domain error's status in the dialect: a busy engine is Ollama's 503, OpenAI's 429
    (its clients back off on it) and Anthropic's 529 (overloaded)."""
    if isinstance(exc, EngineBusy):
        return {Dialect.OPENAI: 429, Dialect.ANTHROPIC: 529}.get(dialect, 503)
    status = getattr(exc, "status", 500)
    return status if isinstance(status, int) and 400 <= status < 600 else 500


def error_body(dialect: Dialect, status: int, message: str) -> dict[str, Any]:
    if dialect is Dialect.OPENAI:
        kind = OPENAI_TYPES.get(status, "invalid_request_error" if status < 500 else "server_error")
        code = {404: "model_not_found", 429: "rate_limit_exceeded"}.get(status)
        return {"error": {"message": message, "type": kind, "param": None, "code": code}}
    if dialect is Dialect.ANTHROPIC:
        kind = ANTHROPIC_TYPES.get(status, "invalid_request_error" if status < 500 else "api_error")
        return {"type": "error", "error": {"type": kind, "message": message}}
    return {"error": message}


def error_response(status: int, message: str, path: str = "") -> JSONResponse:
    """The dialect's error body for the route at ``path``."""
    body = error_body(dialect_of(path), status, message)
    return JSONResponse(body, status_code=status, headers=_retry(status))


def in_band(exc: BaseException, dialect: Dialect) -> tuple[int, str]:
    """(status, message) of an error met after the headers went out; unexpected errors are
    logged and shown without their details."""
    if isinstance(exc, (ChatError, EngineError, RegistryError, APIError)):
        return status_of(exc, dialect), str(exc)
    log.error("stream failed", exc_info=(type(exc), exc, exc.__traceback__))
    return 500, "internal error while generating"


def _retry(status: int) -> dict[str, str] | None:
    return {"Retry-After": "1"} if status in (429, 503, 529) else None


def install_error_handlers(app: FastAPI) -> None:
    @app.exception_handler(APIError)
    async def _api_error(request: Request, exc: APIError) -> JSONResponse:
        return error_response(exc.status, exc.message, request.url.path)

    async def _domain_error(request: Request, exc: Exception) -> JSONResponse:
        path = request.url.path
        return error_response(status_of(exc, dialect_of(path)), str(exc), path)

    for kind in (ChatError, EngineError, RegistryError):
        app.add_exception_handler(kind, _domain_error)

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


class CatchAll:
    """The innermost middleware: an unexpected exception before the response started
    becomes a 500 in the route's dialect, and the request ends normally. (Starlette's
    handler for ``Exception`` answers too, but re-raises, and uvicorn then drops the
    keep-alive connection, failing the client's next request on it.) After the response
    started the exception goes on: the streams report their own errors in-band."""

    def __init__(self, app: Any) -> None:
        self.app = app

    async def __call__(self, scope: Any, receive: Any, send: Any) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        started = False

        async def sending(message: Any) -> None:
            nonlocal started
            started = started or message["type"] == "http.response.start"
            await send(message)

        try:
            await self.app(scope, receive, sending)
        except ClientDisconnect:
            return  # nobody to answer
        except Exception:
            if started:
                raise
            path = scope.get("path", "")
            log.exception("unhandled error on %s %s", scope.get("method", ""), path)
            await error_response(500, "internal server error", path)(scope, receive, send)


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
