"""The adapters/ drop-in folder: registered at startup, idempotent, broken folders skipped."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

from ollama_compact_server.registry.dropin import register_dropins
from ollama_compact_server.registry.importers import import_hf_dir
from ollama_compact_server.registry.store import Registry


def setup_folder(tmp_path: Path, tiny_adapter: Path) -> Path:
    folder = tmp_path / "adapters"
    shutil.copytree(tiny_adapter, folder / "pirate")  # base_model_name_or_path = "tiny-llama"
    return folder


def test_dropin_registers_adapters_on_their_base(
    registry: Registry, tiny_models: dict[str, Path], tiny_adapter: Path, tmp_path: Path
) -> None:
    import_hf_dir(registry, tiny_models["llama"], "tiny-llama")
    folder = setup_folder(tmp_path, tiny_adapter)
    result = register_dropins(registry, folder)
    assert result.registered == ["pirate:latest"] and not result.skipped
    record = registry.get("pirate")
    assert record.is_adapter and record.config.base_model == "tiny-llama:latest"
    # a second start changes nothing
    before = registry.get("pirate").digest
    result = register_dropins(registry, folder)
    assert result.unchanged == ["pirate:latest"] and not result.registered
    assert registry.get("pirate").digest == before
    # new weights in the folder are picked up
    config = json.loads((folder / "pirate" / "adapter_config.json").read_text())
    config["lora_alpha"] = 16
    (folder / "pirate" / "adapter_config.json").write_text(json.dumps(config))
    assert register_dropins(registry, folder).registered == ["pirate:latest"]
    assert registry.get("pirate").config.adapter.alpha == 16


def test_base_matched_through_recorded_aliases(
    registry: Registry, tiny_models: dict[str, Path], tiny_adapter: Path, tmp_path: Path
) -> None:
    # imported under another name: the folder name "llama" is recorded as an alias
    import_hf_dir(registry, tiny_models["llama"], "my-base", aliases=["org/tiny-llama"])
    folder = setup_folder(tmp_path, tiny_adapter)
    config = json.loads((folder / "pirate" / "adapter_config.json").read_text())
    config["base_model_name_or_path"] = "org/tiny-llama"
    (folder / "pirate" / "adapter_config.json").write_text(json.dumps(config))
    assert register_dropins(registry, folder).registered == ["pirate:latest"]
    assert registry.get("pirate").config.base_model == "my-base:latest"


def test_base_sidecar_file(
    registry: Registry, tiny_models: dict[str, Path], tiny_adapter: Path, tmp_path: Path
) -> None:
    import_hf_dir(registry, tiny_models["llama"], "other-name")
    folder = setup_folder(tmp_path, tiny_adapter)
    (folder / "pirate" / "BASE").write_text("other-name\n")
    assert register_dropins(registry, folder).registered == ["pirate:latest"]


def test_broken_folders_are_skipped(
    registry: Registry, tiny_models: dict[str, Path], tiny_adapter: Path, tmp_path: Path
) -> None:
    import_hf_dir(registry, tiny_models["llama"], "tiny-llama")
    folder = setup_folder(tmp_path, tiny_adapter)
    (folder / "no-weights").mkdir()
    (folder / "no-weights" / "adapter_config.json").write_text("{}")
    (folder / "bad-json").mkdir()
    (folder / "bad-json" / "adapter_config.json").write_text("{not json")
    shutil.copytree(tiny_adapter, folder / "unknown-base")
    cfg = json.loads((folder / "unknown-base" / "adapter_config.json").read_text())
    cfg["base_model_name_or_path"] = "nobody/knows"
    (folder / "unknown-base" / "adapter_config.json").write_text(json.dumps(cfg))
    shutil.copytree(tiny_adapter, folder / "bad name!")
    (folder / "not-an-adapter").mkdir()
    result = register_dropins(registry, folder)
    assert result.registered == ["pirate:latest"]
    assert set(result.skipped) == {"no-weights", "bad-json", "unknown-base", "bad name!"}
    assert "not in the registry" in result.skipped["unknown-base"]


def test_dropin_never_replaces_a_model_of_the_same_name(
    registry: Registry, tiny_models: dict[str, Path], tiny_adapter: Path, tmp_path: Path
) -> None:
    import_hf_dir(registry, tiny_models["llama"], "tiny-llama")
    import_hf_dir(registry, tiny_models["qwen2"], "pirate")
    folder = setup_folder(tmp_path, tiny_adapter)
    result = register_dropins(registry, folder)
    assert "already exists" in result.skipped["pirate"]
    assert not registry.get("pirate").is_adapter


def test_missing_folder_is_fine(registry: Registry, tmp_path: Path) -> None:
    assert register_dropins(registry, tmp_path / "absent").registered == []
    assert register_dropins(registry, None).registered == []
