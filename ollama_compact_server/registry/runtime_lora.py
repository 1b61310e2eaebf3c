"""Adapters added and removed while the daemon runs, as vLLM's /v1/load_lora_adapter does:
a name for an adapter folder inside the drop-in folder, or for an adapter model already in
the registry; never a path outside that folder. Names added here are marked so, and only
they are removed by name."""

from __future__ import annotations

from enum import Enum
from pathlib import Path
from typing import cast

from .dropin import BASE_FILE, base_for, same_adapter
from .errors import InvalidModel, ModelNotFound, RegistryError
from .importers import ADAPTER_FILES, import_adapter_dir
from .names import ModelName
from .store import ModelRecord, Registry

RUNTIME_KIND = "runtime-lora"  # config.source["kind"] of names added through the route
MAX_PATH = 4096


class AlreadyLoaded(RegistryError):
    status = 400


def _shown(text: str) -> str:
    cleaned = text.encode("unicode_escape").decode("ascii")
    return repr(cleaned[:120] + ("..." if len(cleaned) > 120 else ""))


def confined_folder(root: Path | None, lora_path: str) -> Path:
    """The adapter folder ``lora_path`` names inside the drop-in folder ``root``: relative
    to it, or absolute under it. Refused (InvalidModel, a 400 that shows no server path):
    '..' anywhere, an absolute path elsewhere, a symlink leading out of the folder (the
    folder itself or the files read from it), a file, a missing folder, a folder without
    the adapter files. Missing and leading out answer alike, so nothing outside the folder
    can be probed."""
    shown = _shown(lora_path)
    if root is None:
        raise InvalidModel(
            f"lora_path {shown} names no adapter model in the registry, and no adapters "
            "folder is configured (OCS_ADAPTERS) to look in"
        )
    if not lora_path.strip() or len(lora_path) > MAX_PATH or "\x00" in lora_path:
        raise InvalidModel(f"lora_path {shown} is not a folder name")
    raw = Path(lora_path)
    if ".." in raw.parts:
        raise InvalidModel(f"lora_path {shown} must not contain '..'")
    nowhere = InvalidModel(f"lora_path {shown} names no adapter folder in the adapters folder")
    try:
        base = root.resolve(strict=True)
    except (OSError, RuntimeError):
        raise nowhere from None
    if raw.is_absolute():  # checked before anything outside the folder is looked at
        if not (raw.is_relative_to(root.absolute()) or raw.is_relative_to(base)):
            raise nowhere
        candidate = raw
    else:
        candidate = base / raw
    try:
        folder = candidate.resolve(strict=True)
    except (OSError, RuntimeError):  # missing, or a symlink loop
        raise nowhere from None
    if folder == base or not folder.is_relative_to(base):
        raise nowhere
    if not folder.is_dir():
        raise InvalidModel(f"lora_path {shown} is not a folder")
    for filename in (*ADAPTER_FILES, BASE_FILE):
        path = folder / filename
        if not path.exists() and not path.is_symlink():
            if filename == BASE_FILE:
                continue
            raise InvalidModel(f"lora_path {shown} holds no {filename}")
        try:
            inside = path.resolve(strict=True).is_relative_to(base)
        except (OSError, RuntimeError):
            inside = False
        if not inside or not path.is_file():
            raise InvalidModel(f"{filename} in lora_path {shown} is not a file in the folder")
    return folder


def _registry_adapter(registry: Registry, lora_path: str) -> ModelRecord | None:
    """The registry model ``lora_path`` names, if it names one (an adapter, else a 400)."""
    try:
        stored = registry.resolve(lora_path)
    except RegistryError:  # not a model name: a folder then
        return None
    if stored is None:
        return None
    record = registry.get(stored)
    if not record.is_adapter:
        raise InvalidModel(f"'{record.name.display()}' is a base model, not a LoRA adapter")
    return record


class Outcome(str, Enum):
    ADDED = "added"  # a new name
    UNCHANGED = "unchanged"  # the name already held exactly this adapter
    REPLACED = "replaced"  # load_inplace: the name now holds other weights


def add_runtime_adapter(
    registry: Registry,
    adapters: Path | None,
    lora_name: str,
    lora_path: str,
    *,
    inplace: bool = False,
) -> tuple[ModelRecord, Outcome]:
    """Registers ``lora_name`` as the adapter ``lora_path`` names: an adapter model of the
    registry (its layers shared, no copy), else a folder inside ``adapters`` imported on the
    base its BASE file or adapter_config.json names.

    A name this function added before that already holds the same adapter is left as it
    is (replicas on one shared registry each load it: all succeed). Other weights under
    that name are refused (AlreadyLoaded, vLLM's message) unless ``inplace`` is set; a name
    made any other way (the drop-in folder, create, import) is never replaced."""
    name = ModelName.parse(lora_name)
    with registry.locked():  # the checks and the write, at once for every process
        stored = registry.resolve(name)
        existing = registry.get(stored) if stored is not None else None
        if existing is not None and existing.config.source.get("kind") != RUNTIME_KIND:
            raise AlreadyLoaded(
                f"a model named '{existing.name.display()}' already exists and was not "
                "loaded through /v1/load_lora_adapter; it is not replaced"
            )
        source = _registry_adapter(registry, lora_path)
        folder = base = None
        if source is None:
            folder = confined_folder(adapters, lora_path)
            base = base_for(registry, folder)
        if existing is not None:
            if source is not None:
                same = existing.manifest.layers == source.manifest.layers
            else:
                same = same_adapter(registry, existing.name, cast(Path, folder), cast(str, base))
            if same:
                return existing, Outcome.UNCHANGED
            if not inplace:
                raise AlreadyLoaded(
                    f"The lora adapter '{lora_name}' has already been loaded. If you want to "
                    "load the adapter in place, set 'load_inplace' to True."
                )
        if source is not None:
            config = source.config.model_copy(
                update={"source": {"kind": RUNTIME_KIND, "model": source.name.display()}}
            )
            with registry.transaction() as txn:
                for layer in source.manifest.layers:
                    txn.add_existing(layer)
                record = txn.commit(name, config)
        else:
            record = import_adapter_dir(
                registry,
                cast(Path, folder),
                name,
                cast(str, base),
                source={"kind": RUNTIME_KIND, "folder": lora_path[:MAX_PATH]},
            )
    return record, Outcome.ADDED if existing is None else Outcome.REPLACED


def remove_runtime_adapter(registry: Registry, lora_name: str) -> tuple[str, bool]:
    """Removes ``lora_name`` if it was added by add_runtime_adapter. Returns (its registry
    name, whether it was removed): any other adapter model stays. ModelNotFound when the
    name is no adapter model."""
    try:
        record = registry.get(lora_name)
    except (ModelNotFound, RegistryError):
        raise ModelNotFound(f"The lora adapter '{lora_name[:100]}' cannot be found.") from None
    if not record.is_adapter:
        raise ModelNotFound(f"'{record.name.display()}' is not a LoRA adapter")
    if record.config.source.get("kind") != RUNTIME_KIND:
        return record.name.display(), False
    registry.delete(record.name)
    return record.name.display(), True
