"""Compression through /api/create (from + quantize, Ollama's names included), /api/show's
quantization_level, the 400s for bad requests, and the real engine serving a compressed model."""

from __future__ import annotations

import json
from collections.abc import AsyncIterator
from pathlib import Path

import pytest

from ollama_compact_server.registry.importers import import_hf_dir
from ollama_compact_server.registry.store import Registry
from tests.conftest import serve_app, tree_hash
from tests.fakes import FakeEngine


@pytest.fixture
async def env(tmp_path: Path, tiny_models: dict[str, Path]) -> AsyncIterator[tuple]:
    registry = Registry(tmp_path / "registry")
    import_hf_dir(registry, tiny_models["gemma3"], "tiny", system="base system")
    async with serve_app(registry, FakeEngine()) as served:
        yield served.raw, registry


async def test_create_with_quantize_streams_progress_and_records_the_scheme(env) -> None:
    raw, registry = env
    r = await raw.post("/api/create", json={"model": "tiny-q4", "from": "tiny", "quantize": "q4_0"})
    assert r.status_code == 200
    lines = [json.loads(line) for line in r.text.splitlines()]
    statuses = [line.get("status", "") for line in lines]
    assert statuses[-1] == "success"
    assert any(s.startswith("compressing model.layers.0") for s in statuses)
    assert any("total" in line for line in lines)
    record = registry.get("tiny-q4")
    assert record.config.quantization is not None
    assert record.config.quantization.scheme == "int4"
    assert record.config.quantization.options["group_size"] == 32
    assert record.config.parent_model == "tiny:latest"
    assert registry.system(record) == "base system"  # text layers come along
    show = (await raw.post("/api/show", json={"model": "tiny-q4"})).json()
    assert show["details"]["quantization_level"] == "INT4"


async def test_create_with_our_scheme_and_options(env) -> None:
    raw, registry = env
    body = {
        "model": "tiny-lr",
        "from": "tiny",
        "quantize": "lowrank",
        "quantize_options": {"rank": 4, "embedding": "keep"},
        "system": "compressed system",
        "stream": False,
    }
    r = await raw.post("/api/create", json=body)
    assert r.status_code == 200, r.text
    record = registry.get("tiny-lr")
    assert record.config.quantization.options["rank"] == 4
    assert registry.system(record) == "compressed system"


@pytest.mark.parametrize(
    ("body", "message"),
    [
        ({"quantize": "q5_K_M"}, "supported: int8, int4, int2, nf4, lowrank, prune, mixed"),
        ({"quantize": "int4", "quantize_options": {"group_size": 7}}, "supported: 32, 64"),
        ({"quantize": "int4", "quantize_options": {"group_size": 256}}, "fit this model: 32"),
        ({"quantize": "lowrank", "quantize_options": {"rank": 999}}, "ranks 1.."),
        ({"quantize": "int8", "quantize_options": {"nope": 1}}, "supported options"),
        ({"quantize": "int4", "from": "tiny-q8"}, "already compressed"),
    ],
)
async def test_bad_quantize_is_400_and_changes_nothing(env, body: dict, message: str) -> None:
    raw, registry = env
    r = await raw.post("/api/create", json={"model": "tiny-q8", "from": "tiny", "quantize": "int8"})
    assert r.status_code == 200
    before = tree_hash(registry.root)
    r = await raw.post("/api/create", json={"model": "bad", "from": "tiny", **body})
    assert r.status_code == 400
    assert message in r.json()["error"]
    assert tree_hash(registry.root) == before


async def test_quantize_needs_a_source(env) -> None:
    raw, _ = env
    r = await raw.post("/api/create", json={"model": "x", "quantize": "int8"})
    assert r.status_code == 400 and "'from'" in r.json()["error"]
    assert "'files'" in r.json()["error"]


async def test_create_from_uploaded_files_with_quantize(
    tmp_path: Path, tiny_models: dict[str, Path]
) -> None:
    """What `ollama create -q q8_0 -f Modelfile` sends when FROM names a local safetensors
    folder: uploaded blobs plus quantize. Only the compressed model is left under a name; the
    uploaded blobs stay (a retry needs no upload); a failure leaves no staging model behind."""
    from tests.test_api_create import upload_dir

    registry = Registry(tmp_path / "registry")
    async with serve_app(registry, FakeEngine()) as served:
        files = await upload_dir(served.ollama, tiny_models["llama"])
        bad = await served.raw.post(
            "/api/create",
            json={"model": "bad", "files": files, "quantize": "int4",
                  "quantize_options": {"group_size": 256}, "stream": False},
        )  # fmt: skip
        assert bad.status_code == 400 and "group sizes" in bad.json()["error"]
        assert registry.names() == []
        r = await served.raw.post(
            "/api/create",
            json={"model": "small", "files": files, "quantize": "q8_0", "system": "terse"},
        )
        assert r.status_code == 200 and json.loads(r.text.splitlines()[-1]) == {"status": "success"}
        assert [n.display() for n in registry.names()] == ["small:latest"]
        record = registry.get("small")
        assert record.config.quantization is not None
        assert record.config.quantization.scheme == "int8"
        assert record.config.parent_model == ""
        assert registry.system(record) == "terse"
        for digest in files.values():
            assert (await served.raw.head(f"/api/blobs/{digest}")).status_code == 200
        shown = (await served.raw.post("/api/show", json={"model": "small"})).json()
        assert shown["details"]["quantization_level"]


async def test_engine_serves_a_compressed_model(
    tmp_path: Path, tiny_models: dict[str, Path]
) -> None:
    registry = Registry(tmp_path / "registry")
    import_hf_dir(registry, tiny_models["llama"], "tiny")
    async with serve_app(registry) as served:
        r = await served.raw.post(
            "/api/create", json={"model": "tiny-q8", "from": "tiny", "quantize": "q8_0"}
        )
        assert r.status_code == 200 and '"success"' in r.text
        options = {"temperature": 0, "num_predict": 8}
        base = await served.ollama.generate(model="tiny", prompt="Hello world", options=options)
        small = await served.ollama.generate(model="tiny-q8", prompt="Hello world", options=options)
        assert small.eval_count == 8 == base.eval_count and small.response


def test_compress_command_line_builds_the_create_request() -> None:
    from ollama_compact_server.cli import build_parser
    from ollama_compact_server.commands import compress_options
    from ollama_compact_server.settings import Settings

    args = build_parser().parse_args(
        ["compress", "gemma3:270m", "small", "--scheme", "int4", "--group-size", "64",
         "-o", "calibration_tokens=512", "-o", "embedding=int8", "-o", "act_order=true"]
    )  # fmt: skip
    assert (args.model, args.name, args.scheme) == ("gemma3:270m", "small", "int4")
    assert compress_options(args) == {
        "group_size": 64,
        "calibration_tokens": 512,
        "embedding": "int8",
        "act_order": True,
    }
    # no compress flag lands on a settings field (settings_from reads args by field name)
    assert not {k for k, v in vars(args).items() if v is not None} & set(Settings.model_fields)
