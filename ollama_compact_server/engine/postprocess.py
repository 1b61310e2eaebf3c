"""After a forward: one new token per row, sampled (under any structured-output
constraint), scored, detokenized, stop-matched and handed to the request's mailbox; and the
final event of a request that ends, with its usage and timings."""

from __future__ import annotations

import logging
import time

import torch

from .faults import error_text
from .sampler import sample, token_logprobs
from .scheduler import Scheduler
from .sequence import Sequence
from .stats import EngineStats
from .types import FinishReason, TokenEvent, TokenLogprob

log = logging.getLogger(__name__)


class Postprocessor:
    def __init__(self, scheduler: Scheduler, stats: EngineStats, capacity: int) -> None:
        self.scheduler = scheduler
        self.stats = stats
        self.capacity = capacity  # tokens per KV slot: a row ends when its slot is full

    def __call__(self, logits: torch.Tensor, seqs: list[Sequence]) -> None:
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
                self.fail(seqs[0], "sampling failed", exc)
                return
            log.warning(
                "sampling %d rows failed (%s); retrying them one by one",
                len(seqs),
                exc.__class__.__name__,
            )
            for row, seq in enumerate(seqs):
                self(logits[row : row + 1], [seq])
            return
        now = time.perf_counter()
        for seq, token, score in zip(seqs, tokens, scores):
            if not seq.first_token:
                seq.first_token = now
            try:
                self.accept(seq, token, score)
            except Exception as exc:
                self.fail(seq, "postprocessing the new token failed", exc)

    def fail(self, seq: Sequence, what: str, exc: BaseException) -> None:
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
        piece = seq.detok.add(token)
        text, stopped = seq.stops.feed(piece)
        if stopped:
            self._emit(seq, text, token, score, piece)
            self.finish(seq, FinishReason.STOP)
            return True
        if seq.constraint is not None and seq.constraint.done:  # the JSON value is complete
            self._emit(seq, text, token, score, piece)
            self.finish(seq, FinishReason.STOP, flush=True)
            return True
        if len(seq.generated) >= seq.max_tokens or seq.position + 1 >= self.capacity:
            self._emit(seq, text, token, score, piece)
            self.finish(seq, FinishReason.LENGTH, flush=True)
            return True
        self._emit(seq, text, token, score, piece)
        return False

    def _emit(
        self, seq: Sequence, text: str, token: int, score: TokenLogprob | None, piece: str
    ) -> None:
        event = TokenEvent(text=text, token_ids=[token])
        if score is not None:
            event.logprobs, event.token_texts = [score], [piece]
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

    def score_prompt(self, seq: Sequence, chunk: list[int], every: torch.Tensor) -> None:
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
        self,
        seq: Sequence,
        reason: FinishReason,
        *,
        flush: bool = False,
        error: str | None = None,
        status: int = 500,
    ) -> None:
        """Ends a request: the rest of its text, its slots given back, and its final event
        (``status``: the HTTP code of an error that ends it before any output)."""
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
        self.scheduler.release(seq)
        now = time.perf_counter()
        counted = [t for t in seq.generated if reason != FinishReason.STOP or t not in seq.stop_ids]
        seq.mailbox.put(
            TokenEvent(
                text=tail,
                finish_reason=reason,
                error=error,
                status=status,
                stop_sequence=seq.stops.matched if reason == FinishReason.STOP else None,
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
