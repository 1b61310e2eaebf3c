"""Dedicated embedding models (BERT-style encoders): imported with their pooling, served by
/api/embed, /api/embeddings and /v1/embeddings with the vectors transformers gives, and
refused for generation with a 400."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from ollama_compact_server.registry.errors import InvalidModel
from ollama_compact_server.registry.importers import import_hf_dir
from ollama_compact_server.registry.store import Registry
from tests.conftest import serve_app, tree_hash
from tests.factory import make_tiny_bert

TEXTS = ["the cat sat on the mat", "hello world", "a red book"]


def reference(directory: Path, texts: list[str], pooling: str) -> list[list[float]]:
    from transformers import AutoModel, AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(directory)
    model = AutoModel.from_pretrained(directory).eval()
    out = []
    with torch.no_grad():
        for text in texts:
            ids = tokenizer(text, return_tensors="pt")
            hidden = model(**ids).last_hidden_state[0]
            vector = {
                "mean": hidden.mean(0),
                "cls": hidden[0],
                "max": hidden.max(0).values,
                "lasttoken": hidden[-1],
            }[pooling]
            out.append(torch.nn.functional.normalize(vector, dim=0).tolist())
    return out


def close(a: list[list[float]], b: list[list[float]]) -> bool:
    return torch.allclose(torch.tensor(a), torch.tensor(b), atol=1e-5)


@pytest.mark.parametrize("pooling", [None, "cls", "max", "lasttoken"])
async def test_encoder_embeddings_match_transformers(tmp_path: Path, pooling: str | None) -> None:
    directory = make_tiny_bert(tmp_path / "bert", pooling=pooling)
    registry = Registry(tmp_path / "registry")
    record = import_hf_dir(registry, directory, "minilm")
    assert record.config.capabilities == ["embedding"]
    assert record.config.embedding is not None
    assert record.config.embedding.pooling == (pooling or "mean")
    expected = reference(directory, TEXTS, pooling or "mean")
    async with serve_app(registry, dtype="float32") as served:
        raw = served.raw
        r = await raw.post("/api/embed", json={"model": "minilm", "input": TEXTS})
        assert r.status_code == 200, r.text
        assert close(r.json()["embeddings"], expected)
        r = await raw.post("/api/embeddings", json={"model": "minilm", "prompt": TEXTS[1]})
        assert close([r.json()["embedding"]], expected[1:2])
        result = await served.openai.embeddings.create(model="minilm", input=TEXTS)
        assert close([d.embedding for d in result.data], expected)
        show = (await raw.post("/api/show", json={"model": "minilm"})).json()
        assert show["capabilities"] == ["embedding"]
        assert show["details"]["family"] == "bert"
        for path, body in (
            ("/api/generate", {"model": "minilm", "prompt": "hi"}),
            ("/api/chat", {"model": "minilm", "messages": [{"role": "user", "content": "hi"}]}),
            ("/v1/chat/completions",
             {"model": "minilm", "messages": [{"role": "user", "content": "hi"}]}),
            ("/v1/completions", {"model": "minilm", "prompt": "hi"}),
        ):  # fmt: skip
            r = await raw.post(path, json=body)
            assert r.status_code == 400, (path, r.text)
        # long inputs are cut to the encoder's 64 positions (truncate defaults to true)
        r = await raw.post("/api/embed", json={"model": "minilm", "input": "cat " * 200})
        assert r.status_code == 200
        assert served.engine.health()


def test_bad_pooling_configs_are_refused(tmp_path: Path) -> None:
    directory = make_tiny_bert(tmp_path / "bert", pooling="mean")
    registry = Registry(tmp_path / "registry")
    before = tree_hash(registry.root)
    (directory / "1_Pooling" / "config.json").write_text(
        '{"pooling_mode_mean_tokens": true, "pooling_mode_cls_token": true}'
    )
    with pytest.raises(InvalidModel, match="exactly one"):
        import_hf_dir(registry, directory, "bad")
    (directory / "modules.json").write_text(
        '[{"path": "../../etc", "type": "sentence_transformers.models.Pooling"}]'
    )
    with pytest.raises(InvalidModel, match="pooling folder"):
        import_hf_dir(registry, directory, "bad")
    assert tree_hash(registry.root) == before
