"""Reuse of what the KV cache already holds: a request whose prompt begins with tokens some
slot has cached (the previous turns of the same chat, a shared system prompt, the same
few-shot header) skips prefilling them.

A slot keeps its contents when its sequence leaves (it becomes idle, not empty). A new
request takes over the idle slot with the longest common prefix (llama.cpp's per-slot
``cache_prompt``), or copies the prefix from a running sequence's slot (a system prompt
shared by concurrent chats): copying K/V is far cheaper than computing them. Cached K/V
depend on the weights that made them, so a match needs the same adapter key (the digest of
the adapter's files: a re-created adapter never reuses stale entries); the model is the
worker's own. Idle contents go least recently used first when slots are needed.
"""

from __future__ import annotations

import time
from collections.abc import Iterable
from dataclasses import dataclass, field

from .kv import SlotKVCache

MIN_COPY = 16  # shortest prefix worth copying from another sequence's slot


@dataclass(slots=True)
class Cached:
    """What an idle slot holds: K/V of ``tokens`` at positions 0.., made with ``adapter``."""

    tokens: list[int]
    adapter: str
    used: float = field(default_factory=time.monotonic)


@dataclass(frozen=True, slots=True)
class Reuse:
    """A plan: take ``length`` positions from ``source`` (an idle slot, or a running one to
    copy from); source -1 and length 0 when nothing matches."""

    source: int = -1
    length: int = 0
    running: bool = False


NO_REUSE = Reuse()


def common_prefix(a: list[int], b: list[int]) -> int:
    """Length of the longest common prefix of two token lists."""
    n = min(len(a), len(b))
    if a[:n] == b[:n]:
        return n
    low, high = 0, n  # a[:low] == b[:low], a[:high] != b[:high]
    while high - low > 1:
        mid = (low + high) // 2
        if a[:mid] == b[:mid]:
            low = mid
        else:
            high = mid
    return low


class PrefixCache:
    """The idle slots' contents of one model's KV cache, and the moves that reuse them. The
    running sequences stay in slots 0..n-1 (the cache's layout); idle slots are the rest."""

    def __init__(self, cache: SlotKVCache) -> None:
        self.cache = cache
        self.idle: dict[int, Cached] = {}
        self.hits = 0  # requests that reused cached positions
        self.reused = 0  # positions reused, in all

    def find(
        self, tokens: list[int], adapter: str, running: Iterable[tuple[int, list[int], str]]
    ) -> Reuse:
        """The best prefix of ``tokens`` held anywhere (no side effects). ``running``: (slot,
        cached tokens, adapter) of the sequences in slots now. At least one token is left to
        compute, so the request gets the logits of its last prompt token."""
        limit = len(tokens) - 1
        best = NO_REUSE
        for slot, entry in self.idle.items():
            if entry.adapter != adapter:
                continue
            length = min(common_prefix(entry.tokens, tokens), limit)
            if length > best.length or (length == best.length > 0 and slot == self.cache.used):
                best = Reuse(slot, length)
        for slot, held, owner in running:
            if owner != adapter:
                continue
            length = min(common_prefix(held, tokens), limit)
            if length >= MIN_COPY and length > best.length:
                best = Reuse(slot, length, running=True)
        return best

    def allocate(self, plan: Reuse) -> int:
        """Takes the next slot (the cache's ``used``) for a new sequence with ``plan``'s
        positions in it: the chosen idle slot's contents are swapped there, or the prefix is
        copied from a running slot. Contents the slot held are kept elsewhere when an older
        idle entry can make room, else forgotten."""
        target = self.cache.used
        if plan.length and not plan.running and plan.source != target:
            moving = self.idle.pop(plan.source)
            here = self.idle.pop(target, None)
            length = max(len(moving.tokens), len(here.tokens) if here else 0)
            self.cache.swap(plan.source, target, length)
            if here is not None:
                self.idle[plan.source] = here
        elif plan.length and not plan.running:
            self.idle.pop(target, None)
        else:
            self._make_room(target)
            if plan.length:
                self.cache.move(plan.source, target, plan.length)
        slot = self.cache.allocate()
        if slot != target:  # the cache's own layout changed: nothing here is valid
            raise RuntimeError("KV slot layout out of step with the prefix cache")
        if plan.length:
            self.hits += 1
            self.reused += plan.length
        return slot

    def _make_room(self, target: int) -> None:
        """The next slot will be overwritten: its contents move to the least recently used
        other idle slot if they are newer, else they are forgotten."""
        here = self.idle.pop(target, None)
        if here is None:
            return
        others = [s for s in range(self.cache.used + 1, self.cache.slots)]
        free = [s for s in others if s not in self.idle]
        if free:
            spot = free[0]
        else:
            older = [s for s in others if self.idle[s].used < here.used]
            if not older:
                return
            spot = min(older, key=lambda s: self.idle[s].used)
            del self.idle[spot]
        self.cache.move(target, spot, len(here.tokens))
        self.idle[spot] = here

    def release(self, slot: int, tokens: list[int], adapter: str, mover_length: int) -> int:
        """A sequence in ``slot`` leaves, its K/V holding ``tokens``. The last running
        sequence (``mover_length`` cached positions) takes its slot, by a swap, so the
        leaver's contents stay cached in the slot that becomes idle. Returns the slot the
        last running sequence moved from (the caller re-points it), or -1 if none moved."""
        last = self.cache.used - 1
        moved_from = self.cache.free(slot)
        if moved_from is not None:
            self.cache.swap(slot, moved_from, max(len(tokens), mover_length))
            idle_slot = moved_from
        else:
            idle_slot = slot
        if idle_slot != last:
            raise RuntimeError("KV slot layout out of step with the prefix cache")
        if tokens:
            self.idle[idle_slot] = Cached(tokens, adapter)
        else:
            self.idle.pop(idle_slot, None)
        return moved_from if moved_from is not None else -1

    def clear(self) -> None:
        self.idle.clear()
