"""The sequences of one resident model and its step: schedule (admit, chunked prefill),
run (one decode forward for every running row), postprocess (sample, detokenize, stop)."""

from __future__ import annotations

import logging
import time
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import torch

from ..modeling.lora import LoraError
from .adapters import AdapterRef, AdapterSlots
from .constraint import GuidedTokenizer, JsonConstraint
from .detok import Detokenizer, StopMatcher
from .mailbox import Mailbox
from .prefix import NO_REUSE, PrefixCache, Reuse
from .runner import ModelRunner
from .sampler import RowState, sample, token_logprobs
from .stats import EngineStats
from .types import FinishReason, GenerateRequest, TokenEvent, TokenLogprob

log = logging.getLogger(__name__)


@dataclass(slots=True)
class Sequence:
    request: GenerateRequest
    mailbox: Mailbox
    state: RowState
    detok: Detokenizer
    stops: StopMatcher
    stop_ids: set[int]
    max_tokens: int
    adapter: AdapterRef | None = None  # the LoRA adapter this request runs with
    lora: int = -1  # its adapter slot while admitted
    slot: int = -1
    prefilled: int = 0
    cached: int = 0  # positions written to the KV cache
    reused: int = 0  # prompt positions taken from the cache instead of computed
    generated: list[int] = field(default_factory=list)
    submitted: float = field(default_factory=time.perf_counter)
    admitted: float = 0.0
    first_token: float = 0.0
    last_token: float = 0.0
    prompt_time: float = 0.0
    load_time: float = 0.0
    preemptions: int = 0
    finished: bool = False
    constraint: JsonConstraint | None = None  # structured output
    prompt_scores: list[TokenLogprob | None] | None = None  # prompt logprobs, when asked
    carry: torch.Tensor | None = None  # last prompt chunk's final logits (for the next chunk)

    @property
    def prompt(self) -> list[int]:
        return self.request.prompt_ids

    @property
    def prefill_ids(self) -> list[int]:
        """What prefill must put in the cache: the prompt, or after a preemption the prompt
        plus every generated token but the last (which the next decode step feeds)."""
        return self.prompt if not self.generated else self.prompt + self.generated[:-1]

    @property
    def position(self) -> int:
        """Position of the last token, the one the next decode step feeds."""
        return len(self.prompt) + len(self.generated) - 1

    @property
    def adapter_key(self) -> str:
        return self.adapter.key if self.adapter is not None else ""

    def held(self) -> list[int]:
        """The tokens whose K/V this sequence's slot holds (positions 0..cached-1)."""
        if self.cached <= len(self.prompt):
            return self.prompt[: self.cached]
        return (self.prompt + self.generated)[: self.cached]


@dataclass
class LoadedModel:
    model: Any
    tokenizer: Any
    stop_ids: set[int]
    guided: GuidedTokenizer | None = None  # built on the first structured-output request
    pooling: str | None = None  # set for dedicated embedding models (encoders): no generation

    def guided_tokenizer(self) -> GuidedTokenizer:
        if self.guided is None:
            vocab = int(getattr(self.model.config, "vocab_size", 0) or len(self.tokenizer))
            self.guided = GuidedTokenizer(self.tokenizer, vocab)
        return self.guided


ModelProvider = Callable[[str], LoadedModel]


@dataclass(slots=True)
class AdapterWait:
    """Work that needs an adapter on the device but no sequence (a bare load of an adapter
    model, its embeddings): ``run(slot)`` once the adapter has a slot, ``fail`` otherwise."""

    adapter: AdapterRef
    run: Callable[[int], None]
    fail: Callable[[str, int], None]
    request_id: str | None = None


# ---------------------------------------------------------------------------- one model


class ModelWorker:
    """The sequences of one resident model: waiting, prefilling (one at a time, in
    chunks), running."""

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
        self.waiting: deque[Sequence] = deque()
        self.prefilling: Sequence | None = None
        self.running: list[Sequence] = []
        self.by_slot: dict[int, Sequence] = {}
        self.prefix = PrefixCache(runner.cache)
        self.adapter_waits: deque[AdapterWait] = deque()
        self.last_used = time.monotonic()
        self.keep_alive: float | None = None  # seconds idle before unloading; None = forever
        self.own_memory = 0  # resident bytes: weights + KV cache (adapter slots come on top)
        self.load_time = 0.0

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
        return bool(self.waiting or self.prefilling or self.running or self.adapter_waits)

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
        served = False
        if self.adapters is not None:
            self._collect_adapters()
            served = self._serve_adapter_waits()
        decode_batch = sorted(self.running, key=lambda s: s.slot)
        prefilled = self._prefill_step()
        # a prefill that ran out of memory may have preempted some of them
        decode_batch = [s for s in decode_batch if s.slot >= 0 and not s.finished]
        if decode_batch:
            self._decode_step(decode_batch)
        # False when every request waits (for an adapter load): the loop may sleep until
        # a wakeup instead of spinning beside the loader thread
        return served or prefilled or bool(decode_batch)

    def _prefill_step(self) -> bool:
        """Prefill under a per-step token budget: a long prompt in chunks, alone; short
        fresh prompts several at a time in one forward. True if anything ran."""
        if self.prefilling is None and self.waiting and self.runner.cache.can_allocate():
            ready = self._ready()
            if ready:
                head = ready[0]
                plan = self._reuse(head)
                remaining = len(head.prefill_ids) - plan.length
                if remaining > self.prefill_chunk or wants_prompt_scores(head):
                    self.prefilling = self._admit(head, plan)
                else:
                    self._prefill_many(ready)
                    return True
        if self.prefilling is not None:
            self._prefill_chunk(self.prefilling)
            return True
        return False

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
        return self.prefix.find(seq.prefill_ids, seq.adapter_key, running)

    def _admit(self, seq: Sequence, plan: Reuse = NO_REUSE) -> Sequence | None:
        """Takes a KV slot (with the cached prefix ``plan`` names) and an adapter slot for a
        waiting sequence; None if its adapter turned out not to fit the model (the request
        has then failed)."""
        if seq.adapter is not None:
            if self.adapters is None or not self.adapters.can_acquire(seq.adapter):
                return None
            try:
                seq.lora = self.adapters.acquire(seq.adapter)
            except Exception as exc:  # does not fit, or no memory for the adapter slots
                if not isinstance(exc, LoraError):
                    log.exception("placing adapter %s failed", seq.adapter.name)
                self.finish(seq, FinishReason.ERROR, error=adapter_error(exc))
                return None
        self.waiting.remove(seq)
        seq.slot = self.prefix.allocate(plan)
        seq.prefilled = seq.cached = plan.length
        if plan.length:
            self.stats.prefix_hits += 1
            self.stats.prefix_tokens += plan.length
        if not seq.generated:  # a fresh prompt: reported as cached tokens
            seq.reused = plan.length
        self.by_slot[seq.slot] = seq
        if not seq.admitted:
            seq.admitted = time.perf_counter()
        return seq

    def _collect_adapters(self) -> None:
        """Finished adapter loads go to host memory; requests whose adapter failed end."""
        if self.adapters is None:
            return
        wanted = {s.adapter.key: s.adapter for s in self.waiting if s.adapter is not None}
        wanted.update((w.adapter.key, w.adapter) for w in self.adapter_waits)
        failed = self.adapters.poll(list(wanted.values()))
        if not failed:
            return
        for seq in [s for s in self.waiting if s.adapter is not None]:
            error = failed.get(seq.adapter.key)  # type: ignore[union-attr]
            if error is not None:
                self.finish(seq, FinishReason.ERROR, error=error)
        for wait in [w for w in self.adapter_waits if w.adapter.key in failed]:
            self.adapter_waits.remove(wait)
            wait.fail(failed[wait.adapter.key], 500)

    def _serve_adapter_waits(self) -> bool:
        """Runs, in order, the adapter loads and embeddings whose adapter can take a slot;
        the first that cannot holds back the rest. True if any ran or failed."""
        if self.adapters is None:
            return False
        worked = False
        while self.adapter_waits:
            wait = self.adapter_waits[0]
            if not self.adapters.can_acquire(wait.adapter):
                break
            self.adapter_waits.popleft()
            worked = True
            try:
                slot = self.adapters.acquire(wait.adapter)
            except Exception as exc:
                if not isinstance(exc, LoraError):
                    log.exception("placing adapter %s failed", wait.adapter.name)
                wait.fail(adapter_error(exc), 400 if isinstance(exc, LoraError) else 500)
                continue
            try:
                wait.run(slot)
            finally:
                self.adapters.release(slot)
        return worked

    def abort_waits(self, request_id: str) -> None:
        for wait in [w for w in self.adapter_waits if w.request_id == request_id]:
            self.adapter_waits.remove(wait)

    def fail_waits(self, message: str, status: int) -> None:
        while self.adapter_waits:
            self.adapter_waits.popleft().fail(message, status)

    def _prefill_many(self, ready: list[Sequence]) -> None:
        batch: list[Sequence] = []
        budget = self.prefill_chunk
        for seq in ready:
            if wants_prompt_scores(seq) or not self.runner.cache.can_allocate():
                break
            plan = self._reuse(seq)  # one at a time: an admission moves cached contents
            size = len(seq.prefill_ids) - plan.length
            if size > budget:
                break
            admitted = self._admit(seq, plan)
            if admitted is None:
                continue
            budget -= size
            batch.append(admitted)
        if not batch:
            return

        def forward(rows: list[Sequence]) -> torch.Tensor:
            return self.runner.prefill_batch(
                [s.slot for s in rows],
                [s.prefill_ids[s.prefilled :] for s in rows],
                [s.lora for s in rows],
                [s.prefilled for s in rows],
            )

        def later() -> None:
            for seq in reversed(batch):  # they wait again, in order
                self._release(seq)
                self.waiting.appendleft(seq)

        self._run(batch, "prefill failed", forward, self._prefilled, later)

    def _prefilled(self, batch: list[Sequence], logits: torch.Tensor, elapsed: float) -> None:
        """After whole prompts went in (logits: [B, V], one row per sequence): resumed
        sequences run again; fresh ones take their first token."""
        fresh = []
        for row, seq in enumerate(batch):
            seq.prefilled = seq.cached = len(seq.prefill_ids)
            seq.prompt_time += elapsed
            if seq.generated:  # resumed after a preemption
                self.running.append(seq)
            else:
                fresh.append((row, seq))
        if fresh:
            rows = [row for row, _ in fresh]
            seqs = [s for _, s in fresh]
            self._postprocess(logits[rows], seqs)
            self.running.extend(s for s in seqs if not s.finished)

    def _prefill_chunk(self, seq: Sequence) -> None:
        target = seq.prefill_ids
        scoring = wants_prompt_scores(seq)
        size = min(self.prefill_chunk, PROMPT_SCORE_CHUNK) if scoring else self.prefill_chunk
        chunk = target[seq.prefilled : seq.prefilled + size]

        def forward(rows: list[Sequence]) -> torch.Tensor:
            if not scoring:
                return self.runner.prefill(seq.slot, chunk, seq.prefilled, lora=seq.lora)
            every = self.runner.prefill(
                seq.slot, chunk, seq.prefilled, all_logits=True, lora=seq.lora
            )
            self._score_prompt(seq, chunk, every)
            return every[-1:]

        def done(rows: list[Sequence], logits: torch.Tensor, elapsed: float) -> None:
            seq.prefilled += len(chunk)
            seq.cached = seq.prefilled
            seq.prompt_time += elapsed
            if seq.prefilled < len(target):
                return
            self.prefilling = None
            if seq.generated:  # resumed after a preemption: the next decode step continues it
                self.running.append(seq)
                return
            if seq.max_tokens == 0:  # scoring only (echo with max_tokens 0)
                seq.mailbox.put(TokenEvent(prompt_logprobs=seq.prompt_scores))
                seq.prompt_scores = None
                self.finish(seq, FinishReason.LENGTH)
                return
            self._postprocess(logits, [seq])
            if not seq.finished:
                self.running.append(seq)

        # after an out-of-memory step-back the same chunk runs again in the next step
        self._run([seq], "prefill failed", forward, done)

    def _decode_step(self, batch: list[Sequence]) -> None:
        batch = [s for s in batch if not s.finished]
        if not batch:
            return

        def forward(rows: list[Sequence]) -> torch.Tensor:
            return self.runner.decode(
                [s.slot for s in rows],
                [s.generated[-1] for s in rows],
                [s.position for s in rows],
                [s.lora for s in rows],
            )

        def done(rows: list[Sequence], logits: torch.Tensor, elapsed: float) -> None:
            for seq in rows:
                seq.cached = seq.position + 1
            self._postprocess(logits, rows)

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
                self._fail(batch[0], what, exc)
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
                    self._fail(seq, what, alone)
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
        decoding = any(s is r for s in batch for r in self.running)
        if not self.running or (decoding and len(batch) == 1):
            return False
        while self.running:
            victim = self._youngest_running()
            self.preempt(victim)
            if not decoding or any(victim is s for s in batch):
                break
        return True

    def _postprocess(self, logits: torch.Tensor, seqs: list[Sequence]) -> None:
        """Samples, scores and accepts one new token per row (logits: [B, V]). A row whose
        sampling, detokenizing, stop matching or constraint fails ends alone with an error
        event (and frees its slot); a failure of the batched sampling is retried row by row,
        so it is pinned on the rows that cause it."""
        try:
            tokens = sample(
                constrain(logits, seqs),
                [s.request.sampling for s in seqs],
                [s.state for s in seqs],
            )
            scores = self._scores(logits, seqs, tokens)
        except Exception as exc:
            if len(seqs) == 1:
                self._fail(seqs[0], "sampling failed", exc)
                return
            log.warning(
                "sampling %d rows failed (%s); retrying them one by one",
                len(seqs),
                exc.__class__.__name__,
            )
            for row, seq in enumerate(seqs):
                self._postprocess(logits[row : row + 1], [seq])
            return
        now = time.perf_counter()
        for seq, token, score in zip(seqs, tokens, scores):
            if not seq.first_token:
                seq.first_token = now
            try:
                self.accept(seq, token, score)
            except Exception as exc:
                self._fail(seq, "postprocessing the new token failed", exc)

    def _fail(self, seq: Sequence, what: str, exc: BaseException) -> None:
        """Ends one request with an error event after a fault that is its own."""
        log.error(
            "%s for %s", what, seq.request.request_id, exc_info=(type(exc), exc, exc.__traceback__)
        )
        self.finish(seq, FinishReason.ERROR, error=error_text(what, exc))

    def accept(self, seq: Sequence, token: int, score: TokenLogprob | None = None) -> bool:
        """Postprocess one new token; returns True when the sequence finished."""
        seq.generated.append(token)
        seq.state.append(token)
        now = time.perf_counter()
        with self.stats.lock:
            self.stats.tokens_generated += 1
            if len(seq.generated) == 1:
                self.stats.ttft.append(now - seq.submitted)
            elif seq.last_token:
                self.stats.itl.append(now - seq.last_token)
        seq.last_token = now
        if seq.constraint is not None:
            seq.constraint.consume(token)
        if token in seq.stop_ids:
            self.finish(seq, FinishReason.STOP, flush=True)
            return True
        text, stopped = seq.stops.feed(seq.detok.add(token))
        if stopped:
            self._emit(seq, text, [token], score)
            self.finish(seq, FinishReason.STOP)
            return True
        if seq.constraint is not None and seq.constraint.done:  # the JSON value is complete
            self._emit(seq, text, [token], score)
            self.finish(seq, FinishReason.STOP, flush=True)
            return True
        if len(seq.generated) >= seq.max_tokens or seq.position + 1 >= self.runner.cache.capacity:
            self._emit(seq, text, [token], score)
            self.finish(seq, FinishReason.LENGTH, flush=True)
            return True
        self._emit(seq, text, [token], score)
        return False

    def _emit(
        self, seq: Sequence, text: str, tokens: list[int], score: TokenLogprob | None
    ) -> None:
        event = TokenEvent(text=text, token_ids=tokens, logprobs=[score] if score else [])
        if seq.prompt_scores is not None:  # the prompt's scores ride on the first event
            event.prompt_logprobs, seq.prompt_scores = seq.prompt_scores, None
        seq.mailbox.put(event)

    def _scores(
        self, logits: torch.Tensor, seqs: list[Sequence], tokens: list[int]
    ) -> list[TokenLogprob | None]:
        """Logprobs for the rows that asked for them (logits: [B, V])."""
        wanted = [i for i, s in enumerate(seqs) if s.request.sampling.logprobs is not None]
        out: list[TokenLogprob | None] = [None] * len(seqs)
        if not wanted:
            return out
        top = max(seqs[i].request.sampling.logprobs or 0 for i in wanted)
        rows = token_logprobs(logits[wanted], [tokens[i] for i in wanted], top)
        for i, row in zip(wanted, rows):
            k = seqs[i].request.sampling.logprobs or 0
            out[i] = (row[0], row[1], row[2][:k])
        return out

    def _score_prompt(self, seq: Sequence, chunk: list[int], every: torch.Tensor) -> None:
        """Scores the chunk's tokens: token j by the logits of position j-1 (the previous
        chunk's last row for j = 0). The very first prompt token has no score."""
        if seq.prompt_scores is None:
            seq.prompt_scores = []
        predictors = every[:-1] if seq.carry is None else torch.cat([seq.carry, every[:-1]])
        targets = chunk[1:] if seq.carry is None else chunk
        if seq.carry is None:
            seq.prompt_scores.append(None)
        if targets:
            k = seq.request.sampling.logprobs or 0
            seq.prompt_scores.extend(token_logprobs(predictors, targets, k))
        seq.carry = every[-1:].clone()

    def finish(
        self, seq: Sequence, reason: FinishReason, *, flush: bool = False, error: str | None = None
    ) -> None:
        if seq.finished:
            return
        seq.finished = True
        tail = ""
        if flush:
            try:
                held, stopped = seq.stops.feed(seq.detok.flush())
                tail = held + ("" if stopped else seq.stops.flush())
            except Exception as exc:  # the request still ends, and frees its slot
                log.error(
                    "detokenizing the end of %s failed",
                    seq.request.request_id,
                    exc_info=(type(exc), exc, exc.__traceback__),
                )
                reason, error = FinishReason.ERROR, error_text("detokenizing failed", exc)
        self.stats.finished[reason.value] += 1
        self._release(seq)
        now = time.perf_counter()
        counted = [t for t in seq.generated if reason != FinishReason.STOP or t not in seq.stop_ids]
        seq.mailbox.put(
            TokenEvent(
                text=tail,
                finish_reason=reason,
                error=error,
                prompt_tokens=len(seq.prompt),
                cached_tokens=seq.reused,
                completion_tokens=len(counted),
                queue_time=(seq.admitted or now) - seq.submitted,
                load_time=seq.load_time,
                prompt_time=seq.prompt_time,
                decode_time=now - seq.first_token if seq.first_token else 0.0,
                total_time=now - seq.submitted,
            )
        )

    def _youngest_running(self) -> Sequence:
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
        release_memory(self.runner.device)
        self._release(seq)  # its contents stay cached: it may take them up again
        self.stats.preemptions += 1
        seq.prefilled = 0
        seq.cached = 0
        seq.preemptions += 1
        self.waiting.appendleft(seq)

    def _release(self, seq: Sequence) -> None:
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
            last = self.runner.cache.used - 1
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


def is_oom(exc: BaseException) -> bool:
    oom_type = getattr(torch, "OutOfMemoryError", None)
    if oom_type is not None and isinstance(exc, oom_type):
        return True
    return isinstance(exc, RuntimeError) and "out of memory" in str(exc).lower()


def release_memory(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.empty_cache()


def adapter_error(exc: BaseException) -> str:
    if isinstance(exc, LoraError):
        return str(exc)
    return error_text("placing the adapter on the device failed", exc)


def error_text(what: str, exc: BaseException) -> str:
    if is_oom(exc):
        return f"{what}: out of memory"
    return f"{what}: {exc.__class__.__name__}"


PROMPT_SCORE_CHUNK = 64  # prompt scoring keeps every position's logits: keep chunks small


def wants_prompt_scores(seq: Sequence) -> bool:
    return seq.request.sampling.prompt_logprobs and not seq.generated


def constrain(logits: torch.Tensor, seqs: list[Sequence]) -> torch.Tensor:
    """logits: [B, V]; rows of structured-output sequences masked to valid continuations
    (as float32, the dtype the sampler works in)."""
    if all(s.constraint is None for s in seqs):
        return logits
    logits = logits.float()
    for row, seq in enumerate(seqs):
        if seq.constraint is not None:
            seq.constraint.mask(logits[row])
    return logits
