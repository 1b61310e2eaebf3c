"""Prefix reuse: a prompt that begins with what a slot holds (the previous turn of a chat, a
shared system prompt) skips prefilling it, with the same greedy output as from scratch; the
cache's bookkeeping matches what the slots really hold through any order of admissions and
releases; adapters never share K/V; the dialects report what was reused."""

from __future__ import annotations

import asyncio
import itertools
import random
from pathlib import Path

import pytest
import torch

from ollama_compact_server.engine.config import EngineConfig, ModelSource
from ollama_compact_server.engine.kv import KVShape, SlotKVCache
from ollama_compact_server.engine.local import LocalEngine
from ollama_compact_server.engine.loop import DeviceLoop
from ollama_compact_server.engine.prefix import MIN_COPY, PrefixCache, common_prefix
from ollama_compact_server.engine.types import GenerateRequest, SamplingParams
from tests.test_engine import provider_for

_ids = itertools.count()

CONFIG = EngineConfig(
    device=torch.device("cpu"), dtype=torch.float32, slots=4, capacity=256, prefill_chunk=16
)


def test_common_prefix() -> None:
    assert common_prefix([], [1]) == 0
    assert common_prefix([1, 2, 3], [1, 2, 3]) == 3
    assert common_prefix([1, 2, 3], [1, 2]) == 2
    assert common_prefix([1, 2, 3, 4], [1, 2, 9, 4]) == 2
    assert common_prefix([5], [6]) == 0
    rng = random.Random(0)
    for _ in range(200):
        a = [rng.randrange(3) for _ in range(rng.randrange(30))]
        b = a[: rng.randrange(len(a) + 1)] + [rng.randrange(3) for _ in range(rng.randrange(5))]
        expected = next((i for i, (x, y) in enumerate(zip(a, b)) if x != y), min(len(a), len(b)))
        assert common_prefix(a, b) == expected


def test_bookkeeping_follows_the_slots_through_random_traffic() -> None:
    """Every slot's K/V is stamped with the token at each position; after hundreds of random
    admissions (reusing idle or running prefixes) and releases, whatever an idle entry
    claims to hold is what its slot holds, and running sequences stay in slots 0..n-1."""
    capacity, slots = 64, 5
    cache = SlotKVCache(KVShape(1, 1, 1), slots, capacity, torch.float32, torch.device("cpu"))
    prefix = PrefixCache(cache)
    rng = random.Random(1)
    running: dict[int, list[int]] = {}  # slot -> tokens it holds
    stems = [[rng.randrange(50) for _ in range(30)] for _ in range(3)]

    def stamp(slot: int, tokens: list[int], start: int) -> None:
        for pos in range(start, len(tokens)):
            cache.k[0][slot, 0, pos, 0] = tokens[pos]

    def holds(slot: int) -> list[int]:
        return [int(v) for v in cache.k[0][slot, 0, :, 0]]

    for _ in range(400):
        if running and (rng.random() < 0.45 or not cache.can_allocate()):
            slot = rng.choice(sorted(running))
            tokens = running.pop(slot)
            last = cache.used - 1
            mover = running.get(last) if last != slot else None
            moved = prefix.release(slot, tokens, "", len(mover) if mover else 0)
            if moved >= 0 and mover is not None:
                running[slot] = running.pop(moved)
        else:
            stem = rng.choice(stems)
            prompt = stem[: rng.randrange(1, 30)] + [rng.randrange(50) for _ in range(5)]
            plan = prefix.find(prompt, "", [(s, t, "") for s, t in running.items()])
            if plan.length:
                assert plan.length < len(prompt)
                source = running[plan.source] if plan.running else prefix.idle[plan.source].tokens
                assert source[: plan.length] == prompt[: plan.length]
                assert plan.length >= MIN_COPY or not plan.running
            slot = prefix.allocate(plan)
            assert holds(slot)[: plan.length] == prompt[: plan.length]
            stamp(slot, prompt, plan.length)
            running[slot] = prompt
        assert sorted(running) == list(range(cache.used))
        for slot, tokens in running.items():
            assert holds(slot)[: len(tokens)] == tokens
        for slot, entry in prefix.idle.items():
            assert slot >= cache.used
            assert holds(slot)[: len(entry.tokens)] == entry.tokens
    assert prefix.hits > 50


@pytest.fixture
def engine(tiny_models: dict[str, Path]):
    loop = DeviceLoop(CONFIG, ModelSource(provider_for(tiny_models)))
    loop.start()
    yield LocalEngine(loop)
    loop.stop()


async def generate(engine: LocalEngine, model: str, prompt: list[int], n: int = 10):
    params = SamplingParams(temperature=0, repeat_penalty=1.0, max_tokens=n)
    tokens: list[int] = []
    final = None
    async for event in engine.generate(GenerateRequest(f"p{next(_ids)}", model, prompt, params)):
        tokens += event.token_ids
        if event.finished:
            final = event
    assert final is not None
    return tokens, final


@pytest.mark.parametrize("family", ["llama", "gemma3"])
async def test_a_chat_turn_reuses_the_conversation_so_far(
    engine: LocalEngine, tiny_models: dict[str, Path], family: str
) -> None:
    """Turn two re-sends turn one (prompt and reply) plus a new message, as `ollama run`
    does: only the new part is computed, and the greedy reply equals a fresh engine's."""
    first = list(range(10, 60))  # longer than a prefill chunk and gemma3's window
    reply, done = await generate(engine, family, first)
    assert done.cached_tokens == 0 and done.prompt_tokens == len(first)
    second = first + reply + list(range(100, 120))
    again, done2 = await generate(engine, family, second)
    # the last reply token was never fed back, so everything before it is reused
    assert done2.cached_tokens == len(first) + len(reply) - 1
    assert done2.prompt_tokens == len(second)
    fresh_loop = DeviceLoop(CONFIG, ModelSource(provider_for(tiny_models)))
    fresh_loop.start()
    try:
        expected, done3 = await generate(LocalEngine(fresh_loop), family, second)
    finally:
        fresh_loop.stop()
    assert done3.cached_tokens == 0
    assert again == expected


async def test_concurrent_requests_share_a_long_common_prefix(engine: LocalEngine) -> None:
    """A system prompt shared by chats in flight at once is copied from the slot of the
    first instead of computed again, and each output equals its output alone."""
    system = list(range(30, 90))
    prompts = [[*system, 200 + i, 201 + i, 202 + i] for i in range(3)]
    alone = []
    for prompt in prompts:
        tokens, _ = await generate(engine, "llama", prompt, n=40)
        alone.append(tokens)
    for worker in engine.device_loop.workers.values():
        worker.scheduler.prefix.clear()

    async def later(i: int):
        await asyncio.sleep(0.02 * i)
        return await generate(engine, "llama", prompts[i], n=40)

    results = await asyncio.gather(*(later(i) for i in range(3)))
    assert [r[0] for r in results] == alone
    assert results[0][1].cached_tokens == 0
    assert all(r[1].cached_tokens >= len(system) for r in results[1:])


async def test_prompt_scoring_is_never_served_from_the_cache(engine: LocalEngine) -> None:
    prompt = list(range(10, 40))
    await generate(engine, "llama", prompt)
    params = SamplingParams(temperature=0, max_tokens=0, prompt_logprobs=True, logprobs=0)
    events = [e async for e in engine.generate(GenerateRequest("score", "llama", prompt, params))]
    scores = next(e.prompt_logprobs for e in events if e.prompt_logprobs is not None)
    assert len(scores) == len(prompt) and events[-1].cached_tokens == 0


def test_cached_contents_are_kept_apart_by_adapter() -> None:
    """K/V depend on the weights that made them: a prefix cached with one adapter (or the
    bare base) is not offered to another, and a re-created adapter has a new key."""
    cache = SlotKVCache(KVShape(1, 1, 1), 3, 32, torch.float32, torch.device("cpu"))
    prefix = PrefixCache(cache)
    tokens = list(range(20))
    slot = prefix.allocate(prefix.find(tokens, "adapter-a", []))
    prefix.release(slot, tokens, "adapter-a", 0)
    assert prefix.find([*tokens, 99], "adapter-a", []).length == 20
    assert prefix.find([*tokens, 99], "", []).length == 0
    assert prefix.find([*tokens, 99], "adapter-a-recreated", []).length == 0
    running = [(1, tokens, "adapter-b")]
    assert prefix.find([*tokens, 99], "", running).length == 0
    assert prefix.find([*tokens, 99], "adapter-b", running).length == 20


async def test_both_dialects_report_what_was_reused(tmp_path: Path, tiny_models) -> None:
    """Ollama's prompt_eval_count counts the prompt tokens evaluated, OpenAI's usage
    prompt_tokens_details.cached_tokens those reused; /metrics counts the hits."""
    from ollama_compact_server.registry.importers import import_hf_dir
    from ollama_compact_server.registry.store import Registry
    from tests.conftest import serve_app

    registry = Registry(tmp_path / "registry")
    import_hf_dir(registry, tiny_models["llama"], "tiny")
    words = "the quick brown fox jumps over the lazy dog " * 6
    options = {"temperature": 0, "num_predict": 4}
    async with serve_app(registry) as served:
        first = await served.ollama.generate(model="tiny", prompt=words, raw=True, options=options)
        assert first.prompt_eval_count > 20
        longer = words + first.response + " and runs away"
        second = await served.ollama.generate(
            model="tiny", prompt=longer, raw=True, options=options
        )
        evaluated = second.prompt_eval_count
        assert 0 < evaluated < first.prompt_eval_count  # only the new words were computed
        reply = await served.openai.completions.create(
            model="tiny", prompt=longer + " again", max_tokens=2, temperature=0
        )
        usage = reply.usage
        assert usage is not None and usage.prompt_tokens_details is not None
        assert usage.prompt_tokens_details.cached_tokens > first.prompt_eval_count - 2
        assert usage.prompt_tokens > usage.prompt_tokens_details.cached_tokens
        text = (await served.raw.get("/metrics")).text
        hits = [line for line in text.splitlines() if line.startswith("ocs_prefix_cache_hits")]
        assert hits and float(hits[0].split()[-1]) >= 2


@pytest.mark.e2e
async def test_a_cached_prompt_gives_the_reply_from_scratch_on_the_c_decode_step(
    gemma_registry,
) -> None:
    """gemma3:270m (int8 / int4 modules, so decode steps run in C): a prompt sent again is
    served from the cache but for its last token, which then runs as a prompt token on the
    torch path, as it did from scratch, not as a C decode step whose last bits differ
    (before: "different kinds of animals" against "types" from scratch)."""
    from tests.conftest import serve_app

    prompt = "Write one sentence about the sea. The sea is"
    options = {"temperature": 0, "num_predict": 16}
    async with serve_app(gemma_registry) as served:
        other = await served.ollama.generate(
            model="gemma3:270m", prompt="Something else entirely.", raw=True, options=options
        )
        assert other.response
        replies = []
        for _ in range(3):
            reply = await served.ollama.generate(
                model="gemma3:270m", prompt=prompt, raw=True, options=options
            )
            replies.append((reply.response, reply.prompt_eval_count))
        (fresh, evaluated), *again = replies
        assert evaluated > 5  # from scratch (the other prompt shared only <bos>)
        for text, count in again:
            assert count < evaluated  # served from the cache...
            assert text == fresh  # ...with the same reply
