"""The step of one resident model: schedule (engine/scheduler.py plans it), run (the
forwards, through the engine's one fault policy) and postprocess (engine/postprocess.py)."""

from __future__ import annotations

import logging
import time
from collections.abc import Callable

import torch

from .adapters import AdapterSlots
from .faults import is_oom, release_memory
from .postprocess import Postprocessor
from .runner import ModelRunner
from .scheduler import Scheduler
from .sequence import PROMPT_SCORE_CHUNK, AdapterWait, LoadedModel, Sequence, wants_prompt_scores
from .stats import EngineStats
from .types import FinishReason, TokenEvent

log = logging.getLogger(__name__)


class ModelWorker:
    """One resident model: its runner (weights and KV cache), the scheduler of its
    sequences and the postprocessor of their tokens."""

    def __init__(
        self,
        name: str,
        loaded: LoadedModel,
        runner: ModelRunner,
        prefill_chunk: int,
        stats: EngineStats | None = None,
        adapters: AdapterSlots | None = None,
    ) -> None:
        self.stats = stats or EngineStats()
        self.adapters = adapters
        self.name = name
        self.loaded = loaded
        self.runner = runner
        self.prefill_chunk = prefill_chunk
        self.scheduler = Scheduler(runner, prefill_chunk, self.stats, adapters)
        self.post = Postprocessor(self.scheduler, self.stats, runner.cache.capacity)
        self.last_used = time.monotonic()
        self.keep_alive: float | None = None  # seconds idle before unloading; None = forever
        self.own_memory = 0  # resident bytes: weights + KV cache (adapter slots come on top)
        self.load_time = 0.0

    # ------------------------------------------------------------ what the loop sees

    @property
    def memory(self) -> int:
        """Resident bytes: weights, KV cache and the adapter slots."""
        return self.own_memory + (self.adapters.nbytes if self.adapters is not None else 0)

    @property
    def expires_at(self) -> float | None:
        """Monotonic time when this idle model unloads; None while busy or kept forever."""
        if self.busy or self.keep_alive is None:
            return None
        return self.last_used + self.keep_alive

    @property
    def busy(self) -> bool:
        return self.scheduler.busy

    def sequences(self) -> list[Sequence]:
        return self.scheduler.sequences()

    def admit(self, seq: Sequence) -> None:
        """A new request waits for its turn."""
        self.scheduler.waiting.append(seq)

    def wait_for_adapter(self, wait: AdapterWait) -> None:
        self.scheduler.adapter_waits.append(wait)

    def finish(
        self,
        seq: Sequence,
        reason: FinishReason,
        *,
        flush: bool = False,
        error: str | None = None,
        status: int = 500,
    ) -> None:
        self.post.finish(seq, reason, flush=flush, error=error, status=status)

    def abort_waits(self, request_id: str) -> None:
        self.scheduler.abort_waits(request_id)

    def fail_waits(self, message: str, status: int) -> None:
        self.scheduler.fail_waits(message, status)

    # ------------------------------------------------------------ schedule → run → postprocess

    def step(self) -> bool:
        """One step; False when there was nothing to run (every request waits for an
        adapter load: the loop may sleep until a wakeup instead of spinning)."""
        if not self.busy:
            return False
        self.last_used = time.monotonic()
        for seq, error, status in self.scheduler.poll_adapters():
            self.finish(seq, FinishReason.ERROR, error=error, status=status)
        served = self._serve_adapter_waits()
        plan = self.scheduler.schedule()
        for seq, error, status in plan.failed:
            self.finish(seq, FinishReason.ERROR, error=error, status=status)
        if plan.prefill:
            self._prefill_many(plan.prefill)
        elif plan.chunk is not None:
            self._prefill_chunk(plan.chunk)
        # a prefill that ran out of memory may have preempted some of them
        decode = [s for s in plan.decode if s.slot >= 0 and not s.finished]
        if decode:
            self._decode_step(decode)
        return served or bool(plan.prefill or plan.chunk or plan.failed or decode)

    def _serve_adapter_waits(self) -> bool:
        """Runs, in order, the adapter loads and embeddings whose adapter can take a slot;
        the first that cannot holds back the rest. True if any ran."""
        worked = False
        while (taken := self.scheduler.next_adapter_wait()) is not None:
            wait, slot = taken
            worked = True
            try:
                wait.run(slot)
            finally:
                if self.adapters is not None:
                    self.adapters.release(slot)
        return worked

    def _prefill_many(self, batch: list[Sequence]) -> None:
        def forward(rows: list[Sequence]) -> torch.Tensor:
            return self.runner.prefill_batch(
                [s.slot for s in rows],
                [s.prefill_ids[s.prefilled :] for s in rows],
                [s.lora for s in rows],
                [s.prefilled for s in rows],
                [s.media for s in rows],
            )

        self._run(
            batch, "prefill failed", forward, self._prefilled, lambda: self.scheduler.requeue(batch)
        )

    def _prefilled(self, batch: list[Sequence], logits: torch.Tensor, elapsed: float) -> None:
        """After whole prompts went in (logits: [B, V], one row per sequence): resumed
        sequences run again; fresh ones take their first token."""
        fresh = []
        for row, seq in enumerate(batch):
            seq.prefilled = seq.cached = len(seq.prefill_ids)
            seq.prompt_time += elapsed
            if seq.generated:  # resumed after a preemption
                self.scheduler.running.append(seq)
            else:
                fresh.append((row, seq))
        if fresh:
            rows = [row for row, _ in fresh]
            seqs = [s for _, s in fresh]
            self.post(logits[rows], seqs)
            self.scheduler.running.extend(s for s in seqs if not s.finished)

    def _prefill_chunk(self, seq: Sequence) -> None:
        target = seq.prefill_ids
        scoring = wants_prompt_scores(seq)
        size = min(self.prefill_chunk, PROMPT_SCORE_CHUNK) if scoring else self.prefill_chunk
        stop = seq.prefilled + size
        vision = self.runner.vision
        if seq.media is not None and vision is not None and vision.bidirectional:
            stop = seq.media.cut(stop, forward=True)  # an image goes in one forward
        chunk = target[seq.prefilled : stop]

        def forward(rows: list[Sequence]) -> torch.Tensor:
            if not scoring:
                return self.runner.prefill(
                    seq.slot, chunk, seq.prefilled, lora=seq.lora, media=seq.media
                )
            every = self.runner.prefill(
                seq.slot, chunk, seq.prefilled, all_logits=True, lora=seq.lora, media=seq.media
            )
            self.post.score_prompt(seq, chunk, every)
            return every[-1:]

        def done(rows: list[Sequence], logits: torch.Tensor, elapsed: float) -> None:
            seq.prefilled += len(chunk)
            seq.cached = seq.prefilled
            seq.prompt_time += elapsed
            if seq.prefilled < len(target):
                return
            self.scheduler.prefilling = None
            if seq.generated:  # resumed after a preemption: the next decode step continues it
                self.scheduler.running.append(seq)
                return
            if seq.max_tokens == 0:  # scoring only (echo with max_tokens 0)
                seq.mailbox.put(TokenEvent(prompt_logprobs=seq.prompt_scores))
                seq.prompt_scores = None
                self.finish(seq, FinishReason.LENGTH)
                return
            self.post(logits, [seq])
            if not seq.finished:
                self.scheduler.running.append(seq)

        # after an out-of-memory step-back the same chunk runs again in the next step
        self._run([seq], "prefill failed", forward, done)

    def _decode_step(self, batch: list[Sequence]) -> None:
        def forward(rows: list[Sequence]) -> torch.Tensor:
            return self.runner.decode(
                [s.slot for s in rows],
                [s.generated[-1] for s in rows],
                [s.position for s in rows],
                [s.lora for s in rows],
                [s.media.delta if s.media is not None else 0 for s in rows],
            )

        def done(rows: list[Sequence], logits: torch.Tensor, elapsed: float) -> None:
            for seq in rows:
                seq.cached = seq.position + 1
            self.post(logits, rows)

        self._run(batch, "generation failed", forward, done)

    # ------------------------------------------------------------ the one fault policy

    def _run(
        self,
        batch: list[Sequence],
        what: str,
        forward: Callable[[list[Sequence]], torch.Tensor],
        done: Callable[[list[Sequence], torch.Tensor, float], None],
        later: Callable[[], None] | None = None,
    ) -> None:
        """Runs one forward over ``batch`` and hands its logits to ``done``, under the
        engine's one fault policy. Out of memory: running requests step back (youngest
        first, to resume later) and the batch runs again in a later step (``later`` puts it
        back in line). Any other fault, or nothing left to step back: each row runs alone,
        so a fault is pinned on the requests that cause it, which end with an error event
        while the others go on."""
        started = time.perf_counter()
        try:
            logits = forward(batch)
        except Exception as exc:
            if is_oom(exc) and self._step_back(batch):
                if later is not None:
                    later()
                return
            if len(batch) == 1:
                self.post.fail(batch[0], what, exc)
                return
            log.warning(
                "%s for a batch of %d (%s); retrying its rows one by one",
                what,
                len(batch),
                exc.__class__.__name__,
            )
            for seq in batch:
                started = time.perf_counter()
                try:
                    logits = forward([seq])
                except Exception as alone:
                    self.post.fail(seq, what, alone)
                    continue
                done([seq], logits, time.perf_counter() - started)
            return
        done(batch, logits, time.perf_counter() - started)

    def _step_back(self, batch: list[Sequence]) -> bool:
        """Out of memory: preempts running requests, youngest first. For a prefill (rows
        not yet running) one is enough; a decode batch steps back until one of its own rows
        did, so it is a row smaller (the youngest may have been prefilled this step, outside
        the batch: preempting it alone would let it come straight back while the same batch
        fails again). False when nothing could step back but a lone row itself."""
        running = self.scheduler.running
        decoding = any(s is r for s in batch for r in running)
        if not running or (decoding and len(batch) == 1):
            return False
        while running:
            victim = self.scheduler.youngest_running()
            self.scheduler.preempt(victim)
            if not decoding or any(victim is s for s in batch):
                break
        release_memory(self.runner.device)
        return True
