"""Folds an adapter model (LoRA, DoRA or IA3, merged by peft's own merge_and_unload) into its
base: a standalone model recorded as derived from both (the adapter as parent, base and
adapter in its source)."""

from __future__ import annotations

import json
import tempfile
from pathlib import Path

from ..compress.schemes import loads_as_float
from ..modeling.loader import load_causal_lm
from ..registry.errors import InvalidModel
from ..registry.importers import ProgressFn, import_hf_dir
from ..registry.manifest import MT_FILE
from ..registry.names import ModelName
from ..registry.store import ModelRecord, Registry

WEIGHT_SUFFIXES = (".safetensors", ".safetensors.index.json")


def _noop(status: str, completed: int | None, total: int | None) -> None:
    del status, completed, total


def merge_adapter(
    registry: Registry,
    adapter: str | ModelName,
    name: str | ModelName,
    progress: ProgressFn = _noop,
) -> ModelRecord:
    """Writes ``name``: the adapter model ``adapter`` with its weights merged into a
    copy of its base (in the base's stored precision). The registry is unchanged on error."""
    target = ModelName.parse(name) if not isinstance(name, ModelName) else name
    record = registry.get(adapter)
    if not record.is_adapter or not record.config.base_model:
        raise InvalidModel(f"'{record.name.display()}' is not an adapter model: nothing to merge")
    base = registry.get(record.config.base_model)
    quantization = base.config.quantization
    if quantization is not None and not loads_as_float(quantization.scheme):
        raise InvalidModel(
            f"the base '{base.name.display()}' is compressed ({quantization.scheme}); "
            "merge into its full-precision parent instead"
        )
    adapter_info = record.config.adapter
    if adapter_info is not None and "lm_head" in adapter_info.target_modules:
        base_hf = json.loads(registry.blobs.read_bytes(base.manifest.files()["config.json"].digest))
        if base_hf.get("tie_word_embeddings", True):
            raise InvalidModel(
                "the adapter changes lm_head, which this base shares with its input embeddings; "
                "merging would change both, unlike serving the adapter, so it is refused"
            )
    progress("loading base model and adapter", None, None)
    # a base imported from a quantized GGUF file merges into its float expansion
    model = load_causal_lm(registry, record, dequantize=True)
    progress("merging adapter weights", None, None)
    merged = model.merge_and_unload()
    with tempfile.TemporaryDirectory(prefix="ocs-merge-") as scratch:
        directory = Path(scratch)
        progress("writing merged weights", None, None)
        merged.save_pretrained(directory)
        for filename, blob in registry.verified_files(base, MT_FILE).items():
            if filename.endswith(WEIGHT_SUFFIXES) or (directory / filename).exists():
                continue  # the merged model's own config and weights
            (directory / filename).symlink_to(blob)  # tokenizer and generation files
        template = registry.template(record)
        return import_hf_dir(
            registry,
            directory,
            target,
            template=template or None,
            system=registry.system(record) or None,
            params=registry.params(record) or None,
            license_text=registry.license(record) or None,
            source={
                "kind": "merge",
                "base": base.name.display(),
                "base_digest": base.digest,
                "adapter": record.name.display(),
                "adapter_digest": record.digest,
            },
            parent_model=record.name.display(),
            progress=progress,
        )
