"""Network guards in front of every route: Host-header check against DNS rebinding while
bound to loopback, and refusal of state-changing requests from foreign browser origins."""

from __future__ import annotations

import re
from ipaddress import ip_address

from starlette.types import ASGIApp, Receive, Scope, Send

from .errors import error_response

LOCAL_ORIGIN = re.compile(
    r"^(https?://(localhost|127\.0\.0\.1|\[::1\]|[a-z0-9-]+\.localhost)(:\d+)?"
    r"|app://.*|file://.*|tauri://.*|vscode-webview://.*)$",
    re.IGNORECASE,
)
SAFE_METHODS = {"GET", "HEAD", "OPTIONS"}


def is_loopback_host(value: str) -> bool:
    """True for localhost names and loopback addresses, with or without a port."""
    host = value.strip().lower()
    if not host:
        return False
    if host.startswith("["):  # [::1]:port
        host = host[1 : host.find("]")] if "]" in host else ""
    elif host.count(":") == 1:
        host = host.rsplit(":", 1)[0]
    if host == "localhost" or host.endswith(".localhost"):
        return True
    try:
        return ip_address(host).is_loopback
    except ValueError:
        return False


def origin_allowed(origin: str, extra: list[str]) -> bool:
    return bool(LOCAL_ORIGIN.match(origin)) or origin in extra or "*" in extra


class NetworkGuard:
    def __init__(self, app: ASGIApp, *, check_host: bool, extra_origins: list[str]) -> None:
        self.app = app
        self.check_host = check_host
        self.extra_origins = extra_origins

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        headers = {
            k.decode("latin-1").lower(): v.decode("latin-1") for k, v in scope.get("headers", [])
        }
        if self.check_host and not is_loopback_host(headers.get("host", "")):
            await error_response(403, "forbidden: unexpected Host header", scope["path"])(
                scope, receive, send
            )
            return
        origin = headers.get("origin")
        if (
            origin
            and scope["method"] not in SAFE_METHODS
            and not origin_allowed(origin, self.extra_origins)
        ):
            await error_response(403, "forbidden: origin not allowed", scope["path"])(
                scope, receive, send
            )
            return
        await self.app(scope, receive, send)
