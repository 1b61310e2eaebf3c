"""The narrow engine protocol the API layer uses, and nothing else of the engine."""

from __future__ import annotations

from collections.abc import AsyncIterator
from typing import Any, Protocol

from .types import DEFAULT, EmbedRequest, GenerateRequest, KeepAlive, Resident, TokenEvent


class Engine(Protocol):
    def generate(self, request: GenerateRequest) -> AsyncIterator[TokenEvent]:
        """Streams a request's token events; raises EngineError before any output."""
        ...

    def abort(self, request_id: str) -> None: ...

    async def embed(self, request: EmbedRequest) -> TokenEvent:
        """One event with ``embeddings`` (mean-pooled, normalised hidden states)."""
        ...

    async def load(self, model: str, keep_alive: KeepAlive = DEFAULT) -> float: ...

    def unload(self, model: str) -> None: ...

    def health(self) -> bool: ...

    def resident(self) -> list[Resident]: ...

    def stats(self) -> dict[str, Any]:
        """Gauges, counters and latency samples since the last call (for /metrics)."""
        ...

    def close(self) -> None: ...
