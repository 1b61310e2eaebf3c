"""Compresses a registry model into a new registry model: loads the parent in float32, runs
the scheme, writes one ``model.safetensors`` of compressed tensors next to the parent's
config and tokenizer files, all in one registry transaction (a failure leaves no trace)."""

from __future__ import annotations

import json
import logging
import tempfile
from pathlib import Path
from typing import Any

from ..compress.format import FORMAT_KEY, FORMAT_VERSION, MODULES_KEY, SHAPES_KEY, specs_to
from ..compress.schemes import Scheme, SchemeError, loads_as_float, resolve, supported
from ..registry.errors import InvalidModel
from ..registry.importers import base_tensors
from ..registry.manifest import MT_FILE, Quantization
from ..registry.names import ModelName
from ..registry.store import ModelRecord, ProgressFn, Registry

log = logging.getLogger(__name__)
WEIGHT_FILES = ("model.safetensors.index.json",)


def _noop(status: str, completed: int | None = None, total: int | None = None) -> None:
    return None


def check_source(record: ModelRecord) -> None:
    """Only float base models are compressed (typed 400 errors otherwise)."""
    if record.is_adapter:
        raise SchemeError(
            f"'{record.name.display()}' is an adapter; compress its base model "
            f"'{record.config.base_model}' and create the adapter on the result"
        )
    quantization = record.config.quantization
    if quantization is not None and not loads_as_float(quantization.scheme):
        parent = record.config.parent_model or "its parent"
        raise SchemeError(
            f"'{record.name.display()}' is already compressed "
            f"({quantization.scheme}); compress {parent} instead "
            f"(supported schemes on a float model: {supported()})"
        )
    if record.config.format != "safetensors":
        raise SchemeError(f"'{record.name.display()}' is not a safetensors model")


def precheck(
    registry: Registry, source: str, scheme_name: str, options: dict[str, Any] | None
) -> tuple[Scheme, dict[str, Any], ModelRecord]:
    """Everything that can be refused before loading weights: the scheme, its options, the
    source model's kind and its weight shapes (read from the safetensors headers)."""
    scheme, checked = resolve(scheme_name, options)
    record = registry.get(source)
    check_source(record)
    shapes = {n: t.shape for n, t in base_tensors(registry, record).items()}
    embedding = next((n for n in shapes if n.endswith("embed_tokens.weight")), "")
    scheme.check_shapes(checked, shapes, embedding)
    return scheme, checked, record


def compress_registry_model(
    registry: Registry,
    source: str,
    name: str | ModelName,
    scheme_name: str,
    options: dict[str, Any] | None = None,
    progress: ProgressFn = _noop,
    parent: str | None = None,
) -> ModelRecord:
    """Compresses ``source`` into a new model ``name``; a bad request raises InvalidModel
    (400) listing what is supported, and any failure leaves the registry unchanged.
    ``parent`` overrides the parent recorded in the manifest ("" for none: ``source`` is a
    staging copy that will not stay)."""
    try:
        return _compress(registry, source, name, scheme_name, options, progress, parent)
    except SchemeError as exc:
        raise InvalidModel(str(exc)) from None


def _compress(
    registry: Registry,
    source: str,
    name: str | ModelName,
    scheme_name: str,
    options: dict[str, Any] | None,
    progress: ProgressFn,
    parent_override: str | None = None,
) -> ModelRecord:
    import torch

    from ..compress.pipeline import compress_model
    from ..modeling.loader import load_causal_lm, load_tokenizer

    scheme, checked, record = precheck(registry, source, scheme_name, options)
    target = name if isinstance(name, ModelName) else ModelName.parse(name)
    progress(f"loading {record.name.display()}", None, None)
    # a model imported from a quantized GGUF file is compressed from its expansion
    model = load_causal_lm(registry, record, dtype=torch.float32, dequantize=True)
    tokenizer = load_tokenizer(registry, record)
    with torch.no_grad():
        result = compress_model(model, tokenizer, scheme, checked, progress)
    del model
    for warning in result.warnings:
        log.warning("%s: %s", scheme.name, warning)
        progress(f"warning: {warning}", None, None)
    from safetensors.torch import save_file

    parent = record.name.display() if parent_override is None else parent_override
    config = record.config.model_copy(deep=True)
    config.quantization = Quantization(scheme=scheme.name, options=checked)
    if scheme_name.lower() != scheme.name:
        config.quantization.requested = scheme_name  # type: ignore[attr-defined]
    if result.choices:
        config.quantization.layers = result.choices  # type: ignore[attr-defined]
    config.parent_model = parent
    config.source = (
        {"kind": "compress", "ref": parent, "digest": record.digest}
        if parent
        else {"kind": "create", "ref": target.display()}
    )
    metadata = {
        FORMAT_KEY: FORMAT_VERSION,
        MODULES_KEY: specs_to(result.specs),
        SHAPES_KEY: json.dumps(result.shapes, sort_keys=True),
        "ocs.scheme": scheme.name,
        "ocs.parent": parent,
    }
    with tempfile.TemporaryDirectory(prefix="ocs-compress-") as scratch:
        path = Path(scratch) / "model.safetensors"
        progress("writing compressed weights", None, None)
        save_file(result.tensors, str(path), metadata=metadata)
        size = path.stat().st_size
        copied = [0]

        def copying(n: int) -> None:
            copied[0] += n
            progress("copying compressed weights", copied[0], size)

        with registry.transaction() as txn:
            for layer in record.manifest.layers:
                filename = layer.filename or ""
                if layer.media_type == MT_FILE and (
                    filename.endswith(".safetensors") or filename in WEIGHT_FILES
                ):
                    continue
                txn.add_existing(layer)
            txn.add_file(
                MT_FILE,
                path,
                "model.safetensors",
                copying,
            )
            progress("writing manifest", None, None)
            return txn.commit(target, config)
