"""Settings: OLLAMA_HOST parsing, validation with one clear line, and `serve --help`."""

from __future__ import annotations

import subprocess
import sys

import pytest

from ollama_compact_server.cli import build_parser
from ollama_compact_server.settings import (
    Settings,
    SettingsError,
    env_name,
    load_settings,
    parse_duration,
    parse_host,
    parse_size,
)


@pytest.mark.parametrize(
    ("value", "expected"),
    [
        ("", ("http", "127.0.0.1", 11434)),
        ("127.0.0.1", ("http", "127.0.0.1", 11434)),
        ("0.0.0.0", ("http", "0.0.0.0", 11434)),
        (":8080", ("http", "127.0.0.1", 8080)),
        ("localhost:9000", ("http", "localhost", 9000)),
        ("http://example.com", ("http", "example.com", 80)),
        ("https://example.com", ("https", "example.com", 443)),
        ("https://example.com:8443/ollama", ("https", "example.com", 8443)),
        ("[::1]:11434", ("http", "::1", 11434)),
        ('"127.0.0.1:1234"', ("http", "127.0.0.1", 1234)),
    ],
)
def test_ollama_host_forms(value: str, expected: tuple[str, str, int]) -> None:
    address = parse_host(value)
    assert (address.scheme, address.host, address.port) == expected


def test_wildcard_bind_is_reached_on_loopback() -> None:
    assert parse_host("0.0.0.0:1234").client_url == "http://127.0.0.1:1234"


@pytest.mark.parametrize(
    "value", ["127.0.0.1:0", "127.0.0.1:70000", "ftp://x", "host:abc", "user@host:1"]
)
def test_bad_hosts(value: str) -> None:
    with pytest.raises(ValueError):
        parse_host(value)


def test_sizes_and_durations() -> None:
    assert parse_size("16GiB") == 16 * 1024**3
    assert parse_size("800MB") == 800_000_000
    assert parse_size(1024) == 1024
    with pytest.raises(ValueError):
        parse_size("-1GB")
    with pytest.raises(ValueError):
        parse_size("12 parsecs")
    assert parse_duration("5m") == 300
    assert parse_duration("1h30m") == 5400
    assert parse_duration(30) == 30
    assert parse_duration("0") == 0
    assert parse_duration("-1") is None
    assert parse_duration(-5) is None
    with pytest.raises(ValueError):
        parse_duration("soon")


def test_defaults_and_environment(monkeypatch: pytest.MonkeyPatch, tmp_path) -> None:
    s = load_settings()
    assert s.address.host == "127.0.0.1" and s.address.port == 11434
    assert s.models.name == "models" and ".ollama-compact" in str(s.models)
    monkeypatch.setenv("OLLAMA_HOST", "0.0.0.0:8080")
    monkeypatch.setenv("OCS_MODELS", str(tmp_path / "m"))
    monkeypatch.setenv("OCS_DEVICE", "CUDA:1")
    monkeypatch.setenv("OCS_MEMORY_BUDGET", "12GiB")
    monkeypatch.setenv("OLLAMA_ORIGINS", "http://a.example, http://b.example")
    s = load_settings()
    assert s.address.port == 8080 and s.address.host == "0.0.0.0"
    assert s.models == tmp_path / "m"
    assert s.device == "cuda:1"
    assert s.memory_budget_bytes == 12 * 1024**3
    assert s.extra_origins == ["http://a.example", "http://b.example"]
    # flags win over the environment
    assert load_settings(device="cpu").device == "cpu"


@pytest.mark.parametrize(
    ("overrides", "needle"),
    [
        ({"device": "gpu"}, "OCS_DEVICE"),
        ({"memory_budget": "-1GB"}, "OCS_MEMORY_BUDGET"),
        ({"host": "127.0.0.1:99999"}, "OLLAMA_HOST"),
        ({"dtype": "int3"}, "OCS_DTYPE"),
        ({"num_parallel": "0"}, "OCS_NUM_PARALLEL"),
        ({"keep_alive": "forever"}, "OCS_KEEP_ALIVE"),
        ({"default_model": "../etc"}, "OCS_DEFAULT_MODEL"),
        ({"log_level": "loud"}, "OCS_LOG_LEVEL"),
    ],
)
def test_invalid_values_name_their_variable(overrides: dict[str, str], needle: str) -> None:
    with pytest.raises(SettingsError) as info:
        load_settings(**overrides)
    message = str(info.value)
    assert needle in message and "\n" not in message


def test_registry_path_that_is_a_file(tmp_path) -> None:
    file = tmp_path / "file"
    file.write_text("x")
    with pytest.raises(SettingsError, match="not a directory"):
        load_settings(models=str(file))


@pytest.mark.parametrize(
    ("args", "env"),
    [
        (["--device", "gpu"], {}),
        ([], {"OCS_MEMORY_BUDGET": "-4GB"}),
        (["--host", "127.0.0.1:65536"], {}),
        ([], {"OCS_MODELS": "/etc/hostname"}),
    ],
)
def test_serve_refuses_bad_settings_with_one_line(args: list[str], env: dict[str, str]) -> None:
    import os

    result = subprocess.run(
        [sys.executable, "-m", "ollama_compact_server", "serve", *args],
        env={**os.environ, **env},
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert result.returncode == 2
    lines = [line for line in result.stderr.splitlines() if line.strip()]
    assert len(lines) == 1 and lines[0].startswith("Error: invalid setting"), result.stderr
    assert "Traceback" not in result.stderr


def test_serve_help_lists_every_setting() -> None:
    parser = build_parser()
    serve = parser._subparsers._group_actions[0].choices["serve"]  # type: ignore[union-attr]
    text = serve.format_help()
    for field in Settings.model_fields:
        assert "--" + field.replace("_", "-") in text
        assert (
            env_name(field) in text.replace("\n", " ").replace("  ", " ") or env_name(field) in text
        )


def test_serve_refuses_cuda_without_a_gpu(tmp_path) -> None:
    import os

    import torch

    if torch.cuda.is_available():
        return  # the machine has a GPU: cuda is a valid choice here
    env = {
        **os.environ,
        "OCS_MODELS": str(tmp_path / "m"),
        "OCS_IMPORT_DEFAULT": "false",
        "OCS_DEVICE": "cuda",
    }
    result = subprocess.run(
        [sys.executable, "-m", "ollama_compact_server", "serve"],
        env=env,
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert (
        result.returncode == 2
        and "no CUDA device" in result.stderr
        and "Traceback" not in result.stderr
    )
