"""The one path from every API dialect to the engine: a ``ChatRequest`` in, a started
``Turn`` out. It resolves the model, checks what the model can do, merges the options once
(defaults, the model's parameters, the request), renders the prompt with the model's
template off the event loop, fans out ``n`` choices and starts the engine requests."""

from __future__ import annotations

import asyncio
import logging
import uuid
from collections import Counter
from collections.abc import AsyncGenerator
from dataclasses import dataclass, field, replace
from typing import TYPE_CHECKING, Any

from ..engine.protocol import Engine
from ..engine.types import (
    EngineError,
    GenerateRequest,
    ImageInput,
    KeepAlive,
    SamplingParams,
    TokenEvent,
)
from ..logs import note_request
from ..logs import request_id as current_request_id
from ..registry.errors import InvalidName
from ..registry.errors import ModelNotFound as RegistryModelNotFound
from ..registry.names import ModelName
from ..registry.store import ModelRecord, Registry
from .errors import ChatError, ModelNotFound, Unsupported
from .image_urls import ImageFetcher
from .images import ImageLimits, Picture, decode_images
from .options import merge_options, to_sampling
from .special import (
    check_fits,
    defuse,
    encode_marked,
    encode_text,
    longest_token,
    new_mark,
    special_pattern,
)
from .templates import plain_chat, render
from .thinking import ThinkSplitter
from .toolcalls import ToolFormat, ToolStream, forced_call, tool_format
from .turn import ChatRequest, Running, ToolChoice, Turn, check_roles
from .vision import ImagePlan, as_parts, with_images

if TYPE_CHECKING:  # torch: imported only where a vision model is served
    from ..modeling.vision import VisionFamily

log = logging.getLogger(__name__)

MAX_MESSAGES = 4096
ROLES = ("system", "user", "assistant", "tool")


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


class ChatService:
    def __init__(
        self,
        registry: Registry,
        engine: Engine,
        tokenizers: Any,
        image_limits: ImageLimits | None = None,
    ) -> None:
        self.registry = registry
        self.engine = engine
        self.tokenizers = tokenizers  # callable: ModelRecord -> tokenizer (may be slow)
        self.image_limits = image_limits or ImageLimits()
        self.fetch_image = ImageFetcher(self.image_limits) if self.image_limits.url_hosts else None
        self._views: dict[str, ModelView] = {}

    # ------------------------------------------------------------------ models

    def model(self, name: str) -> ModelView:
        try:
            parsed = ModelName.parse(name)
        except InvalidName:
            raise ChatError(f'invalid model name "{name[:100]}"') from None
        try:
            record = self.registry.get(parsed)
        except RegistryModelNotFound:
            raise ModelNotFound(parsed.display()) from None
        # by name and manifest: a copy (same manifest, another name) answers as itself
        key = f"{record.name.display()}@{record.digest}"
        view = self._views.get(key)
        if view is None:
            view = ModelView(
                record=record,
                template=self.registry.template(record),
                system=self.registry.system(record),
                params=self.registry.params(record),
                messages=self.registry.messages(record),
            )
            self._views = {k: v for k, v in self._views.items() if v.record.name != record.name}
            self._views[key] = view
        return view

    async def tokenizer(self, view: ModelView) -> Any:
        return await asyncio.to_thread(self.tokenizers, view.record)

    async def token_texts(self, view: ModelView, ids: list[int]) -> list[str]:
        """Each token's own text (special tokens as empty strings), off the event loop."""
        tokenizer = await self.tokenizer(view)
        return await asyncio.to_thread(texts_of_tokens, tokenizer, ids)

    # ------------------------------------------------------------------ turns

    async def start(self, request: ChatRequest) -> Turn:
        """Checks, renders and starts a turn; every choice has produced its first event
        when this returns, so refusals come before any byte is sent (with their status)."""
        prepared = await self.prepare(request)
        view, sampling = prepared.view, prepared.sampling
        runs: list[tuple[Running, AsyncGenerator[TokenEvent, None]]] = []
        for prompt_ids, inside, images in zip(prepared.prompts, prepared.inside, prepared.images):
            for sample in range(request.n):
                params = SamplingParams(**{f: getattr(sampling, f) for f in sampling.__slots__})
                if params.seed is not None:
                    params.seed += sample
                running = Running(
                    prompt_ids=prompt_ids,
                    thinking=ThinkSplitter(inside) if inside is not None else None,
                    tools=ToolStream(prepared.tool_format, prepared.tool_names)
                    if prepared.tools
                    else None,
                )
                stream = self._generate(view, prompt_ids, params, request.keep_alive, images)
                runs.append((running, stream))
        # every choice is submitted at once (they share prefill steps); each first event
        # is awaited, so a refusal has its status before any byte goes out
        try:
            firsts = await asyncio.gather(*(anext(g) for _, g in runs), return_exceptions=True)
            failed = next((f for f in firsts if isinstance(f, BaseException)), None)
            if isinstance(failed, StopAsyncIteration):
                raise ChatError("the engine returned nothing", 500)
            if failed is not None:
                raise failed
        except BaseException:
            for _, stream in runs:
                await stream.aclose()  # abort what already started
            raise
        streams = [
            (first, running, stream)
            for first, (running, stream) in zip(firsts, runs)
            if isinstance(first, TokenEvent)
        ]
        return Turn(
            view.name,
            streams,
            lambda ids: self.token_texts(view, ids),
            [len(p) for p in prepared.prompts],
            request.n,
        )

    async def count_tokens(self, request: ChatRequest) -> int:
        """The prompt's length in tokens, as ``start`` would render it."""
        prepared = await self.prepare(request)
        return sum(len(p) for p in prepared.prompts)

    async def prepare(self, request: ChatRequest) -> Prepared:
        view = self.model(request.model)
        capabilities = view.record.config.capabilities
        if "completion" not in capabilities:
            what = "chat" if request.messages else "generate"
            raise Unsupported(f'"{view.name}" does not support {what}')
        sent = request.all_images()
        if sent and "vision" not in capabilities:
            raise Unsupported(f'"{view.name}" does not support vision')
        if len(request.messages) > MAX_MESSAGES:
            raise ChatError(f"too many messages (at most {MAX_MESSAGES})")
        check_roles(request.messages)
        # every image is fetched and decoded (off the loop) before anything is rendered, so
        # a bad image is refused before any tokenizer or engine work
        pictures = await decode_images(sent, self.image_limits, self.fetch_image)
        think = self._think(view, request)
        tools = request.tools if request.tool_choice != ToolChoice.NONE else None
        if tools and "tools" not in capabilities:
            raise Unsupported(f'"{view.name}" does not support tools')
        fmt = tool_format(view.template)
        sampling = self._sampling(view, request, tools, fmt)
        tokenizer = await self.tokenizer(view)
        prompts, inside, images = await asyncio.to_thread(
            self._render_all, view, tokenizer, request, tools, think, pictures
        )
        if request.context or sampling.logit_bias:
            vocab = len(tokenizer)
            if request.context and any(t < 0 or t >= vocab for t in request.context):
                raise ChatError("context holds token ids outside the vocabulary")
            if sampling.logit_bias and max(sampling.logit_bias) >= vocab:
                raise ChatError("logit_bias holds token ids outside the vocabulary")
        names = frozenset(t["function"]["name"] for t in tools or [])
        return Prepared(view, sampling, prompts, inside, bool(tools), fmt, names, images, pictures)

    def _think(self, view: ModelView, request: ChatRequest) -> bool | None:
        """None for a model that does not think; else whether this turn thinks."""
        capable = "thinking" in view.record.config.capabilities
        if not capable:
            if request.think and request.think_strict:
                raise Unsupported(f'"{view.name}" does not support thinking')
            return None
        if request.raw:
            return None
        return request.think is not False

    def _sampling(
        self,
        view: ModelView,
        request: ChatRequest,
        tools: list[dict[str, Any]] | None,
        fmt: ToolFormat,
    ) -> SamplingParams:
        """Defaults, then the model's parameters, then the request: merged here, once."""
        sampling = to_sampling(merge_options(view.params, request.options))
        sampling.logit_bias = dict(request.logit_bias)
        sampling.logprobs = request.logprobs
        sampling.prompt_logprobs = request.echo and request.logprobs is not None
        sampling.json_schema = request.json_schema
        if request.tool_choice == ToolChoice.REQUIRED:
            if not tools:
                raise ChatError("tool_choice requires tools")
            if sampling.json_schema is not None:
                raise ChatError(
                    "a response format (response_format, format, text.format) cannot be "
                    "combined with a tool choice that forces a call"
                )
            sampling.json_schema, sampling.json_wrap = forced_call(tools, request.tool_name, fmt)
        try:
            sampling.validate()
        except EngineError as exc:
            raise ChatError(str(exc)) from None
        return sampling

    def _render_all(
        self,
        view: ModelView,
        tokenizer: Any,
        request: ChatRequest,
        tools: list[dict[str, Any]] | None,
        think: bool | None,
        pictures: list[Picture],
    ) -> tuple[list[list[int]], list[bool | None], list[list[ImageInput]]]:
        """Each prompt's token ids, for a thinking turn whether the rendered prompt already
        opened the <think> block (some templates do), and each prompt's images made ready
        for the model's encoder. ``pictures``: the request's decoded images in order, each
        with its message (``Picture.message`` indexes ``request.messages``; None for a
        completion's): they go into their message as image parts before its text."""
        vision = self._vision(view) if pictures else None
        counts = Counter(p.message for p in pictures)
        images: list[list[ImageInput]] = []
        if request.messages:
            history = [*view.messages]
            history += [
                with_images(m.for_template(), counts[i]) for i, m in enumerate(request.messages)
            ]
            if view.system and not any(m["role"] == "system" for m in history[:1]):
                history = [{"role": "system", "content": view.system}, *history]
            if "vision" in view.record.config.capabilities:
                history = [as_parts(m) for m in history]
            plan = ImagePlan(vision, tokenizer, pictures) if vision is not None else None
            ids = self._encode(view, tokenizer, history, tools, think, plan)
            if plan is not None:
                images.append(plan.inputs(ids))
            prompts = [ids]
        elif request.raw and pictures:
            raise ChatError("images need the model's template: send them without raw")
        elif len(request.prompts) > 1 and pictures:
            raise ChatError("images go with a single prompt")
        elif request.raw:
            for prompt in request.prompts:
                self._fits(view, tokenizer, prompt)
            prompts = [list(tokenizer(p)["input_ids"]) for p in request.prompts]
        else:
            system = request.system if request.system else view.system
            prompts = []
            for prompt in request.prompts:
                history = [{"role": "system", "content": system}] if system else []
                history.append(with_images({"role": "user", "content": prompt}, counts[None]))
                if "vision" in view.record.config.capabilities:
                    history = [as_parts(m) for m in history]
                plan = ImagePlan(vision, tokenizer, pictures) if vision is not None else None
                ids = self._encode(view, tokenizer, history, None, think, plan)
                context = request.context or []
                if plan is not None:
                    placed = plan.inputs(ids)
                    images.append([replace(i, start=i.start + len(context)) for i in placed])
                prompts.append([*context, *ids])
        if not prompts:
            raise ChatError("nothing to generate from: no messages and no prompt")
        inside: list[bool | None] = [
            None if not think else str(tokenizer.decode(p[-8:])).rstrip().endswith("<think>")
            for p in prompts
        ]
        images += [[] for _ in range(len(prompts) - len(images))]
        return prompts, inside, images

    def _vision(self, view: ModelView) -> VisionFamily:
        """The model's vision family with its image processor (loaded once per model)."""
        load = getattr(self.tokenizers, "vision", None)
        vision = load(view.record) if load is not None else None
        if vision is None:
            raise Unsupported(f'"{view.name}" does not support vision')
        return vision

    def _encode(
        self,
        view: ModelView,
        tokenizer: Any,
        history: list[dict[str, Any]],
        tools: list[Any] | None,
        think: bool | None,
        images: ImagePlan | None = None,
    ) -> list[int]:
        """The prompt's token ids; with ``images``, its placeholders expanded first."""
        if view.template:
            extra = {} if think is None else {"enable_thinking": think}
            # special-token text in what the client sent stays text (chat/special.py)
            pattern, mark = special_pattern(tokenizer), new_mark()
            text = render(
                view.template,
                messages=defuse(history, pattern, mark),
                tools=defuse(tools, pattern, mark) or None,
                add_generation_prompt=True,
                bos_token=tokenizer.bos_token or "",
                eos_token=tokenizer.eos_token or "",
                **extra,
            )
            if images is not None:
                text = images.text(text, mark)
            self._fits(view, tokenizer, text)
            return encode_marked(tokenizer, text, mark)
        if images is not None:
            raise ChatError(f'"{view.name}" has no chat template to place images with')
        text = plain_chat(history)
        self._fits(view, tokenizer, text)
        return encode_text(tokenizer, text)

    @staticmethod
    def _fits(view: ModelView, tokenizer: Any, text: str) -> None:
        """A prompt too long for the model's context is refused before all of it is
        tokenized (a 7.5 MB prompt took 20 s of CPU to reach the engine's 400)."""
        try:
            check_fits(tokenizer, text, view.record.config.context_length or 0)
        except ValueError as exc:
            raise ChatError(str(exc)) from None

    async def _generate(
        self,
        view: ModelView,
        prompt_ids: list[int],
        sampling: SamplingParams,
        keep_alive: KeepAlive,
        images: list[ImageInput] | None = None,
    ) -> AsyncGenerator[TokenEvent, None]:
        """One engine request; its usage is logged when it ends. Raises EngineError before
        any output."""
        http_id = current_request_id()
        request = GenerateRequest(
            request_id=f"{http_id or 'req'}-{uuid.uuid4().hex[:8]}",
            model=view.name,
            prompt_ids=prompt_ids,
            sampling=sampling,
            keep_alive=keep_alive,
            images=images or [],
        )
        events = self.engine.generate(request)
        try:
            async for event in events:
                if event.finished and not event.error:
                    note_request(
                        model=view.name,
                        adapter=view.name if view.record.is_adapter else None,
                        tokens_in=event.prompt_tokens,
                        tokens_out=event.completion_tokens,
                        prompt_eval_seconds=event.prompt_time,
                        eval_seconds=event.decode_time,
                    )
                yield event
        finally:
            # Closing this generator does not close the engine's: `async for` leaves it
            # suspended until the garbage collector finalises it. Close it now, so the
            # engine aborts the request at once.
            close = getattr(events, "aclose", None)
            if close is not None:
                await close()


def texts_of_tokens(tokenizer: Any, ids: list[int]) -> list[str]:
    """Token texts as they read inside a text: decoded after an anchor token, since alone
    a SentencePiece token loses its leading space ("▁Paris" decodes to "Paris")."""
    anchor = list(tokenizer("a", add_special_tokens=False)["input_ids"])[:1]
    base = str(tokenizer.decode(anchor)) if anchor else ""
    out = []
    for token in ids:
        alone = str(tokenizer.decode([token], skip_special_tokens=True))
        if not anchor or not alone:
            out.append(alone)
            continue
        both = str(tokenizer.decode([*anchor, token], skip_special_tokens=True))
        out.append(both[len(base) :] if both.startswith(base) else alone)
    return out


@dataclass(slots=True)
class Prepared:
    """A checked turn, rendered and ready to start."""

    view: ModelView
    sampling: SamplingParams
    prompts: list[list[int]]
    inside: list[bool | None]
    tools: bool
    tool_format: ToolFormat
    tool_names: frozenset[str]
    images: list[list[ImageInput]] = field(default_factory=list)  # each prompt's, in order
    pictures: list[Picture] = field(default_factory=list)  # the request's, decoded, in order


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
    limit = view.record.config.context_length or 0

    def encode(text: str) -> list[int]:
        if not truncate:
            service._fits(view, tokenizer, text)
        elif limit and len(text) > 2 * limit * longest_token(tokenizer):
            text = text[: 2 * limit * longest_token(tokenizer)]  # holds the tokens kept
        return encode_text(tokenizer, text)

    encoded: list[list[int]] = await asyncio.to_thread(lambda: [encode(t) for t in texts])
    if limit:
        too_long = [i for i, ids in enumerate(encoded) if len(ids) > limit]
        if too_long and not truncate:
            raise ChatError(f"input {too_long[0]} exceeds the context length ({limit} tokens)")
        encoded = [ids[:limit] for ids in encoded]
    if any(not ids for ids in encoded):
        raise ChatError("an input is empty")
    return encoded
