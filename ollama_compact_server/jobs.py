"""The model-management jobs that the Ollama routes run (create: import, merge, compress;
pull), with the checks that refuse a job before any work. The routes call this service,
never modeling/ or compress/ directly; the workflows themselves still live in modeling/."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from .compress.schemes import resolve as resolve_scheme
from .modeling.compressing import precheck as precheck_compression
from .modeling.create import CreateSpec, check_file_map, create_model
from .modeling.pull import hub_repo, pull_model
from .registry.names import ModelName
from .registry.store import ModelRecord, Registry

__all__ = ["CreateSpec", "ModelJobs", "check_file_map"]


class ModelJobs:
    def __init__(self, registry: Registry) -> None:
        self.registry = registry

    @staticmethod
    def check_scheme(name: str, options: dict[str, Any] | None) -> None:
        """Raises SchemeError (a 400) for an unknown scheme or option."""
        resolve_scheme(name, options)

    def precheck_compression(
        self, source: str, scheme: str, options: dict[str, Any] | None
    ) -> None:
        """What can be refused before loading weights (may read the registry: a thread)."""
        precheck_compression(self.registry, source, scheme, options)

    def create(
        self, spec: CreateSpec, progress: Callable[[str, int | None, int | None], None]
    ) -> ModelRecord:
        return create_model(self.registry, spec, progress)

    @staticmethod
    def check_pull(name: ModelName) -> None:
        """Raises a RegistryError for a name no hub serves."""
        hub_repo(name)

    def pull(self, name: ModelName, progress: Callable[[dict[str, Any]], None]) -> ModelRecord:
        return pull_model(self.registry, name, progress)
