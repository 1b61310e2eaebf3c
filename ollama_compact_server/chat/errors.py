"""Domain errors of a chat turn, each carrying its HTTP status; every dialect renders them
once (api/errors.py) instead of translating them at each call site."""

from __future__ import annotations


class ChatError(ValueError):
    """A request the chat layer cannot serve (400 unless ``status`` says otherwise). The
    message is safe to show to the client."""

    status = 400

    def __init__(self, message: str, status: int | None = None) -> None:
        super().__init__(message)
        if status is not None:
            self.status = status


class ModelNotFound(ChatError):
    status = 404

    def __init__(self, name: str) -> None:
        super().__init__(f'model "{name}" not found, try pulling it first')
        self.name = name


class Unsupported(ChatError):
    """The model lacks a capability the request needs (tools, thinking, vision, chat)."""


class GenerationFailed(ChatError):
    """The engine ended a request with an error after it had started."""

    status = 500
