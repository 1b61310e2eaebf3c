"""Model-management jobs: the workflows that make registry models (import, create, merge,
compress, pull, the default model's first-start import), called by the Ollama routes
(through :class:`ModelJobs`, with the checks that refuse a job before any work) and by the
CLI. modeling/ keeps the nn.Modules, loaders and converters they use; the routes never
call modeling/ or compress/ directly."""

from __future__ import annotations

import threading
from collections.abc import Callable
from typing import Any

from ..compress.schemes import resolve as resolve_scheme
from ..registry.names import ModelName
from ..registry.store import ModelRecord, Registry
from .compressing import precheck as precheck_compression
from .create import CreateSpec, check_file_map, create_model
from .finetune import FinetuneSpec, finetune
from .finetune import precheck as precheck_finetune
from .pull import hub_repo, pull_model

__all__ = ["CreateSpec", "FinetuneSpec", "ModelJobs", "check_file_map"]


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

    def precheck_finetune(self, spec: FinetuneSpec) -> None:
        """The base and the whole data file, checked before any weights load (a thread)."""
        precheck_finetune(self.registry, spec)

    def finetune(
        self,
        spec: FinetuneSpec,
        progress: Callable[[dict[str, Any]], None],
        cancel: threading.Event,
        device: str = "auto",
        precision: str = "auto",
    ) -> ModelRecord:
        return finetune(self.registry, spec, progress, cancel, device, precision)
