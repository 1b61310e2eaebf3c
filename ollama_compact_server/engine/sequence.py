"""The engine's records of one resident model's work: a sequence (a generate request on
its way through the batch), the loaded model, and work that waits for an adapter slot."""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import torch

from .adapters import AdapterRef
from .constraint import GuidedTokenizer, JsonConstraint
from .detok import Detokenizer, StopMatcher
from .mailbox import Mailbox
from .sampler import RowState
from .types import GenerateRequest, ImageInput, TokenLogprob


@dataclass(slots=True)
class Media:
    """A prompt's images on their way through prefill. ``key`` is the prompt with each
    image's placeholder positions replaced by negative ids drawn from the image's digest,
    so the prefix cache matches images by content, never by their identical placeholders.
    The embeddings are made on first need, one encoder pass for all the prompt's images;
    an M-RoPE model's rotary positions for the prompt (``rope``: [3, L]) and the offset of
    every later position (``delta``) come with them."""

    images: list[ImageInput]
    key: list[int]
    features: list[torch.Tensor] | None = None
    rope: torch.Tensor | None = None
    delta: int = 0

    def cut(self, end: int, forward: bool) -> int:
        """``end`` moved out of any image it falls inside: past the image (``forward``)
        or back to its start. For images whose tokens attend to each other both ways,
        which must go through one forward."""
        for image in self.images:
            if image.start < end < image.start + image.length:
                return image.start + image.length if forward else image.start
        return end


def image_key(prompt: list[int], images: list[ImageInput]) -> list[int]:
    """The prompt as the prefix cache compares it (see Media)."""
    key = list(prompt)
    for image in images:
        base = int(image.digest[:15], 16)
        for offset in range(image.length):
            key[image.start + offset] = -1 - ((base + offset) % (1 << 62))
    return key


@dataclass(slots=True)
class Sequence:
    request: GenerateRequest
    mailbox: Mailbox
    state: RowState
    detok: Detokenizer
    stops: StopMatcher
    stop_ids: set[int]
    max_tokens: int
    adapter: AdapterRef | None = None  # the LoRA adapter this request runs with
    lora: int = -1  # its adapter slot while admitted
    slot: int = -1
    prefilled: int = 0
    cached: int = 0  # positions written to the KV cache
    reused: int = 0  # prompt positions taken from the cache instead of computed
    generated: list[int] = field(default_factory=list)
    submitted: float = field(default_factory=time.perf_counter)
    admitted: float = 0.0
    first_token: float = 0.0
    last_token: float = 0.0
    prompt_time: float = 0.0
    load_time: float = 0.0
    preemptions: int = 0
    finished: bool = False
    constraint: JsonConstraint | None = None  # structured output
    prompt_scores: list[TokenLogprob | None] | None = None  # prompt logprobs, when asked
    carry: torch.Tensor | None = None  # last prompt chunk's final logits (for the next chunk)
    media: Media | None = None  # the prompt's images, for a vision model

    @property
    def key(self) -> list[int]:
        """The prompt as the prefix cache compares it (images by their digests)."""
        return self.media.key if self.media is not None else self.request.prompt_ids

    @property
    def prefill_key(self) -> list[int]:
        return self.key if not self.generated else self.key + self.generated[:-1]

    @property
    def prompt(self) -> list[int]:
        return self.request.prompt_ids

    @property
    def prefill_ids(self) -> list[int]:
        """What prefill must put in the cache: the prompt, or after a preemption the prompt
        plus every generated token but the last (which the next decode step feeds)."""
        return self.prompt if not self.generated else self.prompt + self.generated[:-1]

    @property
    def position(self) -> int:
        """Position of the last token, the one the next decode step feeds."""
        return len(self.prompt) + len(self.generated) - 1

    @property
    def adapter_key(self) -> str:
        return self.adapter.key if self.adapter is not None else ""

    def held(self) -> list[int]:
        """The tokens whose K/V this sequence's slot holds (positions 0..cached-1), images
        as their keys."""
        if self.cached <= len(self.prompt):
            return self.key[: self.cached]
        return (self.key + self.generated)[: self.cached]


@dataclass
class LoadedModel:
    model: Any
    tokenizer: Any
    stop_ids: set[int]
    guided: GuidedTokenizer | None = None  # built on the first structured-output request
    pooling: str | None = None  # set for dedicated embedding models (encoders): no generation
    dtype: Any = None  # the torch dtype it serves in, where the provider chose one per model

    def guided_tokenizer(self) -> GuidedTokenizer:
        if self.guided is None:
            vocab = int(getattr(self.model.config, "vocab_size", 0) or len(self.tokenizer))
            self.guided = GuidedTokenizer(self.tokenizer, vocab)
        return self.guided


ModelProvider = Callable[[str], LoadedModel]


@dataclass(slots=True)
class AdapterWait:
    """Work that needs an adapter on the device but no sequence (a bare load of an adapter
    model, its embeddings): ``run(slot)`` once the adapter has a slot, ``fail`` otherwise."""

    adapter: AdapterRef
    run: Callable[[int], None]
    fail: Callable[[str, int], None]
    request_id: str | None = None


PROMPT_SCORE_CHUNK = 64  # prompt scoring keeps every position's logits: keep chunks small


def wants_prompt_scores(seq: Sequence) -> bool:
    return seq.request.sampling.prompt_logprobs and not seq.generated
