"""One chat turn in dialect-free types: what every dialect asks for (``ChatRequest``) and
what it gets back (``ChatDelta`` pieces, or a ``TurnResult`` once the turn is over). The
service (chat/service.py) prepares a turn; ``Turn`` runs its engine streams and splits their
text into thinking, content and tool calls."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncGenerator, AsyncIterator, Awaitable, Callable, Sequence
from dataclasses import dataclass, field
from enum import Enum
from typing import Any

from ..engine.types import DEFAULT, FinishReason, KeepAlive, TokenEvent, TokenLogprob
from .errors import ChatError, GenerationFailed
from .images import ImageData
from .thinking import ThinkSplitter
from .toolcalls import ToolStream
from .tools import ToolCall

ROLES = ("system", "user", "assistant", "tool")


@dataclass(slots=True)
class CallSpec:
    """A tool call in the history (an assistant message's earlier call)."""

    name: str
    arguments: dict[str, Any]
    id: str | None = None


@dataclass(slots=True)
class Message:
    role: str  # one of ROLES
    content: str = ""
    thinking: str | None = None
    tool_calls: list[CallSpec] = field(default_factory=list)
    tool_call_id: str | None = None  # a tool result: the call it answers
    name: str | None = None  # a tool result: the tool's name
    images: list[ImageData] = field(default_factory=list)  # in the order the client sent them

    def for_template(self) -> dict[str, Any]:
        """The message as Hugging Face chat templates read it."""
        out: dict[str, Any] = {"role": self.role, "content": self.content}
        if self.thinking:
            out["thinking"] = self.thinking
            out["reasoning_content"] = self.thinking
        if self.tool_calls:
            out["tool_calls"] = [
                {
                    "type": "function",
                    **({"id": c.id} if c.id else {}),
                    "function": {"name": c.name, "arguments": c.arguments},
                }
                for c in self.tool_calls
            ]
        if self.tool_call_id is not None:
            out["tool_call_id"] = self.tool_call_id
        if self.name is not None:
            out["name"] = self.name
            out["tool_name"] = self.name
        return out


class ToolChoice(str, Enum):
    AUTO = "auto"  # the model decides
    NONE = "none"  # tools are not offered
    REQUIRED = "required"  # a call is forced (of ``tool_name`` when set, else any)


@dataclass(slots=True)
class ChatRequest:
    """A chat turn as every dialect asks for it. ``messages`` make a chat; ``prompts`` a
    completion (one or more prompts, rendered as a user message unless ``raw``)."""

    model: str
    messages: list[Message] = field(default_factory=list)
    prompts: list[str] = field(default_factory=list)
    images: list[ImageData] = field(default_factory=list)  # a completion's images
    raw: bool = False  # prompts go to the model as they are, no template
    system: str | None = None  # a completion's system prompt (the model's by default)
    context: list[int] | None = None  # Ollama generate: token ids of the earlier exchange
    tools: list[dict[str, Any]] | None = None  # checked function definitions
    tool_choice: ToolChoice = ToolChoice.AUTO
    tool_name: str | None = None  # with REQUIRED: the one function to call
    think: bool | None = None  # None: the model's default (on for thinking models)
    think_strict: bool = True  # an explicit think for a model that cannot think is a 400
    json_schema: str | None = None  # structured output (JSON text of a schema)
    options: dict[str, Any] = field(default_factory=dict)  # Ollama option names
    logit_bias: dict[int, float] = field(default_factory=dict)
    logprobs: int | None = None  # None: off; k: each token's logprob and the top k
    echo: bool = False  # score the prompt too (legacy completions' echo with logprobs)
    n: int = 1  # choices per prompt
    keep_alive: KeepAlive = DEFAULT

    def all_images(self) -> list[tuple[int | None, ImageData]]:
        """Every image in request order: the messages' (with their message's index), then a
        completion's (message None)."""
        pairs: list[tuple[int | None, ImageData]] = [
            (i, image) for i, message in enumerate(self.messages) for image in message.images
        ]
        return pairs + [(None, image) for image in self.images]


@dataclass(slots=True)
class ScoredToken:
    token: str
    logprob: float | None  # None: the first prompt token, which nothing predicts
    top: list[ScoredToken] = field(default_factory=list)

    @property
    def bytes(self) -> list[int]:
        return list(self.token.encode())


class Finish(str, Enum):
    STOP = "stop"  # end of turn or a stop sequence (then ``stop_sequence`` says which)
    LENGTH = "length"
    TOOL_CALLS = "tool_calls"


@dataclass(slots=True)
class Usage:
    prompt_tokens: int = 0
    cached_tokens: int = 0  # of the prompt tokens, reused from the KV cache
    completion_tokens: int = 0
    load_time: float = 0.0
    prompt_time: float = 0.0
    decode_time: float = 0.0
    total_time: float = 0.0

    @property
    def total_tokens(self) -> int:
        return self.prompt_tokens + self.completion_tokens

    def add(self, other: Usage) -> None:
        self.completion_tokens += other.completion_tokens
        self.prompt_tokens += other.prompt_tokens
        self.cached_tokens += other.cached_tokens


@dataclass(slots=True)
class ChatDelta:
    """A piece of one choice's output; the choice's last delta has ``finish`` set."""

    index: int  # the choice: prompt index * n + sample index
    text: str = ""
    thinking: str = ""
    tool_calls: list[ToolCall] = field(default_factory=list)
    logprobs: list[ScoredToken] = field(default_factory=list)
    prompt_logprobs: list[ScoredToken] | None = None  # with echo, on the first delta
    finish: Finish | None = None
    stop_sequence: str | None = None  # the stop sequence that ended the choice
    usage: Usage | None = None  # with finish
    token_ids: list[int] = field(default_factory=list)  # with finish: every output token

    @property
    def empty(self) -> bool:
        return not (self.text or self.thinking or self.tool_calls or self.logprobs) and (
            self.prompt_logprobs is None and self.finish is None
        )


@dataclass(slots=True)
class Choice:
    """A choice's whole output (what a non-streamed answer needs)."""

    index: int
    text: str = ""
    thinking: str = ""
    tool_calls: list[ToolCall] = field(default_factory=list)
    logprobs: list[ScoredToken] = field(default_factory=list)
    prompt_logprobs: list[ScoredToken] | None = None
    finish: Finish = Finish.STOP
    stop_sequence: str | None = None
    usage: Usage = field(default_factory=Usage)
    token_ids: list[int] = field(default_factory=list)


@dataclass(slots=True)
class TurnResult:
    choices: list[Choice]
    usage: Usage  # the whole turn: each prompt counted once, every choice's output


Pair = tuple[TokenEvent, "Running"]
Texts = Callable[[list[int]], Awaitable[list[str]]]


@dataclass(slots=True)
class Running:
    """One engine request of a turn: its running totals and its splitters."""

    prompt_ids: list[int]
    thinking: ThinkSplitter | None
    tools: ToolStream | None
    token_ids: list[int] = field(default_factory=list)


class Turn:
    """A started turn: every choice's engine request is running and has produced its first
    event, so errors before any output were raised already (with their status). Iterate
    ``deltas()`` once, or ``collect()``; ``close()`` aborts whatever still runs."""

    def __init__(
        self,
        model: str,
        streams: list[tuple[TokenEvent, Running, AsyncGenerator[TokenEvent, None]]],
        texts: Texts,
        prompt_lengths: list[int],
        n: int,
    ) -> None:
        self.model = model
        self.n = n
        self.prompt_lengths = prompt_lengths
        self._streams = streams
        self._texts = texts
        self._taken = False
        self.usage = Usage()

    @property
    def choices(self) -> int:
        return len(self._streams)

    def prompt_ids(self, index: int) -> list[int]:
        return self._streams[index][1].prompt_ids

    async def close(self) -> None:
        for _, _, stream in self._streams:
            await stream.aclose()

    async def deltas(self) -> AsyncIterator[ChatDelta]:
        """Every choice's deltas, interleaved as they come. A choice that fails after its
        start raises GenerationFailed (the dialect sends it in-band)."""
        if self._taken:
            raise RuntimeError("a turn's deltas can be taken once")
        self._taken = True
        merged = _merged([(first, s) for first, _, s in self._streams])
        try:
            async for index, event in merged:
                running = self._streams[index][1]
                delta = await self._delta(index, running, event)
                if delta is not None:
                    yield delta
        finally:
            await merged.aclose()  # `async for` leaves it open on an error: abort the rest

    async def collect(self) -> TurnResult:
        choices = [Choice(index=i) for i in range(self.choices)]
        try:
            async for delta in self.deltas():
                choice = choices[delta.index]
                choice.text += delta.text
                choice.thinking += delta.thinking
                choice.tool_calls += delta.tool_calls
                choice.logprobs += delta.logprobs
                if delta.prompt_logprobs is not None:
                    choice.prompt_logprobs = delta.prompt_logprobs
                if delta.finish is not None:
                    choice.finish = delta.finish
                    choice.stop_sequence = delta.stop_sequence
                    choice.usage = delta.usage or Usage()
                    choice.token_ids = delta.token_ids
        finally:
            await self.close()
        for choice in choices:
            choice.thinking = choice.thinking.strip()
            if choice.tool_calls:  # the text around the calls, as one piece
                choice.text = choice.text.strip()
        return TurnResult(choices, self.usage)

    async def _delta(self, index: int, running: Running, event: TokenEvent) -> ChatDelta | None:
        running.token_ids += event.token_ids
        delta = ChatDelta(index=index)
        text, thought = event.text, ""
        if running.thinking is not None:
            thought, text = running.thinking.feed(text)
            if event.finished:
                more_thought, more_text = running.thinking.finish()
                thought, text = thought + more_thought, text + more_text
        if running.tools is not None:
            text = running.tools.feed(text)
        delta.text, delta.thinking = text, thought
        if event.logprobs:
            delta.logprobs = await self._scored(event.logprobs, chosen=event.token_texts)
        if event.prompt_logprobs is not None:
            delta.prompt_logprobs = await self._scored(
                event.prompt_logprobs, first=running.prompt_ids[0] if running.prompt_ids else None
            )
        if event.finished:
            if event.error:
                raise GenerationFailed(event.error)
            if running.tools is not None:
                rest, delta.tool_calls = running.tools.finish()
                delta.text += rest
            delta.finish = (
                Finish.TOOL_CALLS
                if delta.tool_calls
                else Finish.LENGTH
                if event.finish_reason == FinishReason.LENGTH
                else Finish.STOP
            )
            delta.stop_sequence = event.stop_sequence
            delta.usage = Usage(
                prompt_tokens=event.prompt_tokens,
                cached_tokens=event.cached_tokens,
                completion_tokens=event.completion_tokens,
                load_time=event.load_time,
                prompt_time=event.prompt_time,
                decode_time=event.decode_time,
                total_time=event.total_time,
            )
            delta.token_ids = running.token_ids
            # each prompt counts once in the turn's usage, every choice's output counts
            sample = index % self.n
            self.usage.add(
                Usage(
                    prompt_tokens=event.prompt_tokens if sample == 0 else 0,
                    cached_tokens=event.cached_tokens if sample == 0 else 0,
                    completion_tokens=event.completion_tokens,
                )
            )
        return None if delta.empty else delta

    async def _scored(
        self,
        scores: Sequence[TokenLogprob | None],
        first: int | None = None,
        chosen: Sequence[str] = (),
    ) -> list[ScoredToken]:
        """Token ids with their texts: the chosen tokens' as the engine's detokenizer gave
        them (``chosen``, so they add up to the output), the others decoded here (one
        tokenizer call for the whole event)."""
        ids = [s[0] for s in scores if s] + [a for s in scores if s for a, _ in s[2]]
        if first is not None:
            ids.append(first)
        texts = dict(zip(ids, await self._texts(ids)))
        out = []
        for i, score in enumerate(scores):
            if score is None:  # the first prompt token: nothing predicts it
                out.append(ScoredToken(texts.get(first, "") if first is not None else "", None))
                continue
            token, value, top = score
            text = chosen[i] if i < len(chosen) else texts[token]
            out.append(ScoredToken(text, value, [ScoredToken(texts[a], v) for a, v in top]))
        return out


async def _merged(
    streams: list[tuple[TokenEvent, AsyncGenerator[TokenEvent, None]]],
) -> AsyncGenerator[tuple[int, TokenEvent], None]:
    """Interleaves several engine streams, tagging each event with its stream's index. One
    stream is read directly, without tasks."""
    if len(streams) == 1:
        first, stream = streams[0]
        try:
            yield 0, first
            if not first.finished:
                async for event in stream:
                    yield 0, event
        finally:
            await stream.aclose()
        return
    queue: asyncio.Queue[tuple[int, TokenEvent | None]] = asyncio.Queue()

    async def pump(index: int, first: TokenEvent, stream: AsyncGenerator[TokenEvent, None]) -> None:
        try:
            await queue.put((index, first))
            if not first.finished:
                async for item in stream:
                    await queue.put((index, item))
        finally:
            await stream.aclose()  # the pump owns its stream: it closes (aborts) it
            await queue.put((index, None))

    tasks = [asyncio.create_task(pump(i, f, s)) for i, (f, s) in enumerate(streams)]
    remaining = len(tasks)
    try:
        while remaining:
            index, item = await queue.get()
            if item is None:
                remaining -= 1
                continue
            yield index, item
    finally:
        # A client that hangs up cancels us: each pump, cancelled, closes its own stream
        # (closing a stream here while its pump is inside it fails: "aclose(): asynchronous
        # generator is already running"). Streams whose pump already ended are closed here.
        for task in tasks:
            task.cancel()
        for task, (_, stream) in zip(tasks, streams):
            if task.done():
                await stream.aclose()
        await asyncio.gather(*tasks, return_exceptions=True)  # every abort has happened


def check_roles(messages: list[Message]) -> None:
    for message in messages:
        if message.role not in ROLES:
            raise ChatError(f"invalid message role {message.role[:20]!r}")
