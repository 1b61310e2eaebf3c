"""Per-request mailbox: hands token events from the device thread to the request's
coroutine without blocking either side, merging text when the client reads slowly."""

from __future__ import annotations

import asyncio
import threading

from .types import TokenEvent


class Mailbox:
    """Carries events from the device thread to one request's coroutine without blocking
    either side; text that piles up while the client reads slowly is merged."""

    def __init__(self, loop: asyncio.AbstractEventLoop) -> None:
        self.loop = loop
        self.lock = threading.Lock()
        self.pending: list[TokenEvent] = []
        self.ready = asyncio.Event()
        self.closed = False  # the consumer went away

    def put(self, event: TokenEvent) -> None:
        with self.lock:
            if self.closed:
                return
            self.pending.append(event)
            wake = len(self.pending) == 1
        if wake:
            try:
                self.loop.call_soon_threadsafe(self.ready.set)
            except RuntimeError:  # the event loop is gone
                self.closed = True

    async def get(self) -> TokenEvent:
        while True:
            with self.lock:
                if self.pending:
                    events, self.pending = self.pending, []
                    self.ready.clear()
                    return merge(events)
            await self.ready.wait()


def merge(events: list[TokenEvent]) -> TokenEvent:
    if len(events) == 1:
        return events[0]
    last = events[-1]
    last.text = "".join(e.text for e in events)
    last.token_ids = [t for e in events for t in e.token_ids]
    return last
