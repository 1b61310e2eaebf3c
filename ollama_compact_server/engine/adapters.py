"""The LoRA adapters of one resident model: device slots with reference counts, a host
cache of idle adapters, and loads on a helper thread, all least recently used first."""

from __future__ import annotations

import logging
import time
from collections import OrderedDict, deque
from collections.abc import Callable, Collection
from concurrent.futures import Executor, Future
from dataclasses import dataclass, field

from ..modeling.lora import LoraBank, LoraError, LoraWeights

log = logging.getLogger(__name__)


@dataclass(frozen=True, slots=True)
class AdapterRef:
    """An adapter as a request names it: its model name and the identity of its weights
    (re-creating a name with new weights gives a new key, so nothing stale is served)."""

    name: str
    key: str
    files: tuple[tuple[str, str], ...] = ()  # (filename, blob digest)


@dataclass(frozen=True, slots=True)
class Target:
    """Where a request runs: the resident model, and the adapter on top of it if any."""

    model: str
    adapter: AdapterRef | None = None


AdapterLoader = Callable[[AdapterRef], LoraWeights]


@dataclass(slots=True)
class _Slot:
    key: str | None = None
    name: str = ""
    refs: int = 0
    last_used: float = 0.0
    nbytes: int = 0


@dataclass(slots=True)
class AdapterStats:
    loads: int = 0
    # the latest timings: disk -> host memory (on the loader thread), host -> device slot
    load_seconds: deque[float] = field(default_factory=lambda: deque(maxlen=1000))
    place_seconds: deque[float] = field(default_factory=lambda: deque(maxlen=1000))
    device_evictions: int = 0
    host_evictions: int = 0


class AdapterSlots:
    """At most ``device_slots`` adapters sit in the model's LoRA bank; an adapter in use is
    never evicted. Idle adapters stay in host memory (at most ``host_slots`` beyond those
    on the device) until they are needed again or pushed out."""

    def __init__(
        self,
        make_bank: Callable[[int], LoraBank],
        loader: AdapterLoader,
        executor: Executor,
        *,
        device_slots: int,
        host_slots: int,
        on_loaded: Callable[[], None] | None = None,
    ) -> None:
        self.make_bank = make_bank
        self.loader = loader
        self.executor = executor
        self.host_slots = host_slots
        self.on_loaded = on_loaded  # wakes the device loop when a load finishes
        self.bank: LoraBank | None = None
        self.slots = [_Slot() for _ in range(device_slots)]
        self.host: OrderedDict[str, LoraWeights] = OrderedDict()
        self.loading: dict[str, tuple[Future[LoraWeights], float]] = {}
        # key -> the adapter names whose requests brought it here (identical adapters share
        # a key), and name -> the key its newest request named: a key none of its names
        # points at any more is stale (re-created) and goes as soon as nothing uses it
        self.names: dict[str, set[str]] = {}
        self.current: dict[str, str] = {}
        self.stats = AdapterStats()

    # ------------------------------------------------------------ checks

    def slot_of(self, key: str) -> int:
        for index, slot in enumerate(self.slots):
            if slot.key == key:
                return index
        return -1

    def can_acquire(self, ref: AdapterRef) -> bool:
        """True when ``ref`` can take a device slot now: resident, or loaded in host memory
        with a free or idle slot to go in. A check only: loads start in ``arrive`` and
        ``poll``."""
        if self.slot_of(ref.key) >= 0:
            return True
        return ref.key in self.host and any(slot.refs == 0 for slot in self.slots)

    def arrive(self, ref: AdapterRef) -> None:
        """A new request names ``ref``: whatever sits here under its name with other weights
        (the name was re-created) is stale, and goes as soon as nothing uses it. Starts
        loading ``ref``."""
        old = self.current.get(ref.name)
        if old is not None and old != ref.key:
            log.info("adapter %s was re-created: its old weights go once idle", ref.name)
        self.current[ref.name] = ref.key
        self.prefetch(ref)  # the worker's next poll drops the old weights

    def stale(self, key: str) -> bool:
        """True when every name that brought ``key`` here now names other weights."""
        names = self.names.get(key)
        if not names:
            return False
        return all(self.current.get(n, key) != key for n in names)

    def prefetch(self, ref: AdapterRef) -> None:
        self.names.setdefault(ref.key, set()).add(ref.name)
        if ref.key in self.host or ref.key in self.loading or self.slot_of(ref.key) >= 0:
            return
        log.info("loading adapter %s", ref.name)
        future = self.executor.submit(self.loader, ref)
        self.loading[ref.key] = (future, time.perf_counter())
        if self.on_loaded is not None:
            wake = self.on_loaded
            future.add_done_callback(lambda _: wake())

    # ------------------------------------------------------------ taking and giving back

    def acquire(self, ref: AdapterRef) -> int:
        """The device slot holding ``ref``, loading it there if needed (call can_acquire
        first). Raises LoraError if the adapter does not fit this model."""
        index = self.slot_of(ref.key)
        if index < 0:
            index = self._free_slot()
            weights = self.host[ref.key]
            bank = self._bank()
            slot = self.slots[index]
            if slot.key is not None:
                log.info("adapter %s leaves the device (LRU)", slot.name)
                self.stats.device_evictions += 1
            slot.key, slot.name, slot.refs = None, "", 0
            started = time.perf_counter()
            bank.load(index, weights)  # raises LoraError
            self.stats.place_seconds.append(time.perf_counter() - started)
            slot.key, slot.name, slot.nbytes = ref.key, ref.name, weights.nbytes
        slot = self.slots[index]
        slot.refs += 1
        slot.last_used = time.monotonic()
        if ref.key in self.host:
            self.host.move_to_end(ref.key)
        return index

    def release(self, index: int) -> None:
        slot = self.slots[index]
        slot.refs = max(0, slot.refs - 1)
        slot.last_used = time.monotonic()
        if slot.key is None:
            return
        if slot.key in self.host:  # host memory goes least recently *used* first too
            self.host.move_to_end(slot.key)
        if slot.refs == 0 and self.stale(slot.key):
            self.host.pop(slot.key, None)
            self._clear(index)
            self._forget()

    def _free_slot(self) -> int:
        free = [i for i, s in enumerate(self.slots) if s.key is None]
        if free:
            return free[0]
        idle = [i for i, s in enumerate(self.slots) if s.refs == 0]
        if not idle:
            raise LoraError("every adapter slot is in use")  # callers check can_acquire first
        return min(idle, key=lambda i: self.slots[i].last_used)

    def _bank(self) -> LoraBank:
        if self.bank is None:
            self.bank = self.make_bank(len(self.slots))
        return self.bank

    # ------------------------------------------------------------ housekeeping

    def poll(self, wanted: Collection[AdapterRef]) -> dict[str, tuple[str, int]]:
        """Housekeeping once per step: starts loading what ``wanted`` (the adapters waiting
        work names) lacks, collects finished loads into host memory and trims the host
        cache (keeping what ``wanted`` needs); returns {key: (error, HTTP status)} for loads
        that failed (400: the adapter's own fault, such as NaN weights)."""
        for ref in wanted:  # e.g. pushed out of host memory while its request waited
            self.prefetch(ref)
        failed: dict[str, tuple[str, int]] = {}
        for key, (future, started) in list(self.loading.items()):
            if not future.done():
                continue
            del self.loading[key]
            try:
                weights = future.result()
            except LoraError as exc:
                failed[key] = (str(exc), 400)
                continue
            except Exception as exc:
                log.exception("loading an adapter failed")
                failed[key] = (f"loading the adapter failed: {exc.__class__.__name__}", 500)
                continue
            self.stats.loads += 1
            self.stats.load_seconds.append(time.perf_counter() - started)
            self.host[key] = weights
        keys = {ref.key for ref in wanted}
        self._purge(keys)
        self._trim(keys)
        return failed

    def _purge(self, wanted: set[str]) -> None:
        """Drops stale adapters from idle device slots, and from host memory unless a
        waiting request (``wanted``) still names them."""
        for index, slot in enumerate(self.slots):
            if slot.key is not None and slot.refs == 0 and self.stale(slot.key):
                self._clear(index)
        for key in [k for k in self.host if k not in wanted and self.stale(k)]:
            if self.slot_of(key) < 0:
                del self.host[key]
        self._forget()

    def _clear(self, index: int) -> None:
        if self.bank is not None:
            self.bank.clear(index)
        self.slots[index] = _Slot()

    def _forget(self) -> None:
        """Forgets the names of keys that are nowhere any more."""
        here = set(self.host) | set(self.loading) | {s.key for s in self.slots if s.key}
        for key in set(self.names) - here:
            del self.names[key]
        named = set().union(*self.names.values()) if self.names else set()
        for name in set(self.current) - named:
            del self.current[name]

    def _trim(self, wanted: set[str]) -> None:
        on_device = {s.key for s in self.slots if s.key is not None}
        idle = [k for k in self.host if k not in on_device and k not in wanted]
        while len(idle) > self.host_slots:
            key = idle.pop(0)  # least recently used first
            del self.host[key]
            self.stats.host_evictions += 1
        self._forget()

    def forget(self, name: str) -> None:
        """``name`` left the registry: the weights it named go as soon as nothing uses them
        (unless another adapter model shares them)."""
        if name in self.current:
            self.current[name] = ""  # names no weights, so what it named is stale
            self._purge(set())

    def drop(self, key: str) -> None:
        """Forgets an adapter (an unload request): its idle device slot and host copy."""
        index = self.slot_of(key)
        if index >= 0 and self.slots[index].refs == 0:
            self._clear(index)
        if index < 0 or self.slots[index].key is None:
            self.host.pop(key, None)
        self._forget()

    def resident(self) -> list[tuple[str, int, bool]]:
        """(name, bytes, in use) of the adapters on the device: each name that serves a
        slot's weights (identical adapters share a slot), its old weights while still in
        use after a re-create."""
        out = []
        for slot in self.slots:
            if slot.key is None:
                continue
            names = frozenset(self.names.get(slot.key, ()))  # one copy: the engine may add
            live = sorted(n for n in names if self.current.get(n, slot.key) == slot.key)
            for name in live or [slot.name]:
                out.append((name, slot.nbytes, slot.refs > 0))
        return out

    @property
    def nbytes(self) -> int:
        return self.bank.nbytes if self.bank is not None else 0
