"""Images in a chat turn for a vision model: the messages as Hugging Face templates read
them (a message's images as image parts before its text), and the rendered prompt's
placeholders expanded as the model's own processor does it (a text replacement before
tokenizing: each placeholder becomes as many image tokens as its image fills, with what the
family puts around them), then the images' positions found in the token ids, with the
tensors their encoder takes. Runs off the event loop (the image processor is CPU work)."""

from __future__ import annotations

import hashlib
from collections.abc import Sequence
from typing import TYPE_CHECKING, Any, Protocol

from ..engine.types import ImageInput
from .errors import ChatError

if TYPE_CHECKING:  # torch: imported only where a vision model is served
    from ..modeling.vision import Prepared, VisionFamily


class PictureLike(Protocol):
    """A decoded image of the request (chat/images.py's Picture)."""

    image: Any  # PIL image, RGB
    sha256: str  # hex digest of the bytes the client sent


def with_images(message: dict[str, Any], count: int) -> dict[str, Any]:
    """A template message whose content also holds ``count`` image parts, before the
    text (the order Hugging Face processors' examples use)."""
    if not count:
        return message
    content = message.get("content") or ""
    parts: list[dict[str, Any]] = [{"type": "image"} for _ in range(count)]
    if isinstance(content, list):
        parts += content
    elif content:
        parts.append({"type": "text", "text": content})
    return {**message, "content": parts}


def as_parts(message: dict[str, Any]) -> dict[str, Any]:
    """A message whose text content becomes a list of parts, the form vision models'
    templates are written for (some, as Idefics3's, read nothing else)."""
    content = message.get("content")
    if isinstance(content, list):
        return message
    return {**message, "content": [{"type": "text", "text": content or ""}]}


class ImagePlan:
    """One prompt's pictures through the model's processor: ``text`` expands the rendered
    template's placeholders, ``inputs`` finds the images in the token ids."""

    def __init__(
        self, family: VisionFamily, tokenizer: Any, pictures: Sequence[PictureLike]
    ) -> None:
        self.family = family
        self.tokenizer = tokenizer
        self.pictures = list(pictures)
        self.prepared: list[list[Prepared]] = [
            family.prepare(family.processor, p.image) for p in self.pictures
        ]

    def text(self, rendered: str, mark: str) -> str:
        """The rendered prompt with each placeholder the template wrote expanded; text
        between ``mark``s is what the client typed (special-token text kept literal,
        chat/special.py) and is never expanded."""
        placeholder = self.family.placeholder(self.tokenizer)
        parts = rendered.split(mark) if mark else [rendered]
        found = sum(parts[i].count(placeholder) for i in range(0, len(parts), 2))
        if found != len(self.pictures):
            raise ChatError(
                f"the model's template placed {found} image(s) for the {len(self.pictures)} "
                "sent; this template cannot show images here"
            )
        pending = iter(self.prepared)
        for i in range(0, len(parts), 2):
            pieces = parts[i].split(placeholder)
            parts[i] = pieces[0] + "".join(
                self.family.expansion(self.tokenizer, next(pending)) + rest for rest in pieces[1:]
            )
        return mark.join(parts) if mark else parts[0]

    def inputs(self, ids: list[int]) -> list[ImageInput]:
        """The images at their positions: each run of image tokens, in order, as long as
        its image (or tile) fills; a tile's digest is its picture's with its number."""
        token = self.family.image_token
        out: list[ImageInput] = []
        at = 0
        for picture, runs in zip(self.pictures, self.prepared):
            for number, run in enumerate(runs):
                while at < len(ids) and ids[at] != token:
                    at += 1
                span = ids[at : at + run.length]
                if len(span) != run.length or any(t != token for t in span):
                    raise ChatError("the prompt's image tokens do not match the images")
                digest = picture.sha256
                if number:
                    digest = hashlib.sha256(f"{digest}:{number}".encode()).hexdigest()
                out.append(ImageInput(digest, at, run.length, run.pixels))
                at += run.length
        if token in ids[at:]:
            raise ChatError("the prompt's image tokens do not match the images")
        return out
