"""The models resident on one device: loads on a helper thread beside the loop, eviction
(least recently used, by count and by memory budget), keep-alive expiry and unloads."""

from __future__ import annotations

import logging
import threading
import time
from collections import deque
from concurrent.futures import Future
from typing import Any

from ..threads import FreshThreadExecutor
from .adapters import AdapterSlots, Target
from .config import EngineConfig, ModelSource
from .faults import release_memory
from .inbox import Pending
from .runner import ModelRunner
from .stats import EngineStats
from .types import EngineError, error_event
from .worker import ModelWorker

log = logging.getLogger(__name__)


class Residency:
    """Which models are resident (``workers``), which are loading, and the requests that
    wait for a load. Runs on the device thread, except ``_load`` (the loader thread)."""

    def __init__(
        self,
        config: EngineConfig,
        models: ModelSource,
        stats: EngineStats,
        wakeup: threading.Event,
    ) -> None:
        self.config = config
        self.models = models
        self.stats = stats
        self.wakeup = wakeup
        self.workers: dict[str, ModelWorker] = {}
        self.pending: dict[str, deque[Pending]] = {}
        self.loads: dict[str, Future[ModelWorker]] = {}
        self.loader = FreshThreadExecutor("ocs-load")  # fresh threads: see threads.py
        # adapters load on their own thread: never behind a minutes-long model load
        self.adapter_loader = FreshThreadExecutor("ocs-lora")
        self.stopping = False

    def shutdown(self) -> None:
        self.stopping = True
        self.loader.shutdown(wait=False, cancel_futures=True)
        self.adapter_loader.shutdown(wait=False, cancel_futures=True)

    # ------------------------------------------------------------ loading

    def wait_for_load(self, item: Pending) -> None:
        """``item`` waits until its model is resident; its load starts if it can."""
        self.pending.setdefault(item.model, deque()).append(item)
        self._start_load(item.model)

    def _start_load(self, name: str) -> None:
        if name in self.loads or self.stopping:
            return
        if not self._make_room(name):
            return  # waits until a resident model goes idle
        log.info("loading %s", name)
        self.loads[name] = self.loader.submit(self._load, name)

    def _load(self, name: str) -> ModelWorker:
        """Runs on the loader thread, beside the device loop: other models keep streaming."""
        config = self.config
        started = time.perf_counter()
        loaded = self.models.load(name)
        slots, capacity = config.slots, config.capacity
        if loaded.pooling is not None:  # an encoder: no KV cache, embeddings only
            context = getattr(loaded.model.config, "max_position_embeddings", None)
            slots, capacity = 0, int(context or capacity)
        elif self.models.plan is not None:
            available = None
            if config.memory_budget is not None:
                used = sum(w.memory for w in list(self.workers.values()))
                available = config.memory_budget - used
            slots, capacity = self.models.plan(name, loaded, available)
        runner = ModelRunner(
            loaded.model,
            slots=slots,
            capacity=capacity,
            dtype=loaded.dtype or config.dtype,
            device=config.device,
        )
        adapters = None
        if self.models.load_adapter is not None and loaded.pooling is None:
            adapters = AdapterSlots(
                runner.attach_lora,
                self.models.load_adapter,
                self.adapter_loader,
                device_slots=config.max_loras,
                host_slots=config.max_cpu_loras,
                on_loaded=self.wakeup.set,
            )
        worker = ModelWorker(name, loaded, runner, config.prefill_chunk, self.stats, adapters)
        worker.own_memory = runner.cache.nbytes + weight_bytes(loaded.model)
        worker.load_time = time.perf_counter() - started
        worker.keep_alive = config.keep_alive
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

    def collect(self) -> tuple[bool, list[tuple[ModelWorker, Pending]]]:
        """Finished loads become resident; the requests that waited for a failed load end
        with its error. Returns (anything happened, the requests now ready for a worker);
        the caller queues them, then calls :meth:`retry`."""
        worked = False
        ready: list[tuple[ModelWorker, Pending]] = []
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
                message = f"loading model '{name}' failed: {exc.__class__.__name__}"
                for item in waiting:
                    item.mailbox.put(error_event(message, 500))
                continue
            self.workers[name] = worker
            ready.extend((worker, item) for item in waiting)
        return worked, ready

    def retry(self) -> None:
        """Starts the loads that waited for room, if there is room now. Called once the
        requests of newly loaded models are in their workers: a model whose requests are
        not yet queued looks idle, and making room here would evict it under them."""
        for name in list(self.pending):
            if name not in self.loads and self.pending[name]:
                self._start_load(name)

    # ------------------------------------------------------------ making room

    def _make_room(self, name: str) -> bool:
        """Evicts idle models, least recently used first, until ``name`` fits by count and
        by memory; a model in use is never evicted. False if it must wait."""
        budget = self.config.memory_budget
        need = self.models.estimate(name) if self.models.estimate is not None else 0
        if budget is not None and need > budget:
            for item in self.pending.pop(name, deque()):
                item.mailbox.put(
                    error_event(
                        f"model '{name}' needs about {need >> 20} MiB but the memory budget is "
                        f"{budget >> 20} MiB",
                        400,
                    )
                )
            return False

        def fits() -> bool:
            count_ok = len(self.workers) + len(self.loads) < self.config.max_loaded_models
            used = sum(w.memory for w in self.workers.values())
            return count_ok and (budget is None or used + need <= budget)

        while not fits():
            idle = [w for w in self.workers.values() if not w.busy]
            if not idle:
                return False
            self.evict(min(idle, key=lambda w: w.last_used), "to make room for " + name)
        return True

    def evict(self, worker: ModelWorker, why: str) -> None:
        del self.workers[worker.name]
        self.stats.evictions += 1
        if worker.adapters is not None:  # keep its adapter counts: /metrics counters only grow
            self.stats.adapter_loads += worker.adapters.stats.loads
            self.stats.adapter_device_evictions += worker.adapters.stats.device_evictions
            self.stats.adapter_host_evictions += worker.adapters.stats.host_evictions
        release_memory(self.config.device)
        log.info("unloaded %s (%s)", worker.name, why)

    def expire(self) -> None:
        now = time.monotonic()
        for worker in list(self.workers.values()):
            expires = worker.expires_at
            if expires is not None and now >= expires:
                self.evict(worker, "keep-alive expired")

    def unload(self, name: str) -> None:
        """An unload request: a model goes as soon as it is idle; an adapter model's weights
        leave their base's slots (and, once the name is gone from the registry, whatever
        it named leaves once idle)."""
        target = Target(name)
        if self.models.resolve is not None:
            try:
                target = self.models.resolve(name)
            except Exception:  # gone from the registry (deleted)
                for resident in self.workers.values():
                    if resident.adapters is not None:
                        resident.adapters.forget(name)
        if target.adapter is not None:
            worker = self.workers.get(target.model)
            if worker is not None and worker.adapters is not None:
                worker.adapters.drop(target.adapter.key)
            return
        worker = self.workers.get(target.model)
        if worker is not None:
            worker.keep_alive = 0.0  # unloads as soon as it is idle


def weight_bytes(model: Any) -> int:
    seen: set[int] = set()
    total = 0
    for tensor in [*model.parameters(), *model.buffers()]:
        if tensor.data_ptr() in seen:
            continue
        seen.add(tensor.data_ptr())
        total += tensor.numel() * tensor.element_size()
    return total
