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
from concurrent.futures import Future
from dataclasses import dataclass
from typing import Any, cast

import torch

from ..threads import FreshThreadExecutor
from .adapters import AdapterLoader, AdapterRef, AdapterSlots, Target
from .constraint import JsonConstraint, grammar_for
from .detok import Detokenizer, StopMatcher
from .mailbox import Mailbox, Notifier
from .runner import ModelRunner
from .sampler import RowState
from .stats import EngineStats
from .types import (
    DEFAULT,
    EmbedRequest,
    EngineBusy,
    EngineDown,
    EngineError,
    FinishReason,
    GenerateRequest,
    KeepAlive,
    Resident,
    TokenEvent,
)
from .worker import (
    AdapterWait,
    LoadedModel,
    ModelProvider,
    ModelWorker,
    Sequence,
    release_memory,
)

log = logging.getLogger(__name__)


# ---------------------------------------------------------------------------- the device loop


@dataclass(slots=True)
class Pending:
    """A request (or a bare load, without request) on its way to its model's worker."""

    model: str
    mailbox: Mailbox
    request: GenerateRequest | EmbedRequest | None = None
    keep_alive: KeepAlive = DEFAULT
    adapter: AdapterRef | None = None  # set when routed: the LoRA adapter to run with


Sizer = Callable[[str], int]
Planner = Callable[[str, LoadedModel, int | None], tuple[int, int]]
"""(model, loaded, bytes available or None) -> (slots, tokens per slot) to allocate."""
Resolver = Callable[[str], Target]
"""A requested model name -> the resident model that serves it (and the adapter on top)."""


class DeviceLoop:
    """Owns one device: a thread that steps every resident model's worker, loads models on
    a helper thread beside it and evicts idle ones (LRU, keep-alive, memory budget)."""

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
        max_loaded_models: int = 3,
        memory_budget: int | None = None,
        estimate: Sizer | None = None,
        planner: Planner | None = None,
        keep_alive: float | None = 300.0,
        resolver: Resolver | None = None,
        adapter_loader: AdapterLoader | None = None,
        max_loras: int = 8,
        max_cpu_loras: int = 32,
    ) -> None:
        self.provider = provider
        self.resolver = resolver
        self.adapter_loader = adapter_loader
        self.max_loras = max_loras
        self.max_cpu_loras = max_cpu_loras
        self.device = device
        self.dtype = dtype
        self.slots = slots
        self.capacity = capacity
        self.prefill_chunk = prefill_chunk
        self.max_queue = max_queue
        self.max_loaded_models = max_loaded_models
        self.memory_budget = memory_budget
        self.estimate = estimate
        self.planner = planner
        self.keep_alive = keep_alive
        self.workers: dict[str, ModelWorker] = {}
        self.pending: dict[str, deque[Pending]] = {}
        self.loads: dict[str, Future[ModelWorker]] = {}
        self.loader = FreshThreadExecutor("ocs-load")  # fresh threads: see threads.py
        # adapters load on their own thread: never behind a minutes-long model load
        self.adapter_loader_pool = FreshThreadExecutor("ocs-lora")
        self.inbox: deque[tuple[str, Any]] = deque()
        self.stats = EngineStats()
        self.notifier = Notifier()
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
        self.loader.shutdown(wait=False, cancel_futures=True)
        self.adapter_loader_pool.shutdown(wait=False, cancel_futures=True)

    def _run(self) -> None:
        try:
            while not self.stopping:
                worked = self.step()
                self.notifier.flush()
                if not worked:
                    self.wakeup.wait(0.05)
                    self.wakeup.clear()
            for worker in self.workers.values():
                for seq in worker.sequences():
                    worker.finish(seq, FinishReason.ABORT, error="the server is shutting down")
            for queue in self.pending.values():
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
            for queue in list(self.pending.values()):
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
                kind, payload = self.inbox.popleft()
            except IndexError:
                return
            if kind == "submit":
                payload.mailbox.put(error_event(message, 503))

    def step(self) -> bool:
        """schedule -> run -> postprocess for every resident model, plus housekeeping."""
        worked = self._drain_inbox()
        worked = self._service_loads() or worked
        for worker in list(self.workers.values()):
            try:
                worked = worker.step() or worked
            except Exception as exc:  # one model's fault must not stop the others
                self._worker_failed(worker, exc)
                worked = True
        self._expire()
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
        seqs = {id(s): s for s in [*worker.sequences(), *worker.by_slot.values()]}
        for seq in seqs.values():
            if not seq.finished:
                seq.finished = True
                self.stats.finished[FinishReason.ERROR.value] += 1
                seq.mailbox.put(error_event(message, 500))
        worker.fail_waits(message, 500)
        if self.workers.get(worker.name) is worker:
            self._evict(worker, "after a failed step")

    def _drain_inbox(self) -> bool:
        worked = False
        while self.inbox:
            kind, payload = self.inbox.popleft()
            worked = True
            if kind == "submit":
                self._route(payload)
            elif kind == "abort":
                self._abort(payload)
            elif kind == "unload":
                self._request_unload(payload)
        return worked

    # ------------------------------------------------------------ residency

    def _route(self, item: Pending) -> None:
        """Sends a request to the worker of the model that serves it: adapter models run
        on their (one, shared) base model."""
        name = item.model
        if self.resolver is not None:
            try:
                target = self.resolver(name)
            except Exception:  # unknown names fail in the load, with the usual message
                target = Target(name)
            if target.adapter is not None and self.adapter_loader is None:
                item.mailbox.put(error_event("this engine cannot serve LoRA adapters", 400))
                return
            name, item.adapter = target.model, target.adapter
        worker = self.workers.get(name)
        if worker is not None:
            self._enqueue(worker, item, 0.0)
            return
        self.pending.setdefault(name, deque()).append(item)
        self._start_load(name)

    def _start_load(self, name: str) -> None:
        if name in self.loads or self.stopping:
            return
        if not self._make_room(name):
            return  # waits until a resident model goes idle
        log.info("loading %s", name)
        self.loads[name] = self.loader.submit(self._load, name)

    def _load(self, name: str) -> ModelWorker:
        """Runs on the loader thread, beside the device loop: other models keep streaming."""
        started = time.perf_counter()
        loaded = self.provider(name)
        slots, capacity = self.slots, self.capacity
        if loaded.pooling is not None:  # an encoder: no KV cache, embeddings only
            context = getattr(loaded.model.config, "max_position_embeddings", None)
            slots, capacity = 0, int(context or capacity)
        elif self.planner is not None:
            available = None
            if self.memory_budget is not None:
                used = sum(w.memory for w in list(self.workers.values()))
                available = self.memory_budget - used
            slots, capacity = self.planner(name, loaded, available)
        runner = ModelRunner(
            loaded.model, slots=slots, capacity=capacity, dtype=self.dtype, device=self.device
        )
        adapters = None
        if self.adapter_loader is not None and loaded.pooling is None:
            adapters = AdapterSlots(
                runner.attach_lora,
                self.adapter_loader,
                self.adapter_loader_pool,
                device_slots=self.max_loras,
                host_slots=self.max_cpu_loras,
                on_loaded=self.wakeup.set,
            )
        worker = ModelWorker(name, loaded, runner, self.prefill_chunk, self.stats, adapters)
        worker.own_memory = runner.cache.nbytes + weight_bytes(loaded.model)
        worker.load_time = time.perf_counter() - started
        worker.keep_alive = self.keep_alive
        log.info(
            "loaded %s in %.1fs: %d MiB resident (KV cache %d MiB: %d slots x %d tokens)",
            name,
            worker.load_time,
            worker.memory >> 20,
            runner.cache.nbytes >> 20,
            slots,
            capacity,
        )
        return worker

    def _service_loads(self) -> bool:
        worked = False
        for name, future in list(self.loads.items()):
            if not future.done():
                continue
            worked = True
            del self.loads[name]
            waiting = self.pending.pop(name, deque())
            try:
                worker = future.result()
            except EngineError as exc:
                for item in waiting:
                    item.mailbox.put(error_event(str(exc), exc.status))
                continue
            except Exception as exc:
                log.exception("loading %s failed", name)
                for item in waiting:
                    item.mailbox.put(
                        error_event(f"loading model '{name}' failed: {exc.__class__.__name__}", 500)
                    )
                continue
            self.workers[name] = worker
            for item in waiting:
                self._enqueue(worker, item, worker.load_time)
        for name in list(self.pending):  # loads that waited for room
            if name not in self.loads and self.pending[name]:
                self._start_load(name)
        return worked

    def _make_room(self, name: str) -> bool:
        """Evicts idle models, least recently used first, until ``name`` fits by count and
        by memory; a model in use is never evicted. False if it must wait."""
        need = self.estimate(name) if self.estimate is not None else 0
        if self.memory_budget is not None and need > self.memory_budget:
            for item in self.pending.pop(name, deque()):
                item.mailbox.put(
                    error_event(
                        f"model '{name}' needs about {need >> 20} MiB but the memory budget is "
                        f"{self.memory_budget >> 20} MiB",
                        400,
                    )
                )
            return False

        def fits() -> bool:
            count_ok = len(self.workers) + len(self.loads) < self.max_loaded_models
            used = sum(w.memory for w in self.workers.values())
            memory_ok = self.memory_budget is None or used + need <= self.memory_budget
            return count_ok and memory_ok

        while not fits():
            idle = [w for w in self.workers.values() if not w.busy]
            if not idle:
                return False
            self._evict(min(idle, key=lambda w: w.last_used), "to make room for " + name)
        return True

    def _evict(self, worker: ModelWorker, why: str) -> None:
        del self.workers[worker.name]
        self.stats.evictions += 1
        if worker.adapters is not None:  # keep its adapter counts: /metrics counters only grow
            self.stats.adapter_loads += worker.adapters.stats.loads
            self.stats.adapter_device_evictions += worker.adapters.stats.device_evictions
            self.stats.adapter_host_evictions += worker.adapters.stats.host_evictions
        release_memory(self.device)
        log.info("unloaded %s (%s)", worker.name, why)

    def _expire(self) -> None:
        now = time.monotonic()
        for worker in list(self.workers.values()):
            expires = worker.expires_at
            if expires is not None and now >= expires:
                self._evict(worker, "keep-alive expired")

    def _request_unload(self, name: str) -> None:
        if self.resolver is not None:
            try:
                target = self.resolver(name)
            except Exception:  # gone from the registry (deleted): an adapter model's
                target = Target(name)  # weights leave their base once idle
                for resident in self.workers.values():
                    if resident.adapters is not None:
                        resident.adapters.forget(name)
            if target.adapter is not None:
                worker = self.workers.get(target.model)
                if worker is not None and worker.adapters is not None:
                    worker.adapters.drop(target.adapter.key)
                return
            name = target.model
        worker = self.workers.get(name)
        if worker is not None:
            worker.keep_alive = 0.0  # unloads as soon as it is idle

    # ------------------------------------------------------------ requests

    def _enqueue(self, worker: ModelWorker, item: Pending, load_time: float) -> None:
        worker.last_used = time.monotonic()
        # like Ollama, every request sets how long the model stays after it
        keep_alive = self.keep_alive if item.keep_alive is DEFAULT else item.keep_alive
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
            state=RowState(params, request.prompt_ids, self.device),
            detok=Detokenizer(worker.loaded.tokenizer, request.prompt_ids),
            stops=StopMatcher(params.stop),
            stop_ids=set(params.stop_token_ids) | worker.loaded.stop_ids,
            max_tokens=max_tokens,
            load_time=load_time,
            adapter=item.adapter,
        )
        if params.json_schema is not None:
            try:
                seq.constraint = JsonConstraint(
                    worker.loaded.guided_tokenizer(),
                    grammar_for(params.json_schema, params.json_wrap),
                )
            except EngineError as exc:
                item.mailbox.put(error_event(str(exc), 400))
                return
        if max_tokens == 0 and not params.prompt_logprobs:
            worker.finish(seq, FinishReason.LENGTH)
            return
        worker.waiting.append(seq)

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

        worker.adapter_waits.append(
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
                    worker.loaded.model, request.inputs, self.device, worker.loaded.pooling
                )
            else:
                bank = worker.runner.lora if lora >= 0 else None
                try:
                    vectors = embed(
                        worker.loaded.model,
                        request.inputs,
                        self.device,
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
        for queue in self.pending.values():
            for item in list(queue):
                if item.request is not None and item.request.request_id == request_id:
                    queue.remove(item)

    # ------------------------------------------------------------ event-loop side

    def submit(self, item: Pending) -> None:
        if self.crashed is not None or self.stopping:
            raise EngineDown("the engine is not running")
        if len(self.inbox) + self.queued() >= self.max_queue:
            raise EngineBusy("server busy, please try again.  maximum pending requests exceeded")
        self.inbox.append(("submit", item))
        self.wakeup.set()
        if self.crashed is not None or self.stopping:  # it ended while this was appended
            self._fail_inbox("the engine is not running")
            self.notifier.flush()

    def queued(self) -> int:
        waiting = sum(len(w.waiting) + len(w.adapter_waits) for w in list(self.workers.values()))
        return waiting + sum(len(q) for q in list(self.pending.values()))

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

    def snapshot(self) -> dict[str, Any]:
        """Gauges and counters for /metrics (read from the event loop; values may be a step
        old, never torn)."""
        workers = list(self.workers.values())
        kv_used = sum(w.runner.cache.used * w.runner.cache.capacity for w in workers)
        kv_total = sum(w.runner.cache.slots * w.runner.cache.capacity for w in workers)
        banks = [w.adapters for w in workers if w.adapters is not None]
        return {
            "queued": self.queued(),
            "running": sum(len(w.running) + (w.prefilling is not None) for w in workers),
            "kv_tokens_used": kv_used,
            "kv_tokens_free": kv_total - kv_used,
            "resident_models": len(workers),
            "resident_adapters": sum(len(a.resident()) for a in banks),
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
                    device=str(self.device),
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
                        device=str(self.device),
                        base=worker.name,
                    )
                )
        return snapshot


EMBED_BATCH = 16


def right_padded(
    batch: list[list[int]], pad: int, device: torch.device
) -> tuple[torch.Tensor, torch.Tensor]:
    """Token lists as right-padded ids and their attention mask, both [B, T]."""
    width = max(len(x) for x in batch)
    ids = torch.full((len(batch), width), pad, dtype=torch.long)
    mask = torch.zeros((len(batch), width), dtype=torch.long)
    for row, tokens in enumerate(batch):
        ids[row, : len(tokens)] = torch.tensor(tokens, dtype=torch.long)
        mask[row, : len(tokens)] = 1
    return ids.to(device), mask.to(device)


@torch.inference_mode()
def embed(
    model: Any,
    inputs: list[list[int]],
    device: torch.device,
    select: Callable[[int], None] | None = None,
) -> list[list[float]]:
    """Mean of the last hidden states over each input's tokens, L2-normalised; inputs are
    right-padded in batches and masked. ``select(rows)`` runs before each batch's forward
    (it points a LoRA bank's rows at an adapter)."""
    backbone = model.get_decoder() if hasattr(model, "get_decoder") else model.model
    vectors: list[list[float]] = []
    for start in range(0, len(inputs), EMBED_BATCH):
        batch = inputs[start : start + EMBED_BATCH]
        ids, mask = right_padded(batch, 0, device)
        if select is not None:
            select(len(batch))
        hidden = backbone(input_ids=ids, attention_mask=mask, use_cache=False).last_hidden_state
        weights = mask.unsqueeze(-1).to(hidden.dtype)  # hidden: [B, T, H]
        pooled = (hidden * weights).sum(dim=1) / weights.sum(dim=1).clamp(min=1)
        pooled = torch.nn.functional.normalize(pooled.float(), dim=-1)
        vectors.extend(pooled.cpu().tolist())
    return vectors


@torch.inference_mode()
def embed_encoder(
    model: Any, inputs: list[list[int]], device: torch.device, pooling: str
) -> list[list[float]]:
    """Embeddings from an encoder: its token states pooled as its sentence-transformers
    config says (mean, cls, max, lasttoken), L2-normalised; right-padded and masked."""
    vectors: list[list[float]] = []
    pad = getattr(model.config, "pad_token_id", None) or 0
    for start in range(0, len(inputs), EMBED_BATCH):
        batch = inputs[start : start + EMBED_BATCH]
        ids, mask = right_padded(batch, pad, device)
        hidden = model(input_ids=ids, attention_mask=mask).last_hidden_state.float()  # [B, T, H]
        keep = mask.unsqueeze(-1).to(hidden.dtype)
        if pooling == "cls":
            pooled = hidden[:, 0]
        elif pooling == "lasttoken":
            last = mask.sum(dim=1) - 1
            pooled = hidden[torch.arange(len(batch), device=device), last]
        elif pooling == "max":
            pooled = hidden.masked_fill(keep == 0, float("-inf")).max(dim=1).values
        else:
            pooled = (hidden * keep).sum(dim=1) / keep.sum(dim=1).clamp(min=1)
        pooled = torch.nn.functional.normalize(pooled, dim=-1)
        vectors.extend(pooled.cpu().tolist())
    return vectors


def error_event(message: str, status: int) -> TokenEvent:
    return TokenEvent(finish_reason=FinishReason.ERROR, error=message, status=status)


def weight_bytes(model: Any) -> int:
    seen: set[int] = set()
    total = 0
    for tensor in [*model.parameters(), *model.buffers()]:
        if tensor.data_ptr() in seen:
            continue
        seen.add(tensor.data_ptr())
        total += tensor.numel() * tensor.element_size()
    return total


class LocalEngine:
    """The engine protocol over one device loop: what the API layer calls."""

    def __init__(self, loop: DeviceLoop) -> None:
        self.device_loop = loop

    async def generate(self, request: GenerateRequest) -> AsyncIterator[TokenEvent]:
        """Streams a request's events. An error before any output raises EngineError (with
        the HTTP status to use); later errors arrive as the final event."""
        request.sampling.validate()
        mailbox = Mailbox(asyncio.get_running_loop(), self.device_loop.notifier)
        self.device_loop.submit(
            Pending(request.model, mailbox, request=request, keep_alive=request.keep_alive)
        )
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
        self.device_loop.submit(
            Pending(request.model, mailbox, request=request, keep_alive=request.keep_alive)
        )
        event = await mailbox.get()
        if event.error:
            raise engine_error(event)
        return event

    async def load(self, model: str, keep_alive: KeepAlive = DEFAULT) -> float:
        """Makes a model resident; returns the seconds spent loading (0 if it was)."""
        mailbox = Mailbox(asyncio.get_running_loop(), self.device_loop.notifier)
        self.device_loop.submit(Pending(model, mailbox, keep_alive=keep_alive))
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


def engine_error(event: TokenEvent) -> EngineError:
    error = EngineBusy(event.error or "") if event.status == 503 else EngineError(event.error or "")
    error.status = event.status
    return error
