"""The web page at /ui: static files from the package's ui/ folder (no build step), served
with a strict Content-Security-Policy, plus the two small JSON routes only the page needs
(the compression schemes and their options; a Modelfile text parsed into a create request).

The static files are public (they hold no data; the page asks for the key when a call
answers 401); the JSON routes sit behind the key like every other route."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

from fastapi import APIRouter, Request
from fastapi.responses import RedirectResponse, Response

from ..compress.schemes import SCHEMES
from ..modelfile import ModelfileError, parse_modelfile
from .common import json_body
from .errors import APIError

router = APIRouter()

ROOT = Path(__file__).resolve().parent.parent / "ui"
TYPES = {
    ".html": "text/html; charset=utf-8",
    ".js": "text/javascript; charset=utf-8",
    ".css": "text/css; charset=utf-8",
    ".svg": "image/svg+xml",
    ".png": "image/png",
}
# Everything from this origin only: no inline script, no eval, no other site's fonts,
# scripts or frames; model output is put on the page as text, never as markup.
POLICY = (
    "default-src 'none'; script-src 'self'; style-src 'self'; img-src 'self' data:; "
    "connect-src 'self'; font-src 'self'; base-uri 'none'; form-action 'none'; "
    "frame-ancestors 'none'"
)
HEADERS = {
    "Content-Security-Policy": POLICY,
    "X-Content-Type-Options": "nosniff",
    "X-Frame-Options": "DENY",
    "Referrer-Policy": "no-referrer",
    "Cache-Control": "no-cache",
}
PUBLIC_PREFIX = "/ui/"  # GET / HEAD of the page's files need no key (api/auth.py)
API_PREFIX = "/ui/api/"  # ... but these do


def is_public(method: str, path: str) -> bool:
    """Whether ``method path`` is one of the page's static files (no key needed)."""
    if method not in ("GET", "HEAD"):
        return False
    return path == "/ui" or (path.startswith(PUBLIC_PREFIX) and not path.startswith(API_PREFIX))


@dataclass(frozen=True, slots=True)
class Asset:
    body: bytes
    media_type: str


def _assets() -> dict[str, Asset]:
    """The page's files, read once: a fixed set, so no request path reaches the disk."""
    found: dict[str, Asset] = {}
    for path in sorted(ROOT.rglob("*")):
        if path.is_file() and path.suffix in TYPES:
            found[path.relative_to(ROOT).as_posix()] = Asset(path.read_bytes(), TYPES[path.suffix])
    return found


ASSETS = _assets()


@router.get("/ui", include_in_schema=False)
async def ui_root() -> RedirectResponse:
    return RedirectResponse("/ui/", status_code=308)


@router.get("/ui/", include_in_schema=False)
@router.head("/ui/", include_in_schema=False)
async def ui_index() -> Response:
    return _asset("index.html")


@router.get("/ui/api/schemes", include_in_schema=False)
async def ui_schemes() -> dict[str, Any]:
    """The compression schemes with their options, for the page's scheme picker."""
    return {
        "schemes": [
            {
                "name": name,
                "description": scheme.summary,
                "warning": scheme.warning,
                "options": {
                    key: {
                        "type": option.kind.__name__,
                        "default": option.default,
                        "choices": list(option.choices),
                        "min": option.low,
                        "max": option.high,
                        "help": option.help,
                    }
                    for key, option in scheme.options.items()
                },
            }
            for name, scheme in SCHEMES.items()
        ]
    }


@router.post("/ui/api/modelfile", include_in_schema=False)
async def ui_modelfile(request: Request) -> dict[str, Any]:
    """A Modelfile text as the body of /api/create (what the CLI does with a file). FROM
    must name a model here and ADAPTER lines are refused: a page cannot name files on the
    server (the page uploads an adapter folder through /api/blobs instead)."""
    body = await json_body(request)
    text = body.get("modelfile")
    if not isinstance(text, str) or not text.strip():
        raise APIError(400, "modelfile: a Modelfile text is required")
    try:
        parsed = parse_modelfile(text)
    except ModelfileError as exc:
        raise APIError(400, f"modelfile: {exc}") from exc
    if parsed.adapters:
        raise APIError(
            400, "modelfile: ADAPTER names files; upload the adapter folder on the Models page"
        )
    if parsed.from_.startswith((".", "/", "~")):
        raise APIError(400, "modelfile: FROM must name a model here, not a file")
    create: dict[str, Any] = {"from": parsed.from_}
    for key, value in (
        ("template", parsed.template),
        ("system", parsed.system),
        ("parameters", parsed.parameters or None),
        ("messages", parsed.messages or None),
        ("license", parsed.licenses or None),
    ):
        if value is not None:
            create[key] = value
    return create


@router.get("/ui/{name:path}", include_in_schema=False)
@router.head("/ui/{name:path}", include_in_schema=False)
async def ui_file(name: str) -> Response:
    return _asset(name)


def _asset(name: str) -> Response:
    asset = ASSETS.get(name)
    if asset is None:
        raise APIError(404, f"no such page file: {name[:100]}")
    return Response(asset.body, media_type=asset.media_type, headers=HEADERS)
