"""How a device loop is built: the typed engine config and the model source, the same for
the daemon, the benchmarks and the tests."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING

import torch

from .adapters import AdapterLoader, Target
from .sequence import LoadedModel, ModelProvider

if TYPE_CHECKING:
    from ..settings import Settings
    from .constraint import GuidedTokenizer

Sizer = Callable[[str], int]
"""A model name -> the bytes it needs resident (weights and one sequence of context)."""
Planner = Callable[[str, LoadedModel, int | None], tuple[int, int]]
"""(model, loaded, bytes available or None) -> (slots, tokens per slot) to allocate."""
Resolver = Callable[[str], Target]
Guide = Callable[[str], "GuidedTokenizer"]
"""A requested model name -> the resident model that serves it (and the adapter on top)."""


@dataclass(frozen=True, slots=True)
class EngineConfig:
    """What one device loop serves with. Without a planner every model gets ``slots`` KV
    slots of ``capacity`` tokens; with one, the planner sizes them to the memory left."""

    device: torch.device
    dtype: torch.dtype
    slots: int = 16
    capacity: int = 4096
    prefill_chunk: int = 256  # prompt tokens per step: a long prompt goes in chunks
    max_queue: int = 512  # waiting requests before new ones get "server busy"
    max_loaded_models: int = 3
    memory_budget: int | None = None  # bytes for weights, KV caches and adapters
    keep_alive: float | None = 300.0  # seconds an idle model stays; None = forever
    max_loras: int = 8  # adapters on the device per model
    max_cpu_loras: int = 32  # idle adapters kept in host memory per model

    @classmethod
    def from_settings(
        cls, settings: Settings, device: torch.device, dtype: torch.dtype, budget: int
    ) -> EngineConfig:
        return cls(
            device=device,
            dtype=dtype,
            slots=settings.num_parallel,
            capacity=settings.context_length,
            max_queue=settings.max_queue,
            max_loaded_models=settings.max_loaded_models,
            memory_budget=budget,
            keep_alive=settings.keep_alive_seconds,
            max_loras=settings.max_loras,
            max_cpu_loras=settings.max_cpu_loras,
        )


@dataclass(frozen=True, slots=True)
class ModelSource:
    """Where a device loop's models come from: ``load`` builds one (on a loader thread);
    the rest are optional. ``resolve`` names the model and adapter a request runs on (the
    engine front calls it once per request, off the device thread), ``load_adapter`` reads
    an adapter into host memory, ``estimate`` and ``plan`` size a model for the budget,
    ``guide`` gives a model's tokenizer as structured output reads it (for building a
    request's constraint before it reaches the device thread)."""

    load: ModelProvider
    resolve: Resolver | None = None
    load_adapter: AdapterLoader | None = None
    estimate: Sizer | None = None
    plan: Planner | None = None
    guide: Guide | None = None
