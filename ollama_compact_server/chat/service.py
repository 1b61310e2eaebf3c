"""The one path from either API dialect to the engine: resolves the model, applies its
template, system prompt and default parameters, tokenizes off the event loop, and turns
engine events into text deltas with usage and timings."""

from __future__ import annotations

import asyncio
import logging
import uuid
from collections.abc import AsyncGenerator
from dataclasses import dataclass, field
from typing import Any

from ..engine.protocol import Engine
from ..engine.types import (
    DEFAULT,
    FinishReason,
    GenerateRequest,
    KeepAlive,
    SamplingParams,
    TokenEvent,
    TokenLogprob,
)
from ..logs import note_request
from ..logs import request_id as current_request_id
from ..registry.errors import ModelNotFound
from ..registry.names import ModelName
from ..registry.store import ModelRecord, Registry
from .options import merge_options, to_sampling
from .templates import plain_chat, render

log = logging.getLogger(__name__)

MAX_MESSAGES = 4096
ROLES = ("system", "user", "assistant", "tool")


class ChatError(ValueError):
    """A bad request found by the chat layer (400 unless ``status`` says otherwise)."""

    def __init__(self, message: str, status: int = 400) -> None:
        super().__init__(message)
        self.status = status


@dataclass(slots=True)
class ModelView:
    """What the chat layer needs from a registry model (cached per manifest digest)."""

    record: ModelRecord
    template: str
    system: str
    params: dict[str, Any]
    messages: list[dict[str, Any]]

    @property
    def name(self) -> str:
        return self.record.name.display()


@dataclass(slots=True)
class Completion:
    """What both dialects need to frame a finished or streaming completion."""

    text: str = ""
    finish_reason: FinishReason | None = None
    error: str | None = None
    prompt_tokens: int = 0
    cached_tokens: int = 0  # of the prompt tokens, reused from the KV cache
    completion_tokens: int = 0
    prompt_ids: list[int] = field(default_factory=list)
    token_ids: list[int] = field(default_factory=list)
    logprobs: list[TokenLogprob] = field(default_factory=list)
    prompt_logprobs: list[TokenLogprob | None] | None = None
    load_time: float = 0.0
    prompt_time: float = 0.0
    decode_time: float = 0.0
    total_time: float = 0.0


class ChatService:
    def __init__(self, registry: Registry, engine: Engine, tokenizers: Any) -> None:
        self.registry = registry
        self.engine = engine
        self.tokenizers = tokenizers  # callable: ModelRecord -> tokenizer (may be slow)
        self._views: dict[str, ModelView] = {}

    # ------------------------------------------------------------------ models

    def model(self, name: str) -> ModelView:
        parsed = ModelName.parse(name)
        try:
            record = self.registry.get(parsed)
        except ModelNotFound:
            raise ChatError(
                f'model "{parsed.display()}" not found, try pulling it first', 404
            ) from None
        view = self._views.get(record.digest)
        if view is None:
            view = ModelView(
                record=record,
                template=self.registry.template(record),
                system=self.registry.system(record),
                params=self.registry.params(record),
                messages=self.registry.messages(record),
            )
            self._views = {k: v for k, v in self._views.items() if v.record.name != record.name}
            self._views[record.digest] = view
        return view

    async def tokenizer(self, view: ModelView) -> Any:
        return await asyncio.to_thread(self.tokenizers, view.record)

    async def token_texts(self, view: ModelView, ids: list[int]) -> list[str]:
        """Each token's own text (special tokens as empty strings), off the event loop."""
        tokenizer = await self.tokenizer(view)
        return await asyncio.to_thread(
            lambda: [tokenizer.decode([i], skip_special_tokens=True) for i in ids]
        )

    # ------------------------------------------------------------------ prompts

    def sampling(
        self, view: ModelView, options: dict[str, Any] | None, **overrides: Any
    ) -> SamplingParams:
        merged = merge_options(
            view.params, options, {k: v for k, v in overrides.items() if v is not None}
        )
        return to_sampling(merged)

    async def chat_prompt(
        self,
        view: ModelView,
        messages: list[dict[str, Any]],
        tools: list[Any] | None = None,
        think: bool | None = None,
    ) -> list[int]:
        check_messages(messages)
        history = [*view.messages, *messages]
        if view.system and not any(m["role"] == "system" for m in history[:1]):
            history = [{"role": "system", "content": view.system}, *history]
        tokenizer = await self.tokenizer(view)
        return await asyncio.to_thread(
            self._render_and_encode, view, tokenizer, history, tools, think
        )

    async def opens_thinking(self, view: ModelView, prompt_ids: list[int]) -> bool:
        """True when the rendered prompt itself ends inside a <think> block."""
        tokenizer = await self.tokenizer(view)
        tail = await asyncio.to_thread(tokenizer.decode, prompt_ids[-8:])
        return str(tail).rstrip().endswith("<think>")

    def _render_and_encode(
        self,
        view: ModelView,
        tokenizer: Any,
        history: list[dict[str, Any]],
        tools: list[Any] | None,
        think: bool | None = None,
    ) -> list[int]:
        if view.template:
            extra = {} if think is None else {"enable_thinking": think}
            text = render(
                view.template,
                messages=history,
                tools=tools or None,
                add_generation_prompt=True,
                bos_token=tokenizer.bos_token or "",
                eos_token=tokenizer.eos_token or "",
                **extra,
            )
            return list(tokenizer(text, add_special_tokens=False)["input_ids"])
        return list(tokenizer(plain_chat(history))["input_ids"])

    async def generate_prompt(
        self,
        view: ModelView,
        prompt: str,
        *,
        system: str | None,
        raw: bool,
        context: list[int] | None,
        think: bool | None = None,
    ) -> list[int]:
        tokenizer = await self.tokenizer(view)
        if raw:
            return list(await asyncio.to_thread(lambda: tokenizer(prompt)["input_ids"]))
        messages: list[dict[str, Any]] = []
        chosen_system = system if system else view.system
        if chosen_system:
            messages.append({"role": "system", "content": chosen_system})
        messages.append({"role": "user", "content": prompt})
        ids = await asyncio.to_thread(
            self._render_and_encode, view, tokenizer, messages, None, think
        )
        return [*(context or []), *ids]

    # ------------------------------------------------------------------ generation

    async def stream(
        self,
        view: ModelView,
        prompt_ids: list[int],
        sampling: SamplingParams,
        *,
        keep_alive: KeepAlive = DEFAULT,
        request_id: str | None = None,
    ) -> AsyncGenerator[tuple[TokenEvent, Completion], None]:
        """Yields (event, running totals). Raises EngineError before any output."""
        http_id = current_request_id()
        request = GenerateRequest(
            request_id=request_id or f"{http_id or 'req'}-{uuid.uuid4().hex[:8]}",
            model=view.name,
            prompt_ids=prompt_ids,
            sampling=sampling,
            keep_alive=keep_alive,
        )
        totals = Completion(prompt_ids=prompt_ids)
        events = self.engine.generate(request)
        try:
            async for event in events:
                totals.text += event.text
                totals.token_ids += event.token_ids
                totals.logprobs += event.logprobs
                if event.prompt_logprobs is not None:
                    totals.prompt_logprobs = event.prompt_logprobs
                if event.finished:
                    totals.finish_reason = event.finish_reason
                    totals.error = event.error
                    totals.prompt_tokens = event.prompt_tokens
                    totals.cached_tokens = event.cached_tokens
                    totals.completion_tokens = event.completion_tokens
                    totals.load_time = event.load_time
                    totals.prompt_time = event.prompt_time
                    totals.decode_time = event.decode_time
                    totals.total_time = event.total_time
                    note_request(
                        model=view.name,
                        adapter=view.name if view.record.is_adapter else None,
                        tokens_in=event.prompt_tokens,
                        tokens_out=event.completion_tokens,
                        prompt_eval_seconds=event.prompt_time,
                        eval_seconds=event.decode_time,
                    )
                yield event, totals
        finally:
            # Closing this generator does not close the engine's: `async for` leaves it
            # suspended until the garbage collector finalises it. Close it now, so the
            # engine aborts the request at once.
            close = getattr(events, "aclose", None)
            if close is not None:
                await close()


def check_messages(messages: Any) -> None:
    if not isinstance(messages, list):
        raise ChatError("messages must be a list")
    if len(messages) > MAX_MESSAGES:
        raise ChatError(f"too many messages (at most {MAX_MESSAGES})")
    for message in messages:
        if not isinstance(message, dict):
            raise ChatError("each message must be an object")
        role = message.get("role")
        if not isinstance(role, str) or role.lower() not in ROLES:
            raise ChatError(f"invalid message role {str(role)[:20]!r}")
        if not isinstance(message.get("content", ""), str):
            raise ChatError("message content must be a string")
        for key in ("name", "tool_call_id", "tool_name", "thinking"):
            if not isinstance(message.get(key, ""), (str, type(None))):
                raise ChatError(f"message {key} must be a string")
        images = message.get("images")
        if images is not None and (
            not isinstance(images, list) or not all(isinstance(i, str) for i in images)
        ):
            raise ChatError("message images must be a list of base64 strings")
        if not isinstance(message.get("tool_calls", []), (list, type(None))):
            raise ChatError("message tool_calls must be a list")


MAX_EMBED_INPUTS = 256


async def embed_inputs(
    service: ChatService, view: ModelView, texts: list[str], *, truncate: bool = True
) -> list[list[int]]:
    """Tokenizes texts for embedding (off the event loop), cut to the model's context when
    ``truncate`` is set, refused otherwise."""
    if len(texts) > MAX_EMBED_INPUTS:
        raise ChatError(f"at most {MAX_EMBED_INPUTS} inputs per request")
    tokenizer = await service.tokenizer(view)
    encoded: list[list[int]] = await asyncio.to_thread(
        lambda: [list(tokenizer(t)["input_ids"]) for t in texts]
    )
    limit = view.record.config.context_length or 0
    if limit:
        too_long = [i for i, ids in enumerate(encoded) if len(ids) > limit]
        if too_long and not truncate:
            raise ChatError(f"input {too_long[0]} exceeds the context length ({limit} tokens)")
        encoded = [ids[:limit] for ids in encoded]
    if any(not ids for ids in encoded):
        raise ChatError("an input is empty")
    return encoded
