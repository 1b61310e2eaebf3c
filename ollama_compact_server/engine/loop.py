"""The device loop: one background thread owns the device and repeats
``step() = schedule -> run -> postprocess`` over every resident model, handing token events
to each request's mailbox on the event loop."""

from __future__ import annotations

import logging
import threading
import time
from collections import Counter, deque
from typing import Any, cast

from .adapters import AdapterRef
from .config import EngineConfig, ModelSource
from .constraint import JsonConstraint, grammar_for
from .detok import Detokenizer, StopMatcher
from .embedding import embed, embed_encoder
from .inbox import Abort, Message, Pending, Unload
from .mailbox import Mailbox, Notifier
from .residency import Residency
from .sampler import RowState
from .sequence import AdapterWait, Sequence
from .stats import EngineStats
from .types import (
    DEFAULT,
    EmbedRequest,
    EngineBusy,
    EngineDown,
    EngineError,
    FinishReason,
    Resident,
    TokenEvent,
    error_event,
)
from .worker import ModelWorker

log = logging.getLogger(__name__)


class DeviceLoop:
    """Owns one device: a thread that drains the inbox, steps every resident model's
    worker and keeps residency (loads beside it, evictions, keep-alive)."""

    def __init__(self, config: EngineConfig, models: ModelSource) -> None:
        self.config = config
        self.models = models
        self.stats = EngineStats()
        self.notifier = Notifier()
        self.wakeup = threading.Event()
        self.residency = Residency(config, models, self.stats, self.wakeup)
        self.inbox: deque[Message] = deque()
        self.stopping = False
        self.thread: threading.Thread | None = None
        self.crashed: BaseException | None = None

    @property
    def workers(self) -> dict[str, ModelWorker]:
        return self.residency.workers

    # ------------------------------------------------------------ thread side

    def start(self) -> None:
        self.thread = threading.Thread(
            target=self._run, name=f"ocs-engine-{self.config.device}", daemon=True
        )
        self.thread.start()

    def stop(self, timeout: float = 10.0) -> None:
        self.stopping = True
        self.wakeup.set()
        if self.thread is not None:
            self.thread.join(timeout)
        self.residency.shutdown()

    def _run(self) -> None:
        try:
            while not self.stopping:
                worked = self.step()
                self.notifier.flush()
                if not worked:
                    self.wakeup.wait(0.05)
                    self.wakeup.clear()
            self.residency.stopping = True
            for worker in self.workers.values():
                for seq in worker.sequences():
                    worker.finish(seq, FinishReason.ABORT, error="the server is shutting down")
            for queue in self.residency.pending.values():
                for item in queue:
                    item.mailbox.put(error_event("the server is shutting down", 503))
            for worker in self.workers.values():
                worker.fail_waits("the server is shutting down", 503)
            self._fail_inbox("the server is shutting down")
            self.notifier.flush()
        except BaseException as exc:  # the loop itself must not die; if it does, say so
            self.crashed = exc
            log.exception("engine loop died")
            self._fail_everything("the engine stopped after an internal error")

    def _fail_everything(self, message: str) -> None:
        """After a crash: ends every request the loop holds with a 503 error event, without
        touching the (possibly broken) workers' caches, so no client waits forever."""
        try:
            for worker in list(self.workers.values()):
                for seq in worker.sequences():
                    seq.mailbox.put(error_event(message, 503))
                worker.fail_waits(message, 503)
            for queue in list(self.residency.pending.values()):
                for item in queue:
                    item.mailbox.put(error_event(message, 503))
        except Exception:
            log.exception("could not end every request after the engine loop died")
        self._fail_inbox(message)
        self.notifier.flush()

    def _fail_inbox(self, message: str) -> None:
        """Answers submissions that no step will take any more (either thread may call it:
        each item is popped once)."""
        while True:
            try:
                item = self.inbox.popleft()
            except IndexError:
                return
            if isinstance(item, Pending):
                item.mailbox.put(error_event(message, 503))

    def step(self) -> bool:
        """schedule -> run -> postprocess for every resident model, plus housekeeping."""
        worked = self._drain_inbox()
        loaded, ready = self.residency.collect()
        for worker, item in ready:
            self._enqueue(worker, item, worker.load_time)
        self.residency.retry()  # after the new models' requests are queued: they are busy
        worked = loaded or worked
        for worker in list(self.workers.values()):
            try:
                worked = worker.step() or worked
            except Exception as exc:  # one model's fault must not stop the others
                self._worker_failed(worker, exc)
                worked = True
        self.residency.expire()
        return worked

    def _worker_failed(self, worker: ModelWorker, exc: Exception) -> None:
        """A fault the worker could not pin on one request: every request of that model
        ends with an error event, and the model is unloaded (its slots and caches may no
        longer agree), so the next request for it starts from a fresh load."""
        log.error(
            "step of %s failed; ending its requests and unloading it",
            worker.name,
            exc_info=(type(exc), exc, exc.__traceback__),
        )
        message = f"generation failed: {exc.__class__.__name__}"
        seqs = {id(s): s for s in [*worker.sequences(), *worker.scheduler.by_slot.values()]}
        for seq in seqs.values():
            if not seq.finished:
                seq.finished = True
                self.stats.finished[FinishReason.ERROR.value] += 1
                seq.mailbox.put(error_event(message, 500))
        worker.fail_waits(message, 500)
        if self.workers.get(worker.name) is worker:
            self.residency.evict(worker, "after a failed step")

    def _drain_inbox(self) -> bool:
        worked = False
        while self.inbox:
            item = self.inbox.popleft()
            worked = True
            if isinstance(item, Pending):
                self._route(item)
            elif isinstance(item, Abort):
                self._abort(item.request_id)
            else:
                self.residency.unload(item.name)
        return worked

    def _route(self, item: Pending) -> None:
        """Sends a request to the worker of the model that serves it (resolved before it
        got here: an adapter model runs on its one, shared base model), loading it first
        if it is not resident."""
        if item.adapter is not None and self.models.load_adapter is None:
            item.mailbox.put(error_event("this engine cannot serve LoRA adapters", 400))
            return
        worker = self.workers.get(item.model)
        if worker is not None:
            self._enqueue(worker, item, 0.0)
            return
        self.residency.wait_for_load(item)

    # ------------------------------------------------------------ requests

    def _enqueue(self, worker: ModelWorker, item: Pending, load_time: float) -> None:
        worker.last_used = time.monotonic()
        # like Ollama, every request sets how long the model stays after it
        keep_alive = self.config.keep_alive if item.keep_alive is DEFAULT else item.keep_alive
        worker.keep_alive = cast(float | None, keep_alive)
        if item.adapter is not None and worker.adapters is not None:
            worker.adapters.arrive(item.adapter)  # loads beside the running batch
        waits = item.request is None or isinstance(item.request, EmbedRequest)
        if waits and item.adapter is not None and worker.adapters is not None:
            self._wait_for_adapter(worker, item, load_time)
            return
        if item.request is None:  # a bare load
            item.mailbox.put(TokenEvent(finish_reason=FinishReason.STOP, load_time=load_time))
            return
        if isinstance(item.request, EmbedRequest):
            self._embed(worker, item.request, item.mailbox, load_time)
            return
        request = item.request
        if worker.loaded.pooling is not None:
            item.mailbox.put(
                error_event(f'"{request.model}" is an embedding model and does not generate', 400)
            )
            return
        params = request.sampling
        prompt = len(request.prompt_ids)
        capacity = worker.runner.cache.capacity
        if prompt == 0:
            item.mailbox.put(error_event("the prompt is empty", 400))
            return
        if prompt >= capacity:
            item.mailbox.put(
                error_event(f"the prompt has {prompt} tokens but the context holds {capacity}", 400)
            )
            return
        if params.max_tokens is not None and prompt + params.max_tokens > capacity:
            item.mailbox.put(
                error_event(
                    f"prompt ({prompt} tokens) plus max tokens ({params.max_tokens}) exceeds "
                    f"the context length ({capacity})",
                    400,
                )
            )
            return
        max_tokens = params.max_tokens if params.max_tokens is not None else capacity - prompt
        seq = Sequence(
            request=request,
            mailbox=item.mailbox,
            state=RowState(params, request.prompt_ids, self.config.device),
            detok=Detokenizer(worker.loaded.tokenizer, request.prompt_ids),
            stops=StopMatcher(params.stop),
            stop_ids=set(params.stop_token_ids) | worker.loaded.stop_ids,
            max_tokens=max_tokens,
            load_time=load_time,
            adapter=item.adapter,
        )
        if request.images:
            try:
                seq.media = worker.runner.media_for(request.prompt_ids, request.images)
            except ValueError as exc:  # never into the loop: the request's own 400
                message = f'"{request.model}" cannot take these images: {exc}'
                item.mailbox.put(error_event(message, 400))
                return
        if request.constraint is not None:  # built by the engine front (engine/local.py)
            seq.constraint = request.constraint
        elif params.json_schema is not None:
            try:
                seq.constraint = JsonConstraint(
                    worker.loaded.guided_tokenizer(),
                    grammar_for(params.json_schema, params.json_wrap),
                )
            except Exception as exc:  # never into the loop: the request's own 400
                message = str(exc) if isinstance(exc, EngineError) else f"bad JSON schema: {exc}"
                item.mailbox.put(error_event(message[:400], 400))
                return
        if max_tokens == 0 and not params.prompt_logprobs:
            worker.finish(seq, FinishReason.LENGTH)
            return
        worker.admit(seq)

    def _wait_for_adapter(self, worker: ModelWorker, item: Pending, load_time: float) -> None:
        """A bare load or an embedding of an adapter model goes on once its adapter has a
        device slot (it loads beside the batch meanwhile), in the worker's step."""
        request = item.request
        mailbox = item.mailbox

        def run(slot: int) -> None:
            worker.last_used = time.monotonic()
            if request is None:  # a bare load: the adapter now sits on the device
                mailbox.put(TokenEvent(finish_reason=FinishReason.STOP, load_time=load_time))
            else:
                self._embed(worker, cast(EmbedRequest, request), mailbox, load_time, slot)

        def fail(message: str, status: int) -> None:
            mailbox.put(error_event(message, status))

        worker.wait_for_adapter(
            AdapterWait(
                cast(AdapterRef, item.adapter),
                run,
                fail,
                request.request_id if request is not None else None,
            )
        )

    def _embed(
        self,
        worker: ModelWorker,
        request: EmbedRequest,
        mailbox: Mailbox,
        load_time: float,
        lora: int = -1,
    ) -> None:
        capacity = worker.runner.cache.capacity
        longest = max((len(x) for x in request.inputs), default=0)
        if longest > capacity:
            mailbox.put(
                error_event(f"an input has {longest} tokens but the context holds {capacity}", 400)
            )
            return
        started = time.perf_counter()
        try:
            if worker.loaded.pooling is not None:
                vectors = embed_encoder(
                    worker.loaded.model, request.inputs, self.config.device, worker.loaded.pooling
                )
            else:
                bank = worker.runner.lora if lora >= 0 else None
                try:
                    vectors = embed(
                        worker.loaded.model,
                        request.inputs,
                        self.config.device,
                        select=(lambda rows: bank.select([lora] * rows)) if bank else None,
                    )
                finally:
                    if bank is not None:
                        bank.reset()
        except Exception as exc:
            log.exception("embedding failed for %s", request.request_id)
            mailbox.put(error_event(f"embedding failed: {exc.__class__.__name__}", 500))
            return
        elapsed = time.perf_counter() - started
        mailbox.put(
            TokenEvent(
                finish_reason=FinishReason.STOP,
                embeddings=vectors,
                prompt_tokens=sum(len(x) for x in request.inputs),
                load_time=load_time,
                prompt_time=elapsed,
                total_time=elapsed + load_time,
            )
        )

    def _abort(self, request_id: str) -> None:
        for worker in self.workers.values():
            worker.abort_waits(request_id)
            for seq in worker.sequences():
                if seq.request.request_id == request_id:
                    worker.finish(seq, FinishReason.ABORT)
        for queue in self.residency.pending.values():
            for item in list(queue):
                if item.request is not None and item.request.request_id == request_id:
                    queue.remove(item)

    # ------------------------------------------------------------ event-loop side

    def submit(self, item: Pending) -> None:
        if self.crashed is not None or self.stopping:
            raise EngineDown("the engine is not running")
        if len(self.inbox) + self.queued() >= self.config.max_queue:
            raise EngineBusy("server busy, please try again.  maximum pending requests exceeded")
        self.inbox.append(item)
        self.wakeup.set()
        if self.crashed is not None or self.stopping:  # it ended while this was appended
            self._fail_inbox("the engine is not running")
            self.notifier.flush()

    def queued(self) -> int:
        schedulers = [w.scheduler for w in list(self.workers.values())]
        waiting = sum(len(s.waiting) + len(s.adapter_waits) for s in schedulers)
        return waiting + sum(len(q) for q in list(self.residency.pending.values()))

    def abort(self, request_id: str) -> None:
        self.inbox.append(Abort(request_id))
        self.wakeup.set()

    def unload(self, name: str) -> None:
        self.inbox.append(Unload(name))
        self.wakeup.set()

    def health(self) -> bool:
        return self.thread is not None and self.thread.is_alive() and self.crashed is None

    def active_sequences(self) -> int:
        return sum(len(w.sequences()) for w in list(self.workers.values()))

    def snapshot(self) -> dict[str, Any]:
        """Gauges and counters for /metrics (read from the event loop; values may be a step
        old, never torn)."""
        workers = list(self.workers.values())
        kv_used = sum(w.runner.cache.used * w.runner.cache.capacity for w in workers)
        kv_total = sum(w.runner.cache.slots * w.runner.cache.capacity for w in workers)
        banks = [w.adapters for w in workers if w.adapters is not None]
        return {
            "queued": self.queued(),
            "running": sum(
                len(w.scheduler.running) + (w.scheduler.prefilling is not None) for w in workers
            ),
            "kv_tokens_used": kv_used,
            "kv_tokens_free": kv_total - kv_used,
            "resident_models": len(workers),
            "resident_adapters": sum(len(a.resident()) for a in banks),
            **self.adapter_queues(workers),
            "max_loras": self.config.max_loras if self.models.load_adapter is not None else 0,
            "adapter_loads": self.stats.adapter_loads + sum(a.stats.loads for a in banks),
            "adapter_device_evictions": self.stats.adapter_device_evictions
            + sum(a.stats.device_evictions for a in banks),
            "adapter_host_evictions": self.stats.adapter_host_evictions
            + sum(a.stats.host_evictions for a in banks),
            "tokens_generated": self.stats.tokens_generated,
            "prefix_hits": self.stats.prefix_hits,
            "prefix_tokens": self.stats.prefix_tokens,
            "preemptions": self.stats.preemptions,
            "evictions": self.stats.evictions,
            "finished": dict(self.stats.finished),
        }

    def adapter_queues(self, workers: list[ModelWorker]) -> dict[str, dict[str, int]]:
        """The adapters requests run with now (``running_adapters``: decoding or
        prefilling) and wait for (``waiting_adapters``: queued for a KV slot, an adapter
        slot or their model's load), as {adapter model name: requests}; what vLLM reports
        as ``running_lora_adapters`` / ``waiting_lora_adapters``. Copies of the queues are
        read (each copy is one C call: the device thread cannot change it meanwhile)."""
        running: Counter[str] = Counter()
        waiting: Counter[str] = Counter()
        for worker in workers:
            scheduler = worker.scheduler
            active = list(scheduler.running)
            prefilling = scheduler.prefilling
            if prefilling is not None:
                active.append(prefilling)
            running.update(s.adapter.name for s in active if s.adapter is not None)
            waiting.update(s.adapter.name for s in list(scheduler.waiting) if s.adapter)
            waiting.update(w.adapter.name for w in list(scheduler.adapter_waits))
        for queue in list(self.residency.pending.values()):
            waiting.update(item.adapter.name for item in list(queue) if item.adapter)
        return {"running_adapters": dict(running), "waiting_adapters": dict(waiting)}

    def resident(self) -> list[Resident]:
        now = time.monotonic()
        snapshot = []
        for worker in list(self.workers.values()):
            expires = worker.expires_at
            snapshot.append(
                Resident(
                    name=worker.name,
                    memory=worker.own_memory,
                    context=worker.runner.cache.capacity,
                    expires_in=None if expires is None else max(0.0, expires - now),
                    busy=worker.busy,
                    device=str(self.config.device),
                )
            )
            if worker.adapters is None:
                continue
            for name, nbytes, busy in worker.adapters.resident():
                snapshot.append(
                    Resident(
                        name=name,
                        memory=nbytes,
                        context=worker.runner.cache.capacity,
                        expires_in=None if expires is None else max(0.0, expires - now),
                        busy=busy,
                        device=str(self.config.device),
                        base=worker.name,
                    )
                )
        return snapshot
