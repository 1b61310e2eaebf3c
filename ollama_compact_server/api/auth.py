"""API-key check: with OCS_API_KEY set, every route but the public probes needs the key,
as `Authorization: Bearer <key>` or as Anthropic's `x-api-key: <key>`, compared in constant
time. The web page's static files are public too (they hold no data; the page asks for the
key when a call answers 401). With OCS_PUBLIC_METRICS, GET /metrics is public too (gateways
scrape it without a key)."""

from __future__ import annotations

import hmac

from starlette.types import ASGIApp, Receive, Scope, Send

from .errors import error_response
from .ui import is_public

PUBLIC = {("HEAD", "/"), ("GET", "/"), ("GET", "/health"), ("HEAD", "/health")}


class APIKeyMiddleware:
    def __init__(self, app: ASGIApp, key: str, public_metrics: bool = False) -> None:
        self.app = app
        self.public = PUBLIC | ({("GET", "/metrics")} if public_metrics else set())
        self.expected = f"Bearer {key}".encode()
        self.expected_key = key.encode()

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if (
            scope["type"] != "http"
            or (scope["method"], scope["path"]) in self.public
            or is_public(scope["method"], scope["path"])
        ):
            await self.app(scope, receive, send)
            return
        bearer = key = b""
        for name, value in scope.get("headers", []):
            if name == b"authorization":
                bearer = value
            elif name == b"x-api-key":
                key = value
        # both compared, always: the time taken says nothing about which one was sent
        good_bearer = hmac.compare_digest(bearer, self.expected)
        good_key = hmac.compare_digest(key, self.expected_key)
        if not (good_bearer or good_key):
            response = error_response(
                401,
                "unauthorized: a valid key is required ('Authorization: Bearer <key>' or "
                "'x-api-key: <key>')",
                scope["path"],
            )
            response.headers["WWW-Authenticate"] = "Bearer"
            await response(scope, receive, send)
            return
        await self.app(scope, receive, send)
