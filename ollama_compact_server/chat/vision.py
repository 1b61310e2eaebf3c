"""Images in a chat turn for a vision model: the messages as Hugging Face templates read
them (a message's images as image parts before its text), and the rendered prompt's
placeholders expanded to as many tokens as each image fills, with the tensors its encoder
takes. Runs off the event loop (the image processor is CPU work)."""

from __future__ import annotations

from collections.abc import Sequence
from typing import TYPE_CHECKING, Any, Protocol

from ..engine.types import ImageInput
from .errors import ChatError

if TYPE_CHECKING:  # torch: imported only where a vision model is served
    from ..modeling.vision import VisionFamily


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


def expand(
    ids: list[int], family: VisionFamily, pictures: Sequence[PictureLike]
) -> tuple[list[int], list[ImageInput]]:
    """The prompt with each image's one placeholder token (as the template wrote it; text
    the client typed never encodes to it, chat/special.py) repeated as many times as the
    image fills, and the images made ready for the encoder."""
    token = family.image_token
    spots = [i for i, t in enumerate(ids) if t == token]
    if len(spots) != len(pictures):
        raise ChatError(
            f"the model's template placed {len(spots)} image(s) for the "
            f"{len(pictures)} sent; this template cannot show images here"
        )
    out: list[int] = []
    images: list[ImageInput] = []
    last = 0
    for spot, picture in zip(spots, pictures):
        prepared = family.prepare(family.processor, picture.image)
        out += ids[last:spot]
        images.append(ImageInput(picture.sha256, len(out), prepared.length, prepared.pixels))
        out += [token] * prepared.length
        last = spot + 1
    out += ids[last:]
    return out, images
