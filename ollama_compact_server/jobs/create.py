"""`/api/create`: a new registry model from an existing one (`from`), from uploaded blobs
(`files`: a Hugging Face model or a GGUF file), or an adapter on a base (`adapters`), with
template, system prompt, parameters, messages and license, compressed on the way when asked
(`quantize`). Never from a server-side path."""

from __future__ import annotations

import json
import tempfile
import uuid
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

from ..registry.blobs import normalize_digest
from ..registry.errors import BlobNotFound, InvalidModel, ModelNotFound
from ..registry.importers import capabilities_for, import_adapter_dir, import_hf_dir
from ..registry.manifest import (
    MT_LICENSE,
    MT_MESSAGES,
    MT_PARAMS,
    MT_SYSTEM,
    MT_TEMPLATE,
    check_filename,
)
from ..registry.names import ModelName
from ..registry.store import ModelRecord, ProgressFn, Registry
from .importing import import_gguf

MAX_FILES = 256


@dataclass
class CreateSpec:
    name: ModelName
    from_: str | None = None
    files: dict[str, str] = field(default_factory=dict)
    adapters: dict[str, str] = field(default_factory=dict)
    template: str | None = None
    system: str | None = None
    parameters: dict[str, Any] | None = None
    messages: list[dict[str, Any]] | None = None
    license: list[str] | None = None
    merge: bool = False  # fold the adapter model named by ``from_`` into a standalone model
    quantize: str | None = None  # a compression scheme (or Ollama's q8_0, q4_K_M, ...)
    quantize_options: dict[str, Any] | None = None


def check_file_map(files: Any, label: str) -> dict[str, str]:
    """file name -> digest, both validated; no paths, no traversal."""
    if files is None:
        return {}
    if not isinstance(files, dict) or len(files) > MAX_FILES:
        raise InvalidModel(f"{label} must map at most {MAX_FILES} file names to digests")
    checked = {}
    for name, digest in files.items():
        if not isinstance(name, str) or name.startswith("/") or "\\" in name:
            raise InvalidModel("file path must be relative")
        checked[check_filename(name)] = normalize_digest(digest)
    return checked


def _linked(registry: Registry, files: dict[str, str], directory: Path) -> None:
    for name, digest in files.items():
        if not registry.blobs.has(digest):
            raise BlobNotFound(f"blob {digest} for {name} was not uploaded")
        (directory / name).symlink_to(registry.blobs.path(digest))


def create_model(registry: Registry, spec: CreateSpec, progress: ProgressFn) -> ModelRecord:
    if spec.files and spec.from_:
        raise InvalidModel("give either 'from' or 'files', not both")
    if not spec.files and not spec.from_:
        raise InvalidModel("neither 'from' or 'files' was specified")
    if spec.quantize and spec.adapters:
        raise InvalidModel(
            "quantize compresses a model, not an adapter: compress the base, then put the "
            "adapter on the compressed model"
        )
    if spec.quantize and spec.files:
        return _imported_then_compressed(registry, spec, progress)
    if spec.files:
        with tempfile.TemporaryDirectory(prefix="ocs-create-") as scratch:
            directory = Path(scratch)
            _linked(registry, spec.files, directory)
            ggufs = [n for n in spec.files if n.lower().endswith(".gguf")]
            progress("converting model", None, None)
            if ggufs:
                if len(spec.files) != 1:
                    raise InvalidModel("a GGUF model is created from its single .gguf file")
                record = import_gguf(
                    registry,
                    directory / ggufs[0],
                    spec.name,
                    progress=progress,
                    source={"kind": "create", "ref": ggufs[0]},
                    **_import_text(spec),
                )
            else:
                record = import_hf_dir(
                    registry,
                    directory,
                    spec.name,
                    progress=progress,
                    source={"kind": "create", "ref": spec.name.display()},
                    **_import_text(spec),
                )
        if spec.adapters:
            raise InvalidModel("adapters go on an existing model: use 'from' with 'adapters'")
        return _with_messages(registry, record, spec)
    try:
        base = registry.get(spec.from_ or "")
    except ModelNotFound:
        raise ModelNotFound(f"base model '{spec.from_}' not found") from None
    if spec.quantize:
        return _compressed(registry, base, spec, progress)
    if spec.adapters:
        if base.is_adapter:
            raise InvalidModel(f"'{base.name.display()}' is itself an adapter; name its base model")
        with tempfile.TemporaryDirectory(prefix="ocs-create-") as scratch:
            directory = Path(scratch)
            _linked(registry, spec.adapters, directory)
            progress("converting adapter", None, None)
            record = import_adapter_dir(
                registry,
                directory,
                spec.name,
                base.name,
                source={"kind": "create", "ref": base.name.display()},
                progress=progress,
            )
        return _derive(registry, record, spec, inherit=None)
    if spec.merge:
        if spec.adapters:
            raise InvalidModel("'merge' folds an existing adapter model: drop 'adapters'")
        from .merge import merge_adapter

        record = merge_adapter(registry, base.name, spec.name, progress)
        overrides = (spec.template, spec.system, spec.parameters, spec.messages, spec.license)
        if all(value is None for value in overrides):
            return record
        return _derive(registry, record, spec, inherit=None)
    progress("using existing layers", None, None)
    return _derive(registry, base, spec, inherit=base)


def _imported_then_compressed(
    registry: Registry, spec: CreateSpec, progress: ProgressFn
) -> ModelRecord:
    """`ollama create -q SCHEME` from uploaded files (a Modelfile whose FROM is a local
    folder): the files are imported under a staging name, compressed into the asked name,
    and the staging model is removed whatever happens; the uploaded blobs stay, so a retry
    needs no new upload, and only the compressed model is left under a name."""
    staging = ModelName.parse(f"ocs-staging-{uuid.uuid4().hex[:12]}")
    uploaded = frozenset(spec.files.values())
    imported = replace(spec, name=staging, quantize=None, quantize_options=None)
    try:
        record = create_model(registry, imported, progress)
        return _compressed(registry, record, spec, progress, parent="")
    finally:
        if registry.exists(staging):
            registry.delete(staging, keep=uploaded)


def _compressed(
    registry: Registry,
    base: ModelRecord,
    spec: CreateSpec,
    progress: ProgressFn,
    parent: str | None = None,
) -> ModelRecord:
    from .compressing import compress_registry_model

    record = compress_registry_model(
        registry,
        base.name.display(),
        spec.name,
        spec.quantize or "",
        spec.quantize_options,
        progress,
        parent,
    )
    text = CreateSpec(
        spec.name,
        template=spec.template,
        system=spec.system,
        parameters=spec.parameters,
        messages=spec.messages,
        license=spec.license,
    )
    if any(v is not None for v in (spec.template, spec.system, spec.parameters, spec.messages)):
        return _derive(registry, record, text, inherit=None)
    return record


def _import_text(spec: CreateSpec) -> dict[str, Any]:
    return {
        "template": spec.template,
        "system": spec.system,
        "params": spec.parameters,
        "license_text": "\n".join(spec.license) if spec.license else None,
    }


def _with_messages(registry: Registry, record: ModelRecord, spec: CreateSpec) -> ModelRecord:
    if not spec.messages:
        return record
    return _derive(registry, record, CreateSpec(spec.name, messages=spec.messages), inherit=None)


def _derive(
    registry: Registry, source: ModelRecord, spec: CreateSpec, inherit: ModelRecord | None
) -> ModelRecord:
    """A manifest sharing ``source``'s layers, with the text layers the spec overrides.
    Parameters merge over the source's; the rest replace."""
    params = registry.params(source)
    if spec.parameters:
        params = {**params, **spec.parameters}
    replaced = {
        MT_TEMPLATE: spec.template.encode() if spec.template is not None else None,
        MT_SYSTEM: spec.system.encode() if spec.system is not None else None,
        MT_PARAMS: json.dumps(params, sort_keys=True).encode() if spec.parameters else None,
        MT_MESSAGES: json.dumps(spec.messages).encode() if spec.messages is not None else None,
    }
    config = source.config.model_copy(deep=True)
    if spec.template is not None:  # a new template: what it offers; vision stays the model's
        keep = ["vision"] if "vision" in config.capabilities else []
        config.capabilities = capabilities_for(spec.template) + keep
    if inherit is not None:
        config.parent_model = inherit.name.display()
    with registry.transaction() as txn:
        for layer in source.manifest.layers:
            if layer.media_type in replaced and replaced[layer.media_type] is not None:
                continue
            if layer.media_type == MT_LICENSE and spec.license:
                continue
            txn.add_existing(layer)
        for media_type, data in replaced.items():
            if data is not None and data != b"":
                txn.add_bytes(media_type, data)
        for text in spec.license or []:
            txn.add_bytes(MT_LICENSE, text.encode())
        return txn.commit(spec.name, config)
