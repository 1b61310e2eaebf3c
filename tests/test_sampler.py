"""The sampler on small logits, checked against hand computations: min_p, repeat_penalty
with repeat_last_n, presence and frequency penalties; rows of NaN or -inf logits give valid
token ids."""

from __future__ import annotations

import math

import pytest
import torch

from ollama_compact_server.engine.sampler import RowState, apply_penalties, sample, sample_row
from ollama_compact_server.engine.types import SamplingParams

CPU = torch.device("cpu")


def params(**values) -> SamplingParams:
    """Neutral settings (no penalty, no truncation) except what the test names."""
    base = dict(temperature=1.0, top_k=0, top_p=1.0, min_p=0.0, repeat_penalty=1.0, seed=1)
    return SamplingParams(**{**base, **values})


def state(p: SamplingParams, history: list[int], generated: list[int] = ()) -> RowState:
    row = RowState(p, history, CPU)
    for token in generated:
        row.append(token)
    return row


def drawn_distribution(
    monkeypatch: pytest.MonkeyPatch, logits: list[float], p: SamplingParams, row: RowState
) -> list[float]:
    """The (normalised) distribution the sampler draws from for one row."""
    seen: list[torch.Tensor] = []
    real = torch.multinomial

    def spy(probs: torch.Tensor, n: int, **kwargs) -> torch.Tensor:
        seen.append(probs.clone())
        return real(probs, n, **kwargs)

    monkeypatch.setattr(torch, "multinomial", spy)
    sample(torch.tensor([logits]), [p], [row])
    assert len(seen) == 1
    return seen[0].tolist()


def softmax(values: list[float]) -> list[float]:
    exps = [math.exp(v) for v in values]
    return [e / sum(exps) for e in exps]


def test_min_p_keeps_tokens_at_least_min_p_times_the_best(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    logits = [2.0, 1.0, 0.0, -3.0]
    probs = softmax(logits)  # 0.662, 0.244, 0.090, 0.004
    p = params(min_p=0.3)  # threshold 0.3 * 0.662 = 0.199: tokens 0 and 1 survive
    kept = probs[0] + probs[1]
    expected = [probs[0] / kept, probs[1] / kept, 0.0, 0.0]
    got = drawn_distribution(monkeypatch, logits, p, state(p, [9]))
    assert got == pytest.approx(expected, abs=1e-6)
    # with temperature 2 the distribution flattens: token 2 now passes the threshold
    p = params(min_p=0.3, temperature=2.0)
    probs = softmax([v / 2 for v in logits])  # 0.506, 0.307, 0.186, 0.041
    kept = sum(probs[:3])
    expected = [probs[0] / kept, probs[1] / kept, probs[2] / kept, 0.0]
    got = drawn_distribution(monkeypatch, logits, p, state(p, [9]))
    assert got == pytest.approx(expected, abs=1e-6)


def test_repeat_penalty_reads_the_last_n_tokens() -> None:
    logits = torch.tensor([1.0, 2.0, -1.0, 0.5, 3.0])
    history = [0, 1, 4, 2, 3, 1]  # prompt and generated tokens, oldest first
    p = params(repeat_penalty=2.0, repeat_last_n=3)  # window [2, 3, 1]
    got = apply_penalties(logits.clone(), p, state(p, history)).tolist()
    # positive logits are divided by the penalty, negative ones multiplied
    assert got == pytest.approx([1.0, 2.0 / 2, -1.0 * 2, 0.5 / 2, 3.0])
    p = params(repeat_penalty=2.0, repeat_last_n=-1)  # -1: the whole history
    got = apply_penalties(logits.clone(), p, state(p, history)).tolist()
    assert got == pytest.approx([1.0 / 2, 2.0 / 2, -1.0 * 2, 0.5 / 2, 3.0 / 2])
    p = params(repeat_penalty=2.0, repeat_last_n=0)  # 0: off
    assert apply_penalties(logits.clone(), p, state(p, history)).tolist() == logits.tolist()
    # a generated token enters the window too
    p = params(repeat_penalty=2.0, repeat_last_n=1)
    got = apply_penalties(logits.clone(), p, state(p, history, generated=[4])).tolist()
    assert got == pytest.approx([1.0, 2.0, -1.0, 0.5, 3.0 / 2])


def test_repeat_penalty_changes_the_greedy_choice() -> None:
    logits = torch.tensor([[0.0, 3.0, 2.0]])
    p = params(temperature=0.0, repeat_penalty=2.0, repeat_last_n=1)
    assert sample(logits, [p], [state(p, [1])]) == [2]  # 3 / 2 = 1.5 < 2
    assert sample(logits, [p], [state(p, [1, 0])]) == [1]  # token 1 left the window


def test_presence_and_frequency_penalties_count_generated_tokens() -> None:
    logits = torch.zeros(5)
    p = params(presence_penalty=0.5, frequency_penalty=0.25)
    row = state(p, [4, 4], generated=[1, 1, 2])  # the prompt's 4 is not counted
    got = apply_penalties(logits.clone(), p, row).tolist()
    # logit - presence * [count > 0] - frequency * count
    assert got == pytest.approx([0.0, -0.5 - 2 * 0.25, -0.5 - 1 * 0.25, 0.0, 0.0])
    # negative values encourage repetition
    p = params(presence_penalty=-1.0, frequency_penalty=-0.5)
    got = apply_penalties(logits.clone(), p, state(p, [], generated=[3, 3])).tolist()
    assert got == pytest.approx([0.0, 0.0, 0.0, 1.0 + 2 * 0.5, 0.0])


def test_penalties_combine_in_the_drawn_distribution(monkeypatch: pytest.MonkeyPatch) -> None:
    logits = [1.0, 1.0, 1.0]
    p = params(repeat_penalty=2.0, repeat_last_n=64, presence_penalty=0.5, frequency_penalty=0.5)
    row = state(p, [0], generated=[1])  # history [0, 1]; token 1 generated once
    # token 0: 1 / 2; token 1: 1 / 2 - 0.5 - 0.5; token 2: 1
    expected = softmax([0.5, -0.5, 1.0])
    got = drawn_distribution(monkeypatch, logits, p, row)
    assert got == pytest.approx(expected, abs=1e-6)


BAD_ROWS = {
    "nan": [float("nan")] * 6,
    "-inf": [float("-inf")] * 6,
    "+inf": [float("inf")] * 6,
    "mixed": [float("nan"), float("-inf"), float("inf"), float("nan"), 1.0, float("-inf")],
}
SETTINGS = {
    "greedy": dict(temperature=0.0),
    "greedy penalised": dict(temperature=0.0, repeat_penalty=1.5, presence_penalty=1.0),
    "sampled": dict(temperature=0.7, top_k=3, top_p=0.9, min_p=0.1),
    "sampled penalised": dict(
        temperature=0.7, repeat_penalty=1.3, frequency_penalty=2.0, logit_bias={2: 5.0}
    ),
    "tiny temperature": dict(temperature=1e-30, top_k=0),
}


@pytest.mark.parametrize("bad", BAD_ROWS)
@pytest.mark.parametrize("setting", SETTINGS)
def test_bad_logit_rows_give_valid_tokens(bad: str, setting: str) -> None:
    """A row of NaN / infinite logits beside a healthy row: a valid id for the bad row,
    the healthy row's greedy choice unchanged."""
    p = params(**SETTINGS[setting])
    healthy = params(temperature=0.0)
    logits = torch.tensor([BAD_ROWS[bad], [0.0, 0.1, 0.2, 5.0, 0.3, 0.4]])
    rows = [state(p, [1, 2], generated=[2, 3]), state(healthy, [1])]
    tokens = sample(logits, [p, healthy], rows)
    assert 0 <= tokens[0] < 6 and tokens[1] == 3
    if bad == "mixed" and p.greedy and not p.penalised:
        assert tokens[0] == 2  # +inf is the best score


@pytest.mark.parametrize("setting", SETTINGS)
def test_a_nan_row_still_obeys_its_grammar_mask(setting: str) -> None:
    """Structured output masks forbidden tokens with -inf; if the model's scores went NaN,
    the fallback must still pick an allowed token, not whatever sits at index 0."""
    p = params(**SETTINGS[setting])
    row = torch.full((6,), float("nan"))
    row[[0, 1, 2, 3, 5]] = float("-inf")  # only token 4 is allowed
    assert sample(row.view(1, -1), [p], [state(p, [1, 2], generated=[2, 3])]) == [4]


def test_batched_penalties_choose_what_each_row_alone_would() -> None:
    """The batch path (one gather / scatter for every row's repeat penalty) picks, row by
    row, what sampling each row alone picks: greedy and seeded, windows of every length
    (repeated ids, empty, the whole history), with presence / frequency penalties and
    logit biases mixed in, and the raw logits left untouched."""
    generator = torch.Generator().manual_seed(7)
    vocab = 500
    logits = torch.randn(12, vocab, generator=generator) * 4
    logits[3, 7] = float("nan")
    settings = [
        dict(temperature=0.0, repeat_penalty=1.1),
        dict(temperature=0.0, repeat_penalty=1.3, repeat_last_n=3),
        dict(temperature=0.0),  # the fast path beside the batch
        dict(temperature=0.0, repeat_penalty=1.1, repeat_last_n=-1),
        dict(temperature=0.7, repeat_penalty=1.2, seed=3),
        dict(temperature=0.0, repeat_penalty=1.1, presence_penalty=0.5, frequency_penalty=0.3),
        dict(temperature=0.0, repeat_penalty=1.1, logit_bias={5: 3.0, 9: -100.0}),
        dict(temperature=0.9, repeat_penalty=1.0, presence_penalty=1.0, seed=4),
        dict(temperature=0.0, repeat_penalty=0.8, repeat_last_n=0),  # window off
        dict(temperature=0.0, repeat_penalty=1.5),
        dict(temperature=1.0, top_k=20, top_p=0.9, repeat_penalty=1.1, seed=9),
        dict(temperature=0.0, repeat_penalty=1.1),
    ]
    histories = [
        [int(t) for t in torch.randint(0, vocab, (n,), generator=generator)]
        for n in (64, 3, 0, 200, 10, 50, 64, 5, 64, 1, 30, 0)
    ]
    histories[0] = [int(torch.argmax(logits[0]))] * 40  # one id, many times
    ps = [params(**s) for s in settings]
    raw = logits.clone()
    batched = sample(logits, ps, [state(p, h, generated=h[-3:]) for p, h in zip(ps, histories)])
    assert torch.equal(torch.nan_to_num(logits), torch.nan_to_num(raw))
    finite = torch.nan_to_num(logits, nan=-1e29, posinf=1e30, neginf=-1e30)
    alone = [  # the row-by-row path: a clone per row, penalised alone
        sample_row(finite[i], p, state(p, h, generated=h[-3:]))
        for i, (p, h) in enumerate(zip(ps, histories))
    ]
    assert batched == alone


def test_greedy_repeat_penalty_without_copies_matches_the_row_by_row_path() -> None:
    """All-greedy batches whose rows differ only by their repeat penalties (Ollama's
    default) skip the row copies: the same picks as penalising each row alone, with the
    raw best token inside and outside the window, penalties above and below 1, ties
    between a window token and the raw best, short and empty windows."""
    generator = torch.Generator().manual_seed(11)
    vocab = 300
    logits = torch.randn(10, vocab, generator=generator) * 3
    histories: list[list[int]] = []
    for row in range(10):
        history = [int(t) for t in torch.randint(0, vocab, (20,), generator=generator)]
        best = int(torch.argmax(logits[row]))
        if row % 2 == 0:
            history[-1] = best  # the raw best was just generated: it is penalised
        histories.append(history)
    # a tie: a window token scored, after its penalty, exactly the raw best's logit
    top = float(logits[5].max())
    logits[5, 7] = top * 1.5 if top > 0 else top / 1.5
    histories[5] = [7, 8, 9]
    histories[9] = []
    penalties = [1.1, 0.4, 0.8, 1.1, 0.5, 1.5, 1.1, 2.0, 1.0, 1.1]
    ps = [params(temperature=0.0, repeat_penalty=r, repeat_last_n=8) for r in penalties]
    ps[3] = params(temperature=0.0)  # an unpenalised row among them
    raw = logits.clone()
    batched = sample(logits, ps, [state(p, h) for p, h in zip(ps, histories)])
    assert torch.equal(logits, raw)
    alone = [sample_row(logits[i], p, state(p, h)) for i, (p, h) in enumerate(zip(ps, histories))]
    assert batched == alone


def test_a_sampled_row_beside_an_unpenalised_greedy_row_is_sampled() -> None:
    """Once, a greedy row without penalties was counted twice (fast and repeat-only), the
    batch taken for all-greedy, and the sampled row beside it given its raw argmax."""
    logits = torch.tensor([[0.0, 5.0, 1.0], [4.0, 4.0, 4.0]])
    ps = [params(temperature=0.0), params(temperature=1.0, repeat_penalty=1.1, seed=0)]
    picks = set()
    for seed in range(30):
        ps[1] = params(temperature=1.0, repeat_penalty=1.1, seed=seed)
        picks.add(sample(logits, ps, [state(p, [2]) for p in ps])[1])
    assert picks == {0, 1, 2}
