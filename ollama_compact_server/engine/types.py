"""Engine records: what a request asks for and what the engine streams back."""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from enum import Enum
from typing import Any

ANY_JSON_OBJECT = '{"type": "object"}'
"""The schema behind Ollama's format "json" and OpenAI's json_object mode."""


class FinishReason(str, Enum):
    STOP = "stop"
    LENGTH = "length"
    ABORT = "abort"
    ERROR = "error"


class EngineError(Exception):
    """A request the engine cannot serve; ``status`` is the HTTP code the API should use."""

    status = 400


class RequestTooLarge(EngineError):
    status = 400


class EngineBusy(EngineError):
    status = 503


class EngineDown(EngineError):
    """The device loop has stopped or died: nothing can be served until a restart."""

    status = 503


class ModelLoadError(EngineError):
    status = 500


class Default:
    """Marks "use the daemon's default" (for keep-alive)."""

    def __repr__(self) -> str:
        return "DEFAULT"


DEFAULT = Default()
KeepAlive = float | None | Default
"""Seconds an idle model stays loaded after this request; None = forever; DEFAULT."""


@dataclass(slots=True)
class SamplingParams:
    temperature: float = 0.8
    top_k: int = 40
    top_p: float = 0.9
    min_p: float = 0.0
    repeat_penalty: float = 1.1
    repeat_last_n: int = 64
    presence_penalty: float = 0.0
    frequency_penalty: float = 0.0
    seed: int | None = None
    max_tokens: int | None = None  # None: until the context is full
    stop: list[str] = field(default_factory=list)
    stop_token_ids: list[int] = field(default_factory=list)
    logit_bias: dict[int, float] = field(default_factory=dict)
    logprobs: int | None = None  # None: off; k: the chosen token's logprob and the top k
    prompt_logprobs: bool = False  # also score every prompt token (echo, perplexity)
    json_schema: str | None = None  # structured output: JSON text of a schema
    json_wrap: tuple[str, str] | None = None  # text forced before and after that JSON value

    def validate(self) -> None:
        """Raises :class:`EngineError` naming the first out-of-range or non-finite value."""
        checks = (
            ("temperature", self.temperature, 0.0, 100.0),
            ("top_p", self.top_p, 0.0, 1.0),
            ("min_p", self.min_p, 0.0, 1.0),
            ("repeat_penalty", self.repeat_penalty, 0.0, 100.0),
            ("presence_penalty", self.presence_penalty, -100.0, 100.0),
            ("frequency_penalty", self.frequency_penalty, -100.0, 100.0),
        )
        for name, value, low, high in checks:
            if (
                not isinstance(value, (int, float))
                or not math.isfinite(value)
                or not low <= value <= high
            ):
                raise EngineError(f"{name} must be a finite number in [{low:g}, {high:g}]")
        if self.repeat_penalty == 0:
            raise EngineError("repeat_penalty must be greater than 0")
        if not 0 <= self.top_k <= 1_000_000:
            raise EngineError("top_k must be in [0, 1000000]")
        if not -1 <= self.repeat_last_n <= 1_000_000:
            raise EngineError("repeat_last_n must be in [-1, 1000000]")
        if self.max_tokens is not None and self.max_tokens < 0:
            raise EngineError("max tokens must not be negative")
        if self.logprobs is not None and not 0 <= self.logprobs <= 20:
            raise EngineError("top_logprobs must be between 0 and 20")
        if self.seed is not None and not -(2**63) <= self.seed < 2**64:
            raise EngineError("seed is out of range")

    @property
    def greedy(self) -> bool:
        return self.temperature == 0

    @property
    def penalised(self) -> bool:
        return (
            self.repeat_penalty != 1.0
            or self.presence_penalty != 0.0
            or self.frequency_penalty != 0.0
            or bool(self.logit_bias)
        )


@dataclass(slots=True)
class ImageInput:
    """One image of a prompt, made ready for the model's vision encoder: its embeddings fill
    the prompt positions start .. start + length - 1 (placeholder tokens there)."""

    digest: str  # sha256 of the image's bytes: the prefix cache keys its positions on it
    start: int
    length: int
    pixels: dict[str, Any]  # the processor's tensors for this image (the family's names)


@dataclass(slots=True)
class GenerateRequest:
    request_id: str
    model: str
    prompt_ids: list[int]
    sampling: SamplingParams = field(default_factory=SamplingParams)
    keep_alive: KeepAlive = DEFAULT
    # structured output's JsonConstraint, built by the engine front off the device thread
    constraint: Any = None
    images: list[ImageInput] = field(default_factory=list)  # in prompt order


TokenLogprob = tuple[int, float, list[tuple[int, float]]]
"""(token id, its log-probability, [(alternative id, log-probability), ...])."""


@dataclass(slots=True)
class EmbedRequest:
    """Token lists to embed with a model's hidden states (mean-pooled, L2-normalised)."""

    request_id: str
    model: str
    inputs: list[list[int]]
    keep_alive: KeepAlive = DEFAULT


@dataclass(slots=True)
class TokenEvent:
    """A piece of output. The last event of a request has ``finish_reason`` set."""

    text: str = ""
    token_ids: list[int] = field(default_factory=list)
    finish_reason: FinishReason | None = None
    error: str | None = None
    stop_sequence: str | None = None  # the stop string that ended the request, if one did
    embeddings: list[list[float]] | None = None
    logprobs: list[TokenLogprob] = field(default_factory=list)  # one per token in token_ids
    # with logprobs: each token's own text, as the detokenizer gave it (so the pieces add
    # up to the output; "" for a token that ends inside a UTF-8 character)
    token_texts: list[str] = field(default_factory=list)
    prompt_logprobs: list[TokenLogprob | None] | None = None  # first event, when asked
    status: int = 500  # HTTP status for an error that ends a request before any output
    prompt_tokens: int = 0
    cached_tokens: int = 0  # of prompt_tokens, taken from the KV cache instead of computed
    completion_tokens: int = 0
    # seconds
    queue_time: float = 0.0
    load_time: float = 0.0
    prompt_time: float = 0.0
    decode_time: float = 0.0
    total_time: float = 0.0

    @property
    def finished(self) -> bool:
        return self.finish_reason is not None


@dataclass(frozen=True, slots=True)
class Resident:
    """What /api/ps shows about a loaded model."""

    name: str
    memory: int
    context: int
    expires_in: float | None  # seconds until unloaded when idle; None = busy or forever
    busy: bool
    device: str = "cpu"
    base: str | None = None  # for a LoRA adapter: the resident model it runs on


def error_event(message: str, status: int) -> TokenEvent:
    """The final event of a request that failed (``status``: the HTTP code to use)."""
    return TokenEvent(finish_reason=FinishReason.ERROR, error=message, status=status)
