"""Shared fixtures: tiny offline models, registries on tmp_path, the session-cached
gemma3:270m registry for end-to-end tests, and an in-process app client."""

from __future__ import annotations

import asyncio
import hashlib
import os
import socket
import subprocess
import sys
import time
from collections.abc import AsyncIterator, Iterator
from contextlib import asynccontextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx
import pytest
from asgi_lifespan import LifespanManager

from ollama_compact_server.app import create_app
from ollama_compact_server.registry.store import Registry
from ollama_compact_server.settings import Settings
from tests.factory import make_lora_adapter, make_tiny_model

REPO = Path(__file__).resolve().parent.parent
# End-to-end tests share one import of gemma3:270m. It is kept between local runs (delete
# .cache/ to redo it); CI starts from a clean clone and imports it once per run.
KERNEL_CACHE = REPO / ".cache" / "kernels"
E2E_REGISTRY = Path(os.environ.get("OCS_TEST_REGISTRY", REPO / ".cache" / "test-registry"))


@pytest.fixture(autouse=True)
def _isolated_env(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    """No test reads the developer's own settings or registry."""
    for key in list(os.environ):
        if key.startswith("OCS_") or key in ("OLLAMA_HOST", "OLLAMA_ORIGINS"):
            monkeypatch.delenv(key, raising=False)
    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    # the compiled CPU kernels are kept for the whole run (and between local runs)
    monkeypatch.setenv("OCS_KERNEL_CACHE", str(KERNEL_CACHE))


@pytest.fixture(scope="session")
def tiny_models(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """One tiny model directory per family, built once per session (read-only for tests)."""
    root = tmp_path_factory.mktemp("tiny-models")
    return {
        family: make_tiny_model(root / family, family) for family in ("llama", "qwen2", "gemma3")
    }


@pytest.fixture(scope="session")
def tiny_vision_models(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """Tiny vision-language model directories (tests/vision_factory.py), once per session."""
    from tests.vision_factory import (
        make_tiny_gemma3_vision,
        make_tiny_idefics3,
        make_tiny_llava,
        make_tiny_qwen2_vl,
    )

    root = tmp_path_factory.mktemp("tiny-vision")
    return {
        "qwen2_vl": make_tiny_qwen2_vl(root / "qwen2_vl"),
        "qwen2_5_vl": make_tiny_qwen2_vl(root / "qwen2_5_vl", version="2.5"),
        "llava": make_tiny_llava(root / "llava"),
        "gemma3": make_tiny_gemma3_vision(root / "gemma3"),
        "idefics3": make_tiny_idefics3(root / "idefics3"),
    }


@pytest.fixture(scope="session")
def tiny_adapter(tiny_models: dict[str, Path], tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = tmp_path_factory.mktemp("tiny-adapters")
    return make_lora_adapter(tiny_models["llama"], root / "lora", base_name="tiny-llama")


@pytest.fixture
def registry(tmp_path: Path) -> Registry:
    return Registry(tmp_path / "registry")


@pytest.fixture
def settings(tmp_path: Path) -> Settings:
    return Settings(
        models=tmp_path / "registry", adapters=tmp_path / "adapters", import_default=False
    )


@pytest.fixture
async def client(settings: Settings, registry: Registry) -> AsyncIterator[httpx.AsyncClient]:
    """The real app with its lifespan, in process."""
    app = create_app(settings, registry=registry)
    async with LifespanManager(app):
        transport = httpx.ASGITransport(app=app)
        async with httpx.AsyncClient(transport=transport, base_url="http://127.0.0.1:11434") as c:
            yield c


@pytest.fixture(scope="session")
def gemma_registry() -> Registry:
    """A registry holding gemma3:270m, imported from the bundled package once."""
    from ollama_compact_server.jobs.default_model import ensure_default_model

    registry = Registry(E2E_REGISTRY)
    ensure_default_model(registry)
    return registry


def tree_hash(root: Path) -> str:
    """sha256 over (relative path, size, content hash) of every file under root, lock aside."""
    digest = hashlib.sha256()
    if not root.exists():
        return "absent"
    for path in sorted(root.rglob("*")):
        if path.name.endswith(".lock"):  # the registry's and the default import's locks
            continue
        rel = path.relative_to(root).as_posix()
        if path.is_file():
            digest.update(f"{rel}:{path.stat().st_size}:".encode())
            digest.update(hashlib.sha256(path.read_bytes()).digest())
        else:
            digest.update(f"{rel}/".encode())
    return digest.hexdigest()


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


class Daemon:
    """`ollama-compact serve` as a subprocess on a free loopback port."""

    def __init__(self, env: dict[str, str], port: int) -> None:
        self.port = port
        self.url = f"http://127.0.0.1:{port}"
        self.env = {**os.environ, **env, "OLLAMA_HOST": f"127.0.0.1:{port}"}
        self.process: subprocess.Popen[bytes] | None = None
        self.log = Path(env.get("OCS_MODELS", "/tmp")).parent / f"daemon-{port}.log"

    def output(self) -> str:
        return self.log.read_text(errors="replace") if self.log.exists() else ""

    def start(self, timeout: float = 240.0) -> float:
        started = time.monotonic()
        with open(self.log, "wb") as log:
            self.process = subprocess.Popen(
                [sys.executable, "-m", "ollama_compact_server", "serve"],
                env=self.env,
                stdout=log,
                stderr=subprocess.STDOUT,
            )
        while time.monotonic() - started < timeout:
            if self.process.poll() is not None:
                out = self.output()
                raise RuntimeError(f"daemon exited with {self.process.returncode}:\n{out[-3000:]}")
            try:
                if httpx.get(self.url + "/", timeout=1).status_code == 200:
                    return time.monotonic() - started
            except httpx.HTTPError:
                time.sleep(0.2)
        raise TimeoutError("daemon did not start")

    def cli(self, *args: str, input_text: str | None = None) -> subprocess.CompletedProcess[str]:
        return subprocess.run(
            [sys.executable, "-m", "ollama_compact_server", *args],
            env=self.env,
            capture_output=True,
            text=True,
            input=input_text,
            timeout=120,
        )

    def stop(self) -> None:
        if self.process and self.process.poll() is None:
            self.process.terminate()
            try:
                self.process.wait(timeout=15)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait()


@pytest.fixture
def daemon_factory() -> Iterator[type[Daemon]]:
    started: list[Daemon] = []

    class Tracked(Daemon):
        def start(self, timeout: float = 240.0) -> float:
            started.append(self)
            return super().start(timeout)

    yield Tracked
    for d in started:
        d.stop()


@dataclass
class Served:
    """The app in process and clients wired to it."""

    raw: httpx.AsyncClient
    ollama: Any
    openai: Any
    registry: Registry
    engine: Any
    anthropic: Any = None


@asynccontextmanager
async def serve_app(
    registry: Registry, engine: Any = None, **settings: Any
) -> AsyncIterator[Served]:
    """Runs the real app (lifespan included) on ``registry``, with the real engine unless a
    fake one is given, and yields raw httpx, ollama, openai and anthropic clients bound
    to it."""
    import anthropic
    import httpx2  # the anthropic SDK's own httpx fork
    import ollama
    import openai

    options = {"adapters": None, "import_default": False, **settings}
    app = create_app(Settings(models=registry.root, **options), registry=registry, engine=engine)
    async with LifespanManager(app):
        transport = httpx.ASGITransport(app=app)
        base = "http://127.0.0.1:11434"
        async with httpx.AsyncClient(transport=transport, base_url=base, timeout=60) as raw:
            oai = openai.AsyncOpenAI(
                base_url=base + "/v1",
                api_key="unused",
                max_retries=0,
                http_client=httpx.AsyncClient(
                    transport=transport, base_url=base + "/v1", timeout=60
                ),
            )
            claude = anthropic.AsyncAnthropic(
                base_url=base,
                api_key="unused",
                max_retries=0,
                http_client=httpx2.AsyncClient(
                    transport=httpx2.ASGITransport(app=app), base_url=base, timeout=60
                ),
            )
            yield Served(
                raw,
                ollama.AsyncClient(host=base, transport=transport),
                oai,
                registry,
                app.state.engine,
                claude,
            )


def pytest_sessionfinish(session: pytest.Session, exitstatus: int) -> None:
    """Writes the reliability tests' counts (tests/reliability.py) when they all passed."""
    from tests import reliability

    if exitstatus == 0:
        reliability.save()


@asynccontextmanager
async def running_server(app: Any, settings: Settings) -> AsyncIterator[int]:
    """``app`` under uvicorn on a free loopback port, configured as `ollama-compact serve`
    runs it, on this event loop; yields the port."""
    import uvicorn

    from ollama_compact_server.server import uvicorn_config

    port = free_port()
    server = uvicorn.Server(uvicorn_config(app, settings, "127.0.0.1", port))
    task = asyncio.create_task(server.serve())
    deadline = time.monotonic() + 30
    while not server.started:
        assert not task.done(), "server stopped during startup"
        assert time.monotonic() < deadline, "server did not start"
        await asyncio.sleep(0.02)
    try:
        yield port
    finally:
        server.should_exit = True
        await asyncio.wait_for(task, 30)
