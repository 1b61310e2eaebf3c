"""The CLI against a real daemon process (tiny model registry, no default import): create
from a Modelfile with an adapter, show, run one-shot, ps, stop, cp, rm, list."""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest

from ollama_compact_server.registry.importers import import_hf_dir
from ollama_compact_server.registry.store import Registry
from tests.conftest import Daemon, free_port


@pytest.fixture
def daemon(tmp_path: Path, tiny_models: dict[str, Path], daemon_factory: type[Daemon]) -> Daemon:
    registry = Registry(tmp_path / "models")
    import_hf_dir(registry, tiny_models["llama"], "tiny")
    env = {
        "OCS_MODELS": str(registry.root),
        "OCS_ADAPTERS": "",
        "OCS_IMPORT_DEFAULT": "false",
        "OCS_DTYPE": "float32",
        "OCS_SHUTDOWN_TIMEOUT": "20",
    }
    d = daemon_factory(env, free_port())
    d.start(timeout=120)
    return d


def test_cli_workflow(daemon: Daemon, tmp_path: Path, tiny_adapter: Path) -> None:
    work = tmp_path / "work"
    work.mkdir()
    shutil.copytree(tiny_adapter, work / "lora")
    (work / "Modelfile").write_text(
        'FROM tiny\nSYSTEM """You are a pirate."""\nPARAMETER num_predict 5\n'
        "PARAMETER temperature 0\nPARAMETER stop <end_of_turn>\nMESSAGE user Ahoy\n"
    )
    created = daemon.cli("create", "pirate", "-f", str(work / "Modelfile"))
    assert created.returncode == 0, created.stderr
    assert "success" in created.stderr
    assert daemon.cli("show", "pirate", "--system").stdout.strip() == "You are a pirate."
    params = daemon.cli("show", "pirate", "--parameters").stdout
    assert "num_predict" in params and "<end_of_turn>" in params
    (work / "Modelfile.lora").write_text("FROM tiny\nADAPTER ./lora\nPARAMETER num_predict 4\n")
    created = daemon.cli("create", "pirate-lora", "-f", str(work / "Modelfile.lora"))
    assert created.returncode == 0, created.stderr
    info = daemon.cli("show", "pirate-lora")
    assert "parent model" in info.stdout and "tiny:latest" in info.stdout
    one_shot = daemon.cli("run", "pirate", "hello there")
    assert one_shot.returncode == 0, one_shot.stderr
    assert one_shot.stdout.strip()  # five tokens of the tiny model's text
    ps = daemon.cli("ps")
    assert "pirate:latest" in ps.stdout
    assert daemon.cli("stop", "pirate").returncode == 0
    assert daemon.cli("cp", "pirate", "pirate2").returncode == 0
    assert daemon.cli("rm", "pirate2").returncode == 0
    listing = daemon.cli("list").stdout
    assert (
        "pirate:latest" in listing and "pirate-lora:latest" in listing and "pirate2" not in listing
    )
    bad = daemon.cli("create", "x", "-f", str(work / "missing"))
    assert bad.returncode == 1 and "cannot read" in bad.stderr


def test_sigterm_lets_running_streams_finish_then_exits_zero(daemon: Daemon) -> None:
    """A real SIGTERM while an Ollama and an OpenAI stream run: new connections are refused,
    both streams finish (well within OCS_SHUTDOWN_TIMEOUT, 20 s here), the process exits 0."""
    import json
    import signal
    import threading
    import time

    import httpx

    ndjson: list[dict] = []
    sse: list[str] = []
    errors: list[str] = []

    def ollama() -> None:
        body = {"model": "tiny", "prompt": "go", "options": {"num_predict": 150, "temperature": 0}}
        try:
            with httpx.stream("POST", daemon.url + "/api/generate", json=body, timeout=60) as r:
                for line in r.iter_lines():
                    ndjson.append(json.loads(line))
        except httpx.HTTPError as exc:
            errors.append(repr(exc))

    def openai() -> None:
        body = {
            "model": "tiny",
            "messages": [{"role": "user", "content": "go"}],
            "max_tokens": 150,
            "temperature": 0,
            "stream": True,
        }
        url = daemon.url + "/v1/chat/completions"
        try:
            with httpx.stream("POST", url, json=body, timeout=60) as r:
                for line in r.iter_lines():
                    if line.startswith("data: "):
                        sse.append(line[6:])
        except httpx.HTTPError as exc:
            errors.append(repr(exc))

    readers = [threading.Thread(target=ollama), threading.Thread(target=openai)]
    for reader in readers:
        reader.start()
    deadline = time.monotonic() + 30
    while not (ndjson and sse) and time.monotonic() < deadline:
        time.sleep(0.01)
    assert ndjson and sse and daemon.process is not None
    daemon.process.send_signal(signal.SIGTERM)
    assert daemon.process.wait(timeout=40) == 0
    with pytest.raises(httpx.HTTPError):
        httpx.get(daemon.url + "/", timeout=2)
    for reader in readers:
        reader.join(60)
    assert not errors, errors
    assert "done" in ndjson[-1], (ndjson[-1], daemon.output()[-3000:])
    assert ndjson[-1]["done"] is True and ndjson[-1]["eval_count"] == 150
    assert sse[-1] == "[DONE]" and json.loads(sse[-2])["choices"][0]["finish_reason"] == "length"
