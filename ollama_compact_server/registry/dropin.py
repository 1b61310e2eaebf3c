"""The adapters/ drop-in folder: each subfolder holding a PEFT adapter becomes a model named
after the folder. Broken folders are logged and skipped; they never stop the daemon."""

from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path

from .errors import RegistryError
from .importers import find_base, import_adapter_dir, read_json
from .names import ModelName
from .store import Registry

log = logging.getLogger(__name__)

BASE_FILE = "BASE"  # a one-line file naming the base model
SOURCE_KIND = "dropin"


@dataclass(slots=True)
class DropinResult:
    registered: list[str]
    unchanged: list[str]
    skipped: dict[str, str]  # folder -> reason


def base_for(registry: Registry, folder: Path) -> str:
    """The registry name of the base an adapter folder names (BASE file, else
    adapter_config.json's base_model_name_or_path)."""
    sidecar = folder / BASE_FILE
    if sidecar.is_file():
        named = sidecar.read_text(encoding="utf-8").strip().splitlines()
        if not named or not named[0].strip():
            raise RegistryError(f"{BASE_FILE} file is empty")
        return ModelName.parse(named[0].strip()).display()
    reference = read_json(folder / "adapter_config.json").get("base_model_name_or_path")
    if not isinstance(reference, str) or not reference.strip():
        raise RegistryError(f"adapter_config.json names no base model; add a {BASE_FILE} file")
    record = find_base(registry, reference)
    if record is None:
        raise RegistryError(
            f"base model {reference[:100]!r} is not in the registry (or matches several); "
            f"import it, or name it in a {BASE_FILE} file"
        )
    return record.name.display()


def same_adapter(registry: Registry, name: ModelName, folder: Path, base: str) -> bool:
    """True when ``name`` already holds exactly this folder's files on this base."""
    from .blobs import sha256_file
    from .manifest import MT_ADAPTER_FILE

    record = registry.get(name)
    if record.config.base_model != base:
        return False
    try:
        if record.config.base_digest != registry.get(base).digest:
            return False
    except RegistryError:
        return False
    files = record.manifest.files(MT_ADAPTER_FILE)
    for filename in ("adapter_config.json", "adapter_model.safetensors"):
        layer = files.get(filename)
        if layer is None or layer.digest != sha256_file(folder / filename):
            return False
    return True


def register_dropins(registry: Registry, directory: Path | None) -> DropinResult:
    result = DropinResult([], [], {})
    if directory is None or not directory.is_dir():
        return result
    for folder in sorted(
        p for p in directory.iterdir() if p.is_dir() and not p.name.startswith(".")
    ):
        if not (folder / "adapter_config.json").is_file():
            continue
        try:
            name = ModelName.parse(folder.name)
            base = base_for(registry, folder)
            existing = registry.resolve(name)
            if existing is not None:
                record = registry.get(existing)
                if record.config.source.get("kind") != SOURCE_KIND:
                    raise RegistryError(
                        f"a model named '{name.display()}' already exists "
                        "and is not from this folder"
                    )
                if same_adapter(registry, existing, folder, base):
                    result.unchanged.append(name.display())
                    continue
            import_adapter_dir(
                registry, folder, name, base, source={"kind": SOURCE_KIND, "folder": folder.name}
            )
            result.registered.append(name.display())
            log.info("registered adapter folder %s as %s on %s", folder.name, name.display(), base)
        except (RegistryError, OSError, UnicodeDecodeError) as exc:
            result.skipped[folder.name] = str(exc)
            log.warning("skipping adapter folder %s: %s", folder.name, exc)
    return result
