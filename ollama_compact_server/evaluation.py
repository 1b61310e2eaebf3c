"""`ollama-compact eval`: measures a registry model through the real engine (perplexity on
held-out text, size on disk, resident memory, tokens/s at 1 and 16 streams) and records the
report in the registry, where /api/show finds it."""

from __future__ import annotations

import asyncio
import hashlib
import itertools
import math
import time
from dataclasses import dataclass
from datetime import datetime, timezone
from importlib import resources
from pathlib import Path
from typing import Any

from .engine.protocol import Engine
from .engine.types import EngineError, GenerateRequest, SamplingParams
from .registry.evals import EvalReport, disk_size, read_eval, write_eval
from .registry.store import ModelRecord, Registry
from .settings import Settings

HELDOUT_TEXT = "heldout_en.txt"
"""Public-domain English prose shipped in the package's data folder, never used for
calibration (its sources: data/HELDOUT.md)."""

WINDOW = 512  # tokens the model sees per scored window
STRIDE = 256  # windows start this far apart; each token after the first window is scored
# with at least WINDOW - STRIDE tokens of context, and every token is scored once
EVAL_CONTEXT = 1024  # KV cache per sequence while measuring (window + generation fit)
EVAL_STREAMS = 16
NEW_TOKENS = 64  # tokens asked of each throughput stream (greedy)

PROMPTS = (
    "Write a short story about a lighthouse keeper.",
    "Explain how a bicycle stays upright.",
    "List five uses for a paper clip.",
    "Describe the water cycle to a child.",
    "What makes bread rise?",
    "Summarise the plot of a detective novel in three sentences.",
    "Give directions from a train station to a museum.",
    "Why is the sky blue?",
    "Write a polite letter declining an invitation.",
    "Describe a busy market on a Saturday morning.",
    "How do bees make honey?",
    "Compose a limerick about a cat.",
    "Explain what a library card is for.",
    "Describe the sound of rain on a tin roof.",
    "What should one pack for a week of hiking?",
    "Tell me about the history of the printing press.",
)

_ids = itertools.count()


class EvalError(Exception):
    pass


@dataclass(slots=True)
class Heldout:
    name: str
    text: str

    @property
    def sha256(self) -> str:
        return hashlib.sha256(self.text.encode()).hexdigest()


def heldout_text(path: Path | None = None) -> Heldout:
    """The shipped held-out text, or a UTF-8 file of the user's."""
    if path is not None:
        try:
            return Heldout(path.name, path.read_text(encoding="utf-8"))
        except (OSError, UnicodeDecodeError) as exc:
            raise EvalError(f"cannot read {path}: {exc}") from None
    data = resources.files("ollama_compact_server").joinpath("data", HELDOUT_TEXT)
    return Heldout(HELDOUT_TEXT, data.read_text(encoding="utf-8"))


def windows(
    n_tokens: int, window: int = WINDOW, stride: int = STRIDE
) -> list[tuple[int, int, int]]:
    """Sliding windows over ``n_tokens`` tokens as (begin, end, first scored position): each
    position in [1, n_tokens) is scored exactly once, by the window that ends nearest after it
    (position 0 has nothing to be predicted from)."""
    if window < 2 or not 0 < stride < window:
        raise ValueError("need window >= 2 and 0 < stride < window")
    spans: list[tuple[int, int, int]] = []
    scored_to = 1
    begin = 0
    while scored_to < n_tokens:
        end = min(begin + window, n_tokens)
        spans.append((begin, end, scored_to))
        scored_to = end
        begin += stride
    return spans


async def perplexity(
    engine: Engine, model: str, ids: list[int], window: int = WINDOW, stride: int = STRIDE
) -> tuple[float, int]:
    """exp(mean negative log-likelihood) of ``ids`` under the engine's own forward pass, and
    how many tokens were scored."""
    nll = 0.0
    count = 0
    for begin, end, first in windows(len(ids), window, stride):
        request = GenerateRequest(
            request_id=f"eval-ppl-{next(_ids)}",
            model=model,
            prompt_ids=ids[begin:end],
            sampling=SamplingParams(temperature=0.0, max_tokens=0, prompt_logprobs=True),
            keep_alive=None,
        )
        scores = None
        async for event in engine.generate(request):
            if event.error:
                raise EvalError(f"scoring failed: {event.error}")
            if event.prompt_logprobs is not None:
                scores = event.prompt_logprobs
        if scores is None or len(scores) != end - begin:
            raise EvalError("the engine returned no prompt scores")
        for position in range(first, end):
            score = scores[position - begin]
            if score is None:
                raise EvalError("the engine left a prompt token unscored")
            nll -= score[1]
            count += 1
    if count == 0:
        raise EvalError("the text is too short to score (fewer than 2 tokens)")
    return math.exp(nll / count), count


async def throughput(
    engine: Engine, model: str, prompts: list[list[int]], new_tokens: int
) -> float:
    """Generated tokens per wall-clock second with all ``prompts`` streaming at once (greedy;
    prompt processing included, as a client sees it)."""

    async def one(ids: list[int]) -> int:
        request = GenerateRequest(
            request_id=f"eval-tps-{next(_ids)}",
            model=model,
            prompt_ids=ids,
            sampling=SamplingParams(
                temperature=0.0, repeat_penalty=1.0, top_k=1, max_tokens=new_tokens
            ),
            keep_alive=None,
        )
        produced = 0
        async for event in engine.generate(request):
            if event.error:
                raise EvalError(f"generation failed: {event.error}")
            produced += len(event.token_ids)
        return produced

    started = time.perf_counter()
    counts = await asyncio.gather(*(one(ids) for ids in prompts))
    elapsed = time.perf_counter() - started
    return sum(counts) / elapsed if elapsed > 0 else 0.0


def prompt_ids(tokenizer: Any, streams: int) -> list[list[int]]:
    """``streams`` fixed chat prompts, rendered with the model's template when it has one."""
    out = []
    for i in range(streams):
        text = PROMPTS[i % len(PROMPTS)]
        try:
            ids = tokenizer.apply_chat_template(
                [{"role": "user", "content": text}], add_generation_prompt=True, tokenize=True
            )
            if isinstance(ids, dict) or hasattr(ids, "input_ids"):
                ids = ids["input_ids"]
        except Exception:  # no chat template: plain text
            ids = tokenizer(text)["input_ids"]
        out.append([int(t) for t in ids])
    return out


def text_ids(tokenizer: Any, text: str, max_tokens: int | None) -> list[int]:
    ids = [int(t) for t in tokenizer(text, add_special_tokens=True, verbose=False)["input_ids"]]
    return ids[:max_tokens] if max_tokens else ids


@dataclass(slots=True)
class Options:
    max_tokens: int | None = None  # score at most this many tokens of the text
    text: Path | None = None
    new_tokens: int = NEW_TOKENS
    streams: int = EVAL_STREAMS


async def measure(
    engine: Engine,
    registry: Registry,
    record: ModelRecord,
    heldout: Heldout,
    options: Options,
    device: str,
    dtype: str,
) -> EvalReport:
    """One model's report; the model stays loaded only while it is measured."""
    from .modeling.loader import load_tokenizer

    name = record.name.display()
    base = record
    if record.is_adapter and record.config.base_model:
        base = registry.get(record.config.base_model)
    tokenizer, _ = await asyncio.gather(  # side by side: both verify the blobs first
        asyncio.to_thread(load_tokenizer, registry, base), engine.load(name, keep_alive=None)
    )
    try:
        resident = next((r for r in engine.resident() if r.name == name), None)
        if resident is None:
            raise EvalError(f"model '{name}' did not stay loaded")
        stats = engine.stats()
        kv_tokens = int(stats.get("kv_tokens_used", 0)) + int(stats.get("kv_tokens_free", 0))
        slots = kv_tokens // resident.context if resident.context else 0
        window = min(WINDOW, resident.context - 1)
        stride = min(STRIDE, window - 1)
        ids = await asyncio.to_thread(text_ids, tokenizer, heldout.text, options.max_tokens)
        ppl, scored = await perplexity(engine, name, ids, window, stride)
        prompts = prompt_ids(tokenizer, options.streams)
        new_tokens = max(1, min(options.new_tokens, resident.context - max(map(len, prompts))))
        await throughput(engine, name, prompts[:1], 4)  # warm-up
        single = await throughput(engine, name, prompts[:1], new_tokens)
        many = await throughput(engine, name, prompts, new_tokens)
    finally:
        engine.unload(name)
    return EvalReport(
        model=name,
        digest=record.digest,
        measured_at=datetime.now(timezone.utc).isoformat(timespec="seconds"),
        device=device,
        dtype=dtype,
        text=heldout.name,
        text_sha256=heldout.sha256,
        tokens_scored=scored,
        window=window,
        stride=stride,
        perplexity=ppl,
        size_bytes=disk_size(registry, record),
        resident_bytes=resident.memory,
        slots=slots,
        context=resident.context,
        new_tokens=new_tokens,
        tokens_per_second_1=single,
        tokens_per_second_16=many,
    )


def compare_with_parent(report: EvalReport, parent: EvalReport | None) -> None:
    if parent is None or not report.comparable(parent) or parent.perplexity <= 0:
        return
    report.parent_perplexity = parent.perplexity
    report.perplexity_change = (report.perplexity - parent.perplexity) / parent.perplexity


def eval_settings(settings: Settings) -> Settings:
    """The daemon's settings, sized for measuring: 16 sequences of EVAL_CONTEXT tokens."""
    return settings.model_copy(
        update={
            "num_parallel": EVAL_STREAMS,
            "context_length": EVAL_CONTEXT,
            "keep_alive": "-1",
            "max_loaded_models": max(settings.max_loaded_models, 2),
        }
    )


def evaluate(
    settings: Settings,
    registry: Registry,
    name: str,
    options: Options,
    with_parent: bool = False,
    save: bool = True,
) -> list[EvalReport]:
    """Measures ``name`` (its parent first with ``with_parent``), records each report in the
    registry (unless ``save`` is false) and returns them, the parent's first."""
    from .app import build_engine
    from .engine.device import dtype_name, model_dtype, resolve_device
    from .engine.provider import scheme_of

    record = registry.get(name)
    targets = [record]
    parent_name = record.config.parent_model
    if with_parent:
        if not parent_name:
            raise EvalError(f"model '{record.name.display()}' records no parent model")
        targets.insert(0, registry.get(parent_name))
    heldout = heldout_text(options.text)
    settings = eval_settings(settings)
    device = resolve_device(settings.device)
    engine = build_engine(settings, registry)

    async def run() -> list[EvalReport]:
        return [
            await measure(
                engine,
                registry,
                target,
                heldout,
                options,
                str(device),
                dtype_name(model_dtype(settings.dtype, device, scheme_of(target))),
            )
            for target in targets
        ]

    try:
        reports = asyncio.run(run())
    except EngineError as exc:
        raise EvalError(str(exc)) from None
    finally:
        engine.close()
    report = reports[-1]
    report.parent_model = parent_name
    if parent_name:
        parent = reports[0] if with_parent else None
        if parent is None and registry.exists(parent_name):
            parent = read_eval(registry, registry.get(parent_name))
        compare_with_parent(report, parent)
    if save:
        for item in reports:
            write_eval(registry, item)
    return reports


def format_report(report: EvalReport) -> str:
    from .units import human_size

    change = ""
    if report.perplexity_change is not None:
        change = f" ({100 * report.perplexity_change:+.1f}% vs {report.parent_model})"
    elif report.parent_model:
        change = f" (parent {report.parent_model}: no comparable eval; try --with-parent)"
    rows = [
        ("model", report.model),
        ("size on disk", human_size(report.size_bytes)),
        (
            "resident memory",
            f"{human_size(report.resident_bytes)} "
            f"(weights + KV for {report.slots} x {report.context} tokens, {report.dtype})",
        ),
        ("tokens/s, 1 stream", f"{report.tokens_per_second_1:.1f}"),
        (f"tokens/s, {EVAL_STREAMS} streams", f"{report.tokens_per_second_16:.1f}"),
        (
            "perplexity",
            f"{report.perplexity:.3f}{change}",
        ),
        (
            "text",
            f"{report.text}, {report.tokens_scored} tokens scored "
            f"(window {report.window}, stride {report.stride}) on {report.device}",
        ),
    ]
    return "\n".join(f"  {label:<22}{value}" for label, value in rows)
