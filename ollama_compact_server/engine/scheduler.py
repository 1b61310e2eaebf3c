"""Plans the step of one resident model: which running rows decode, which waiting prompts
are admitted (a KV slot, the cached prefix they reuse, an adapter slot), and which long
prompt gets its next chunk. Resources are checked with side-effect-free ``can_*`` methods
before they are taken; nothing here runs the model."""

from __future__ import annotations

import logging
import time
from collections import deque
from dataclasses import dataclass, field, replace

from ..modeling.lora import LoraError
from .adapters import AdapterSlots
from .faults import adapter_error
from .prefix import MIN_COPY, NO_REUSE, PrefixCache, Reuse
from .runner import ModelRunner
from .sequence import AdapterWait, Sequence, wants_prompt_scores
from .stats import EngineStats

log = logging.getLogger(__name__)


@dataclass(slots=True)
class StepPlan:
    """One step of one model: ``decode`` the running rows (in slot order), and either
    ``prefill`` whole prompts admitted now (one forward) or the next ``chunk`` of one long
    prompt. ``failed`` are admissions that could not go on (their adapter does not fit),
    each with its error."""

    decode: list[Sequence]
    prefill: list[Sequence] = field(default_factory=list)
    chunk: Sequence | None = None
    failed: list[tuple[Sequence, str, int]] = field(default_factory=list)  # error, status


class Scheduler:
    """The sequences of one resident model: waiting, prefilling (one at a time, in
    chunks), running; and the work that waits for an adapter slot."""

    def __init__(
        self,
        runner: ModelRunner,
        prefill_chunk: int,
        stats: EngineStats,
        adapters: AdapterSlots | None = None,
    ) -> None:
        self.cache = runner.cache
        self.prefill_chunk = prefill_chunk
        self.stats = stats
        self.adapters = adapters
        self.waiting: deque[Sequence] = deque()
        self.prefilling: Sequence | None = None
        self.running: list[Sequence] = []
        self.by_slot: dict[int, Sequence] = {}
        self.prefix = PrefixCache(runner.cache)
        self.vision = runner.vision  # a vision model's family (its images' needs)
        self.adapter_waits: deque[AdapterWait] = deque()

    @property
    def busy(self) -> bool:
        return bool(self.waiting or self.prefilling or self.running or self.adapter_waits)

    def sequences(self) -> list[Sequence]:
        seqs = list(self.waiting) + self.running
        if self.prefilling is not None:
            seqs.append(self.prefilling)
        return seqs

    # ------------------------------------------------------------ the plan

    def schedule(self) -> StepPlan:
        """Plans one step under a per-step prompt budget: a long prompt in chunks, alone;
        short fresh prompts several at a time in one forward. Rows admitted now decode
        from the next step on."""
        plan = StepPlan(decode=sorted(self.running, key=lambda s: s.slot))
        if self.prefilling is None and self.waiting and self.cache.can_allocate():
            ready = self._ready()
            if ready:
                head = ready[0]
                reuse = self._reuse(head)
                remaining = len(head.prefill_ids) - reuse.length
                if remaining <= self.prefill_chunk and not wants_prompt_scores(head):
                    self._admit_many(ready, plan)
                    return plan
                self.prefilling = self._admit(head, reuse, plan)
        plan.chunk = self.prefilling
        return plan

    def _ready(self) -> list[Sequence]:
        """Waiting sequences that can start now, in order. A request whose adapter is still
        loading lets others pass; one whose adapter waits for a free device slot holds back
        the adapter requests behind it (so busy adapters cannot starve it), not bare ones."""
        if self.adapters is None:
            return [s for s in self.waiting if s.adapter is None]
        ready: list[Sequence] = []
        # an adapter load or embedding waiting for a slot is older than these requests
        slot_blocked = any(w.adapter.key in self.adapters.host for w in self.adapter_waits)
        for seq in self.waiting:
            if seq.adapter is None:
                ready.append(seq)
            elif not slot_blocked:
                if self.adapters.can_acquire(seq.adapter):
                    ready.append(seq)
                elif seq.adapter.key in self.adapters.host:
                    slot_blocked = True
        return ready

    def _reuse(self, seq: Sequence) -> Reuse:
        """What of the sequence's prompt the KV cache already holds (no side effects);
        nothing for prompt scoring, which needs every position's logits."""
        if wants_prompt_scores(seq):
            return NO_REUSE
        running = [(s.slot, s.held(), s.adapter_key) for s in self.by_slot.values() if s.cached > 0]
        reuse = self.prefix.find(seq.prefill_key, seq.adapter_key, running)
        vision = self.vision
        if reuse.length and seq.media is not None and vision is not None and vision.bidirectional:
            # an image whose tokens see each other both ways is computed whole or reused whole
            length = seq.media.cut(reuse.length, forward=False)
            if length != reuse.length:
                short = length == 0 or (reuse.running and length < MIN_COPY)
                reuse = NO_REUSE if short else replace(reuse, length=length)
        return reuse

    def _admit_many(self, ready: list[Sequence], plan: StepPlan) -> None:
        budget = self.prefill_chunk
        for seq in ready:
            if wants_prompt_scores(seq) or not self.cache.can_allocate():
                break
            reuse = self._reuse(seq)  # one at a time: an admission moves cached contents
            size = len(seq.prefill_ids) - reuse.length
            if size > budget:
                break
            if self._admit(seq, reuse, plan) is None:
                continue
            budget -= size
            plan.prefill.append(seq)

    def _admit(self, seq: Sequence, reuse: Reuse, plan: StepPlan) -> Sequence | None:
        """Takes a KV slot (with the cached prefix ``reuse`` names) and an adapter slot for
        a waiting sequence; None if its adapter cannot go on the device now, or does not
        fit the model (then it is in ``plan.failed``)."""
        if seq.adapter is not None:
            if self.adapters is None or not self.adapters.can_acquire(seq.adapter):
                return None
            try:
                seq.lora = self.adapters.acquire(seq.adapter)
            except Exception as exc:  # does not fit, or no memory for the adapter slots
                if not isinstance(exc, LoraError):
                    log.exception("placing adapter %s failed", seq.adapter.name)
                status = 400 if isinstance(exc, LoraError) else 500
                plan.failed.append((seq, adapter_error(exc), status))
                return None
        self.waiting.remove(seq)
        seq.slot = self.prefix.allocate(reuse)
        seq.prefilled = seq.cached = reuse.length
        if reuse.length:
            self.stats.prefix_hits += 1
            self.stats.prefix_tokens += reuse.length
        if not seq.generated:  # a fresh prompt: reported as cached tokens
            seq.reused = reuse.length
        self.by_slot[seq.slot] = seq
        if not seq.admitted:
            seq.admitted = time.perf_counter()
        return seq

    # ------------------------------------------------------------ adapters

    def poll_adapters(self) -> list[tuple[Sequence, str, int]]:
        """Housekeeping: adapter loads start for what waits, finished ones go to host
        memory; returns the waiting sequences whose adapter failed to load (to end, with
        the error and its HTTP status), and fails the adapter waits for it."""
        if self.adapters is None:
            return []
        wanted = {s.adapter.key: s.adapter for s in self.waiting if s.adapter is not None}
        wanted.update((w.adapter.key, w.adapter) for w in self.adapter_waits)
        failed = self.adapters.poll(list(wanted.values()))
        if not failed:
            return []
        for wait in [w for w in self.adapter_waits if w.adapter.key in failed]:
            self.adapter_waits.remove(wait)
            wait.fail(*failed[wait.adapter.key])
        return [
            (seq, *failed[seq.adapter.key])
            for seq in self.waiting
            if seq.adapter is not None and seq.adapter.key in failed
        ]

    def next_adapter_wait(self) -> tuple[AdapterWait, int] | None:
        """The oldest adapter load or embedding whose adapter can take a device slot now,
        with the slot it took (the caller runs it, then releases the slot); None when the
        first cannot (it holds back the rest). Waits whose adapter does not fit fail here."""
        while self.adapters is not None and self.adapter_waits:
            wait = self.adapter_waits[0]
            if not self.adapters.can_acquire(wait.adapter):
                return None
            self.adapter_waits.popleft()
            try:
                return wait, self.adapters.acquire(wait.adapter)
            except Exception as exc:
                if not isinstance(exc, LoraError):
                    log.exception("placing adapter %s failed", wait.adapter.name)
                wait.fail(adapter_error(exc), 400 if isinstance(exc, LoraError) else 500)
        return None

    def abort_waits(self, request_id: str) -> None:
        for wait in [w for w in self.adapter_waits if w.request_id == request_id]:
            self.adapter_waits.remove(wait)

    def fail_waits(self, message: str, status: int) -> None:
        while self.adapter_waits:
            self.adapter_waits.popleft().fail(message, status)

    # ------------------------------------------------------------ giving back

    def youngest_running(self) -> Sequence:
        """The running request that arrived last: the one preemption picks."""
        return max(self.running, key=lambda s: s.submitted)

    def preempt(self, seq: Sequence) -> None:
        """Gives up a running sequence's cache; it waits at the head of the queue and is
        recomputed from its prompt and generated tokens when a slot frees."""
        log.warning(
            "out of memory: preempting %s (%d tokens) to resume later",
            seq.request.request_id,
            seq.cached,
        )
        self.release(seq)  # its contents stay cached: it may take them up again
        self.stats.preemptions += 1
        seq.prefilled = 0
        seq.cached = 0
        seq.preemptions += 1
        self.waiting.appendleft(seq)

    def requeue(self, batch: list[Sequence]) -> None:
        """Admitted prompts that could not be prefilled wait again, at the head, in order."""
        for seq in reversed(batch):
            self.release(seq)
            self.waiting.appendleft(seq)

    def release(self, seq: Sequence) -> None:
        """Takes a sequence out of every queue and gives back its KV and adapter slots."""
        if seq in self.waiting:
            self.waiting.remove(seq)
        if seq is self.prefilling:
            self.prefilling = None
        if seq in self.running:
            self.running.remove(seq)
        if seq.slot >= 0:
            del self.by_slot[seq.slot]
            # keep running sequences in slots 0..n-1: the last one takes the hole, and what
            # this one cached stays in the slot that becomes idle, for a later prompt
            last = self.cache.used - 1
            mover = self.by_slot.get(last) if last != seq.slot else None
            moved_from = self.prefix.release(
                seq.slot, seq.held(), seq.adapter_key, mover.cached if mover else 0
            )
            if moved_from >= 0 and mover is not None:
                del self.by_slot[moved_from]
                mover.slot = seq.slot
                self.by_slot[seq.slot] = mover
            seq.slot = -1
        if seq.lora >= 0 and self.adapters is not None:
            self.adapters.release(seq.lora)
            seq.lora = -1
