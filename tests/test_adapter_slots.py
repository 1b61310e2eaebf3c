"""AdapterSlots on its own, with a fake LoRA bank and loads that finish at once: least
recently used idle slots go first, a slot in use is never taken, requests beyond the limit
wait, the host cache keeps its limit oldest first, re-created names drop their old weights."""

from __future__ import annotations

import itertools
from collections.abc import Callable
from concurrent.futures import Executor, Future
from types import SimpleNamespace
from typing import Any

import pytest
import torch

from ollama_compact_server.engine import adapters as adapters_module
from ollama_compact_server.engine.adapters import AdapterRef, AdapterSlots
from ollama_compact_server.modeling.lora import LoraError, LoraWeights


class InlineExecutor(Executor):
    """Runs each submitted call at once, on the caller's thread."""

    def submit(self, fn: Callable[..., Any], /, *args: Any, **kwargs: Any) -> Future[Any]:
        future: Future[Any] = Future()
        try:
            future.set_result(fn(*args, **kwargs))
        except Exception as exc:
            future.set_exception(exc)
        return future


class FakeBank:
    """Records what the slots asked of the device."""

    def __init__(self, slots: int) -> None:
        self.held: list[str | None] = [None] * slots
        self.log: list[tuple[str, int, str | None]] = []
        self.nbytes = 0

    def load(self, slot: int, weights: LoraWeights) -> None:
        if weights.key.startswith("bad"):
            raise LoraError("does not fit")
        self.held[slot] = weights.key
        self.log.append(("load", slot, weights.key))

    def clear(self, slot: int) -> None:
        self.held[slot] = None
        self.log.append(("clear", slot, None))


@pytest.fixture(autouse=True)
def clock(monkeypatch: pytest.MonkeyPatch) -> None:
    """A clock that ticks on every reading: "least recently used" never ties."""
    ticks = itertools.count(1)
    fake = SimpleNamespace(monotonic=lambda: float(next(ticks)), perf_counter=lambda: 0.0)
    monkeypatch.setattr(adapters_module, "time", fake)


def ref(name: str, version: int = 1) -> AdapterRef:
    return AdapterRef(f"{name}:latest", f"{name}-v{version}")


def make(device: int, host: int) -> tuple[AdapterSlots, FakeBank, list[str]]:
    banks: list[FakeBank] = []
    loads: list[str] = []

    def make_bank(n: int) -> Any:
        banks.append(FakeBank(n))
        return banks[0]

    def loader(r: AdapterRef) -> LoraWeights:
        loads.append(r.key)
        return LoraWeights(r.key, 4, 1.0, {"p": (torch.zeros(4, 2), torch.zeros(2, 4))})

    slots = AdapterSlots(make_bank, loader, InlineExecutor(), device_slots=device, host_slots=host)
    slots._bank()
    return slots, banks[0], loads


def ready(slots: AdapterSlots, r: AdapterRef, *waiting: AdapterRef) -> bool:
    """What the worker does for a waiting request: check, and collect finished loads."""
    if slots.can_acquire(r):
        return True
    slots.poll([r, *waiting])
    return slots.can_acquire(r)


def take(slots: AdapterSlots, r: AdapterRef) -> int:
    slots.arrive(r)
    assert ready(slots, r)
    return slots.acquire(r)


def names_on_device(slots: AdapterSlots) -> list[str]:
    return sorted(name.split(":")[0] for name, _, _ in slots.resident())


def test_the_least_recently_used_idle_slot_goes_first() -> None:
    slots, bank, _ = make(device=2, host=4)
    a, b, c = ref("a"), ref("b"), ref("c")
    sa, sb = take(slots, a), take(slots, b)
    slots.release(sb)  # b idle first ...
    slots.release(sa)  # ... a idle since later
    assert take(slots, c) == sb  # c takes b's slot
    assert bank.held == ["a-v1", "c-v1"] if sa == 0 else ["c-v1", "a-v1"]
    assert slots.stats.device_evictions == 1
    assert names_on_device(slots) == ["a", "c"]
    # b is still in host memory: it comes back without a load from disk
    slots.release(slots.slot_of("c-v1"))
    assert slots.can_acquire(b) and take(slots, b) == sa  # a is now the oldest idle slot
    assert slots.stats.loads == 3 and slots.stats.device_evictions == 2


def test_a_slot_in_use_is_never_taken_and_requests_beyond_the_limit_wait() -> None:
    slots, bank, _ = make(device=2, host=4)
    a, b, c = ref("a"), ref("b"), ref("c")
    sa, sb = take(slots, a), take(slots, b)
    slots.arrive(c)
    for _ in range(3):  # every slot in use: c waits (loaded and kept in host memory)
        assert not ready(slots, c)
    assert "c-v1" in slots.host and slots.stats.device_evictions == 0
    assert bank.held.count(None) == 0 and "c-v1" not in bank.held
    taken = slots.acquire(a)  # a second request for a resident adapter shares its slot
    assert taken == sa and slots.slots[sa].refs == 2
    slots.release(sa)
    assert not ready(slots, c)  # a is still in use by the other request
    slots.release(sb)
    assert ready(slots, c) and slots.acquire(c) == sb
    assert slots.slot_of("a-v1") == sa and slots.slots[sa].refs == 1


def test_the_host_cache_keeps_its_limit_least_recently_used_first() -> None:
    slots, _, loads = make(device=1, host=2)
    for name in "abcd":
        slots.release(take(slots, ref(name)))
    slots.poll([])
    # d on the device; of the idle a, b, c only the two most recent stay
    assert list(slots.host) == ["b-v1", "c-v1", "d-v1"]
    assert slots.stats.host_evictions == 1 and slots.stats.device_evictions == 3
    # b used again (from host memory, no load): c becomes the oldest idle one
    slots.release(take(slots, ref("b")))
    slots.release(take(slots, ref("e")))
    slots.poll([])
    assert sorted(slots.host) == ["b-v1", "d-v1", "e-v1"]
    assert loads == ["a-v1", "b-v1", "c-v1", "d-v1", "e-v1"]
    assert slots.stats.host_evictions == 2


def test_host_recency_counts_from_when_a_request_let_go() -> None:
    """An adapter held by a long request was used more recently than one acquired after
    it but released before it."""
    slots, _, _ = make(device=2, host=1)
    sa = take(slots, ref("a"))  # a long request
    slots.release(take(slots, ref("b")))  # a short one, done first
    slots.release(sa)
    slots.release(take(slots, ref("c")))  # c and d push a and b off the device
    slots.release(take(slots, ref("d")))
    slots.poll([])
    assert names_on_device(slots) == ["c", "d"]
    assert list(slots.host) == ["a-v1", "c-v1", "d-v1"]  # b, the older, left


def test_a_waiting_request_keeps_its_adapter_in_host_memory() -> None:
    slots, _, loads = make(device=1, host=0)
    a, b = ref("a"), ref("b")
    sa = take(slots, a)
    slots.arrive(b)
    assert not ready(slots, b)
    for _ in range(3):
        slots.poll([b])
    assert "b-v1" in slots.host and loads == ["a-v1", "b-v1"]
    slots.release(sa)
    assert ready(slots, b) and slots.acquire(b) == sa


def test_an_adapter_that_does_not_fit_leaves_the_slots_usable() -> None:
    slots, _, _ = make(device=1, host=1)
    bad = AdapterRef("bad:latest", "bad-v1")
    slots.arrive(bad)
    assert ready(slots, bad)
    with pytest.raises(LoraError):
        slots.acquire(bad)
    assert slots.resident() == [] and slots.slots[0].refs == 0
    assert take(slots, ref("a")) == 0


def test_a_recreated_idle_adapter_leaves_the_device_and_host_memory() -> None:
    slots, bank, _ = make(device=2, host=4)
    old, new = ref("style", 1), ref("style", 2)
    slots.release(take(slots, old))
    slots.release(take(slots, ref("other")))
    slots.arrive(new)
    slots.poll([new])  # the worker's next step
    assert "style-v1" not in slots.host and slots.slot_of("style-v1") < 0
    assert ("clear", 0, None) in bank.log
    assert slots.acquire(new) == 0
    assert names_on_device(slots) == ["other", "style"]
    assert slots.stats.device_evictions == 0  # dropped, not pushed out
    assert set(slots.names) == {"style-v2", "other-v1"}


def test_a_recreated_adapter_in_use_goes_when_its_requests_finish() -> None:
    slots, bank, _ = make(device=2, host=4)
    old, new = ref("style", 1), ref("style", 2)
    s_old = take(slots, old)
    s_old2 = slots.acquire(old)  # two running requests on the old weights
    s_new = take(slots, new)
    slots.poll([])
    assert slots.slot_of("style-v1") == s_old and "style-v1" in slots.host
    assert names_on_device(slots) == ["style", "style"]  # both really sit on the device
    slots.release(s_old)
    assert slots.slot_of("style-v1") == s_old  # one request still runs on them
    slots.release(s_old2)
    assert slots.slot_of("style-v1") < 0 and "style-v1" not in slots.host
    assert bank.held[s_old] is None and bank.held[s_new] == "style-v2"
    assert names_on_device(slots) == ["style"]


def test_a_request_for_the_old_weights_still_runs_after_a_recreate() -> None:
    """A request routed before the re-create waits for the old weights: they stay in host
    memory for it, and go once it is done."""
    slots, _, _ = make(device=1, host=4)
    old, new, other = ref("style", 1), ref("style", 2), ref("other")
    s = take(slots, other)  # the only slot is busy: the old request waits
    slots.arrive(old)
    assert not ready(slots, old)
    slots.arrive(new)  # re-created meanwhile
    assert not ready(slots, new, old)
    assert "style-v1" in slots.host  # wanted by the waiting request
    slots.release(s)
    assert ready(slots, old, new) and slots.acquire(old) == 0
    slots.release(0)  # done: the old weights go at once
    assert slots.slot_of("style-v1") < 0 and "style-v1" not in slots.host
    assert ready(slots, new) and slots.acquire(new) == 0


def test_checking_a_slot_starts_nothing_and_the_step_loads_what_waits() -> None:
    slots, _, loads = make(device=1, host=0)
    a = ref("a")
    for _ in range(3):
        assert not slots.can_acquire(a)  # a check, not a load
    assert loads == [] and not slots.loading
    slots.poll([a])  # housekeeping: a waiting request's adapter is loaded
    assert loads == ["a-v1"] and slots.can_acquire(a)


def test_identical_adapters_share_a_slot_and_are_listed_by_each_name() -> None:
    slots, _, loads = make(device=2, host=2)
    first = AdapterRef("first:latest", "same")
    second = AdapterRef("second:latest", "same")
    assert take(slots, first) == take(slots, second) == 0
    assert loads == ["same"]
    assert names_on_device(slots) == ["first", "second"]
    # re-creating one of them leaves the weights to the other
    slots.release(0)
    slots.release(0)
    slots.arrive(AdapterRef("first:latest", "changed"))
    slots.poll([AdapterRef("first:latest", "changed")])
    assert slots.slot_of("same") == 0 and names_on_device(slots) == ["second"]
