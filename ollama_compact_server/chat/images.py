"""Images a client sends, from what the wire carried (``ImageData``) to decoded RGB pictures
(``Picture``) under the daemon's caps (``ImageLimits``); every bad image is a 400 naming it.
Pillow only, no torch: bytes and pixels are checked before anything large is allocated."""

from __future__ import annotations

import asyncio
import base64
import binascii
import hashlib
import io
import logging
import re
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass, field

from PIL import Image, UnidentifiedImageError

from ..units import MiB
from .errors import ChatError

log = logging.getLogger(__name__)

FORMATS = ("JPEG", "PNG", "BMP", "TIFF", "GIF", "WEBP")
"""What Pillow may open (``formats=``: no other decoder is even tried)."""
MEDIA_TYPES = {
    "image/jpeg": "JPEG",
    "image/jpg": "JPEG",
    "image/pjpeg": "JPEG",
    "image/png": "PNG",
    "image/bmp": "BMP",
    "image/x-bmp": "BMP",
    "image/x-ms-bmp": "BMP",
    "image/tiff": "TIFF",
    "image/gif": "GIF",
    "image/webp": "WEBP",
}
ACCEPTED = "JPEG, PNG, BMP, TIFF, GIF or WebP"

DEFAULT_MAX_BYTES = 20 * MiB
# 50 megapixels: above what phone and most camera photos have (48-50 MP sensors), below
# Pillow's own bomb warning (89 MP); one such image is 150 MB decoded as RGB.
DEFAULT_MAX_PIXELS = 50_000_000
DEFAULT_MAX_IMAGES = 16


class ImageError(ChatError):
    """A bad image: a 400 whose message names the image (1-based, in request order)."""

    def __init__(self, index: int, reason: str) -> None:
        super().__init__(f"image {index + 1}: {reason}")
        self.index = index


@dataclass(frozen=True, slots=True)
class ImageData:
    """An image as a client sent it, not decoded yet: exactly one of the file's ``raw``
    bytes, ``base64`` text of them, or a ``url`` (a ``data:`` URI or a remote http(s) URL).
    ``media_type`` is what the client declared (Anthropic's base64 source says it)."""

    raw: bytes | None = None
    base64: str | None = None
    url: str | None = None
    media_type: str | None = None

    def __post_init__(self) -> None:
        if sum(v is not None for v in (self.raw, self.base64, self.url)) != 1:
            raise ValueError("ImageData holds exactly one of raw, base64 or url")

    @classmethod
    def of_bytes(cls, raw: bytes, media_type: str | None = None) -> ImageData:
        return cls(raw=raw, media_type=media_type)

    @classmethod
    def of_base64(cls, text: str, media_type: str | None = None) -> ImageData:
        return cls(base64=text, media_type=media_type)

    @classmethod
    def of_url(cls, url: str) -> ImageData:
        return cls(url=url)

    @property
    def remote(self) -> bool:
        """A URL the daemon would have to fetch (anything but a ``data:`` URI)."""
        return self.url is not None and self.url[:5].lower() != "data:"

    def __repr__(self) -> str:  # never the whole payload in a log line
        if self.raw is not None:
            return f"ImageData(raw=<{len(self.raw)} bytes>)"
        if self.base64 is not None:
            return f"ImageData(base64=<{len(self.base64)} chars>)"
        return f"ImageData(url={(self.url or '')[:60]!r})"


@dataclass(frozen=True, slots=True)
class ImageLimits:
    """The caps every request's images are held to, and the hosts images may be fetched
    from (none by default: the daemon fetches no URL for clients)."""

    max_bytes: int = DEFAULT_MAX_BYTES  # one image's encoded file
    max_pixels: int = DEFAULT_MAX_PIXELS  # one image's width x height
    max_images: int = DEFAULT_MAX_IMAGES  # per request, every message's together
    url_hosts: frozenset[str] = frozenset()  # lowercase host names, compared exactly
    fetch_timeout: float = 10.0  # seconds for one remote image, connection to last byte


@dataclass(slots=True)
class Picture:
    """A decoded image: RGB, fully loaded, in the request's order. ``message`` is the index
    of its message in ``ChatRequest.messages`` (None: a completion's image)."""

    index: int  # 0-based, over the whole request
    message: int | None
    sha256: str  # hex digest of the encoded bytes (what a cache keys on)
    image: Image.Image = field(repr=False)
    width: int
    height: int
    format: str  # Pillow's name: JPEG, PNG, BMP, TIFF, GIF, WEBP


# ------------------------------------------------------------------------------ bytes


_DATA_URI = re.compile(r"data:([^,]*?),", re.IGNORECASE)
_ADDRESS = re.compile(r"<[^<>]*>|\b0x[0-9a-fA-F]+")


def check_media_type(index: int, media_type: str) -> None:
    kind = media_type.split(";")[0].strip().lower()
    if kind not in MEDIA_TYPES:
        shown = kind[:60] or "no media type"
        if kind.startswith("image/"):
            raise ImageError(index, f"{shown} is not an accepted format ({ACCEPTED})")
        raise ImageError(index, f"{shown} is not an image type ({ACCEPTED})")


def _base64(index: int, text: str, limits: ImageLimits) -> bytes:
    compact = "".join(text.split())  # MIME line breaks; the text itself when there are none
    if len(compact) * 3 // 4 > limits.max_bytes + 2:
        raise ImageError(index, _too_big(len(compact) * 3 // 4, limits))
    compact += "=" * (-len(compact) % 4)  # padding left out by some clients
    try:
        return base64.b64decode(compact, validate=True)
    except (binascii.Error, ValueError):
        raise ImageError(index, "the image is not valid base64") from None


def _data_uri(index: int, url: str, limits: ImageLimits) -> bytes:
    match = _DATA_URI.match(url[:300])
    if match is None:
        raise ImageError(index, "a data: URI needs a comma before its data")
    header = match.group(1)
    params = [p.strip().lower() for p in header.split(";")]
    check_media_type(index, params[0])
    if "base64" not in params[1:]:
        raise ImageError(index, "a data: URI image must be base64 (data:image/png;base64,...)")
    return _base64(index, url[match.end() :], limits)


def raw_bytes(data: ImageData, index: int, limits: ImageLimits) -> bytes:
    """The encoded file of an inline image, the byte cap checked (before base64 decoding
    from the text's length, then exactly)."""
    if data.media_type is not None:
        check_media_type(index, data.media_type)
    if data.raw is not None:
        raw = data.raw
    elif data.base64 is not None and data.base64[:5].lower() == "data:":
        raw = _data_uri(index, data.base64, limits)  # some clients send a URI as "base64"
    elif data.base64 is not None:
        raw = _base64(index, data.base64, limits)
    elif data.url is not None and not data.remote:
        raw = _data_uri(index, data.url, limits)
    else:
        raise ImageError(index, REMOTE_REFUSED)
    if not raw:
        raise ImageError(index, "the image is empty")
    if len(raw) > limits.max_bytes:
        raise ImageError(index, _too_big(len(raw), limits))
    return raw


def _too_big(size: int, limits: ImageLimits) -> str:
    return f"{size:,} bytes is more than the {limits.max_bytes:,} this server takes per image"


REMOTE_REFUSED = (
    "remote image URLs are not fetched by this server (fetching them would let any client "
    "make it reach into the network); send the image inline, as base64 or a data: URI"
)


# ------------------------------------------------------------------------------ pixels


def decode_image(
    data: ImageData, index: int, limits: ImageLimits, message: int | None = None
) -> Picture:
    """Decodes one inline image (CPU work: call it off the event loop). Raises ImageError
    for anything wrong with it: never Pillow's own errors, whose text may hold addresses."""
    raw = raw_bytes(data, index, limits)
    try:
        with Image.open(io.BytesIO(raw), formats=FORMATS) as opened:
            width, height = opened.size
            if width * height > limits.max_pixels:
                raise ImageError(
                    index,
                    f"{width}x{height} pixels is more than the {limits.max_pixels:,} this "
                    "server takes per image",
                )
            if width < 1 or height < 1:
                raise ImageError(index, "the image has no pixels")
            kind = str(opened.format)
            opened.load()  # the first frame of an animation only
            image = to_rgb(opened)
    except ImageError:
        raise
    except (Image.DecompressionBombError, Image.DecompressionBombWarning):
        raise ImageError(
            index, "the image declares too many pixels (a decompression bomb)"
        ) from None
    except UnidentifiedImageError:
        raise ImageError(index, f"not an image in an accepted format ({ACCEPTED})") from None
    except Exception as exc:  # crafted files raise anything from a plugin
        log.info("image %d refused: %s: %s", index + 1, type(exc).__name__, exc)
        raise ImageError(index, f"the image is broken or truncated ({_cause(exc)})") from None
    return Picture(
        index=index,
        message=message,
        sha256=hashlib.sha256(raw).hexdigest(),
        image=image,
        width=image.width,
        height=image.height,
        format=kind,
    )


def _cause(exc: BaseException) -> str:
    """Pillow's message, without object reprs and addresses (they leak heap layout)."""
    text = _ADDRESS.sub("", str(exc)).strip(" :") or type(exc).__name__
    return text[:160]


def to_rgb(image: Image.Image) -> Image.Image:
    """A new RGB image: transparency laid over white (as Ollama's clients expect), 16-bit
    and 32-bit grey scaled to 8 bits, palette, CMYK and the rest converted."""
    if image.mode in ("I;16", "I;16L", "I;16B", "I;16N", "I"):
        top = 65535  # 16-bit samples; 32-bit ones are read as 8 or 16 bits where they fit
        if image.mode == "I":
            extrema = image.getextrema()
            high = int(extrema[1]) if isinstance(extrema[1], (int, float)) else 65535
            top = 255 if high <= 255 else max(high, 65535)
        scale = 255 / top
        grey = image.convert("I").point(lambda v: v * scale)
        return grey.convert("L").convert("RGB")
    if image.mode in ("RGBA", "LA", "PA", "RGBa", "La") or "transparency" in image.info:
        rgba = image.convert("RGBA")
        white = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
        white.alpha_composite(rgba)
        return white.convert("RGB")
    return image.convert("RGB")


# ------------------------------------------------------------------------------ a request


Fetch = Callable[[ImageData, int], Awaitable[ImageData]]


async def decode_images(
    images: Sequence[tuple[int | None, ImageData]],
    limits: ImageLimits,
    fetch: Fetch | None = None,
) -> list[Picture]:
    """Every image of a request, in order (``(message index or None, data)`` pairs),
    fetched where allowed and decoded off the event loop. The count is checked first."""
    if len(images) > limits.max_images:
        raise ChatError(f"too many images: {len(images)} (at most {limits.max_images} per request)")
    pictures = []
    for index, (message, data) in enumerate(images):
        if data.remote:
            if fetch is None:
                raise ImageError(index, REMOTE_REFUSED)
            data = await fetch(data, index)
        pictures.append(await asyncio.to_thread(decode_image, data, index, limits, message))
    return pictures
