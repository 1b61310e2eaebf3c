"""The device loop on tiny models: greedy equality inside busy batches, seeded sampling,
stop strings, UTF-8 streaming, cancellation, fault isolation and context limits."""

from __future__ import annotations

import asyncio
import itertools
from pathlib import Path

import pytest
import torch

from ollama_compact_server.engine.config import EngineConfig, ModelSource
from ollama_compact_server.engine.detok import Detokenizer, StopMatcher
from ollama_compact_server.engine.local import LocalEngine
from ollama_compact_server.engine.loop import DeviceLoop
from ollama_compact_server.engine.provider import stop_ids_of
from ollama_compact_server.engine.sequence import LoadedModel
from ollama_compact_server.engine.types import (
    EngineError,
    FinishReason,
    GenerateRequest,
    SamplingParams,
)
from tests.factory import make_tokenizer

_ids = itertools.count()


def provider_for(models: dict[str, Path]):
    cache: dict[str, LoadedModel] = {}

    def provide(name: str) -> LoadedModel:
        if name not in models:
            raise EngineError(f"model '{name}' not found")
        if name not in cache:
            from transformers import AutoModelForCausalLM, AutoTokenizer

            model = AutoModelForCausalLM.from_pretrained(
                models[name], attn_implementation="sdpa"
            ).eval()
            tokenizer = AutoTokenizer.from_pretrained(models[name])
            # the tiny models never emit their special tokens; keep eos out for length tests
            cache[name] = LoadedModel(model, tokenizer, stop_ids=set())
        return cache[name]

    return provide


@pytest.fixture
def engine(tiny_models: dict[str, Path]):
    config = EngineConfig(
        device=torch.device("cpu"), dtype=torch.float32, slots=6, capacity=256, prefill_chunk=16
    )
    loop = DeviceLoop(config, ModelSource(provider_for(tiny_models)))
    loop.start()
    yield LocalEngine(loop)
    loop.stop()


def greedy(n: int = 12, **extra) -> SamplingParams:
    return SamplingParams(temperature=0, repeat_penalty=1.0, max_tokens=n, **extra)


def request(model: str, prompt: list[int], params: SamplingParams) -> GenerateRequest:
    return GenerateRequest(
        request_id=f"r{next(_ids)}", model=model, prompt_ids=prompt, sampling=params
    )


async def collect(engine: LocalEngine, req: GenerateRequest, delay: float = 0.0):
    await asyncio.sleep(delay)
    tokens: list[int] = []
    text = []
    final = None
    async for event in engine.generate(req):
        tokens += event.token_ids
        text.append(event.text)
        if event.finished:
            final = event
    return tokens, "".join(text), final


PROMPTS = [
    list(range(10, 30)),
    list(range(40, 47)),
    list(range(100, 160)),  # longer than one prefill chunk and the gemma3 sliding window
    [7, 8, 9],
    list(range(200, 235)),
]


@pytest.mark.parametrize("family", ["llama", "qwen2", "gemma3"])
async def test_greedy_output_in_a_busy_batch_equals_solo_and_transformers(
    engine: LocalEngine, tiny_models: dict[str, Path], family: str
) -> None:
    from transformers import AutoModelForCausalLM

    hf = AutoModelForCausalLM.from_pretrained(
        tiny_models[family], attn_implementation="sdpa"
    ).eval()
    solo = []
    for prompt in PROMPTS:
        tokens, _, final = await collect(engine, request(family, prompt, greedy()))
        assert final.finish_reason == FinishReason.LENGTH and final.completion_tokens == 12
        solo.append(tokens)
        ref = hf.generate(torch.tensor([prompt]), max_new_tokens=12, do_sample=False)[
            0, len(prompt) :
        ]
        assert tokens == ref.tolist()
    # now all together, joining at different steps (staggered), more than the slots hold
    jobs = [
        collect(engine, request(family, prompt, greedy()), delay=0.003 * i)
        for i, prompt in enumerate(PROMPTS + PROMPTS)
    ]
    results = await asyncio.gather(*jobs)
    for i, (tokens, _, _) in enumerate(results):
        assert tokens == solo[i % len(PROMPTS)], f"request {i} differs inside the batch"
    assert engine.device_loop.active_sequences() == 0
    assert engine.device_loop.workers[family].runner.cache.used == 0


async def test_several_models_in_one_loop(engine: LocalEngine) -> None:
    jobs = [
        collect(engine, request(f, PROMPTS[0], greedy(6))) for f in ("llama", "qwen2", "gemma3")
    ] * 2
    results = await asyncio.gather(*jobs)
    assert results[0][0] == results[3][0] and results[1][0] == results[4][0]
    assert len(engine.device_loop.workers) == 3


async def test_seeded_sampling_is_reproducible_inside_a_batch(engine: LocalEngine) -> None:
    params = dict(temperature=1.0, top_k=50, top_p=0.95, max_tokens=16)
    alone, _, _ = await collect(
        engine, request("llama", PROMPTS[0], SamplingParams(seed=42, **params))
    )
    noise = [collect(engine, request("llama", p, SamplingParams(**params))) for p in PROMPTS]
    together = await asyncio.gather(
        collect(engine, request("llama", PROMPTS[0], SamplingParams(seed=42, **params))), *noise
    )
    assert together[0][0] == alone
    other, _, _ = await collect(
        engine, request("llama", PROMPTS[0], SamplingParams(seed=43, **params))
    )
    assert other != alone


async def test_stop_strings_across_token_boundaries(engine: LocalEngine) -> None:
    _, text, _ = await collect(engine, request("llama", PROMPTS[0], greedy(12)))
    assert len(text) > 6
    stop = text[3:7]  # likely spans a token boundary; must never be emitted
    _, stopped_text, final = await collect(
        engine, request("llama", PROMPTS[0], greedy(12, stop=[stop]))
    )
    assert final.finish_reason == FinishReason.STOP
    assert stopped_text == text[: text.find(stop)]
    assert stop not in stopped_text


def test_stop_matcher_holds_back_partial_matches() -> None:
    matcher = StopMatcher(["</end>"])
    assert matcher.feed("hello </") == ("hello ", False)
    assert matcher.feed("en") == ("", False)
    assert matcher.feed("x more") == ("</enx more", False)
    assert matcher.feed("a</e") == ("a", False)
    assert matcher.feed("nd> tail") == ("", True)


def test_utf8_streaming_never_splits_a_character() -> None:
    tokenizer = make_tokenizer()
    text = "héllo wörld 你好世界 🙂👍 naïve café"
    ids = tokenizer(text, add_special_tokens=False)["input_ids"]
    detok = Detokenizer(tokenizer, [])
    pieces = [detok.add(t) for t in ids]
    pieces.append(detok.flush())
    assert "".join(pieces) == text
    assert not any("\ufffd" in p for p in pieces)


async def test_max_tokens_zero_and_context_limit(engine: LocalEngine) -> None:
    tokens, _, final = await collect(engine, request("llama", PROMPTS[0], greedy(0)))
    assert tokens == [] and final.finish_reason == FinishReason.LENGTH
    with pytest.raises(EngineError) as info:
        await collect(engine, request("llama", list(range(200)), greedy(100)))
    assert info.value.status == 400
    assert "200" in str(info.value) and "100" in str(info.value) and "256" in str(info.value)
    # without max tokens, generation stops at the context's end
    tokens, _, final = await collect(engine, request("llama", list(range(240)), greedy(None)))
    assert final.finish_reason == FinishReason.LENGTH and len(tokens) == 16


async def test_unknown_model_and_bad_params(engine: LocalEngine) -> None:
    with pytest.raises(EngineError, match="not found"):
        await collect(engine, request("absent", [1, 2], greedy()))
    for bad in (dict(temperature=float("nan")), dict(top_p=2.0), dict(repeat_penalty=-1.0)):
        with pytest.raises(EngineError):
            await collect(engine, request("llama", [1, 2], SamplingParams(**bad)))
    assert engine.health()


async def test_abandoned_streams_free_everything(engine: LocalEngine) -> None:
    """200 clients leave mid-stream: the engine ends holding nothing, and the next
    request's time to first token is what it was before."""
    import time

    async def first_token_seconds() -> float:
        started = time.perf_counter()
        async for _ in engine.generate(request("llama", PROMPTS[0], greedy(4))):
            return time.perf_counter() - started
        raise AssertionError("no token")

    async def abandon(i: int) -> None:
        count = 0
        async for _ in engine.generate(request("llama", PROMPTS[i % 5], greedy(150))):
            count += 1
            if count == 1 + i % 3:
                break  # the client goes away after a token or three

    await collect(engine, request("llama", PROMPTS[0], greedy(2)))  # load the model
    before = min([await first_token_seconds() for _ in range(3)])
    await asyncio.gather(*(abandon(i) for i in range(200)))
    cache = engine.device_loop.workers["llama"].runner.cache
    for _ in range(500):
        if engine.device_loop.active_sequences() == 0 and cache.used == 0:
            break
        await asyncio.sleep(0.02)
    assert engine.device_loop.active_sequences() == 0
    assert cache.used == 0 and not engine.device_loop.inbox
    after = min([await first_token_seconds() for _ in range(3)])
    assert after < max(5 * before, before + 0.05), (before, after)


async def test_a_failing_request_fails_alone(engine: LocalEngine) -> None:
    await collect(engine, request("llama", PROMPTS[0], greedy(2)))  # load the model
    runner = engine.device_loop.workers["llama"].runner
    real = runner.decode
    poisoned = 77  # only the bad request (a 77-token prompt) decodes at this position

    def decode(slots, tokens, positions, loras=None, offsets=None):
        if poisoned in positions:
            raise RuntimeError("injected fault")
        return real(slots, tokens, positions, loras)

    runner.decode = decode  # type: ignore[method-assign]
    try:
        good = [collect(engine, request("llama", p, greedy(6))) for p in PROMPTS[:2]]
        bad = collect(engine, request("llama", list(range(300, 377)), greedy(6)))
        results = await asyncio.gather(*good, bad)
    finally:
        runner.decode = real  # type: ignore[method-assign]
    for tokens, _, final in results[:2]:
        assert len(tokens) == 6 and final.error is None
    tokens, _, final = results[2]
    assert final.finish_reason == FinishReason.ERROR and "RuntimeError" in final.error
    assert len(tokens) == 1  # the token from its prefill, then the fault
    assert engine.health()
    assert engine.device_loop.active_sequences() == 0


def test_stop_ids_from_generation_config(tiny_models: dict[str, Path]) -> None:
    from transformers import AutoModelForCausalLM, AutoTokenizer

    model = AutoModelForCausalLM.from_pretrained(tiny_models["gemma3"])
    tokenizer = AutoTokenizer.from_pretrained(tiny_models["gemma3"])
    assert stop_ids_of(model, tokenizer) == {1, 5}


async def test_error_after_output_is_an_event_even_when_merged() -> None:
    """A slow reader gets a token and a later error merged into one event: that is output
    followed by an error (an event), not an error before output (an exception)."""
    from ollama_compact_server.engine.types import TokenEvent

    class Instant:
        notifier = None
        models = ModelSource(lambda name: None)  # type: ignore[arg-type, return-value]

        def submit(self, item) -> None:
            item.mailbox.put(TokenEvent(text="hi", token_ids=[7]))
            item.mailbox.put(TokenEvent(finish_reason=FinishReason.ERROR, error="later failure"))

        def abort(self, request_id: str) -> None:
            raise AssertionError("a finished request is not aborted")

    engine = LocalEngine(Instant())  # type: ignore[arg-type]
    events = [e async for e in engine.generate(request("m", [1, 2], greedy(4)))]
    assert len(events) == 1 and events[0].token_ids == [7] and events[0].error == "later failure"


async def test_logprobs_match_transformers(
    engine: LocalEngine, tiny_models: dict[str, Path]
) -> None:
    """Chosen-token and prompt logprobs equal log_softmax of transformers' own logits."""
    from transformers import AutoModelForCausalLM

    prompt = PROMPTS[2]  # 60 tokens: prompt scoring crosses chunk boundaries (chunk 16)
    params = greedy(5, logprobs=3, prompt_logprobs=True)
    events = [e async for e in engine.generate(request("qwen2", prompt, params))]
    generated = [t for e in events for t in e.token_ids]
    scores = [s for e in events for s in e.logprobs]
    prompt_scores = next(e.prompt_logprobs for e in events if e.prompt_logprobs is not None)
    hf = AutoModelForCausalLM.from_pretrained(
        tiny_models["qwen2"], attn_implementation="sdpa"
    ).eval()
    with torch.no_grad():
        logits = hf(torch.tensor([prompt + generated])).logits[0]
    reference = torch.log_softmax(logits.float(), dim=-1)
    assert prompt_scores[0] is None and len(prompt_scores) == len(prompt)
    for position in range(1, len(prompt)):
        token, value, top = prompt_scores[position]
        assert token == prompt[position]
        assert abs(value - float(reference[position - 1, token])) < 1e-3
        assert len(top) == 3
    for i, (token, value, top) in enumerate(scores):
        assert token == generated[i]
        assert abs(value - float(reference[len(prompt) - 1 + i, token])) < 1e-3
        assert top[0][0] == token  # greedy: the chosen token is the most likely one


async def test_scoring_only_with_no_new_tokens(engine: LocalEngine) -> None:
    events = [
        e
        async for e in engine.generate(
            request("llama", PROMPTS[0], greedy(0, prompt_logprobs=True))
        )
    ]
    scores = next(e.prompt_logprobs for e in events if e.prompt_logprobs is not None)
    assert len(scores) == len(PROMPTS[0]) and events[-1].finish_reason == FinishReason.LENGTH
    assert not [t for e in events for t in e.token_ids]


async def test_a_long_prompt_delays_a_running_stream_by_one_chunk_at_most(
    engine: LocalEngine,
) -> None:
    """Between two decode steps of a running stream, at most one prefill chunk of at most
    prefill_chunk prompt tokens runs, however long the prompt that arrives meanwhile."""
    await collect(engine, request("llama", [1, 2], greedy(1)))  # load the model
    runner = engine.device_loop.workers["llama"].runner
    chunk = engine.device_loop.config.prefill_chunk
    junk = runner.cache.capacity - 1  # the position of batched prefill's pad columns
    stream = PROMPTS[0]  # 20 tokens: its decode steps feed positions 20..79
    long_prompt = list(range(300, 300 + 5 * chunk + 8))  # six chunks, none of one token
    real = runner.forward
    steps: list[tuple[str, int]] = []  # ("decode", 1 if the stream is in it) / ("prefill", n)

    def forward(slots, input_ids, positions, length, keep=1, loras=None, step=False, **media):
        if step:
            mine = any(len(stream) <= int(p) < len(long_prompt) for p in positions.view(-1))
            steps.append(("decode", int(mine)))
        else:
            steps.append(("prefill", int((positions != junk).sum())))
        return real(slots, input_ids, positions, length, keep, loras, step, **media)

    runner.forward = forward  # type: ignore[method-assign]
    try:
        events = engine.generate(request("llama", stream, greedy(60)))
        tokens = 0
        async for event in events:
            tokens += len(event.token_ids)
            if tokens >= 3:
                break
        late = asyncio.ensure_future(collect(engine, request("llama", long_prompt, greedy(4))))
        async for event in events:
            tokens += len(event.token_ids)
        long_tokens, _, final = await late
    finally:
        runner.forward = real  # type: ignore[method-assign]
    assert tokens == 60 and len(long_tokens) == 4 and final.error is None
    between: list[int] | None = None  # prompt tokens of each prefill since its last decode
    interleaved = 0
    for kind, value in steps:
        if kind == "prefill" and between is not None:
            between.append(value)
        elif kind == "decode" and value:  # a decode step of the stream
            if between is not None:
                assert len(between) <= 1 and sum(between) <= chunk, steps
                interleaved += bool(between)
            between = []
    assert interleaved >= 5, steps  # the long prompt went in between the stream's steps


def test_large_freed_blocks_are_kept_for_reuse_on_glibc(monkeypatch: pytest.MonkeyPatch) -> None:
    """The daemon asks glibc to serve big allocations (a step's logits) from its heap; where
    the C library has no mallopt nothing changes and the call says so."""
    import ctypes.util
    import platform

    from ollama_compact_server.engine import device

    if platform.system() == "Linux" and platform.libc_ver()[0] == "glibc":
        assert device.keep_freed_memory()
        big = torch.empty((64, 262144))  # 67 MB: served from the heap now, and freed back
        big.fill_(1.0)
        del big
    monkeypatch.setattr(ctypes.util, "find_library", lambda name: None)
    assert not device.keep_freed_memory()
