"""Schemathesis over the daemon's own OpenAPI schema, which describes every request body
(issue 17, "keep it found"): property-based bodies, paths and headers for every operation,
sent over real HTTP to the daemon on loopback; no answer may be a 5xx. Bounded: a few dozen
examples per operation (OCS_FUZZ_EXAMPLES raises it)."""

from __future__ import annotations

import os
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import schemathesis
import uvicorn
from hypothesis import HealthCheck, given, settings
from starlette.applications import Starlette
from starlette.responses import JSONResponse

from ollama_compact_server.app import create_app
from ollama_compact_server.protocol import protocol_class
from ollama_compact_server.registry.importers import import_hf_dir
from ollama_compact_server.registry.store import Registry
from ollama_compact_server.settings import Settings
from tests.conftest import free_port
from tests.fakes import FakeEngine
from tests.reliability import record

EXAMPLES = int(os.environ.get("OCS_FUZZ_EXAMPLES", "30"))
SEEN: dict[str, int] = {"requests": 0, "server_errors": 0}


class Background:
    """A uvicorn server for ``app`` on a thread of its own."""

    def __init__(self, app: Any, **options: Any) -> None:
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        config = uvicorn.Config(
            app, host="127.0.0.1", port=self.port, log_config=None, access_log=False, **options
        )
        self.server = uvicorn.Server(config)
        self.thread = threading.Thread(target=self.server.run, daemon=True)

    def __enter__(self) -> Background:
        self.thread.start()
        deadline = time.monotonic() + 60
        while not self.server.started:
            assert self.thread.is_alive() and time.monotonic() < deadline, "did not start"
            time.sleep(0.05)
        return self

    def __exit__(self, *exc: object) -> None:
        self.server.should_exit = True
        self.thread.join(30)


@pytest.fixture(scope="module")
def daemon_url(
    tmp_path_factory: pytest.TempPathFactory, tiny_models: dict[str, Path]
) -> Iterator[str]:
    import huggingface_hub.constants

    registry = Registry(tmp_path_factory.mktemp("fuzz") / "registry")
    import_hf_dir(registry, tiny_models["llama"], "m")
    # a hub that knows no repository: pulls end in a 400 without leaving loopback
    hub = Starlette()
    hub.add_route("/{path:path}", lambda _: JSONResponse({"error": "nope"}, 404), ["GET"])
    settings_ = Settings(
        models=registry.root, adapters=None, import_default=False, default_model="m"
    )
    app = create_app(settings_, registry=registry, engine=FakeEngine())
    patch = pytest.MonkeyPatch()
    with Background(hub) as fake_hub, Background(app, http=protocol_class(10.0)) as daemon:
        patch.setenv("HF_ENDPOINT", fake_hub.url)
        patch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", False)
        try:
            yield daemon.url
        finally:
            patch.undo()


def test_no_request_makes_a_server_error(daemon_url: str) -> None:
    """Each operation fuzzed in turn (hypothesis, derandomized: the same examples every
    run, so a failure reproduces); failures are collected, not shrunk."""
    api = schemathesis.openapi.from_url(f"{daemon_url}/openapi.json")
    failures: list[str] = []
    operations = 0
    for result in api.get_all_operations():
        operation = result.ok()
        operations += 1

        @given(case=operation.as_strategy())
        @settings(
            max_examples=EXAMPLES,
            deadline=None,
            suppress_health_check=list(HealthCheck),
            derandomize=True,
            database=None,
        )
        def run(case: Any) -> None:
            response = case.call(base_url=daemon_url, timeout=30)
            SEEN["requests"] += 1
            if response.status_code >= 500:
                SEEN["server_errors"] += 1
                failures.append(
                    f"{case.method} {case.formatted_path} -> {response.status_code}: "
                    f"{response.text[:200]}\n{case.as_curl_command()[:600]}"
                )

        run()
    record(
        f"Schemathesis over /openapi.json ({operations} operations, bodies included)",
        "tests/test_fuzz_openapi.py",
        SEEN["requests"],
        server_errors=SEEN["server_errors"],
    )
    assert operations >= 25
    assert SEEN["requests"] >= operations * min(EXAMPLES, 5)
    assert not failures, "\n\n".join(failures[:10])
