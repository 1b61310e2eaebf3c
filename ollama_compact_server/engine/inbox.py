"""The typed messages the event loop hands the device thread."""

from __future__ import annotations

from dataclasses import dataclass

from .adapters import AdapterRef
from .mailbox import Mailbox
from .types import DEFAULT, EmbedRequest, GenerateRequest, KeepAlive


@dataclass(slots=True)
class Pending:
    """A request (or a bare load, without request) on its way to its model's worker.
    ``model`` is the resident model that serves it, ``adapter`` the LoRA adapter on top
    (both resolved once, before the device thread sees it)."""

    model: str
    mailbox: Mailbox
    request: GenerateRequest | EmbedRequest | None = None
    keep_alive: KeepAlive = DEFAULT
    adapter: AdapterRef | None = None


@dataclass(frozen=True, slots=True)
class Abort:
    request_id: str


@dataclass(frozen=True, slots=True)
class Unload:
    name: str  # as the client named it: a model, or an adapter model


Message = Pending | Abort | Unload
