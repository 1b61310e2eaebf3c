"""gemma3:270m compressed to int8 in a scratch registry (blobs hard-linked from the shared
one, which is never written) and served by the real engine: greedy text stays sensible."""

from __future__ import annotations

import os
from pathlib import Path

import pytest
import torch

from ollama_compact_server.jobs.compressing import compress_registry_model
from ollama_compact_server.modeling.loader import load_causal_lm, load_tokenizer
from ollama_compact_server.modeling.quantized import Int8Linear
from ollama_compact_server.registry.store import Registry
from tests.conftest import serve_app

pytestmark = pytest.mark.e2e


def linked_registry(source: Registry, model: str, root: Path) -> Registry:
    registry = Registry(root)
    record = source.get(model)
    for digest in record.manifest.digests():
        path = registry.blobs.path(digest)
        path.parent.mkdir(parents=True, exist_ok=True)
        try:
            os.link(source.blobs.path(digest), path)
        except OSError:  # another file system: a copy
            path.write_bytes(source.blobs.path(digest).read_bytes())
    registry.write_manifest(model, record.manifest)
    return registry


async def test_gemma_int8_serves_greedy_text(gemma_registry: Registry, tmp_path: Path) -> None:
    registry = linked_registry(gemma_registry, "gemma3:270m", tmp_path / "registry")
    record = compress_registry_model(registry, "gemma3:270m", "gemma3:270m-q8", "q8_0")
    # compressed from the expansion of the GGUF file's weights: a quarter of float32
    assert record.size < 0.3 * 4 * registry.get("gemma3:270m").config.parameter_count
    model = load_causal_lm(registry, record, dtype=torch.float32)
    assert isinstance(model.model.layers[0].mlp.down_proj, Int8Linear)
    tokenizer = load_tokenizer(registry, record)
    ids = tokenizer("Once upon a time", return_tensors="pt")
    out = model.generate(**ids, max_new_tokens=12, do_sample=False)
    text = tokenizer.decode(out[0, ids["input_ids"].shape[1] :])
    # int8 continues ", there was a small town in the middle of nowhere." (perplexity within
    # 1%, see docs/PERFORMANCE.md): sensible English, not noise
    assert text.startswith(", there was a "), text
    async with serve_app(registry) as served:
        reply = await served.ollama.generate(
            model="gemma3:270m-q8",
            prompt="Once upon a time",
            raw=True,
            options={"temperature": 0, "num_predict": 12},
        )
    assert reply.eval_count == 12
    assert reply.response.startswith(", there was a "), reply.response
