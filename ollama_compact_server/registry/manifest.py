"""Manifest and model-config schemas. A manifest lists a model's layers (content-addressed
files); its config blob records what the model is, so nothing is guessed from file names."""

from __future__ import annotations

import json
import re
from typing import Any

from pydantic import BaseModel, ConfigDict, Field, field_validator

from .blobs import normalize_digest
from .errors import InvalidModel

MANIFEST_MEDIA_TYPE = "application/vnd.docker.distribution.manifest.v2+json"
MT_CONFIG = "application/vnd.ollama-compact.config.v1+json"
MT_FILE = "application/vnd.ollama-compact.file"  # a file of a Hugging Face model directory
MT_ADAPTER_FILE = "application/vnd.ollama-compact.adapter.file"  # a file of a PEFT adapter
MT_TEMPLATE = "application/vnd.ollama.image.template"  # chat template (Jinja)
MT_SYSTEM = "application/vnd.ollama.image.system"
MT_PARAMS = "application/vnd.ollama.image.params"  # JSON object of default options
MT_MESSAGES = "application/vnd.ollama.image.messages"  # JSON list of {role, content}
MT_LICENSE = "application/vnd.ollama.image.license"
MT_TRAINING = "application/vnd.ollama-compact.training+json"  # report of a run trained here

TEXT_LAYERS = (MT_TEMPLATE, MT_SYSTEM, MT_PARAMS, MT_MESSAGES, MT_LICENSE)
MAX_MANIFEST_BYTES = 1 << 20
MAX_LAYERS = 4096

FILENAME_RE = re.compile(r"[A-Za-z0-9_][A-Za-z0-9_.-]{0,199}")


def check_filename(name: object) -> str:
    """A file name inside a model: flat, no traversal, no odd characters."""
    if not isinstance(name, str) or not FILENAME_RE.fullmatch(name) or ".." in name:
        raise InvalidModel(f"invalid file path {str(name)[:100]!r}")
    return name


class Layer(BaseModel):
    model_config = ConfigDict(populate_by_name=True, extra="ignore")

    media_type: str = Field(alias="mediaType", max_length=200)
    digest: str
    size: int = Field(ge=0)
    annotations: dict[str, str] | None = None

    @field_validator("digest")
    @classmethod
    def _digest(cls, value: str) -> str:
        return normalize_digest(value)

    @property
    def filename(self) -> str | None:
        return (self.annotations or {}).get("filename")


class Manifest(BaseModel):
    model_config = ConfigDict(populate_by_name=True, extra="ignore")

    schema_version: int = Field(2, alias="schemaVersion")
    media_type: str = Field(MANIFEST_MEDIA_TYPE, alias="mediaType")
    config: Layer
    layers: list[Layer] = Field(max_length=MAX_LAYERS)

    @field_validator("layers")
    @classmethod
    def _filenames(cls, layers: list[Layer]) -> list[Layer]:
        for layer in layers:
            if layer.media_type in (MT_FILE, MT_ADAPTER_FILE):
                check_filename(layer.filename)
        return layers

    def to_bytes(self) -> bytes:
        data = self.model_dump(by_alias=True, exclude_none=True)
        return json.dumps(data, indent=2, sort_keys=False).encode()

    @classmethod
    def from_bytes(cls, data: bytes) -> Manifest:
        if len(data) > MAX_MANIFEST_BYTES:
            raise InvalidModel("manifest too large")
        return cls.model_validate_json(data)

    def digests(self) -> set[str]:
        return {self.config.digest, *(layer.digest for layer in self.layers)}

    def files(self, media_type: str = MT_FILE) -> dict[str, Layer]:
        return {
            layer.filename: layer
            for layer in self.layers
            if layer.media_type == media_type and layer.filename
        }

    def first(self, media_type: str) -> Layer | None:
        for layer in self.layers:
            if layer.media_type == media_type:
                return layer
        return None


class Quantization(BaseModel):
    model_config = ConfigDict(extra="allow")

    scheme: str
    options: dict[str, Any] = Field(default_factory=dict)


class AdapterInfo(BaseModel):
    model_config = ConfigDict(extra="allow")

    peft_type: str = "LORA"
    r: int
    alpha: float
    target_modules: list[str] = Field(default_factory=list)
    use_rslora: bool = False
    use_dora: bool = False
    # IA3: the modules whose input is scaled (peft's list of name suffixes, or a pattern)
    feedforward_modules: list[str] | str = Field(default_factory=list)


POOLING_MODES = ("mean", "cls", "max", "lasttoken")


class EmbeddingInfo(BaseModel):
    """A dedicated embedding model (an encoder such as BERT): how token states become one
    vector (sentence-transformers' pooling, recorded at import)."""

    model_config = ConfigDict(extra="allow")

    pooling: str = "mean"


class ModelConfig(BaseModel):
    """The config blob: what a model is, recorded at import or create time."""

    model_config = ConfigDict(extra="allow")

    schema_: int = Field(1, alias="schema")
    kind: str = "model"  # "model" or "adapter"
    format: str = "safetensors"
    architecture: str = ""
    model_type: str = ""
    family: str = ""
    families: list[str] = Field(default_factory=list)
    parameter_count: int = 0
    dtype: str = ""
    quantization: Quantization | None = None
    context_length: int = 0
    embedding_length: int = 0
    source: dict[str, Any] = Field(default_factory=dict)
    aliases: list[str] = Field(default_factory=list)
    parent_model: str = ""
    base_model: str | None = None
    base_digest: str | None = None
    adapter: AdapterInfo | None = None
    embedding: EmbeddingInfo | None = None  # set for dedicated embedding models only
    capabilities: list[str] = Field(default_factory=lambda: ["completion"])

    def to_bytes(self) -> bytes:
        return json.dumps(self.model_dump(by_alias=True, exclude_none=True), indent=2).encode()

    @classmethod
    def from_bytes(cls, data: bytes) -> ModelConfig:
        return cls.model_validate_json(data)

    @property
    def quantization_level(self) -> str:
        if self.quantization is not None:
            level = getattr(self.quantization, "level", None)  # a GGUF file's own (Q4_K_M)
            return str(level) if level else self.quantization.scheme.upper()
        return {"float32": "F32", "bfloat16": "BF16", "float16": "F16"}.get(
            self.dtype, self.dtype.upper()
        )
