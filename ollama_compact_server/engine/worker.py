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
        if self.adapters is not None:
            self._collect_adapters()
        decode_batch = sorted(self.running, key=lambda s: s.slot)
        prefilled = self._prefill_step()
        if decode_batch:
            self._decode_step(decode_batch)
        # False when every request waits (for an adapter load): the loop may sleep until
        # a wakeup instead of spinning beside the loader thread
        return prefilled or bool(decode_batch)

    def _prefill_step(self) -> bool:
        """Prefill under a per-step token budget: a long prompt in chunks, alone; short
        fresh prompts several at a time in one forward. True if anything ran."""
        if self.prefilling is None and self.waiting and self.runner.cache.can_allocate():
            ready = self._ready()
            if ready:
                head = ready[0]
                if len(head.prefill_ids) > self.prefill_chunk or wants_prompt_scores(head):
                    self.prefilling = self._admit(head)
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
        slot_blocked = False
        for seq in self.waiting:
            if seq.adapter is None:
                ready.append(seq)
            elif not slot_blocked:
                if self.adapters.can_acquire(seq.adapter):
                    ready.append(seq)
                elif seq.adapter.key in self.adapters.host:
                    slot_blocked = True
        return ready

    def _admit(self, seq: Sequence) -> Sequence | None:
        """Takes a KV slot (and an adapter slot) for a waiting sequence; None if its
        adapter turned out not to fit the model (the request has then failed)."""
        if seq.adapter is not None:
            if self.adapters is None or not self.adapters.can_acquire(seq.adapter):
                return None
            try:
                seq.lora = self.adapters.acquire(seq.adapter)
            except LoraError as exc:
                self.finish(seq, FinishReason.ERROR, error=str(exc))
                return None
        self.waiting.remove(seq)
        seq.slot = self.runner.cache.allocate()
        self.by_slot[seq.slot] = seq
        if not seq.admitted:
            seq.admitted = time.perf_counter()
        return seq

    def _collect_adapters(self) -> None:
        """Finished adapter loads go to host memory; requests whose adapter failed end."""
        if self.adapters is None:
            return
        wanted = {s.adapter.key for s in self.waiting if s.adapter is not None}
        failed = self.adapters.poll(wanted)
        for seq in [s for s in self.waiting if s.adapter is not None]:
            error = failed.get(seq.adapter.key)  # type: ignore[union-attr]
            if error is not None:
                self.finish(seq, FinishReason.ERROR, error=error)

    def _prefill_many(self, ready: list[Sequence]) -> None:
        batch: list[Sequence] = []
        budget = self.prefill_chunk
        for seq in ready:
            size = len(seq.prefill_ids)
            if size > budget or wants_prompt_scores(seq) or not self.runner.cache.can_allocate():
                break
            admitted = self._admit(seq)
            if admitted is None:
                continue
            budget -= size
            batch.append(admitted)
        if not batch:
            return
        started = time.perf_counter()
        try:
            logits = self.runner.prefill_batch(
                [s.slot for s in batch], [s.prefill_ids for s in batch], [s.lora for s in batch]
            )
        except Exception as exc:
            if is_oom(exc) and self.running:
                self.preempt(max(self.running, key=lambda s: s.submitted))
                for seq in reversed(batch):  # they wait again, in order
                    self._release(seq)
                    self.waiting.appendleft(seq)
                return
            log.exception("prefill failed for %d requests", len(batch))
            for seq in batch:
                self.finish(seq, FinishReason.ERROR, error=error_text("prefill failed", exc))
            return
        elapsed = time.perf_counter() - started
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
            chosen = constrain(logits[rows], [s for _, s in fresh])
            tokens = sample(
                chosen, [s.request.sampling for _, s in fresh], [s.state for _, s in fresh]
            )
            scores = self._scores(logits[rows], [s for _, s in fresh], tokens)
            now = time.perf_counter()
            for (_, seq), token, score in zip(fresh, tokens, scores):
                seq.first_token = now
                if not self.accept(seq, token, score):
                    self.running.append(seq)

    def _prefill_chunk(self, seq: Sequence) -> None:
        started = time.perf_counter()
        target = seq.prefill_ids
        scoring = wants_prompt_scores(seq)
        size = min(self.prefill_chunk, PROMPT_SCORE_CHUNK) if scoring else self.prefill_chunk
        chunk = target[seq.prefilled : seq.prefilled + size]
        try:
            if scoring:
                every = self.runner.prefill(
                    seq.slot, chunk, seq.prefilled, all_logits=True, lora=seq.lora
                )
                self._score_prompt(seq, chunk, every)
                logits = every[-1:]
            else:
                logits = self.runner.prefill(seq.slot, chunk, seq.prefilled, lora=seq.lora)
        except Exception as exc:  # a failing request fails alone
            if is_oom(exc) and self.running:
                self.preempt(max(self.running, key=lambda s: s.submitted))
                return
            log.exception("prefill failed for %s", seq.request.request_id)
            self.finish(seq, FinishReason.ERROR, error=error_text("prefill failed", exc))
            return
        seq.prefilled += len(chunk)
        seq.cached = seq.prefilled
        seq.prompt_time += time.perf_counter() - started
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
        token = sample(constrain(logits, [seq]), [seq.request.sampling], [seq.state])[0]
        seq.first_token = time.perf_counter()
        score = self._scores(logits, [seq], [token])[0]
        if not self.accept(seq, token, score):
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
                [s.lora for s in batch],
            )
            tokens = sample(
                constrain(logits, batch),
                [s.request.sampling for s in batch],
                [s.state for s in batch],
            )
        except Exception as exc:
            if is_oom(exc) and len(batch) > 1:
                # out of memory: the youngest request steps back and resumes later
                self.preempt(max(batch, key=lambda s: s.submitted))
                return
            log.exception("decode step failed; retrying its %d rows one by one", len(batch))
            self._decode_rows_alone(batch)
            return
        for seq in batch:
            seq.cached = seq.position + 1
        scores = self._scores(logits, batch, tokens)
        for seq, token, score in zip(batch, tokens, scores):
            self.accept(seq, token, score)

    def _decode_rows_alone(self, batch: list[Sequence]) -> None:
        for seq in batch:
            try:
                logits = self.runner.decode(
                    [seq.slot], [seq.generated[-1]], [seq.position], [seq.lora]
                )
                token = sample(constrain(logits, [seq]), [seq.request.sampling], [seq.state])[0]
            except Exception as exc:
                self.finish(
                    seq, FinishReason.ERROR, error=f"generation failed: {exc.__class__.__name__}"
                )
                continue
            seq.cached = seq.position + 1
            self.accept(seq, token)

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
        self.stats.finished[reason.value] += 1
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

    def preempt(self, seq: Sequence) -> None:
        """Gives up a running sequence's cache; it waits at the head of the queue and is
        recomputed from its prompt and generated tokens when a slot frees."""
        log.warning(
            "out of memory: preempting %s (%d tokens) to resume later",
            seq.request.request_id,
            seq.cached,
        )
        release_memory(self.runner.device)
        self._release(seq)
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
            moved_from = self.runner.cache.free(seq.slot)
            if moved_from is not None:
                # keep running sequences in slots 0..n-1: the last one fills the hole
                mover = self.by_slot.pop(moved_from)
                self.runner.cache.move(moved_from, seq.slot, mover.cached)
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
