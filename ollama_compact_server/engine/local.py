"""The engine protocol the API layer calls, over one device loop: each call hands the loop a
message with a mailbox and awaits its events."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from concurrent.futures import ThreadPoolExecutor
from typing import Any

from .adapters import Target
from .constraint import build_constraint
from .inbox import Pending
from .loop import DeviceLoop
from .mailbox import Mailbox
from .types import (
    ANY_JSON_OBJECT,
    DEFAULT,
    EmbedRequest,
    EngineBusy,
    EngineError,
    GenerateRequest,
    KeepAlive,
    Resident,
    TokenEvent,
)

GRAMMAR_SECONDS = 10.0  # to compile one request's JSON schema, before it is refused
GRAMMAR_THREADS = 2  # schemas compiled at once (each may hold a CPU for seconds)


def _prepared(guide: Any, model: str) -> Any:
    """The model's guided tokenizer, built and warmed (the lexer over its token trie, which
    every schema then shares) with the trivial schema."""
    guided = guide(model)
    if not guided.warmed:
        build_constraint(guided, ANY_JSON_OBJECT)
        guided.warmed = True
    return guided


class LocalEngine:
    """The engine protocol over one device loop: what the API layer calls."""

    def __init__(self, loop: DeviceLoop) -> None:
        self.device_loop = loop
        # llguidance drops the GIL while it compiles; no torch runs here (threads.py)
        self._grammars = ThreadPoolExecutor(GRAMMAR_THREADS, thread_name_prefix="ocs-grammar")

    async def _constraint(self, model: str, request: GenerateRequest) -> Any:
        """The request's structured-output constraint, compiled on a grammar thread within
        GRAMMAR_SECONDS: a schema with thousands of properties takes seconds, which on the
        device thread would stall every stream it serves."""
        guide = self.device_loop.models.guide
        sampling = request.sampling
        if guide is None or sampling.json_schema is None:
            return None  # the device loop builds it (engines assembled without a guide)
        loop = asyncio.get_running_loop()
        try:
            # the model's tokenizer as the grammar library reads it: seconds the first time
            # for a big vocabulary (262k tokens: ~10 s here), then cached; not the client's
            # doing, so not under the cap
            guided = await loop.run_in_executor(self._grammars, _prepared, guide, model)
        except Exception as exc:
            raise EngineError(f"structured output is not available: {exc}"[:400]) from None
        job = loop.run_in_executor(
            self._grammars,
            lambda: build_constraint(guided, sampling.json_schema or "", sampling.json_wrap),
        )
        try:
            return await asyncio.wait_for(job, GRAMMAR_SECONDS)
        except TimeoutError:
            raise EngineError(
                f"the JSON schema is too complex: compiling it took more than "
                f"{GRAMMAR_SECONDS:.0f} s"
            ) from None
        except EngineError:
            raise
        except Exception as exc:  # a grammar library failure is the request's, a 400
            raise EngineError(f"the JSON schema could not be compiled: {exc}"[:400]) from None

    async def _pending(
        self,
        model: str,
        mailbox: Mailbox,
        request: GenerateRequest | EmbedRequest | None = None,
        keep_alive: KeepAlive = DEFAULT,
    ) -> Pending:
        """The message for ``model``, resolved once, here: an adapter model runs on its base
        (the registry is read and the manifest hashed on a worker thread, neither on the
        event loop nor on the device thread). A name the registry does not know goes as it
        is: its load then fails with the usual message."""
        target = Target(model)
        resolve = self.device_loop.models.resolve
        if resolve is not None:
            try:
                target = await asyncio.to_thread(resolve, model)
            except Exception:
                target = Target(model)
        return Pending(target.model, mailbox, request, keep_alive, target.adapter)

    async def generate(self, request: GenerateRequest) -> AsyncIterator[TokenEvent]:
        """Streams a request's events. An error before any output raises EngineError (with
        the HTTP status to use); later errors arrive as the final event."""
        request.sampling.validate()
        mailbox = Mailbox(asyncio.get_running_loop(), self.device_loop.notifier)
        item = await self._pending(request.model, mailbox, request, request.keep_alive)
        if request.sampling.json_schema is not None and request.constraint is None:
            request.constraint = await self._constraint(item.model, request)
        self.device_loop.submit(item)
        done = False
        started = False
        try:
            while not done:
                event = await mailbox.get()
                done = event.finished
                if event.error and not started and not event.token_ids and not event.text:
                    raise engine_error(event)
                started = True
                yield event
        finally:
            mailbox.closed = True
            if not done:
                self.device_loop.abort(request.request_id)

    async def embed(self, request: EmbedRequest) -> TokenEvent:
        """Embeds the request's token lists on the device; raises EngineError on failure."""
        mailbox = Mailbox(asyncio.get_running_loop(), self.device_loop.notifier)
        item = await self._pending(request.model, mailbox, request, request.keep_alive)
        self.device_loop.submit(item)
        event = await mailbox.get()
        if event.error:
            raise engine_error(event)
        return event

    async def load(self, model: str, keep_alive: KeepAlive = DEFAULT) -> float:
        """Makes a model resident; returns the seconds spent loading (0 if it was)."""
        mailbox = Mailbox(asyncio.get_running_loop(), self.device_loop.notifier)
        self.device_loop.submit(await self._pending(model, mailbox, keep_alive=keep_alive))
        event = await mailbox.get()
        if event.error:
            raise engine_error(event)
        return event.load_time

    def unload(self, model: str) -> None:
        """Unloads a model as soon as no request uses it."""
        self.device_loop.unload(model)

    def abort(self, request_id: str) -> None:
        self.device_loop.abort(request_id)

    def health(self) -> bool:
        return self.device_loop.health()

    def resident(self) -> list[Resident]:
        return self.device_loop.resident()

    def stats(self) -> dict[str, Any]:
        snapshot = self.device_loop.snapshot()
        snapshot["ttft"], snapshot["itl"] = self.device_loop.stats.drain()
        return snapshot

    def close(self) -> None:
        self.device_loop.stop()
        self._grammars.shutdown(wait=False, cancel_futures=True)


def engine_error(event: TokenEvent) -> EngineError:
    error = EngineBusy(event.error or "") if event.status == 503 else EngineError(event.error or "")
    error.status = event.status
    return error
