"""Daemon settings: one pydantic-settings model that is the single source for environment
variables, `serve` flags and the README's configuration table."""

from __future__ import annotations

import os
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

from pydantic import AliasChoices, Field, SecretStr, ValidationError, field_validator
from pydantic_settings import BaseSettings, SettingsConfigDict

from .units import parse_duration, parse_size  # re-exported: settings' users import them here

DEFAULT_PORT = 11434
DEFAULT_HOST = f"127.0.0.1:{DEFAULT_PORT}"
DEFAULT_MODEL = "gemma3:270m"


class SettingsError(ValueError):
    """An invalid setting; its message is one line meant for the user."""


# --------------------------------------------------------------------------- parsing helpers


@dataclass(frozen=True, slots=True)
class HostAddress:
    """Where the daemon listens or where a client finds it (OLLAMA_HOST's parts)."""

    scheme: str
    host: str
    port: int
    path: str = ""

    @property
    def url(self) -> str:
        host = f"[{self.host}]" if ":" in self.host else self.host
        return f"{self.scheme}://{host}:{self.port}{self.path}"

    @property
    def client_url(self) -> str:
        """The URL a client should use: a wildcard bind address is reached on loopback."""
        host = {"0.0.0.0": "127.0.0.1", "::": "::1", "": "127.0.0.1"}.get(self.host, self.host)  # noqa: S104
        return HostAddress(self.scheme, host, self.port, self.path).url


def parse_host(value: str | None) -> HostAddress:
    """Parses OLLAMA_HOST like Ollama does: ``[scheme://]host[:port][/path]``; no scheme means
    http, no port means 11434 (or 80 / 443 when the scheme is given explicitly)."""
    text = (value or "").strip().strip("\"'")
    if not text:
        return HostAddress("http", "127.0.0.1", DEFAULT_PORT)
    scheme, default_port = "http", DEFAULT_PORT
    if "://" in text:
        scheme, _, rest = text.partition("://")
        scheme = scheme.lower()
        if scheme not in ("http", "https"):
            raise ValueError(f"unsupported scheme {scheme!r} (use http or https)")
        default_port = 443 if scheme == "https" else 80
        text = rest
    parts = urlsplit("//" + text)
    try:
        port = parts.port
    except ValueError:
        raise ValueError(f"port out of range in {value!r} (1-65535)") from None
    host = parts.hostname if parts.hostname is not None else ""
    if "@" in text or parts.query or parts.fragment:
        raise ValueError(f"{value!r} is not host[:port]")
    if not host:
        host = "127.0.0.1"
    if port is None:
        port = default_port
    if not 1 <= port <= 65535:
        raise ValueError(f"port {port} out of range (1-65535)")
    return HostAddress(scheme, host, port, parts.path.rstrip("/"))


_DEVICE_RE = re.compile(r"(auto|cpu|cuda|cuda:[0-9]{1,2})")
_DTYPES = ("auto", "float32", "bfloat16", "float16")
_LOG_LEVELS = ("debug", "info", "warning", "error", "critical")
_RAY_ROUTINGS = ("model", "round_robin")


def default_home() -> Path:
    return Path(os.path.expanduser("~")) / ".ollama-compact"


# --------------------------------------------------------------------------- the settings


class Settings(BaseSettings):
    """Every setting of the daemon. Each field's description is its documentation."""

    model_config = SettingsConfigDict(
        env_prefix="OCS_",
        extra="ignore",
        case_sensitive=False,
        populate_by_name=True,
        validate_default=True,
    )

    host: str = Field(
        DEFAULT_HOST,
        validation_alias=AliasChoices("host", "OLLAMA_HOST"),
        description="Address to listen on (and, for client commands, where the daemon is): "
        "[scheme://]host[:port], as Ollama reads it.",
        json_schema_extra={"env": "OLLAMA_HOST"},
    )
    models: Path = Field(
        default_factory=lambda: default_home() / "models",
        description="Registry root: manifests and content-addressed blobs.",
    )
    adapters: Path | None = Field(
        default_factory=lambda: default_home() / "adapters",
        description="Drop-in folder: each subfolder holding a PEFT adapter is registered "
        "at startup as a model named after the folder.",
    )
    default_model: str = Field(
        DEFAULT_MODEL,
        description="Model imported on first start (from the bundled Gemma 3 270M package) "
        "and used by health checks.",
    )
    import_default: bool = Field(
        True,
        description="Import the default model on first start if the registry lacks it.",
    )
    device: str = Field("auto", description="Compute device: auto, cpu, cuda or cuda:N.")
    dtype: str = Field(
        "auto", description="Weight and activation dtype: auto, float32, bfloat16 or float16."
    )
    memory_budget: str = Field(
        "auto",
        description="Bytes for weights plus KV cache, e.g. 12GiB. auto: 14 GiB on CUDA "
        "(fits a 16 GB card with room for activations), half of the RAM on CPU.",
    )
    max_loaded_models: int = Field(3, ge=1, le=64, description="Most base models resident at once.")
    context_length: int = Field(
        4096,
        ge=256,
        le=1 << 20,
        description="Tokens per sequence (prompt plus output), capped by the model's own "
        "context length and the memory budget.",
    )
    num_parallel: int = Field(
        16, ge=1, le=1024, description="Most sequences decoded together per model."
    )
    max_queue: int = Field(
        512,
        ge=1,
        le=1_000_000,
        description="Most requests waiting; beyond it the daemon "
        "answers 503 (Ollama routes) or 429 (OpenAI routes).",
    )
    keep_alive: str = Field(
        "5m",
        description="How long an idle model stays loaded: Go duration or seconds; "
        "0 unloads at once, negative keeps it forever.",
    )
    max_loras: int = Field(
        8, ge=1, le=1024, description="Most LoRA adapters resident on the device at once."
    )
    max_cpu_loras: int = Field(
        32, ge=0, le=100_000, description="Most idle LoRA adapters kept in host memory."
    )
    runtime_lora: bool = Field(
        True,
        description="Serve POST /v1/load_lora_adapter and /v1/unload_lora_adapter (vLLM's "
        "runtime adapter routes, for gateways); their lora_path only names a folder inside "
        "OCS_ADAPTERS or an adapter model of the registry.",
    )
    public_metrics: bool = Field(
        False,
        description="GET /metrics answers without OCS_API_KEY (a gateway's endpoint picker "
        "scrapes it without a key).",
    )
    api_key: SecretStr | None = Field(
        None,
        description="When set, every route but HEAD /, GET / and /health needs "
        "'Authorization: Bearer <key>' (or Anthropic's 'x-api-key: <key>').",
    )
    insecure_no_auth: bool = Field(
        False,
        description="Allow listening on a non-loopback address without OCS_API_KEY "
        "(refused otherwise).",
    )
    origins: str = Field(
        "",
        validation_alias=AliasChoices("origins", "OCS_ORIGINS", "OLLAMA_ORIGINS"),
        description="Extra CORS origins, comma-separated (local origins are always allowed; "
        "OLLAMA_ORIGINS is read too).",
    )
    allowed_hosts: str = Field(
        "",
        description="Extra names the Host header may carry, comma-separated (for a reverse "
        "proxy or another container's name for this one). Local names are always allowed; "
        "the check guards against DNS rebinding and is off only for a non-loopback bind with "
        "OCS_API_KEY.",
    )
    max_blob_size: str = Field(
        "64GiB",
        description="Largest file /api/blobs takes (a model shard, a GGUF file); an upload "
        "that would leave less than 1 GiB free on the registry's disk is refused too (507).",
    )
    max_image_size: str = Field(
        "20MiB",
        description="Largest image a request may carry (the encoded file, before base64); "
        "a larger one is a 400 naming the image.",
    )
    max_image_pixels: int = Field(
        50_000_000,
        ge=1,
        le=178_956_970,
        description="Most pixels (width x height) of one image, checked from its header "
        "before it is decoded (a decompression bomb is refused without allocating it). 50 "
        "megapixels is above what phone and camera photos have and about 150 MB decoded; "
        "Pillow's own bomb check refuses more than 178,956,970 whatever this says.",
    )
    max_images: int = Field(
        16, ge=1, le=1024, description="Most images in one request, every message's together."
    )
    image_url_hosts: str = Field(
        "",
        description="Host names (comma-separated, compared exactly) whose http(s) image URLs "
        "the daemon fetches for clients; unset: remote image URLs are refused and images "
        "must be sent inline. Naming a host lets every client make the daemon reach it "
        "(on any port).",
    )
    max_connections: int = Field(
        1024,
        ge=1,
        le=100_000,
        description="Open connections (and requests in flight) past which new requests get a "
        "503 at once.",
    )
    header_timeout: float = Field(
        10.0,
        gt=0,
        le=3600,
        description="Seconds a client has to send a request's headers; a request body, once "
        "30 s have passed, must keep arriving at 16 KiB/s on average. Slower clients get a "
        "408 and the connection closes.",
    )
    shutdown_timeout: int = Field(
        30,
        ge=0,
        le=3600,
        description="Seconds running requests get to finish after SIGTERM before they are ended.",
    )
    cpu_kernels: bool = Field(
        True,
        description="Serve int8 / int4 weights on x86 CPUs with our AVX2 kernels, compiled "
        "once with the system's C compiler (about a second); false: torch's kernels.",
    )
    kernel_cache: Path | None = Field(
        None,
        description="Folder for the compiled CPU kernels (unset: ~/.cache/ollama-compact/kernels).",
    )
    ray_routing: str = Field(
        "model",
        description="serve --ray: how the ingress picks a replica. model: the request's model "
        "is Ray Serve's multiplexed model id (a replica that holds it); round_robin: no model "
        "id, Serve's default choice (the shorter queue of two replicas), a baseline.",
    )
    log_level: str = Field("info", description="debug, info, warning or error.")
    log_json: bool = Field(False, description="Write logs as JSON lines.")

    # ---------------------------------------------------------------- validators

    @field_validator("host")
    @classmethod
    def _check_host(cls, value: str) -> str:
        parse_host(value)
        return value

    @field_validator("models")
    @classmethod
    def _check_models(cls, value: Path) -> Path:
        value = value.expanduser()
        if value.exists() and not value.is_dir():
            raise ValueError(f"{value} exists and is not a directory")
        return value

    @field_validator("adapters", mode="before")
    @classmethod
    def _empty_adapters(cls, value: Any) -> Any:
        if isinstance(value, str) and not value.strip():
            return None
        return value

    @field_validator("adapters")
    @classmethod
    def _check_adapters(cls, value: Path | None) -> Path | None:
        if value is None:
            return None
        value = value.expanduser()
        if value.exists() and not value.is_dir():
            raise ValueError(f"{value} exists and is not a directory")
        return value

    @field_validator("default_model")
    @classmethod
    def _check_default_model(cls, value: str) -> str:
        from .registry.errors import InvalidName
        from .registry.names import ModelName

        try:
            ModelName.parse(value)
        except InvalidName as exc:
            raise ValueError(str(exc)) from None
        return value

    @field_validator("device")
    @classmethod
    def _check_device(cls, value: str) -> str:
        value = value.strip().lower()
        if not _DEVICE_RE.fullmatch(value):
            raise ValueError(f"unknown device {value!r} (use auto, cpu, cuda or cuda:N)")
        return value

    @field_validator("dtype")
    @classmethod
    def _check_dtype(cls, value: str) -> str:
        value = value.strip().lower()
        aliases = {"fp32": "float32", "bf16": "bfloat16", "fp16": "float16", "half": "float16"}
        value = aliases.get(value, value)
        if value not in _DTYPES:
            raise ValueError(f"unknown dtype {value!r} (use {', '.join(_DTYPES)})")
        return value

    @field_validator("memory_budget")
    @classmethod
    def _check_budget(cls, value: str) -> str:
        value = str(value).strip()
        if value.lower() == "auto":
            return "auto"
        if parse_size(value) <= 0:
            raise ValueError("memory budget must be positive")
        return value

    @field_validator("max_blob_size")
    @classmethod
    def _check_blob_size(cls, value: str) -> str:
        if parse_size(value) <= 0:
            raise ValueError("the blob size cap must be positive")
        return str(value).strip()

    @field_validator("max_image_size")
    @classmethod
    def _check_image_size(cls, value: str) -> str:
        if not 0 < parse_size(value) <= 1 << 30:
            raise ValueError("the image size cap must be positive and at most 1GiB")
        return str(value).strip()

    @field_validator("image_url_hosts")
    @classmethod
    def _check_image_url_hosts(cls, value: str) -> str:
        for host in value.split(","):
            host = host.strip()
            if host and not re.fullmatch(r"[A-Za-z0-9.\-]+|\[[0-9A-Fa-f:.]+\]", host):
                raise ValueError(f"{host[:60]!r} is not a host name (no scheme, port or path)")
        return value

    @field_validator("keep_alive")
    @classmethod
    def _check_keep_alive(cls, value: str) -> str:
        parse_duration(value)
        return value

    @field_validator("api_key")
    @classmethod
    def _check_api_key(cls, value: SecretStr | None) -> SecretStr | None:
        if value is not None and not value.get_secret_value().strip():
            raise ValueError("the API key must not be empty")
        return value

    @field_validator("ray_routing")
    @classmethod
    def _check_ray_routing(cls, value: str) -> str:
        value = value.strip().lower().replace("-", "_")
        if value not in _RAY_ROUTINGS:
            raise ValueError(f"unknown routing {value!r} (use {', '.join(_RAY_ROUTINGS)})")
        return value

    @field_validator("log_level")
    @classmethod
    def _check_log_level(cls, value: str) -> str:
        value = value.strip().lower()
        if value not in _LOG_LEVELS:
            raise ValueError(f"unknown log level {value!r} (use {', '.join(_LOG_LEVELS)})")
        return value

    # ---------------------------------------------------------------- derived values

    @property
    def address(self) -> HostAddress:
        return parse_host(self.host)

    @property
    def keep_alive_seconds(self) -> float | None:
        """Seconds an idle model stays loaded; None means forever."""
        return parse_duration(self.keep_alive)

    @property
    def memory_budget_bytes(self) -> int | None:
        """The budget in bytes, or None for "auto" (the engine decides per device)."""
        return None if self.memory_budget == "auto" else parse_size(self.memory_budget)

    @property
    def max_blob_bytes(self) -> int:
        return parse_size(self.max_blob_size)

    @property
    def max_image_bytes(self) -> int:
        return parse_size(self.max_image_size)

    @property
    def image_hosts(self) -> frozenset[str]:
        """OCS_IMAGE_URL_HOSTS as lowercase names (an IPv6 address without brackets)."""
        hosts = (h.strip().lower().strip("[]").rstrip(".") for h in self.image_url_hosts.split(","))
        return frozenset(h for h in hosts if h)

    @property
    def extra_origins(self) -> list[str]:
        return [o.strip() for o in self.origins.split(",") if o.strip()]

    @property
    def extra_hosts(self) -> list[str]:
        return [h.strip().lower() for h in self.allowed_hosts.split(",") if h.strip()]


def env_name(field: str) -> str:
    """The environment variable that sets a field."""
    info = Settings.model_fields[field]
    extra = info.json_schema_extra
    if isinstance(extra, dict) and isinstance(extra.get("env"), str):
        return str(extra["env"])
    return f"OCS_{field.upper()}"


def load_settings(**overrides: Any) -> Settings:
    """Builds settings from the environment plus explicit overrides (CLI flags), turning a
    validation failure into one readable :class:`SettingsError` line."""
    try:
        return Settings(**{k: v for k, v in overrides.items() if v is not None})
    except ValidationError as exc:
        raise SettingsError(describe_validation_error(exc)) from None


def describe_validation_error(exc: ValidationError) -> str:
    problems = []
    for err in exc.errors():
        field = str(err["loc"][0]) if err["loc"] else "?"
        name = env_name(field) if field in Settings.model_fields else field
        message = str(err.get("msg", "invalid value"))
        message = message.removeprefix("Value error, ")
        value = err.get("input")
        shown = f"={value!r}" if isinstance(value, (str, int, float)) else ""
        problems.append(f"{name}{shown}: {message}")
    return "invalid setting " + "; ".join(problems)
