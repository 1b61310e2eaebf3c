"""The images, built and run: docker/smoke-test.sh builds the CPU image (and the CUDA target,
build only), starts it with docker compose, waits for (healthy), chats through the published
port with the ollama client, restarts it (the models volume keeps the model) and stops it.

Minutes long, so marked e2e; it runs only where a docker daemon answers (`docker info`) and is
skipped, running nothing, where the docker CLI is missing. The script's inputs (PYTHON_IMAGE,
SMOKE_WHEELS, SMOKE_PIP_CERT, SMOKE_BUILD_NETWORK, SMOKE_PORT, ...) pass through from the
environment; see its header."""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parent.parent
SCRIPT = REPO / "docker" / "smoke-test.sh"
# conftest points HOME at a temporary folder for every test; docker keeps its CLI plugins
# (compose) and contexts under the real one
HOME = os.environ.get("HOME", "")
TIMEOUT = 3600  # a first build downloads torch and the dependencies
BUSY = 75  # the script's exit status while another run holds its lock

pytestmark = pytest.mark.e2e


def docker_env() -> dict[str, str]:
    env = {**os.environ, "HOME": HOME} if HOME else dict(os.environ)
    return {**pip_local_sources(), **env}  # what the caller sets wins


def pip_local_sources() -> dict[str, str]:
    """SMOKE_* defaults from this machine's pip configuration: where pip takes torch from a
    local folder (``find-links``) and trusts a CA bundle of its own, the image build does the
    same (a machine without the PyTorch index, such as the one this project is built on)."""
    try:
        listed = subprocess.run(
            [sys.executable, "-m", "pip", "config", "list"],
            capture_output=True,
            text=True,
            timeout=60,
        ).stdout
    except (OSError, subprocess.TimeoutExpired):
        return {}
    values: dict[str, str] = {}
    for line in listed.splitlines():
        key, _, value = line.partition("=")
        values[key.rsplit(".", 1)[-1]] = value.strip().strip("'\"")
    found: dict[str, str] = {}
    for folder in values.get("find-links", "").split():
        if Path(folder).is_dir() and any(Path(folder).glob("torch-*.whl")):
            found["SMOKE_WHEELS"] = folder
            found["SMOKE_TORCH_INDEX_URL"] = "https://pypi.org/simple"  # torch's dependencies
            break
    if found and Path(values.get("cert", "")).is_file():
        found["SMOKE_PIP_CERT"] = values["cert"]
    return found


def docker_skip_reason() -> str | None:
    """Why the smoke test cannot run here, or None; runs nothing without the docker CLI."""
    docker = shutil.which("docker")
    if docker is None:
        return "docker CLI not found: the image smoke test needs docker and a daemon"
    for args, what in (
        (["info"], "no docker daemon reachable (`docker info` failed)"),
        (["compose", "version"], "the docker compose v2 plugin is missing"),
    ):
        try:
            done = subprocess.run(
                [docker, *args], env=docker_env(), capture_output=True, text=True, timeout=60
            )
        except (OSError, subprocess.TimeoutExpired) as exc:
            return f"{what}: {exc}"
        if done.returncode != 0:
            last = (done.stderr.strip().splitlines() or [f"exit {done.returncode}"])[-1]
            return f"{what}: {last}"
    return None


def run_script() -> tuple[int, str]:
    """Runs the script in its own process group; on a timeout or an interrupt the group gets
    SIGTERM first, so the script's trap still takes its containers and volume down."""
    process = subprocess.Popen(
        ["bash", str(SCRIPT)],
        cwd=REPO,
        env=docker_env(),
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
        start_new_session=True,
    )
    try:
        output, _ = process.communicate(timeout=TIMEOUT)
    except BaseException:
        os.killpg(process.pid, signal.SIGTERM)
        try:
            process.communicate(timeout=120)
        except subprocess.TimeoutExpired:
            os.killpg(process.pid, signal.SIGKILL)
            process.communicate()
        raise
    return process.returncode, output


def test_images_build_start_healthy_chat_and_keep_the_model_across_a_restart() -> None:
    reason = docker_skip_reason()
    if reason:
        pytest.skip(reason)
    returncode, output = run_script()
    print(output)  # phases and timings (pytest -s or -rP shows them)
    if returncode == BUSY:
        pytest.skip("another run of docker/smoke-test.sh (same SMOKE_PROJECT) is in progress")
    assert returncode == 0, output[-6000:]
    assert "smoke test passed" in output
    assert "(healthy)" in output
    assert "the models volume kept gemma3:270m" in output
