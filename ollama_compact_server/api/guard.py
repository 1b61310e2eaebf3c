"""Network guards in front of every route: Host-header check against DNS rebinding (while
bound to loopback, or on any address while no API key is set), and refusal of
state-changing requests from foreign browser origins."""

from __future__ import annotations

import re
from dataclasses import dataclass
from ipaddress import ip_address

from starlette.types import ASGIApp, Receive, Scope, Send

from .errors import error_response

LOCAL_ORIGIN = re.compile(
    r"^(https?://(localhost|127\.0\.0\.1|\[::1\]|[a-z0-9-]+\.localhost)(:\d+)?"
    r"|app://.*|file://.*|tauri://.*|vscode-webview://.*)$",
    re.IGNORECASE,
)
SAFE_METHODS = {"GET", "HEAD", "OPTIONS"}


def host_name(value: str) -> str:
    """The host of a Host header value, lower-case, without port or IPv6 brackets."""
    host = value.strip().lower()
    if host.startswith("["):  # [::1]:port
        return host[1 : host.find("]")] if "]" in host else ""
    if host.count(":") == 1:
        return host.rsplit(":", 1)[0]
    return host


def is_ip(host: str) -> bool:
    try:
        ip_address(host)
    except ValueError:
        return False
    return True


def is_loopback_host(value: str) -> bool:
    """True for localhost names and loopback addresses, with or without a port."""
    host = host_name(value)
    if host == "localhost" or host.endswith(".localhost"):
        return True
    return is_ip(host) and ip_address(host).is_loopback


@dataclass(frozen=True, slots=True)
class HostCheck:
    """Which Host headers to serve: local names, the configured ``names`` and, with
    ``any_ip``, any address literal. DNS rebinding needs a name the attacker controls, so
    an address literal is safe to accept where the daemon listens beyond loopback."""

    names: frozenset[str] = frozenset()
    any_ip: bool = False

    def allows(self, value: str) -> bool:
        host = host_name(value)
        if not host:
            return False
        return (
            is_loopback_host(host)
            or host.rstrip(".") in self.names
            or (self.any_ip and is_ip(host))
        )


def origin_allowed(origin: str, extra: list[str], host: str = "") -> bool:
    """Local origins, the configured ones, and the daemon's own (the web page at /ui,
    opened by whatever name the Host check let through)."""
    return (
        bool(LOCAL_ORIGIN.fullmatch(origin))
        or origin in extra
        or "*" in extra
        or same_origin(origin, host)
    )


def same_origin(origin: str, host: str) -> bool:
    """Whether ``origin`` is this server as the request names it (``Host``): a page the
    daemon served itself. Safe only behind the Host check (a rebound name fails there) or
    the key (where the Host check is off)."""
    if not host:
        return False
    for scheme in ("http://", "https://"):
        if origin.lower().startswith(scheme):
            return origin[len(scheme) :].lower() == host.strip().lower()
    return False


class NetworkGuard:
    def __init__(self, app: ASGIApp, *, hosts: HostCheck | None, extra_origins: list[str]) -> None:
        self.app = app
        self.hosts = hosts  # None: no Host check
        self.extra_origins = extra_origins

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        headers = {
            k.decode("latin-1").lower(): v.decode("latin-1") for k, v in scope.get("headers", [])
        }
        if self.hosts is not None and not self.hosts.allows(headers.get("host", "")):
            await error_response(403, "forbidden: unexpected Host header", scope["path"])(
                scope, receive, send
            )
            return
        origin = headers.get("origin")
        if (
            origin
            and scope["method"] not in SAFE_METHODS
            and not origin_allowed(origin, self.extra_origins, headers.get("host", ""))
        ):
            await error_response(403, "forbidden: origin not allowed", scope["path"])(
                scope, receive, send
            )
            return
        await self.app(scope, receive, send)
