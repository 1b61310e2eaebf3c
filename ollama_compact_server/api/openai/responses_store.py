"""Responses kept for ``previous_response_id``: the last few hundred conversations, in
memory only (a restart forgets them), each with the model that answered."""

from __future__ import annotations

from collections import OrderedDict
from dataclasses import dataclass

from ...chat.turn import Message

MAX_RESPONSES = 256
MAX_MESSAGES = 4096


@dataclass(slots=True)
class Stored:
    model: str
    messages: list[Message]  # the whole conversation, the response's own output included


class ResponseStore:
    def __init__(self, capacity: int = MAX_RESPONSES) -> None:
        self.capacity = capacity
        self._items: OrderedDict[str, Stored] = OrderedDict()

    def get(self, response_id: str) -> Stored | None:
        stored = self._items.get(response_id)
        if stored is not None:
            self._items.move_to_end(response_id)
        return stored

    def put(self, response_id: str, stored: Stored) -> None:
        if len(stored.messages) > MAX_MESSAGES:
            return  # too long to keep: a follow-up gets a clear 404 instead
        self._items[response_id] = stored
        self._items.move_to_end(response_id)
        while len(self._items) > self.capacity:
            self._items.popitem(last=False)
