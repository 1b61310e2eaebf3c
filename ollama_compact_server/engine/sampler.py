"""Per-row sampling inside a batch: penalties, temperature, top-k, top-p, min-p, seeds."""

from __future__ import annotations

from collections.abc import Sequence

import torch

from .types import SamplingParams, TokenLogprob


class RowState:
    """What a row needs across steps: its generator and the tokens that penalties read."""

    __slots__ = ("counts", "generator", "history")

    def __init__(
        self, params: SamplingParams, prompt_ids: Sequence[int], device: torch.device
    ) -> None:
        self.generator: torch.Generator | None = None
        if not params.greedy:
            self.generator = torch.Generator(device="cpu")
            seed = params.seed if params.seed is not None else torch.seed()
            self.generator.manual_seed(seed % (2**63))
        self.history: list[int] = list(prompt_ids)  # prompt + generated (repeat penalty window)
        self.counts: dict[int, int] = {}  # generated tokens only (presence / frequency)

    def append(self, token: int) -> None:
        self.history.append(token)
        self.counts[token] = self.counts.get(token, 0) + 1


def apply_penalties(logits: torch.Tensor, params: SamplingParams, state: RowState) -> torch.Tensor:
    """logits: [V] for one row; returns penalised logits (llama.cpp's rules)."""
    if params.repeat_penalty != 1.0 and params.repeat_last_n != 0:
        window = (
            state.history if params.repeat_last_n < 0 else state.history[-params.repeat_last_n :]
        )
        if window:
            ids = torch.tensor(sorted(set(window)), dtype=torch.long, device=logits.device)
            picked = logits[ids]
            logits[ids] = torch.where(
                picked > 0, picked / params.repeat_penalty, picked * params.repeat_penalty
            )
    if (params.presence_penalty or params.frequency_penalty) and state.counts:
        ids = torch.tensor(list(state.counts), dtype=torch.long, device=logits.device)
        counts = torch.tensor(list(state.counts.values()), dtype=logits.dtype, device=logits.device)
        logits[ids] -= params.presence_penalty + params.frequency_penalty * counts
    if params.logit_bias:
        vocab = logits.shape[-1]
        pairs = [(t, b) for t, b in params.logit_bias.items() if 0 <= t < vocab]
        if pairs:
            ids = torch.tensor([t for t, _ in pairs], dtype=torch.long, device=logits.device)
            logits[ids] += torch.tensor(
                [b for _, b in pairs], dtype=logits.dtype, device=logits.device
            )
    return logits


def sample_row(logits: torch.Tensor, params: SamplingParams, state: RowState) -> int:
    """logits: [V] float32 for one row; returns the chosen token id."""
    if params.penalised:
        logits = apply_penalties(logits.clone(), params, state)
    if params.greedy:
        return int(torch.argmax(logits))
    scores = logits  # before the temperature, which can overflow them all to -inf
    logits = logits / params.temperature
    ids: torch.Tensor | None = None
    if 0 < params.top_k < logits.shape[-1]:
        # only the k best survive top-k: the rest of the work runs on k candidates, not
        # the whole vocabulary (262k entries for gemma3)
        logits, ids = torch.topk(logits, params.top_k)
    probs = torch.softmax(logits, dim=-1)
    if params.min_p > 0:
        probs = probs.masked_fill(probs < params.min_p * probs.max(), 0.0)
    if params.top_p < 1.0:
        sorted_probs, order = torch.sort(probs, descending=True)
        cumulative = torch.cumsum(sorted_probs, dim=-1)
        drop = cumulative - sorted_probs > params.top_p  # keep at least the top token
        sorted_probs = sorted_probs.masked_fill(drop, 0.0)
        probs = torch.zeros_like(probs).scatter_(0, order, sorted_probs)
    total = probs.sum()
    if not torch.isfinite(total) or total <= 0:
        return int(torch.argmax(scores))  # nothing left to draw from: the best score
    pick = int(torch.multinomial(probs.cpu() / total.cpu(), 1, generator=state.generator))
    return int(ids[pick]) if ids is not None else pick


def sample(logits: torch.Tensor, params: list[SamplingParams], states: list[RowState]) -> list[int]:
    """logits: [B, V]. Greedy rows without penalties share one argmax; the host syncs once
    for them, and once per sampled row."""
    fast = [i for i, p in enumerate(params) if p.greedy and not p.penalised]
    if len(fast) == len(params):
        # all greedy: one max over the raw logits (bfloat16 -> float32 is exact, so the
        # argmax is the same); a NaN anywhere wins max() and sends us the careful way
        values, picks = torch.max(logits, dim=-1)
        if not bool(torch.isnan(values).any()):
            return [int(t) for t in picks.tolist()]
    logits = logits.float()
    # NaN ranks just above -inf: a structured-output mask writes -inf, so a row that went
    # NaN still picks a token its grammar allows
    logits = torch.nan_to_num(logits, nan=-1e29, posinf=1e30, neginf=-1e30)
    chosen: list[int] = [0] * len(params)
    if fast:
        picks = torch.argmax(logits[fast], dim=-1)
        for i, token in zip(fast, picks.tolist()):
            chosen[i] = int(token)
    for i, p in enumerate(params):
        if i not in fast:
            chosen[i] = sample_row(logits[i], p, states[i])
    return chosen


def token_logprobs(logits: torch.Tensor, tokens: list[int], top: int) -> list[TokenLogprob]:
    """logits: [N, V] (raw model scores); the log-probability of each chosen token and the
    ``top`` most likely alternatives, from the unmodified distribution."""
    logprobs = torch.log_softmax(logits.float(), dim=-1)  # [N, V]
    index = torch.tensor(tokens, dtype=torch.long, device=logprobs.device).view(-1, 1)
    chosen = logprobs.gather(1, index).view(-1).tolist()
    alternatives: list[list[tuple[int, float]]] = [[] for _ in tokens]
    if top > 0:
        values, ids = torch.topk(logprobs, top, dim=-1)
        alternatives = [list(zip(i, v)) for i, v in zip(ids.tolist(), values.tolist())]
    return [(t, c, a) for t, c, a in zip(tokens, chosen, alternatives)]
