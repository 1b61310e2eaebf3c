"""Docker structure (no Docker daemon needed): the Dockerfile's CPU/CUDA build argument,
non-root runtime, stdlib health check and safe listening defaults; the compose profiles, GPU
reservation, named models volume and loopback-only port; .dockerignore; and the health check
script itself against a stub server."""

from __future__ import annotations

import fnmatch
import http.server
import os
import re
import shlex
import socket
import subprocess
import sys
import threading
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import yaml

from ollama_compact_server.settings import Settings, env_name

REPO = Path(__file__).resolve().parent.parent
HEALTHCHECK = REPO / "docker" / "healthcheck.py"


# ------------------------------------------------------------------------------ Dockerfile


def instructions(text: str) -> list[tuple[str, str]]:
    """(INSTRUCTION, arguments) pairs, continuation lines joined, comments dropped."""
    out: list[tuple[str, str]] = []
    pending = ""
    for raw in text.splitlines():
        line = raw.strip()
        if not line or line.startswith("#"):
            continue
        pending = f"{pending} {line}" if pending else line
        if pending.endswith("\\"):
            pending = pending[:-1].rstrip()
            continue
        word, _, rest = pending.partition(" ")
        out.append((word.upper(), rest.strip()))
        pending = ""
    return out


def stages(text: str) -> dict[str, list[tuple[str, str]]]:
    found: dict[str, list[tuple[str, str]]] = {"<global>": []}
    current = "<global>"
    for word, rest in instructions(text):
        if word == "FROM":
            parts = rest.split()
            current = parts[2] if len(parts) >= 3 and parts[1].upper() == "AS" else parts[0]
            found[current] = [(word, rest)]
        else:
            found[current].append((word, rest))
    return found


@pytest.fixture(scope="module")
def dockerfile() -> dict[str, list[tuple[str, str]]]:
    return stages((REPO / "Dockerfile").read_text())


def args_of(stage: list[tuple[str, str]], word: str) -> list[str]:
    return [rest for w, rest in stage if w == word]


def test_one_dockerfile_builds_cpu_and_cuda_variants(dockerfile) -> None:
    assert {"build", "runtime", "cpu", "cuda"} <= set(dockerfile)
    # the targets add only the device on top of the shared runtime; cpu is the default
    assert list(dockerfile)[-1] == "cpu"
    for target in ("cpu", "cuda"):
        assert dockerfile[target][0] == ("FROM", f"runtime AS {target}")
        assert f"OCS_DEVICE={target}" in args_of(dockerfile[target], "ENV")
        # nothing to build: the legacy builder runs every stage before the target asked for
        assert [w for w, _ in dockerfile[target]] == ["FROM", "ENV"], target
    assert any(a.startswith("PYTHON_IMAGE=") for a in args_of(dockerfile["<global>"], "ARG"))
    build = dockerfile["build"]
    assert "TORCH_INDEX_URL=https://download.pytorch.org/whl/cpu" in args_of(build, "ARG")
    torch_install = [r for r in args_of(build, "RUN") if "torch==" in r]
    assert torch_install and '--index-url "${TORCH_INDEX_URL}"' in torch_install[0]
    assert any('".[default-model]"' in r for r in args_of(build, "RUN"))
    runtime = dockerfile["runtime"]
    assert any("--from=build /opt/venv /opt/venv" in c for c in args_of(runtime, "COPY"))
    # no build tools or package caches in the runtime stage
    assert not any("pip install" in r for r in args_of(runtime, "RUN"))


def test_runtime_runs_as_a_user_and_checks_health_with_python(dockerfile) -> None:
    runtime = dockerfile["runtime"]
    users = args_of(runtime, "USER")
    assert users and users[-1] not in ("root", "0", "0:0")
    words = [w for w, _ in runtime]
    assert words.index("USER") < words.index("ENTRYPOINT")
    assert not any(w == "RUN" for w in words[words.index("USER") :])  # nothing root after
    (check,) = args_of(runtime, "HEALTHCHECK")
    assert "--start-period=" in check and 'CMD ["python", "/healthcheck.py"]' in check
    commands = " ".join(rest for stage in dockerfile.values() for _, rest in stage)
    assert "curl" not in commands and "wget" not in commands
    assert "11434" in args_of(runtime, "EXPOSE")
    assert any("/data/models" in v for v in args_of(runtime, "VOLUME"))


def test_image_listens_widely_only_behind_the_existing_guard(dockerfile) -> None:
    env = " ".join(args_of(dockerfile["runtime"], "ENV"))
    assert "OLLAMA_HOST=0.0.0.0:11434" in env
    env = " ".join(rest for stage in dockerfile.values() for rest in args_of(stage, "ENV"))
    # the image never switches the guard off: that is the deployer's (compose's) choice
    assert "OCS_INSECURE_NO_AUTH" not in env and "OCS_API_KEY" not in env


def test_copied_files_exist_and_pass_dockerignore(dockerfile) -> None:
    patterns = [
        line.strip()
        for line in (REPO / ".dockerignore").read_text().splitlines()
        if line.strip() and not line.startswith("#")
    ]

    def ignored(path: str) -> bool:
        result = False
        for pattern in patterns:
            negate = pattern.startswith("!")
            body = pattern.lstrip("!").rstrip("/")
            parts = path.split("/")
            prefixes = ["/".join(parts[: i + 1]) for i in range(len(parts))]
            if any(fnmatch.fnmatch(p, body) for p in prefixes) or (
                body.startswith("**/") and any(fnmatch.fnmatch(x, body[3:]) for x in parts)
            ):
                result = not negate
        return result

    copied = []
    for stage in dockerfile.values():
        for rest in args_of(stage, "COPY"):
            if "--from=" in rest:
                continue  # from another stage, not the build context
            parts = [p for p in shlex.split(rest) if not p.startswith("--")]
            copied.extend(parts[:-1])
    assert copied
    for source in copied:
        assert (REPO / source).exists(), source
        assert not ignored(source.rstrip("/")), source
    for kept_out in (
        ".git",
        ".venv",
        ".cache",
        "models",
        "adapters",
        "tests",
        ".env",
        "docker/.env",
    ):
        assert ignored(kept_out), kept_out
    assert ignored("ollama_compact_server/__pycache__/x.pyc")
    assert not ignored("ollama_compact_server/data/heldout_en.txt")


def test_entrypoint_execs_the_daemon() -> None:
    entry = REPO / "docker" / "entrypoint.sh"
    assert os.access(entry, os.X_OK)
    assert re.search(r"^exec ollama-compact serve", entry.read_text(), re.M)  # PID 1 gets signals


# ------------------------------------------------------------------------------ compose


@pytest.fixture(scope="module")
def compose() -> dict[str, Any]:
    data = yaml.safe_load((REPO / "docker-compose.yml").read_text())
    assert isinstance(data, dict)
    return data


def service(compose: dict[str, Any], profile: str) -> dict[str, Any]:
    (found,) = [s for s in compose["services"].values() if profile in s.get("profiles", [])]
    return found


@pytest.mark.parametrize("profile", ["cpu", "cuda"])
def test_profiles_share_the_safe_defaults(compose: dict[str, Any], profile: str) -> None:
    svc = service(compose, profile)
    assert svc["build"]["context"] == "." and svc["build"]["target"] == profile
    index = svc["build"]["args"]["TORCH_INDEX_URL"]
    assert index.endswith("/cpu") if profile == "cpu" else re.search(r"/cu\d+$", index)
    assert svc["image"].endswith(f":{profile}")
    # the port is published on the host's loopback only; inside, 0.0.0.0 is allowed by the
    # explicit flag (or a key from docker/.env)
    assert svc["ports"] == ["127.0.0.1:11434:11434"]
    assert "OCS_INSECURE_NO_AUTH" in svc["environment"]
    assert {"path": "docker/.env", "required": False} in svc["env_file"]
    assert "models:/data/models" in svc["volumes"]
    check = svc["healthcheck"]
    assert check["test"] == ["CMD", "python", "/healthcheck.py"]
    assert check["start_period"] and check["retries"] >= 1
    # the grace period outlasts the daemon's own shutdown timeout
    grace = int(str(svc["stop_grace_period"]).removesuffix("s"))
    assert grace > Settings.model_fields["shutdown_timeout"].default
    assert svc["restart"] == "unless-stopped"


def dotenv() -> dict[str, str]:
    """The top-level .env that docker compose reads from the project folder."""
    pairs = {}
    for line in (REPO / ".env").read_text().splitlines():
        line = line.strip()
        if line and not line.startswith("#"):
            key, _, value = line.partition("=")
            pairs[key.strip()] = value.strip()
    return pairs


def started(compose: dict[str, Any], flags: list[str]) -> list[str]:
    """The services `docker compose up` starts, by the documented profile rules: a service
    without `profiles` always starts, one with profiles when one of them is active; the
    active profiles are those of the --profile flags, or else COMPOSE_PROFILES (from .env)."""
    active = set(flags) or {p.strip() for p in dotenv().get("COMPOSE_PROFILES", "").split(",")}
    return [
        name
        for name, svc in compose["services"].items()
        if not svc.get("profiles") or active & set(svc["profiles"])
    ]


def test_plain_up_starts_the_cpu_service_and_the_cuda_profile_only_cuda(
    compose: dict[str, Any],
) -> None:
    (plain,) = started(compose, [])
    assert "cpu" in compose["services"][plain]["profiles"]
    (cuda,) = started(compose, ["cuda"])
    assert "cuda" in compose["services"][cuda]["profiles"]
    assert "deploy" in compose["services"][cuda] and "deploy" not in compose["services"][plain]
    (cpu,) = started(compose, ["cpu"])
    assert cpu == plain
    # .env holds only compose's own variables (the daemon's settings and key go in docker/.env)
    assert set(dotenv()) == {"COMPOSE_PROFILES"}
    assert "/.env" not in (REPO / ".gitignore").read_text().splitlines()


def test_readme_documents_what_compose_does() -> None:
    readme = (REPO / "README.md").read_text()
    assert "docker compose up -d " in readme and "docker compose --profile cuda up -d" in readme


def test_services_answer_to_their_own_name(compose: dict[str, Any]) -> None:
    """Without a key the daemon checks the Host header; it accepts its own host name, so
    each service's host name is the name other containers reach it by."""
    for name, svc in compose["services"].items():
        assert svc["hostname"] == name


def test_models_live_in_a_named_volume(compose: dict[str, Any]) -> None:
    assert "models" in compose["volumes"]


def test_cuda_profile_reserves_a_gpu(compose: dict[str, Any]) -> None:
    svc = service(compose, "cuda")
    (device,) = svc["deploy"]["resources"]["reservations"]["devices"]
    assert device["driver"] == "nvidia" and "gpu" in device["capabilities"]
    assert svc["build"]["target"] == "cuda"  # the target sets OCS_DEVICE=cuda
    assert "deploy" not in service(compose, "cpu")


def test_env_example_names_real_settings() -> None:
    known = {env_name(field) for field in Settings.model_fields}
    text = (REPO / "docker" / "env.example").read_text()
    names = re.findall(r"^#?\s*([A-Z][A-Z0-9_]+)=", text, re.M)
    assert names and set(names) <= known, set(names) - known


# ------------------------------------------------------------------------------ health check


class Stub(http.server.BaseHTTPRequestHandler):
    status = 200
    seen: list[tuple[str, str | None]] = []  # noqa: RUF012

    def do_GET(self) -> None:
        Stub.seen.append((self.path, self.headers.get("Authorization")))
        self.send_response(Stub.status)
        self.end_headers()
        self.wfile.write(b"{}")

    def log_message(self, *args: Any) -> None:
        pass


@pytest.fixture
def stub() -> Iterator[int]:
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Stub)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    Stub.seen.clear()
    yield server.server_address[1]
    server.shutdown()
    server.server_close()


def run_check(env: dict[str, str]) -> int:
    clean = {k: v for k, v in os.environ.items() if not k.startswith(("OCS_", "OLLAMA_"))}
    result = subprocess.run(
        [sys.executable, "-I", str(HEALTHCHECK)], env={**clean, **env}, timeout=30
    )
    return result.returncode


def test_health_check_script(stub: int) -> None:
    Stub.status = 200
    assert run_check({"OLLAMA_HOST": f"0.0.0.0:{stub}"}) == 0
    assert Stub.seen[-1] == ("/ready", None)
    assert run_check({"OLLAMA_HOST": f"http://0.0.0.0:{stub}", "OCS_API_KEY": "k1"}) == 0
    assert Stub.seen[-1] == ("/ready", "Bearer k1")
    Stub.status = 503
    assert run_check({"OLLAMA_HOST": f"0.0.0.0:{stub}"}) == 1
    assert run_check({"OLLAMA_HOST": f"0.0.0.0:{unused_port()}"}) == 1
    source = HEALTHCHECK.read_text()
    imports = set(re.findall(r"^(?:from|import) (\w+)", source, re.M))
    assert imports <= {"__future__", "os", "sys", "urllib"}  # stdlib only


def unused_port() -> int:
    """A port with nothing listening."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def test_health_check_route_needs_no_more_than_the_key() -> None:
    """The route the script asks is the daemon's readiness probe."""
    from ollama_compact_server.api import health

    paths = {getattr(route, "path", "") for route in health.router.routes}
    assert "/ready" in paths
