"""Loads registry models with transformers: verified blobs are exposed to transformers as a
directory of links, weights stay memory-mapped from the blob files."""

from __future__ import annotations

import contextlib
import tempfile
import threading
import warnings
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from ..registry.manifest import MT_ADAPTER_FILE, MT_FILE
from ..registry.store import ModelRecord, Registry

_IMPORTS = threading.Lock()


def _transformers() -> Any:
    """transformers, its auto classes resolved. Its lazy attributes are not thread-safe to
    resolve: two threads asking at once (a tokenizer for one request, the model for another,
    on a cold daemon) can fail with "cannot import name 'AutoTokenizer'"."""
    with _IMPORTS:
        import transformers
        from transformers import (  # noqa: F401
            AutoConfig,
            AutoImageProcessor,
            AutoModel,
            AutoModelForCausalLM,
            AutoModelForImageTextToText,
            AutoTokenizer,
        )

        return transformers


@contextlib.contextmanager
def model_dir(registry: Registry, record: ModelRecord, media_type: str = MT_FILE) -> Iterator[Path]:
    """A temporary directory whose entries link to the model's verified blobs."""
    files = registry.verified_files(record, media_type)
    with tempfile.TemporaryDirectory(prefix="ocs-view-") as scratch:
        view = Path(scratch)
        for filename, blob in files.items():
            (view / filename).symlink_to(blob)
        yield view


def load_tokenizer(registry: Registry, record: ModelRecord) -> Any:
    auto_tokenizer = _transformers().AutoTokenizer
    with model_dir(registry, record) as directory:
        return auto_tokenizer.from_pretrained(directory, trust_remote_code=False)


def load_causal_lm(
    registry: Registry, record: ModelRecord, dtype: Any = None, *, dequantize: bool = False
) -> Any:
    """A transformers causal LM for a registry model (an adapter model loads its base plus
    the adapter through peft; a vision model, its vision tower too). ``dequantize``
    expands a compressed model to plain float modules (for workflows that need float
    weights)."""
    base = (
        registry.get(record.config.base_model)
        if record.is_adapter and record.config.base_model
        else record
    )
    library = _transformers()
    auto_model = (
        library.AutoModelForImageTextToText
        if "vision" in base.config.capabilities
        else library.AutoModelForCausalLM
    )
    model: Any
    with model_dir(registry, base) as directory:
        if base.config.quantization is not None and dequantize:
            from .quantized import load_dequantized

            model = load_dequantized(directory, _torch_dtype(dtype))
        elif base.config.quantization is not None:  # compressed: its modules, as stored
            from .quantized import load_compressed

            model = load_compressed(directory, _torch_dtype(dtype))
        else:
            model = auto_model.from_pretrained(
                directory,
                dtype=dtype or "auto",
                trust_remote_code=False,
                use_safetensors=True,
                attn_implementation="sdpa",
            )
    if record.is_adapter:
        with _IMPORTS:
            from peft import PeftModel

        with model_dir(registry, record, MT_ADAPTER_FILE) as directory:
            config = None
            if base.config.quantization is not None and not dequantize:  # around our linears
                from .quantized import lora_config

                config = lora_config(directory)
            with warnings.catch_warnings():  # peft warns about layer types it does not know
                warnings.filterwarnings("ignore", "Unsupported layer type", UserWarning)
                model = PeftModel.from_pretrained(model, directory, config=config)
    model.eval()
    return model


def load_vision(registry: Registry, record: ModelRecord) -> Any:
    """A vision model's family (modeling/vision.py) with its image processor, made from
    preprocessor_config.json on transformers' Pillow backend (serving images must not need
    torchvision). None for a model without the vision capability."""
    from .vision import vision_family

    if "vision" not in record.config.capabilities:
        return None
    library = _transformers()
    with model_dir(registry, record) as directory:
        config = library.AutoConfig.from_pretrained(directory, trust_remote_code=False)
        processor = library.AutoImageProcessor.from_pretrained(
            directory, backend="pil", trust_remote_code=False
        )
    return vision_family(record.config.architecture, config, processor)


def load_encoder(registry: Registry, record: ModelRecord, dtype: Any = None) -> Any:
    """A transformers encoder (BERT and kin) for a dedicated embedding model."""
    auto_model = _transformers().AutoModel
    with model_dir(registry, record) as directory:
        model = auto_model.from_pretrained(
            directory, dtype=dtype or "auto", trust_remote_code=False, use_safetensors=True
        )
    model.eval()
    return model


def _torch_dtype(dtype: Any) -> Any:
    import torch

    return dtype if isinstance(dtype, torch.dtype) else torch.float32
