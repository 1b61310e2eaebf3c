"""Responses kept for ``previous_response_id``: the last few hundred conversations, in
memory only (a restart forgets them), each with the model that answered; the images they
carry are bounded too (a conversation's images come back with each follow-up)."""

from __future__ import annotations

from collections import OrderedDict
from dataclasses import dataclass

from ...chat.images import ImageData
from ...chat.turn import Message
from ...units import MiB

MAX_RESPONSES = 256
MAX_MESSAGES = 4096
MAX_IMAGE_BYTES = 256 * MiB  # every kept conversation's images together, as sent


def image_size(image: ImageData) -> int:
    return len(image.raw or b"") + len(image.base64 or "") + len(image.url or "")


@dataclass(slots=True)
class Stored:
    model: str
    messages: list[Message]  # the whole conversation, the response's own output included

    @property
    def image_bytes(self) -> int:
        return sum(image_size(i) for m in self.messages for i in m.images)


class ResponseStore:
    def __init__(self, capacity: int = MAX_RESPONSES, image_bytes: int = MAX_IMAGE_BYTES) -> None:
        self.capacity = capacity
        self.max_image_bytes = image_bytes
        self._items: OrderedDict[str, Stored] = OrderedDict()
        self._image_bytes: dict[str, int] = {}

    def get(self, response_id: str) -> Stored | None:
        stored = self._items.get(response_id)
        if stored is not None:
            self._items.move_to_end(response_id)
        return stored

    def put(self, response_id: str, stored: Stored) -> None:
        weight = stored.image_bytes
        if len(stored.messages) > MAX_MESSAGES or weight > self.max_image_bytes:
            return  # too long to keep: a follow-up gets a clear 404 instead
        self._items[response_id] = stored
        self._image_bytes[response_id] = weight
        self._items.move_to_end(response_id)
        while len(self._items) > self.capacity or (
            sum(self._image_bytes.values()) > self.max_image_bytes
        ):
            oldest, _ = self._items.popitem(last=False)
            self._image_bytes.pop(oldest, None)
