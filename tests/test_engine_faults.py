"""Fault isolation: an error in one request's sampling, detokenizing or logits fails that
request alone (an error event, its slot freed) while the other streams finish with their
solo output; a fault the worker cannot pin on a request ends only that model's requests."""

from __future__ import annotations

import asyncio
from pathlib import Path

import pytest

from ollama_compact_server.engine import postprocess
from ollama_compact_server.engine.detok import Detokenizer
from ollama_compact_server.engine.types import (
    EngineError,
    FinishReason,
    GenerateRequest,
    SamplingParams,
)
from tests.test_engine import PROMPTS, collect, greedy, request
from tests.test_engine_residency import make_engine, wait_for

GOOD = PROMPTS[:3]


async def outcome(engine, req: GenerateRequest, delay: float = 0.0):
    """(tokens, final event) or (tokens, EngineError) when it failed before any output."""
    try:
        tokens, _, final = await collect(engine, req, delay)
    except EngineError as exc:
        return [], exc
    return tokens, final


async def together(*jobs):
    """The jobs' results; a request left without an answer fails the test, not hangs it."""
    return await asyncio.wait_for(asyncio.gather(*jobs), 60)


def assert_failed(result) -> None:
    _, final = result
    if isinstance(final, EngineError):
        assert final.status == 500 and "ValueError" in str(final)
    else:
        assert final.finish_reason == FinishReason.ERROR and "ValueError" in final.error


async def solo_outputs(engine, model: str = "llama", n: int = 24) -> list[list[int]]:
    return [(await collect(engine, request(model, p, greedy(n))))[0] for p in GOOD]


async def settled(engine, model: str = "llama") -> None:
    cache = engine.device_loop.workers[model].runner.cache
    await wait_for(lambda: engine.device_loop.active_sequences() == 0 and cache.used == 0)


@pytest.fixture
def engine(tiny_models: dict[str, Path]):
    engine = make_engine(tiny_models, slots=6)
    yield engine
    engine.close()


async def test_sampling_error_for_a_fresh_request_fails_it_alone(
    engine, monkeypatch: pytest.MonkeyPatch
) -> None:
    solo = await solo_outputs(engine)
    bad = request("llama", list(range(300, 310)), greedy(24))
    real = postprocess.sample

    def sample(logits, params, states):
        if any(p is bad.sampling for p in params):
            raise ValueError("injected sampler fault")
        return real(logits, params, states)

    monkeypatch.setattr(postprocess, "sample", sample)
    # the bad request arrives while the others decode, and is prefilled beside a newcomer
    jobs = [outcome(engine, request("llama", p, greedy(24))) for p in GOOD[:2]]
    jobs += [
        outcome(engine, bad, delay=0.05),
        outcome(engine, request("llama", GOOD[2], greedy(24)), delay=0.05),
    ]
    results = await together(*jobs)
    assert_failed(results[2])
    for (tokens, final), expected in zip([*results[:2], results[3]], solo):
        assert final.finish_reason == FinishReason.LENGTH and tokens == expected
    assert engine.health()
    await settled(engine)


async def test_detokenizer_error_for_a_running_request_fails_it_alone(
    engine, monkeypatch: pytest.MonkeyPatch
) -> None:
    solo = await solo_outputs(engine)
    bad_prompt = list(range(300, 320))
    tail = bad_prompt[-4:]
    real = Detokenizer.add

    def add(self: Detokenizer, token: int) -> str:
        if self.tokens[:4] == tail and len(self.tokens) >= 4 + 3:  # its fourth token
            raise ValueError("injected detokenizer fault")
        return real(self, token)

    monkeypatch.setattr(Detokenizer, "add", add)
    jobs = [outcome(engine, request("llama", p, greedy(24))) for p in GOOD]
    jobs.append(outcome(engine, request("llama", bad_prompt, greedy(24)), delay=0.02))
    results = await together(*jobs)
    tokens, final = results[3]
    assert final.finish_reason == FinishReason.ERROR and "ValueError" in final.error
    assert len(tokens) == 3  # three tokens streamed, the fourth failed
    for (tokens, final), expected in zip(results[:3], solo):
        assert final.finish_reason == FinishReason.LENGTH and tokens == expected
    assert engine.health()
    await settled(engine)


@pytest.mark.parametrize("poison", [float("nan"), float("-inf")])
async def test_a_row_of_bad_logits_gives_finite_tokens(engine, poison: float) -> None:
    """NaN or -inf logits for one row (a greedy and a sampling request) yield valid token
    ids, never a crash; the other rows are untouched."""
    solo = await solo_outputs(engine, n=12)
    runner = engine.device_loop.workers["llama"].runner
    vocab = runner.config.vocab_size
    real = runner.decode
    bad_prompts = [list(range(300, 377)), list(range(300, 390))]  # unique positions >= 77
    hits = {"n": 0}

    def decode(slots, tokens, positions, loras=None, offsets=None):
        logits = real(slots, tokens, positions, loras).clone()
        for row, position in enumerate(positions):
            if position >= 77:
                logits[row] = poison
                hits["n"] += 1
        return logits

    runner.decode = decode  # type: ignore[method-assign]
    sampled = SamplingParams(
        temperature=0.8,
        top_k=20,
        top_p=0.9,
        min_p=0.05,
        repeat_penalty=1.3,
        presence_penalty=0.5,
        frequency_penalty=0.5,
        seed=3,
        max_tokens=12,
    )
    try:
        jobs = [outcome(engine, request("llama", p, greedy(12))) for p in GOOD]
        jobs.append(outcome(engine, request("llama", bad_prompts[0], greedy(12))))
        jobs.append(outcome(engine, request("llama", bad_prompts[1], sampled)))
        results = await together(*jobs)
    finally:
        runner.decode = real  # type: ignore[method-assign]
    assert hits["n"] > 0
    for tokens, final in results[3:]:
        assert final.finish_reason == FinishReason.LENGTH and len(tokens) == 12
        assert all(0 <= t < vocab for t in tokens)
    for (tokens, _), expected in zip(results[:3], solo):
        assert tokens == expected
    assert engine.health()
    await settled(engine)


@pytest.mark.parametrize("where", ["decode", "prefill_batch"])
async def test_a_forward_fault_is_pinned_on_the_row_that_causes_it(engine, where: str) -> None:
    """A batched forward that raises (not out of memory) runs again row by row: the row
    that causes it ends with an error event, the rows beside it go on with their solo
    output (the one fault policy of engine/worker.py, for prefill and decode alike)."""
    solo = await solo_outputs(engine)
    runner = engine.device_loop.workers["llama"].runner
    real = getattr(runner, where)
    if where == "decode":  # decode(slots, tokens, positions, loras)
        bad_prompt = list(range(300, 400))  # the only request reaching position 90

        def faulty(slots, tokens, positions, loras=None, offsets=None):
            if any(p >= 90 for p in positions):
                raise ValueError("injected decode fault")
            return real(slots, tokens, positions, loras)

    else:  # prefill_batch(slots, prompts, loras, starts): short, beside a short good one
        bad_prompt = list(range(395, 400))

        def faulty(slots, prompts, loras=None, starts=None, media=None):  # type: ignore[misc]
            if any(399 in p for p in prompts):
                raise ValueError("injected prefill fault")
            return real(slots, prompts, loras, starts)

    setattr(runner, where, faulty)
    try:
        order = [GOOD[1], bad_prompt, GOOD[0], GOOD[2]]  # GOOD[1] and the bad one batch up
        results = await together(*(outcome(engine, request("llama", p, greedy(24))) for p in order))
    finally:
        setattr(runner, where, real)
    assert_failed(results[1])
    for (tokens, final), expected in zip([results[2], results[0], results[3]], solo):
        assert final.finish_reason == FinishReason.LENGTH and tokens == expected
    assert engine.health()
    await settled(engine)


async def test_a_failing_model_step_spares_the_other_models(engine) -> None:
    """A fault no request can be blamed for ends that model's requests with an error and
    unloads it; another model's stream in the same loop goes on, and the loop stays up."""
    expected, _, _ = await collect(engine, request("qwen2", GOOD[0], greedy(40)))
    await collect(engine, request("llama", GOOD[0], greedy(2)))  # load it
    worker = engine.device_loop.workers["llama"]
    real = worker.step
    calls = {"n": 0}

    def step() -> bool:
        calls["n"] += 1
        if calls["n"] == 4:
            raise RuntimeError("injected worker fault")
        return real()

    worker.step = step  # type: ignore[method-assign]
    results = await together(
        outcome(engine, request("qwen2", GOOD[0], greedy(40))),
        outcome(engine, request("llama", GOOD[1], greedy(40))),
        outcome(engine, request("llama", GOOD[2], greedy(40))),
    )
    tokens, final = results[0]
    assert final.finish_reason == FinishReason.LENGTH and tokens == expected
    for _, final in results[1:]:
        error = str(final) if isinstance(final, EngineError) else final.error
        assert "RuntimeError" in error
    assert engine.health()
    assert "llama" not in engine.device_loop.workers  # unloaded; the next request reloads it
    tokens, final = await outcome(engine, request("llama", GOOD[1], greedy(4)))
    assert final.finish_reason == FinishReason.LENGTH and len(tokens) == 4
