"""Per-request mailbox: hands token events from the device thread to the request's
coroutine without blocking either side, merging text when the client reads slowly."""

from __future__ import annotations

import asyncio
import threading

from .types import TokenEvent


class Notifier:
    """Collects the mailboxes that got events during one engine step and wakes them with
    one call per event loop at the end of the step, instead of one call per token."""

    def __init__(self) -> None:
        self.lock = threading.Lock()
        self.due: list[Mailbox] = []

    def add(self, mailbox: Mailbox) -> None:
        with self.lock:
            self.due.append(mailbox)

    def flush(self) -> None:
        with self.lock:
            due, self.due = self.due, []
        by_loop: dict[asyncio.AbstractEventLoop, list[Mailbox]] = {}
        for mailbox in due:
            by_loop.setdefault(mailbox.loop, []).append(mailbox)
        for loop, boxes in by_loop.items():
            try:
                loop.call_soon_threadsafe(_wake_all, boxes)
            except RuntimeError:  # the event loop is gone
                for box in boxes:
                    box.closed = True


def _wake_all(boxes: list[Mailbox]) -> None:
    for box in boxes:
        box.ready.set()


class Mailbox:
    """Carries events from the device thread to one request's coroutine without blocking
    either side; text that piles up while the client reads slowly is merged."""

    def __init__(self, loop: asyncio.AbstractEventLoop, notifier: Notifier | None = None) -> None:
        self.loop = loop
        self.notifier = notifier
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
        if not wake:
            return
        if self.notifier is not None:
            self.notifier.add(self)
            return
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
                # A wake can arrive after its events were taken (the consumer was already
                # awake): the flag is then set with nothing pending. Clear it, or wait()
                # returns at once, forever, without yielding: a spin that freezes the
                # whole event loop until this request's next event. A put() after this
                # point schedules a new wake, so none is lost.
                self.ready.clear()
            await self.ready.wait()


def merge(events: list[TokenEvent]) -> TokenEvent:
    if len(events) == 1:
        return events[0]
    last = events[-1]
    last.text = "".join(e.text for e in events)
    last.token_ids = [t for e in events for t in e.token_ids]
    last.logprobs = [lp for e in events for lp in e.logprobs]
    last.token_texts = [t for e in events for t in e.token_texts]
    prompt = next((e.prompt_logprobs for e in events if e.prompt_logprobs is not None), None)
    last.prompt_logprobs = prompt
    return last
