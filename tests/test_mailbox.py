"""The per-request mailbox between the device thread and the event loop: no lost wakeups,
merged text for slow readers, and no busy wait that would freeze the event loop."""

from __future__ import annotations

import asyncio
import threading
import time

from ollama_compact_server.engine.mailbox import Mailbox, Notifier
from ollama_compact_server.engine.types import FinishReason, TokenEvent


async def test_a_late_wake_does_not_freeze_the_event_loop() -> None:
    """The consumer can take an event before the wake-up scheduled for it has run; that
    wake then finds nothing pending. get() must wait again (yielding to the loop), not spin:
    a spin blocks every other request on the loop until this one's next event arrives."""
    loop = asyncio.get_running_loop()
    for notifier in (None, Notifier()):
        box = Mailbox(loop, notifier)
        box.put(TokenEvent(text="a"))  # schedules the wake (at once, or on flush)
        if notifier is not None:
            notifier.flush()
        assert (await box.get()).text == "a"  # taken before the wake ran
        await asyncio.sleep(0)  # the wake runs now, with nothing pending

        ticks = 0

        async def ticker() -> None:
            nonlocal ticks
            while True:
                ticks += 1
                await asyncio.sleep(0.01)

        def later(box: Mailbox = box, notifier: Notifier | None = notifier) -> None:
            time.sleep(0.5)  # the device thread's next event, 0.5 s on
            box.put(TokenEvent(text="b"))
            if notifier is not None:
                notifier.flush()

        tick_task = asyncio.create_task(ticker())
        threading.Thread(target=later, daemon=True).start()
        assert (await asyncio.wait_for(box.get(), 5)).text == "b"
        tick_task.cancel()
        assert ticks >= 10, f"the event loop ran {ticks} times while get() waited"


async def test_events_from_another_thread_arrive_in_order_and_merged() -> None:
    loop = asyncio.get_running_loop()
    notifier = Notifier()
    box = Mailbox(loop, notifier)

    def produce() -> None:
        for i in range(200):
            box.put(TokenEvent(text=str(i % 10), token_ids=[i]))
            if i % 7 == 0:
                notifier.flush()
        box.put(TokenEvent(finish_reason=FinishReason.STOP))
        notifier.flush()

    threading.Thread(target=produce, daemon=True).start()
    ids: list[int] = []
    while True:
        event = await asyncio.wait_for(box.get(), 5)
        ids += event.token_ids
        if event.finished:
            break
    assert ids == list(range(200))
