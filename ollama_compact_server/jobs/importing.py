"""One entry point for `ollama-compact import`: dispatches a local path to the right importer
(Hugging Face directory, PEFT adapter directory or GGUF file)."""

from __future__ import annotations

import tempfile
from pathlib import Path
from typing import Any

from ..registry.blobs import sha256_file
from ..registry.errors import InvalidModel
from ..registry.importers import PICKLE_SUFFIXES, import_adapter_dir, import_hf_dir
from ..registry.names import ModelName
from ..registry.store import ModelRecord, ProgressFn, Registry


def _noop(status: str, completed: int | None = None, total: int | None = None) -> None:
    return None


def import_path(
    registry: Registry,
    path: Path,
    name: str,
    *,
    base: str | None = None,
    progress: ProgressFn = _noop,
    **extra: Any,
) -> ModelRecord:
    """Imports a model or adapter found at ``path`` under ``name``."""
    target = ModelName.parse(name)
    path = Path(path).expanduser()
    if not path.exists():
        raise InvalidModel(f"{path} does not exist")
    if extra.get("dequantize") and (path.is_dir() or path.suffix.lower() != ".gguf"):
        raise InvalidModel("--dequantize is for GGUF files")
    if path.is_dir():
        if (path / "adapter_config.json").is_file():
            if not base:
                raise InvalidModel("this is a PEFT adapter: name its base model with --base MODEL")
            return import_adapter_dir(registry, path, target, base, progress=progress)
        if base:
            raise InvalidModel("--base is only for adapter directories (adapter_config.json)")
        return import_hf_dir(registry, path, target, progress=progress, **extra)
    if path.suffix.lower() == ".gguf":
        return import_gguf(registry, path, target, progress=progress, **extra)
    if path.suffix.lower() in PICKLE_SUFFIXES:
        raise InvalidModel(
            f"{path.name} is a pickle file: pickle can run arbitrary code when loaded, so only "
            "safetensors model directories and GGUF files are accepted"
        )
    raise InvalidModel(
        f"{path.name}: expected a model directory (config.json + *.safetensors), "
        "a PEFT adapter directory or a .gguf file"
    )


def import_gguf(
    registry: Registry,
    path: Path,
    name: ModelName,
    *,
    progress: ProgressFn = _noop,
    source: dict[str, Any] | None = None,
    aliases: list[str] | None = None,
    dequantize: bool = False,
    **extra: Any,
) -> ModelRecord:
    """Imports a GGUF file: its weights stay near their own grid (int8 / int4, see
    modeling/gguf.py) unless ``dequantize`` expands them to float32."""
    from ..compress.schemes import GGUF
    from ..modeling.gguf import convert_gguf
    from ..registry.manifest import Quantization

    progress("hashing GGUF file", None, None)
    digest = sha256_file(path)
    with tempfile.TemporaryDirectory(prefix="ocs-import-") as scratch:
        result = convert_gguf(path, Path(scratch), dequantize=dequantize, progress=progress)
        metadata = result.metadata
        names = [str(metadata[k]) for k in ("general.name",) if metadata.get(k)]
        quantization = None
        if result.compressed:
            quantization = Quantization(
                scheme=GGUF.name,
                options={"source_types": result.source_types, "stored": result.stored},
            )
            if result.level:
                quantization.level = result.level  # type: ignore[attr-defined]
        return import_hf_dir(
            registry,
            Path(scratch),
            name,
            progress=progress,
            source=source or {"kind": "gguf", "ref": path.name, "digest": digest},
            aliases=[*(aliases or []), *names],
            quantization=quantization,
            parameter_count=result.parameters or None,
            **extra,
        )
