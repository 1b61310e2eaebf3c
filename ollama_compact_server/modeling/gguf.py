"""Converts a GGUF file into a Hugging Face safetensors directory through transformers' GGUF
loader (weights dequantized), ready for the registry's importer."""

from __future__ import annotations

import contextlib
import json
import logging
import shutil
import tempfile
from collections.abc import Callable
from pathlib import Path

from ..registry.errors import InvalidModel

log = logging.getLogger(__name__)

Progress = Callable[[str, int | None, int | None], None]


def read_gguf_metadata(path: Path) -> dict[str, object]:
    """A few identifying GGUF keys (architecture, name), read without loading tensors."""
    try:
        from gguf import GGUFReader

        reader = GGUFReader(str(path))
    except Exception as exc:  # gguf raises plain ValueErrors/struct errors on bad files
        raise InvalidModel(f"{path.name} is not a readable GGUF file: {exc}") from None
    wanted = ("general.architecture", "general.name", "general.basename", "general.size_label")
    found: dict[str, object] = {}
    for key in wanted:
        field = reader.fields.get(key)
        if field is not None and field.types:
            with contextlib.suppress(Exception):  # contents() varies between gguf versions
                found[key] = field.contents()
    return found


def convert_gguf(
    path: Path, out_dir: Path, *, dtype: str = "float32", progress: Progress | None = None
) -> dict[str, object]:
    """Writes config.json, model.safetensors and the tokenizer of a GGUF file into ``out_dir``.
    Returns the GGUF metadata that identifies the model."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    path = Path(path)
    if not path.is_file():
        raise InvalidModel(f"{path} is not a file")
    metadata = read_gguf_metadata(path)
    say = progress or (lambda *_: None)
    torch_dtype = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}[
        dtype
    ]
    with tempfile.TemporaryDirectory(prefix="ocs-gguf-") as scratch:
        # transformers wants a directory plus a file name; a link keeps the big file in place.
        link = Path(scratch) / path.name
        try:
            link.symlink_to(path.resolve())
        except OSError:
            shutil.copyfile(path, link)
        say("loading tokenizer from GGUF", None, None)
        try:
            tokenizer = AutoTokenizer.from_pretrained(scratch, gguf_file=path.name)
            say("dequantizing GGUF weights", None, None)
            model = AutoModelForCausalLM.from_pretrained(
                scratch, gguf_file=path.name, dtype=torch_dtype, low_cpu_mem_usage=True
            )
        except (ValueError, KeyError, RuntimeError, OSError) as exc:
            raise InvalidModel(f"{path.name} could not be converted: {exc}") from None
    say("writing safetensors", None, None)
    # The model still carries the GGUF quantizer, which refuses save_pretrained; its weights
    # are plain dequantized tensors, so write them (shared tied weights once) ourselves.
    from safetensors.torch import save_model

    out_dir.mkdir(parents=True, exist_ok=True)
    save_model(model, str(out_dir / "model.safetensors"), metadata={"format": "pt"})
    config = model.config.to_dict()
    config.pop("quantization_config", None)
    config["dtype"] = dtype
    config["architectures"] = [type(model).__name__]
    (out_dir / "config.json").write_text(json.dumps(config, indent=2, sort_keys=True))
    if model.generation_config is not None:
        model.generation_config.save_pretrained(out_dir)
    tokenizer.save_pretrained(out_dir)
    del model
    return metadata
