"""The device loop: one background thread owns the device and repeats
``step() = schedule -> run -> postprocess`` over every resident model, handing token events
to each request's mailbox on the event loop."""

from __future__ import annotations

import asyncio
import logging
import threading
import time
from collections import deque
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass, field
from typing import Any

import torch

from .detok import Detokenizer, StopMatcher
from .runner import ModelRunner
from .sampler import RowState, sample
from .types import (
    EngineError,
    FinishReason,
    GenerateRequest,
    TokenEvent,
)

log = logging.getLogger(__name__)


# ---------------------------------------------------------------------------- mailbox


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


# ---------------------------------------------------------------------------- sequences


@dataclass(slots=True)
class Sequence:
    request: GenerateRequest
    mailbox: Mailbox
    state: RowState
    detok: Detokenizer
    stops: StopMatcher
    stop_ids: set[int]
    max_tokens: int
    slot: int = -1
    prefilled: int = 0
    cached: int = 0  # positions written to the KV cache
    generated: list[int] = field(default_factory=list)
    submitted: float = field(default_factory=time.perf_counter)
    admitted: float = 0.0
    first_token: float = 0.0
    prompt_time: float = 0.0
    load_time: float = 0.0
    finished: bool = False

    @property
    def prompt(self) -> list[int]:
        return self.request.prompt_ids

    @property
    def position(self) -> int:
        """Position of the last token, the one the next decode step feeds."""
        return len(self.prompt) + len(self.generated) - 1


@dataclass
class LoadedModel:
    model: Any
    tokenizer: Any
    stop_ids: set[int]


ModelProvider = Callable[[str], LoadedModel]


# ---------------------------------------------------------------------------- one model


class ModelWorker:
    """The sequences of one resident model: waiting, prefilling (one at a time, in
    chunks), running."""

    def __init__(
        self, name: str, loaded: LoadedModel, runner: ModelRunner, prefill_chunk: int
    ) -> None:
        self.name = name
        self.loaded = loaded
        self.runner = runner
        self.prefill_chunk = prefill_chunk
        self.waiting: deque[Sequence] = deque()
        self.prefilling: Sequence | None = None
        self.running: list[Sequence] = []
        self.by_slot: dict[int, Sequence] = {}
        self.last_used = time.monotonic()

    @property
    def busy(self) -> bool:
        return bool(self.waiting or self.prefilling or self.running)

    def sequences(self) -> list[Sequence]:
        seqs = list(self.waiting) + self.running
        if self.prefilling is not None:
            seqs.append(self.prefilling)
        return seqs

    # ------------------------------------------------------------ schedule → run → postprocess

    def step(self) -> bool:
        if not self.busy:
            return False
        self.last_used = time.monotonic()
        decode_batch = sorted(self.running, key=lambda s: s.slot)
        self._prefill_step()
        if decode_batch:
            self._decode_step(decode_batch)
        return True

    def _prefill_step(self) -> None:
        if self.prefilling is None and self.waiting and self.runner.cache.can_allocate():
            admitted = self.waiting.popleft()
            admitted.slot = self.runner.cache.allocate()
            self.by_slot[admitted.slot] = admitted
            admitted.admitted = time.perf_counter()
            self.prefilling = admitted
        if self.prefilling is None:
            return
        seq = self.prefilling
        started = time.perf_counter()
        chunk = seq.prompt[seq.prefilled : seq.prefilled + self.prefill_chunk]
        try:
            logits = self.runner.prefill(seq.slot, chunk, seq.prefilled)
        except Exception as exc:  # a failing request fails alone
            log.exception("prefill failed for %s", seq.request.request_id)
            self.finish(seq, FinishReason.ERROR, error=f"prefill failed: {exc.__class__.__name__}")
            return
        seq.prefilled += len(chunk)
        seq.cached = seq.prefilled
        seq.prompt_time += time.perf_counter() - started
        if seq.prefilled < len(seq.prompt):
            return
        self.prefilling = None
        token = sample(logits, [seq.request.sampling], [seq.state])[0]
        seq.first_token = time.perf_counter()
        if not self.accept(seq, token):
            self.running.append(seq)

    def _decode_step(self, batch: list[Sequence]) -> None:
        batch = [s for s in batch if not s.finished]
        if not batch:
            return
        try:
            logits = self.runner.decode(
                [s.slot for s in batch],
                [s.generated[-1] for s in batch],
                [s.position for s in batch],
            )
            tokens = sample(logits, [s.request.sampling for s in batch], [s.state for s in batch])
        except Exception:
            log.exception("decode step failed; retrying its %d rows one by one", len(batch))
            self._decode_rows_alone(batch)
            return
        for seq in batch:
            seq.cached = seq.position + 1
        for seq, token in zip(batch, tokens):
            self.accept(seq, token)

    def _decode_rows_alone(self, batch: list[Sequence]) -> None:
        for seq in batch:
            try:
                logits = self.runner.decode([seq.slot], [seq.generated[-1]], [seq.position])
                token = sample(logits, [seq.request.sampling], [seq.state])[0]
            except Exception as exc:
                self.finish(
                    seq, FinishReason.ERROR, error=f"generation failed: {exc.__class__.__name__}"
                )
                continue
            seq.cached = seq.position + 1
            self.accept(seq, token)

    def accept(self, seq: Sequence, token: int) -> bool:
        """Postprocess one new token; returns True when the sequence finished."""
        seq.generated.append(token)
        seq.state.append(token)
        if token in seq.stop_ids:
            self.finish(seq, FinishReason.STOP, flush=True)
            return True
        text, stopped = seq.stops.feed(seq.detok.add(token))
        if stopped:
            self._emit(seq, text, [token])
            self.finish(seq, FinishReason.STOP)
            return True
        if len(seq.generated) >= seq.max_tokens or seq.position + 1 >= self.runner.cache.capacity:
            self._emit(seq, text, [token])
            self.finish(seq, FinishReason.LENGTH, flush=True)
            return True
        self._emit(seq, text, [token])
        return False

    def _emit(self, seq: Sequence, text: str, tokens: list[int]) -> None:
        if text or tokens:
            seq.mailbox.put(TokenEvent(text=text, token_ids=tokens))

    def finish(
        self, seq: Sequence, reason: FinishReason, *, flush: bool = False, error: str | None = None
    ) -> None:
        if seq.finished:
            return
        seq.finished = True
        tail = ""
        if flush:
            held, stopped = seq.stops.feed(seq.detok.flush())
            tail = held + ("" if stopped else seq.stops.flush())
        self._release(seq)
        now = time.perf_counter()
        counted = [t for t in seq.generated if reason != FinishReason.STOP or t not in seq.stop_ids]
        seq.mailbox.put(
            TokenEvent(
                text=tail,
                finish_reason=reason,
                error=error,
                prompt_tokens=len(seq.prompt),
                completion_tokens=len(counted),
                queue_time=(seq.admitted or now) - seq.submitted,
                load_time=seq.load_time,
                prompt_time=seq.prompt_time,
                decode_time=now - seq.first_token if seq.first_token else 0.0,
                total_time=now - seq.submitted,
            )
        )

    def _release(self, seq: Sequence) -> None:
        if seq in self.waiting:
            self.waiting.remove(seq)
        if seq is self.prefilling:
            self.prefilling = None
        if seq in self.running:
            self.running.remove(seq)
        if seq.slot >= 0:
            del self.by_slot[seq.slot]
            moved_from = self.runner.cache.free(seq.slot)
            if moved_from is not None:
                # keep running sequences in slots 0..n-1: the last one fills the hole
                mover = self.by_slot.pop(moved_from)
                self.runner.cache.move(moved_from, seq.slot, mover.cached)
                mover.slot = seq.slot
                self.by_slot[seq.slot] = mover
            seq.slot = -1


# ---------------------------------------------------------------------------- the device loop


class DeviceLoop:
    """Owns one device: a thread that steps every resident model's worker."""

    def __init__(
        self,
        provider: ModelProvider,
        *,
        device: torch.device,
        dtype: torch.dtype,
        slots: int = 16,
        capacity: int = 4096,
        prefill_chunk: int = 256,
        max_queue: int = 512,
    ) -> None:
        self.provider = provider
        self.device = device
        self.dtype = dtype
        self.slots = slots
        self.capacity = capacity
        self.prefill_chunk = prefill_chunk
        self.max_queue = max_queue
        self.workers: dict[str, ModelWorker] = {}
        self.inbox: deque[tuple[str, Any]] = deque()
        self.wakeup = threading.Event()
        self.stopping = False
        self.thread: threading.Thread | None = None
        self.crashed: BaseException | None = None

    # ------------------------------------------------------------ thread side

    def start(self) -> None:
        self.thread = threading.Thread(
            target=self._run, name=f"ocs-engine-{self.device}", daemon=True
        )
        self.thread.start()

    def stop(self, timeout: float = 10.0) -> None:
        self.stopping = True
        self.wakeup.set()
        if self.thread is not None:
            self.thread.join(timeout)

    def _run(self) -> None:
        try:
            while not self.stopping:
                if not self.step():
                    self.wakeup.wait(0.05)
                    self.wakeup.clear()
            for worker in self.workers.values():
                for seq in worker.sequences():
                    worker.finish(seq, FinishReason.ABORT, error="the server is shutting down")
        except BaseException as exc:  # pragma: no cover - the loop itself must not die
            self.crashed = exc
            log.exception("engine loop died")

    def step(self) -> bool:
        worked = self._drain_inbox()
        for worker in list(self.workers.values()):
            worked = worker.step() or worked
        return worked

    def _drain_inbox(self) -> bool:
        worked = False
        while self.inbox:
            kind, payload = self.inbox.popleft()
            worked = True
            if kind == "submit":
                self._admit(*payload)
            elif kind == "abort":
                self._abort(payload)
            elif kind == "unload":
                self._unload(payload)
        return worked

    def _worker(self, name: str) -> tuple[ModelWorker, float]:
        worker = self.workers.get(name)
        if worker is not None:
            return worker, 0.0
        started = time.perf_counter()
        loaded = self.provider(name)
        runner = ModelRunner(
            loaded.model,
            slots=self.slots,
            capacity=self.capacity,
            dtype=self.dtype,
            device=self.device,
        )
        worker = ModelWorker(name, loaded, runner, self.prefill_chunk)
        self.workers[name] = worker
        seconds = time.perf_counter() - started
        log.info(
            "loaded %s in %.1fs (KV cache %d MiB, %d slots x %d tokens)",
            name,
            seconds,
            runner.cache.nbytes >> 20,
            self.slots,
            self.capacity,
        )
        return worker, seconds

    def _admit(self, request: GenerateRequest, mailbox: Mailbox) -> None:
        def fail(message: str, status: int = 400) -> None:
            mailbox.put(TokenEvent(finish_reason=FinishReason.ERROR, error=message, status=status))

        try:
            worker, load_time = self._worker(request.model)
        except EngineError as exc:
            fail(str(exc), exc.status)
            return
        except Exception as exc:
            log.exception("loading %s failed", request.model)
            fail(f"loading model '{request.model}' failed: {exc.__class__.__name__}", 500)
            return
        params = request.sampling
        prompt = len(request.prompt_ids)
        room = self.capacity - prompt
        if prompt == 0:
            fail("the prompt is empty")
            return
        if room < 1:
            fail(f"the prompt has {prompt} tokens but the context holds {self.capacity}")
            return
        if params.max_tokens is not None and prompt + params.max_tokens > self.capacity:
            fail(
                f"prompt ({prompt} tokens) plus max tokens ({params.max_tokens}) exceeds "
                f"the context length ({self.capacity})"
            )
            return
        max_tokens = params.max_tokens if params.max_tokens is not None else room
        tokenizer = worker.loaded.tokenizer
        seq = Sequence(
            request=request,
            mailbox=mailbox,
            state=RowState(params, request.prompt_ids, self.device),
            detok=Detokenizer(tokenizer, request.prompt_ids),
            stops=StopMatcher(params.stop),
            stop_ids=set(params.stop_token_ids) | worker.loaded.stop_ids,
            max_tokens=max_tokens,
            load_time=load_time,
        )
        if max_tokens == 0:
            worker.finish(seq, FinishReason.LENGTH)
            return
        worker.waiting.append(seq)

    def _abort(self, request_id: str) -> None:
        for worker in self.workers.values():
            for seq in worker.sequences():
                if seq.request.request_id == request_id:
                    worker.finish(seq, FinishReason.ABORT)

    def _unload(self, name: str) -> None:
        worker = self.workers.get(name)
        if worker is not None and not worker.busy:
            del self.workers[name]
            log.info("unloaded %s", name)

    # ------------------------------------------------------------ event-loop side

    def submit(self, request: GenerateRequest, mailbox: Mailbox) -> None:
        if len(self.inbox) >= self.max_queue or self.queued() >= self.max_queue:
            raise EngineError("server busy, please try again.  maximum pending requests exceeded")
        self.inbox.append(("submit", (request, mailbox)))
        self.wakeup.set()

    def queued(self) -> int:
        return sum(len(w.waiting) for w in list(self.workers.values()))

    def abort(self, request_id: str) -> None:
        self.inbox.append(("abort", request_id))
        self.wakeup.set()

    def unload(self, name: str) -> None:
        self.inbox.append(("unload", name))
        self.wakeup.set()

    def health(self) -> bool:
        return self.thread is not None and self.thread.is_alive() and self.crashed is None

    def active_sequences(self) -> int:
        return sum(len(w.sequences()) for w in list(self.workers.values()))


class LocalEngine:
    """The engine protocol over one device loop: what the API layer calls."""

    def __init__(self, loop: DeviceLoop) -> None:
        self.device_loop = loop

    async def generate(self, request: GenerateRequest) -> AsyncIterator[TokenEvent]:
        request.sampling.validate()
        mailbox = Mailbox(asyncio.get_running_loop())
        self.device_loop.submit(request, mailbox)
        done = False
        started = False
        try:
            while not done:
                event = await mailbox.get()
                done = event.finished
                if event.error and not started:
                    done = True
                    error = EngineError(event.error)
                    error.status = event.status
                    raise error
                started = True
                yield event
        finally:
            mailbox.closed = True
            if not done:
                self.device_loop.abort(request.request_id)

    def abort(self, request_id: str) -> None:
        self.device_loop.abort(request_id)

    def health(self) -> bool:
        return self.device_loop.health()
