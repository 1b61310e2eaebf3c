"""Per-row sampling inside a batch: penalties, temperature, top-k, top-p, min-p, seeds."""

from __future__ import annotations

from collections.abc import Iterable, Sequence

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


def apply_penalties(
    logits: torch.Tensor, params: SamplingParams, state: RowState, repeat: bool = True
) -> torch.Tensor:
    """logits: [V] for one row, penalised in place and returned (llama.cpp's rules);
    ``repeat`` False leaves the repeat penalty out (``penalise`` applied it already)."""
    if repeat and params.repeat_penalty != 1.0 and params.repeat_last_n != 0:
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


def sample_row(
    logits: torch.Tensor, params: SamplingParams, state: RowState, penalised: bool = False
) -> int:
    """logits: [V] float32 for one row; returns the chosen token id. ``penalised``: the
    penalties were applied already."""
    if params.penalised and not penalised:
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
    for them. The other rows are copied once, penalised together (the repeat penalty of
    Ollama's defaults is one gather and one scatter for the whole batch), and the greedy
    ones among them share one argmax too; the rest draw one by one."""
    fast = [i for i, p in enumerate(params) if p.greedy and not p.penalised]
    repeat_only = [i for i, p in enumerate(params) if p.greedy and p.penalised and _repeat_only(p)]
    if len(fast) + len(repeat_only) == len(params):
        # all greedy: one max over the raw logits (bfloat16 -> float32 is exact, so the
        # argmax is the same); a NaN or an infinity as a row's best sends us the careful way
        values, picks = torch.max(logits, dim=-1)
        if bool(torch.isfinite(values).all()):
            best = [int(t) for t in picks.tolist()]
            if repeat_only:
                _repeat_greedy(logits, values.tolist(), best, repeat_only, params, states)
            return best
    chosen: list[int] = [0] * len(params)
    if fast:
        picks = torch.argmax(_finite(logits[fast]), dim=-1)
        for i, token in zip(fast, picks.tolist()):
            chosen[i] = int(token)
    taken = set(fast)
    slow = [i for i in range(len(params)) if i not in taken]
    if not slow:
        return chosen
    rows = _finite(logits[slow])  # [S, V]: a copy, so penalties never touch the raw scores
    slow_params = [params[i] for i in slow]
    penalise(rows, slow_params, [states[i] for i in slow])
    greedy = [j for j, p in enumerate(slow_params) if p.greedy]
    if greedy:
        picks = torch.argmax(rows[greedy], dim=-1)
        for j, token in zip(greedy, picks.tolist()):
            chosen[slow[j]] = int(token)
    for j, i in enumerate(slow):
        if not params[i].greedy:
            chosen[i] = sample_row(rows[j], params[i], states[i], penalised=True)
    return chosen


def _repeat_only(p: SamplingParams) -> bool:
    return not (p.presence_penalty or p.frequency_penalty or p.logit_bias)


def _repeat_greedy(
    logits: torch.Tensor,
    values: list[float],
    chosen: list[int],
    rows: list[int],
    params: list[SamplingParams],
    states: list[RowState],
) -> None:
    """Greedy rows whose only modifier is the repeat penalty (Ollama's default), without
    copying a row: the penalty only changes the window's logits, so the penalised argmax
    is the best of the window's penalised logits and, when the raw best token is outside
    the window, that token (ties to the lower id, as argmax). A row whose raw best token
    is inside the window is penalised on a copy of that row alone."""
    penalised_rows, windows = _windows(rows, params, states)
    if not penalised_rows:
        return
    width = max(len(w) for w in windows)
    ids = torch.tensor([w + [w[0]] * (width - len(w)) for w in windows], dtype=torch.long)
    which = torch.tensor(penalised_rows, dtype=torch.long).unsqueeze(1)  # [R, 1]
    penalty = torch.tensor([params[i].repeat_penalty for i in penalised_rows]).unsqueeze(1)
    picked = logits[which.to(logits.device), ids.to(logits.device)].float().cpu()  # [R, W]
    scores = torch.where(picked > 0, picked / penalty, picked * penalty)  # [R, W]
    best_in_window = scores.max(dim=1).values.tolist()
    for r, (i, window) in enumerate(zip(penalised_rows, windows)):
        raw = chosen[i]
        if raw in set(window):  # the raw best is penalised: this row alone, on a copy
            row = logits[i].float().clone()
            row[ids[r].to(row.device)] = scores[r].to(row.device)
            chosen[i] = int(torch.argmax(row))
        elif best_in_window[r] >= values[i]:  # a window token can still win (penalty < 1)
            best, token = values[i], raw
            for candidate, score in zip(ids[r].tolist(), scores[r].tolist()):
                if score > best or (score == best and candidate < token):
                    best, token = score, candidate
            chosen[i] = token


def _windows(
    rows: Iterable[int], params: list[SamplingParams], states: list[RowState]
) -> tuple[list[int], list[list[int]]]:
    """The rows whose repeat penalty applies, and each one's window of recent tokens."""
    which, windows = [], []
    for i in rows:
        p, history = params[i], states[i].history
        if p.repeat_penalty != 1.0 and p.repeat_last_n != 0:
            window = history if p.repeat_last_n < 0 else history[-p.repeat_last_n :]
            if window:
                which.append(i)
                windows.append(window)
    return which, windows


def _finite(logits: torch.Tensor) -> torch.Tensor:
    """float32 with NaN ranked just above -inf: a structured-output mask writes -inf, so a
    row that went NaN still picks a token its grammar allows."""
    return torch.nan_to_num(logits.float(), nan=-1e29, posinf=1e30, neginf=-1e30)


def penalise(rows: torch.Tensor, params: list[SamplingParams], states: list[RowState]) -> None:
    """rows: [S, V] float32, penalised in place: every row's repeat penalty at once, then
    the rarer presence / frequency penalties and logit biases row by row."""
    repeat, windows = _windows(range(len(params)), params, states)
    if repeat:
        width = max(len(w) for w in windows)
        # a short window is padded with its own first token: a repeated id is written
        # twice with the same value (computed from the unpenalised logit), so once
        ids = torch.tensor([w + [w[0]] * (width - len(w)) for w in windows], dtype=torch.long)
        which = torch.tensor(repeat, dtype=torch.long).unsqueeze(1)  # [R, 1]
        ids = ids.to(rows.device)
        which = which.to(rows.device)
        penalty = torch.tensor(
            [params[j].repeat_penalty for j in repeat], dtype=rows.dtype, device=rows.device
        ).unsqueeze(1)  # [R, 1]
        picked = rows[which, ids]  # [R, W]
        rows[which, ids] = torch.where(picked > 0, picked / penalty, picked * penalty)
    for j, (p, state) in enumerate(zip(params, states)):
        if p.presence_penalty or p.frequency_penalty or p.logit_bias:
            apply_penalties(rows[j], p, state, repeat=False)


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
