"""Quality reports of `ollama-compact eval`, kept beside the registry: one JSON file per
manifest digest under ``evals/``, written atomically. A report describes exactly the model
it measured: once a model's manifest changes, its old report no longer applies (and a copy
with the same manifest shares it), so no digest ever changes because a model was measured."""

from __future__ import annotations

import contextlib
import json
import logging
import re
from pathlib import Path
from typing import Any

from pydantic import BaseModel, ConfigDict, Field, ValidationError

from .errors import RegistryError
from .fsutil import TMP_PREFIX, atomic_write_bytes
from .store import ModelRecord, Registry

log = logging.getLogger(__name__)

EVAL_DIR = "evals"
MAX_REPORT_BYTES = 1 << 16
_DIGEST_RE = re.compile(r"[0-9a-f]{64}")


class EvalReport(BaseModel):
    """What one evaluation measured (sizes in bytes, speeds in generated tokens/s)."""

    model_config = ConfigDict(extra="allow")

    model: str
    digest: str  # the manifest digest of the measured model
    measured_at: str  # RFC 3339, UTC
    device: str
    dtype: str
    text: str  # the held-out text's name
    text_sha256: str
    tokens_scored: int = Field(ge=0)
    window: int = Field(ge=1)  # tokens per scored window (the context)
    stride: int = Field(ge=1)
    perplexity: float
    size_bytes: int = Field(ge=0)
    resident_bytes: int = Field(ge=0)
    slots: int = Field(ge=0)  # sequences the engine allocated KV cache for
    context: int = Field(ge=0)  # tokens per sequence in that KV cache
    new_tokens: int = Field(ge=0)  # tokens asked of each throughput stream
    tokens_per_second_1: float
    tokens_per_second_16: float
    parent_model: str = ""
    parent_perplexity: float | None = None
    perplexity_change: float | None = None  # relative: (ppl - parent) / parent

    def model_info(self) -> dict[str, float | int | str]:
        """The keys /api/show adds to ``model_info`` once a model was measured."""
        info: dict[str, float | int | str] = {
            "ocs.eval.perplexity": round(self.perplexity, 4),
            "ocs.eval.tokens_scored": self.tokens_scored,
            "ocs.eval.text": self.text,
            "ocs.eval.size_bytes": self.size_bytes,
            "ocs.eval.resident_bytes": self.resident_bytes,
            "ocs.eval.tokens_per_second_1": round(self.tokens_per_second_1, 2),
            "ocs.eval.tokens_per_second_16": round(self.tokens_per_second_16, 2),
            "ocs.eval.device": self.device,
            "ocs.eval.measured_at": self.measured_at,
        }
        if self.perplexity_change is not None and self.parent_perplexity is not None:
            info["ocs.eval.parent_model"] = self.parent_model
            info["ocs.eval.parent_perplexity"] = round(self.parent_perplexity, 4)
            info["ocs.eval.perplexity_change"] = round(self.perplexity_change, 5)
        return info

    def comparable(self, other: EvalReport) -> bool:
        """Whether two perplexities were measured on the same tokens the same way."""
        return (
            self.text_sha256 == other.text_sha256
            and self.tokens_scored == other.tokens_scored
            and self.window == other.window
            and self.stride == other.stride
        )


def eval_path(registry: Registry, digest: str) -> Path:
    if not _DIGEST_RE.fullmatch(digest):
        raise ValueError(f"invalid manifest digest {digest[:80]!r}")
    return registry.root / EVAL_DIR / f"sha256-{digest}.json"


def read_eval(registry: Registry, record: ModelRecord) -> EvalReport | None:
    """The report measured on this exact manifest, or None (missing or unreadable)."""
    path = eval_path(registry, record.digest)
    try:
        with open(path, "rb") as handle:
            data = handle.read(MAX_REPORT_BYTES + 1)
    except OSError:
        return None
    if len(data) > MAX_REPORT_BYTES:
        log.warning("ignoring oversized eval report %s", path.name)
        return None
    try:
        report = EvalReport.model_validate_json(data)
    except ValidationError:
        log.warning("ignoring damaged eval report %s", path.name)
        return None
    return report if report.digest == record.digest else None


def write_eval(registry: Registry, report: EvalReport) -> None:
    """Stores a report atomically and drops reports of manifests no model uses any more."""
    with registry.locked():
        atomic_write_bytes(
            eval_path(registry, report.digest), report.model_dump_json(indent=2).encode()
        )
        prune_evals(registry)


def prune_evals(registry: Registry) -> None:
    directory = registry.root / EVAL_DIR
    if not directory.is_dir():
        return
    with registry.locked():
        live = {record.digest for record in registry.models()}
        for tmp in directory.glob(TMP_PREFIX + "*"):  # left by a crash mid-write
            with contextlib.suppress(OSError):
                tmp.unlink()
        for path in directory.glob("sha256-*.json"):
            digest = path.name.removeprefix("sha256-").removesuffix(".json")
            if digest not in live:
                with contextlib.suppress(OSError):
                    path.unlink()


def disk_size(registry: Registry, record: ModelRecord) -> int:
    """Bytes of the model's distinct blobs on disk, its base model's included for an adapter."""
    sizes = {record.manifest.config.digest: record.manifest.config.size}
    sizes.update({layer.digest: layer.size for layer in record.manifest.layers})
    if record.is_adapter and record.config.base_model:
        base = registry.get(record.config.base_model)
        sizes[base.manifest.config.digest] = base.manifest.config.size
        sizes.update({layer.digest: layer.size for layer in base.manifest.layers})
    return sum(sizes.values())


TRAINING_INFO = (
    "method",
    "steps",
    "epochs",
    "train_tokens",
    "tokens_per_second",
    "eval_loss_base",
    "eval_loss_adapter",
    "perplexity_base",
    "perplexity_adapter",
    "perplexity_change",
)


def read_training(registry: Registry, record: ModelRecord) -> dict[str, Any] | None:
    """The report of the run that trained an adapter model here (jobs/finetune.py), kept
    in its manifest; None for models not trained here."""
    from .manifest import MT_TRAINING

    layer = record.manifest.first(MT_TRAINING)
    if layer is None:
        return None
    try:
        value = json.loads(registry.read_text(layer))
    except (json.JSONDecodeError, RegistryError):
        return None
    return value if isinstance(value, dict) else None


def training_info(report: dict[str, Any]) -> dict[str, Any]:
    """The report's figures as /api/show's model_info keys (``ocs.train.*``)."""
    info: dict[str, Any] = {
        f"ocs.train.{key}": report[key]
        for key in TRAINING_INFO
        if isinstance(report.get(key), (int, float, str))
    }
    data = report.get("data")
    if isinstance(data, dict) and isinstance(data.get("name"), str):
        info["ocs.train.data"] = data["name"]
    return info
