"""Imports: Hugging Face directories of each family, PEFT adapters, and refusal of pickle,
custom code and malformed files (the registry unchanged after every refusal)."""

from __future__ import annotations

import json
import pickle
import shutil
import struct
from pathlib import Path

import pytest
import torch

from ollama_compact_server.jobs.importing import import_path
from ollama_compact_server.modeling.loader import load_causal_lm, load_tokenizer
from ollama_compact_server.registry.errors import InvalidModel, ModelNotFound
from ollama_compact_server.registry.importers import import_adapter_dir, import_hf_dir
from ollama_compact_server.registry.manifest import MT_ADAPTER_FILE, MT_FILE, MT_TEMPLATE
from ollama_compact_server.registry.store import Registry
from ollama_compact_server.registry.tensors import parse_header
from tests.conftest import tree_hash
from tests.factory import make_lora_adapter, make_tiny_model


def greedy(model, tokenizer, text: str, n: int = 8) -> list[int]:
    ids = tokenizer(text, return_tensors="pt")
    with torch.no_grad():
        out = model.generate(**ids, max_new_tokens=n, do_sample=False)
    return out[0, ids["input_ids"].shape[1] :].tolist()


@pytest.mark.parametrize("family", ["llama", "qwen2", "gemma3"])
def test_import_hf_dir_records_metadata_and_loads(
    registry: Registry, tiny_models: dict[str, Path], family: str
) -> None:
    source = tiny_models[family]
    record = import_hf_dir(registry, source, f"tiny-{family}")
    config = record.config
    assert config.kind == "model" and config.format == "safetensors"
    assert config.model_type.startswith(family)
    assert config.architecture.endswith("ForCausalLM")
    assert config.dtype == "float32"
    assert config.context_length == 2048
    assert config.embedding_length == 64
    files = record.manifest.files(MT_FILE)
    assert {"config.json", "model.safetensors", "tokenizer.json"} <= files.keys()
    assert not any(name.endswith(".bin") for name in files)
    # the chat template was recorded as its own layer
    assert "start_of_turn" in registry.template(record)
    assert record.manifest.first(MT_TEMPLATE) is not None
    from transformers import AutoModelForCausalLM, AutoTokenizer

    direct_model = AutoModelForCausalLM.from_pretrained(source)
    direct_tok = AutoTokenizer.from_pretrained(source)
    model = load_causal_lm(registry, record)
    tokenizer = load_tokenizer(registry, record)
    assert config.parameter_count == sum(p.numel() for p in direct_model.state_dict().values()) or (
        config.parameter_count == sum(p.numel() for p in direct_model.parameters())
    )
    assert greedy(model, tokenizer, "hello world") == greedy(
        direct_model, direct_tok, "hello world"
    )


def test_import_via_cli(tmp_path: Path, tiny_models: dict[str, Path], capsys) -> None:
    from ollama_compact_server.cli import main

    root = tmp_path / "cli-registry"
    assert main(["import", str(tiny_models["llama"]), "tiny:cli", "--models", str(root)]) == 0
    assert "imported tiny:cli" in capsys.readouterr().out
    assert Registry(root).get("tiny:cli").config.family == "llama"
    # a missing path and a bad name fail with one clear line and exit 1
    assert main(["import", str(tmp_path / "missing"), "x", "--models", str(root)]) == 1
    assert main(["import", str(tiny_models["llama"]), "../x", "--models", str(root)]) == 1
    err = capsys.readouterr().err
    assert "does not exist" in err and "invalid model name" in err and "Traceback" not in err


class Canary:
    """Unpickling this creates a file: the proof that pickle was loaded."""

    path = ""

    def __reduce__(self):
        return (Path.touch, (Path(self.path),))


def write_pickle(path: Path, canary: Path) -> None:
    Canary.path = str(canary)
    path.write_bytes(pickle.dumps(Canary()))


def test_pickle_only_model_is_refused(
    registry: Registry, tiny_models: dict[str, Path], tmp_path: Path
) -> None:
    model = tmp_path / "pickled"
    shutil.copytree(tiny_models["llama"], model)
    (model / "model.safetensors").unlink()
    canary = tmp_path / "canary"
    write_pickle(model / "pytorch_model.bin", canary)
    before = tree_hash(registry.root)
    with pytest.raises(InvalidModel, match="pickle") as info:
        import_path(registry, model, "pickled")
    assert "safe_serialization=True" in str(info.value)  # says how to convert
    assert not canary.exists()
    assert tree_hash(registry.root) == before


def test_pickle_beside_safetensors_is_ignored(
    registry: Registry, tiny_models: dict[str, Path], tmp_path: Path
) -> None:
    model = tmp_path / "both"
    shutil.copytree(tiny_models["llama"], model)
    canary = tmp_path / "canary"
    write_pickle(model / "pytorch_model.bin", canary)
    record = import_path(registry, model, "both")
    assert "pytorch_model.bin" not in record.manifest.files(MT_FILE)
    load_causal_lm(registry, record)
    assert not canary.exists()


def test_single_pickle_file_is_refused(registry: Registry, tmp_path: Path) -> None:
    canary = tmp_path / "canary"
    write_pickle(tmp_path / "model.pt", canary)
    with pytest.raises(InvalidModel, match="pickle"):
        import_path(registry, tmp_path / "model.pt", "pt")
    assert not canary.exists()


@pytest.mark.parametrize(
    ("patch", "message"),
    [
        ({"auto_map": {"AutoModelForCausalLM": "modeling_evil.Evil"}}, "custom code"),
        ({"vocab_size": 10**12}, "vocab_size"),
        ({"num_hidden_layers": 10**6}, "num_hidden_layers"),
        ({"model_type": None}, "model_type"),
    ],
)
def test_dangerous_configs_are_refused(
    registry: Registry, tiny_models: dict[str, Path], tmp_path: Path, patch: dict, message: str
) -> None:
    model = tmp_path / "bad"
    shutil.copytree(tiny_models["llama"], model)
    config = json.loads((model / "config.json").read_text())
    config.update(patch)
    (model / "config.json").write_text(json.dumps(config))
    before = tree_hash(registry.root)
    with pytest.raises(InvalidModel, match=message):
        import_path(registry, model, "bad")
    assert tree_hash(registry.root) == before


def header_bytes(header: dict) -> bytes:
    raw = json.dumps(header).encode()
    return struct.pack("<Q", len(raw)) + raw


@pytest.mark.parametrize(
    "header",
    [
        {"w": {"dtype": "F32", "shape": [2, 2], "data_offsets": [0, 100]}},  # beyond the file
        {"w": {"dtype": "F32", "shape": [2, 2], "data_offsets": [0, 12]}},  # wrong size
        {"w": {"dtype": "Q9", "shape": [1], "data_offsets": [0, 4]}},  # unknown dtype
        {"w": {"dtype": "F32", "shape": [-1], "data_offsets": [0, 4]}},  # negative dim
        {"w": {"dtype": "F32", "shape": [2**40, 2**40], "data_offsets": [0, 16]}},  # overflow
        {
            "a": {"dtype": "F32", "shape": [2], "data_offsets": [0, 8]},
            "b": {"dtype": "F32", "shape": [2], "data_offsets": [4, 12]},
        },  # overlap
        {"__metadata__": {"k": 1}},  # metadata must be strings
        {"w": "not an object"},
    ],
)
def test_malformed_safetensors_headers(header: dict) -> None:
    with pytest.raises(InvalidModel):
        parse_header(json.dumps(header).encode(), 16)


def test_truncated_safetensors_file_is_refused(
    registry: Registry, tiny_models: dict[str, Path], tmp_path: Path
) -> None:
    model = tmp_path / "truncated"
    shutil.copytree(tiny_models["llama"], model)
    weights = model / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[:1000])
    with pytest.raises(InvalidModel, match=r"model\.safetensors"):
        import_path(registry, model, "truncated")
    (model / "model.safetensors").write_bytes(struct.pack("<Q", 10**12) + b"{}")
    with pytest.raises(InvalidModel, match="header length"):
        import_path(registry, model, "truncated")


# ------------------------------------------------------------------------------ adapters


def test_adapter_import_and_load(
    registry: Registry, tiny_models: dict[str, Path], tiny_adapter: Path
) -> None:
    base = import_hf_dir(registry, tiny_models["llama"], "tiny-llama")
    record = import_path(registry, tiny_adapter, "tiny-lora", base="tiny-llama")
    config = record.config
    assert config.kind == "adapter"
    assert config.base_model == "tiny-llama:latest" and config.parent_model == "tiny-llama:latest"
    assert config.base_digest == base.digest
    assert config.adapter is not None and config.adapter.r == 4 and config.adapter.alpha == 8
    assert set(record.manifest.files(MT_ADAPTER_FILE)) == {
        "adapter_config.json",
        "adapter_model.safetensors",
    }
    assert registry.template(record) == registry.template(base)  # inherits the base's template
    base_model = load_causal_lm(registry, base)
    adapted = load_causal_lm(registry, record)
    tokenizer = load_tokenizer(registry, base)
    assert greedy(adapted, tokenizer, "hello") != greedy(base_model, tokenizer, "hello")
    # deleting the adapter keeps the base whole
    registry.delete("tiny-lora")
    assert registry.verified_files(registry.get("tiny-llama"), MT_FILE)


def test_adapter_needs_an_existing_base(registry: Registry, tiny_adapter: Path) -> None:
    with pytest.raises(ModelNotFound, match="base model"):
        import_adapter_dir(registry, tiny_adapter, "x", "absent")
    with pytest.raises(InvalidModel, match="--base"):
        import_path(registry, tiny_adapter, "x")


def test_adapter_with_wrong_shapes_is_refused(
    registry: Registry, tiny_models: dict[str, Path], tmp_path: Path
) -> None:
    import_hf_dir(registry, tiny_models["llama"], "tiny-llama")
    wide = make_tiny_model(tmp_path / "wide", "llama", hidden_size=96)
    adapter = make_lora_adapter(wide, tmp_path / "wide-lora")
    before = tree_hash(registry.root)
    with pytest.raises(InvalidModel, match="does not fit"):
        import_adapter_dir(registry, adapter, "wide-lora", "tiny-llama")
    assert tree_hash(registry.root) == before


def test_adapter_targeting_missing_modules_is_refused(
    registry: Registry, tiny_models: dict[str, Path], tiny_adapter: Path, tmp_path: Path
) -> None:
    import_hf_dir(registry, tiny_models["gemma3"], "tiny-gemma")
    # a llama adapter has the same module names but an incompatible kv width on gemma3
    with pytest.raises(InvalidModel):
        import_adapter_dir(registry, tiny_adapter, "mismatch", "tiny-gemma")


@pytest.mark.parametrize(
    ("patch", "message"),
    [
        ({"peft_type": "LOHA"}, "the supported types are LoRA"),
        ({"peft_type": "IA3"}, "does not belong in a IA3 adapter"),  # LoRA weights
        ({"use_dora": True}, "DoRA adapter's module .* lacks its lora_magnitude_vector"),
        ({"r": 10**9}, "rank"),
        ({"lora_alpha": -1}, "lora_alpha"),
        ({"auto_mapping": {"base_model_class": "Evil"}}, "custom code"),
        ({"modules_to_save": ["lm_head"]}, "modules_to_save"),
    ],
)
def test_unsupported_adapter_configs(
    registry: Registry,
    tiny_models: dict[str, Path],
    tiny_adapter: Path,
    tmp_path: Path,
    patch: dict,
    message: str,
) -> None:
    import_hf_dir(registry, tiny_models["llama"], "tiny-llama")
    adapter = tmp_path / "adapter"
    shutil.copytree(tiny_adapter, adapter)
    config = json.loads((adapter / "adapter_config.json").read_text())
    config.update(patch)
    (adapter / "adapter_config.json").write_text(json.dumps(config))
    with pytest.raises(InvalidModel, match=message):
        import_adapter_dir(registry, adapter, "bad-lora", "tiny-llama")


def test_pickled_adapter_is_refused(
    registry: Registry, tiny_models: dict[str, Path], tiny_adapter: Path, tmp_path: Path
) -> None:
    import_hf_dir(registry, tiny_models["llama"], "tiny-llama")
    adapter = tmp_path / "adapter"
    shutil.copytree(tiny_adapter, adapter)
    (adapter / "adapter_model.safetensors").unlink()
    canary = tmp_path / "canary"
    write_pickle(adapter / "adapter_model.bin", canary)
    with pytest.raises(InvalidModel, match="pickle"):
        import_adapter_dir(registry, adapter, "bad-lora", "tiny-llama")
    assert not canary.exists()


def test_adapter_on_embeddings_is_refused(
    registry: Registry, tiny_models: dict[str, Path], tmp_path: Path
) -> None:
    import_hf_dir(registry, tiny_models["llama"], "tiny-llama")
    adapter = make_lora_adapter(
        tiny_models["llama"], tmp_path / "emb-lora", target_modules=["embed_tokens", "q_proj"]
    )
    before = tree_hash(registry.root)
    with pytest.raises(InvalidModel, match="embedding"):
        import_adapter_dir(registry, adapter, "emb-lora", "tiny-llama")
    assert tree_hash(registry.root) == before
