"""The web page in a real browser: the daemon (real app and engine, tiny models) under
uvicorn on a free loopback port, and Debian's chromium driven by Playwright, headless.

``ui_session`` yields a :class:`UI` whose ``page`` has the page open; every uncaught script
error and every console error (a refused Content-Security-Policy, a failed import) is
collected in ``ui.errors`` and fails the test when the session ends."""

from __future__ import annotations

import os
import shutil
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import httpx
from asgi_lifespan import LifespanManager

from ollama_compact_server.app import create_app
from ollama_compact_server.registry.importers import import_adapter_dir, import_hf_dir
from ollama_compact_server.registry.store import Registry
from ollama_compact_server.settings import Settings
from tests.conftest import running_server
from tests.factory import make_lora_adapter

CHROMIUM = os.environ.get("OCS_TEST_CHROMIUM") or shutil.which("chromium") or "/usr/bin/chromium"
ARGS = ["--no-sandbox", "--disable-background-networking", "--disable-component-update"]
SCREENSHOTS = Path(os.environ["OCS_SCREENSHOTS"]) if os.environ.get("OCS_SCREENSHOTS") else None


@dataclass
class UI:
    base: str  # http://127.0.0.1:PORT
    page: Any  # playwright.async_api.Page
    registry: Registry
    http: httpx.AsyncClient  # the API, for checks behind the page's back
    errors: list[str] = field(default_factory=list)

    async def open(self, route: str = "chat") -> None:
        await self.page.goto(f"{self.base}/ui/#/{route}")

    async def shot(self, name: str) -> None:
        """A screenshot for the README when OCS_SCREENSHOTS names a folder."""
        if SCREENSHOTS is not None:
            SCREENSHOTS.mkdir(parents=True, exist_ok=True)
            await self.page.screenshot(path=str(SCREENSHOTS / f"{name}.png"))


def tiny_registry(root: Path, tiny_models: dict[str, Path], work: Path) -> Registry:
    """A registry with the tiny llama ("tiny") and two LoRA adapter models on it."""
    registry = Registry(root)
    import_hf_dir(registry, tiny_models["llama"], "tiny")
    for name, seed in (("pirate", 1), ("poet", 2)):
        adapter = make_lora_adapter(tiny_models["llama"], work / name, seed=seed, base_name="tiny")
        import_adapter_dir(registry, adapter, name, "tiny")
    return registry


@asynccontextmanager
async def ui_session(
    registry: Registry, *, width: int = 1280, height: int = 800, **settings: Any
) -> AsyncIterator[UI]:
    from playwright.async_api import async_playwright, expect

    expect.set_options(timeout=20_000)  # a busy 2-core CI box, not a slow page

    options = {"adapters": None, "import_default": False, **settings}
    config = Settings(models=registry.root, **options)
    app = create_app(config, registry=registry)
    async with (
        LifespanManager(app),
        running_server(app, config) as port,
        async_playwright() as playwright,
    ):
        base = f"http://127.0.0.1:{port}"
        browser = await playwright.chromium.launch(
            executable_path=CHROMIUM, headless=True, args=ARGS
        )
        try:
            context = await browser.new_context(viewport={"width": width, "height": height})
            page = await context.new_page()
            page.set_default_timeout(20_000)
            key = settings.get("api_key")
            headers = {"Authorization": f"Bearer {key}"} if key else {}
            async with httpx.AsyncClient(base_url=base, timeout=60, headers=headers) as http:
                ui = UI(base, page, registry, http)
                page.on("pageerror", lambda exc: ui.errors.append(f"page error: {exc}"))
                page.on(
                    "console",
                    lambda msg: (
                        ui.errors.append(f"console: {msg.text}")
                        if msg.type == "error"
                        and not msg.text.startswith("Failed to load resource")
                        else None
                    ),
                )
                yield ui
                assert not ui.errors, ui.errors
        finally:
            await browser.close()
