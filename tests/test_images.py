"""Images from what a client sent to decoded RGB pictures (chat/images.py), and remote image
URLs (chat/image_urls.py): every accepted format, first frames, transparency, every cap
(bytes, pixels from the header, count), broken files and bad encodings as 400s naming the
image, URLs refused unless their host is allowed, and random bytes never escaping as
anything but a 400."""

from __future__ import annotations

import base64
import io
import random
import re
import struct
import threading
import tracemalloc
import warnings
import zlib
from collections.abc import Iterator
from contextlib import contextmanager
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any, ClassVar

import pytest
from PIL import Image

from ollama_compact_server.chat.errors import ChatError
from ollama_compact_server.chat.image_urls import ImageFetcher
from ollama_compact_server.chat.images import (
    ImageData,
    ImageError,
    ImageLimits,
    Picture,
    decode_image,
    decode_images,
)
from tests.reliability import record

LIMITS = ImageLimits()


def encoded(image: Image.Image, fmt: str, **options: Any) -> bytes:
    out = io.BytesIO()
    image.save(out, fmt, **options)
    return out.getvalue()


def png(width: int = 8, height: int = 6, color: tuple[int, int, int] = (200, 10, 10)) -> bytes:
    return encoded(Image.new("RGB", (width, height), color), "PNG")


def png_header(width: int, height: int) -> bytes:
    """A few dozen bytes of PNG claiming ``width`` x ``height`` pixels (no pixel data)."""

    def chunk(kind: bytes, data: bytes) -> bytes:
        return (
            struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))
        )

    ihdr = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IDAT", zlib.compress(b"\0" * 64))


def refusal(data: ImageData, index: int = 0, limits: ImageLimits = LIMITS) -> str:
    with pytest.raises(ImageError) as caught:
        decode_image(data, index, limits)
    assert caught.value.status == 400
    return str(caught.value)


# ------------------------------------------------------------------------------ formats


@pytest.mark.parametrize(
    ("fmt", "exact"),
    [("JPEG", False), ("PNG", True), ("BMP", True), ("TIFF", True), ("GIF", True), ("WEBP", False)],
)
def test_each_accepted_format_decodes_to_rgb(fmt: str, exact: bool) -> None:
    raw = encoded(Image.new("RGB", (7, 5), (200, 10, 10)), fmt)
    picture = decode_image(ImageData.of_bytes(raw), 3, LIMITS, message=1)
    assert (picture.format, picture.width, picture.height) == (fmt, 7, 5)
    assert picture.image.mode == "RGB" and picture.image.size == (7, 5)
    assert (picture.index, picture.message) == (3, 1)
    assert picture.sha256 == __import__("hashlib").sha256(raw).hexdigest()
    pixel = picture.image.getpixel((3, 2))
    assert isinstance(pixel, tuple)
    if exact:
        assert pixel == (200, 10, 10)
    else:  # lossy: near the color
        assert all(abs(a - b) < 12 for a, b in zip(pixel, (200, 10, 10)))


def test_an_animated_gif_gives_its_first_frame() -> None:
    frames = [Image.new("RGB", (6, 6), c) for c in ((255, 0, 0), (0, 0, 255), (0, 255, 0))]
    raw = encoded(frames[0], "GIF", save_all=True, append_images=frames[1:], duration=50)
    assert Image.open(io.BytesIO(raw)).n_frames == 3  # type: ignore[attr-defined]
    picture = decode_image(ImageData.of_bytes(raw), 0, LIMITS)
    assert picture.image.getpixel((0, 0)) == (255, 0, 0)


def test_an_animated_webp_gives_its_first_frame() -> None:
    frames = [Image.new("RGB", (6, 6), c) for c in ((255, 0, 0), (0, 0, 255))]
    raw = encoded(frames[0], "WEBP", save_all=True, append_images=frames[1:], lossless=True)
    assert decode_image(ImageData.of_bytes(raw), 0, LIMITS).image.getpixel((0, 0)) == (255, 0, 0)


def test_transparency_is_laid_over_white() -> None:
    clear = Image.new("RGBA", (4, 4), (0, 0, 0, 0))
    clear.putpixel((1, 1), (10, 20, 30, 255))
    half = Image.new("LA", (4, 4), (0, 128))
    palette = Image.new("P", (4, 4), 0)
    palette.putpalette([0, 0, 0, 9, 9, 9] + [0] * 762)
    palette.putpixel((2, 2), 1)
    cases = [
        (encoded(clear, "PNG"), (255, 255, 255), (10, 20, 30)),
        (encoded(clear, "WEBP", lossless=True), (255, 255, 255), (10, 20, 30)),
        (encoded(palette, "GIF", transparency=0), (255, 255, 255), (255, 255, 255)),
        (encoded(palette, "PNG", transparency=0), (255, 255, 255), (255, 255, 255)),
    ]
    for raw, corner, inner in cases:
        image = decode_image(ImageData.of_bytes(raw), 0, LIMITS).image
        assert image.mode == "RGB"
        assert image.getpixel((0, 0)) == corner
        assert image.getpixel((1, 1)) == inner
    grey = decode_image(ImageData.of_bytes(encoded(half, "PNG")), 0, LIMITS).image
    pixel = grey.getpixel((0, 0))
    assert isinstance(pixel, tuple) and all(126 <= v <= 128 for v in pixel)  # black at half


def test_palette_cmyk_16_bit_grey_and_bilevel_become_rgb() -> None:
    deep = Image.new("I;16", (4, 4), 0)
    deep.putpixel((0, 0), 65535)
    deep.putpixel((1, 0), 32768)
    cases = {
        "cmyk": encoded(Image.new("CMYK", (4, 4), (0, 255, 255, 0)), "JPEG"),
        "cmyk tiff": encoded(Image.new("CMYK", (4, 4), (0, 255, 255, 0)), "TIFF"),
        "16-bit png": encoded(deep, "PNG"),
        "16-bit tiff": encoded(deep, "TIFF"),
        "palette": encoded(Image.new("RGB", (4, 4), (200, 10, 10)).convert("P"), "PNG"),
        "bilevel": encoded(Image.new("1", (4, 4), 1), "BMP"),
    }
    for name, raw in cases.items():
        image = decode_image(ImageData.of_bytes(raw), 0, LIMITS).image
        assert image.mode == "RGB", name
        pixel = image.getpixel((0, 0))
        assert isinstance(pixel, tuple)
        if name.startswith("cmyk"):
            assert pixel[0] > 240 and pixel[1] < 15 and pixel[2] < 15, (name, pixel)
        elif name.startswith("16-bit"):
            assert pixel == (255, 255, 255), name  # scaled, not clipped
            assert image.getpixel((1, 0)) in ((127,) * 3, (128,) * 3), name
            assert image.getpixel((2, 0)) == (0, 0, 0), name
        elif name == "bilevel":
            assert pixel == (255, 255, 255)


def test_base64_and_data_uris_decode() -> None:
    raw = png()
    text = base64.b64encode(raw).decode()
    wrapped = "\n".join(text[i : i + 20] for i in range(0, len(text), 20))  # MIME lines
    forms = [
        ImageData.of_base64(text),
        ImageData.of_base64(wrapped),
        ImageData.of_base64(text.rstrip("=")),
        ImageData.of_base64(text, "image/png"),
        ImageData.of_url("data:image/png;base64," + text),
        ImageData.of_url("DATA:image/jpeg;base64," + text),  # a mislabelled type is read anyway
        ImageData.of_url("data:image/png;name=a.png;base64," + text),
        ImageData.of_base64("data:image/png;base64," + text),  # a URI where base64 belongs
    ]
    for form in forms:
        assert (
            decode_image(form, 0, LIMITS).sha256
            == decode_image(ImageData.of_bytes(raw), 0, LIMITS).sha256
        )


# ------------------------------------------------------------------------------ refusals


def test_bad_encodings_are_400s_naming_the_image() -> None:
    text = base64.b64encode(png()).decode()
    cases = {
        ImageData.of_base64("not base64 at all!"): "not valid base64",
        ImageData.of_base64("aGk=" + "!"): "not valid base64",
        ImageData.of_base64(""): "empty",
        ImageData.of_url("data:text/plain;base64," + text): "text/plain is not an image type",
        ImageData.of_url("data:;base64," + text): "is not an image type",
        ImageData.of_url("data:image/svg+xml;base64," + text): "not an accepted format",
        ImageData.of_url("data:image/png," + text): "must be base64",
        ImageData.of_url("data:image/png;base64" + text): "needs a comma",
        ImageData.of_url("data:image/png;base64,%%%"): "not valid base64",
        ImageData.of_base64(text, "application/pdf"): "application/pdf is not an image type",
    }
    for data, words in cases.items():
        message = refusal(data, index=1)
        assert message.startswith("image 2: ") and words in message, message


def test_broken_files_are_400s_with_the_cause_and_no_internals() -> None:
    whole = encoded(Image.new("RGB", (64, 64), (1, 2, 3)), "PNG", compress_level=0)
    jpeg = encoded(Image.new("RGB", (64, 64), (1, 2, 3)), "JPEG")
    cases = [
        (b"garbage bytes, not an image", "not an image in an accepted format"),
        (whole[: len(whole) // 2], "broken or truncated"),
        (jpeg[:200], "broken or truncated"),
        (b"\x89PNG\r\n\x1a\n" + b"\0" * 40, "accepted format"),
        (b"%PDF-1.7\n" + b"x" * 100, "accepted format"),
        (b"<svg xmlns='http://www.w3.org/2000/svg'/>", "accepted format"),
        (encoded(Image.new("RGB", (4, 4)), "ICO"), "accepted format"),  # Pillow knows it: not us
        (encoded(Image.new("RGB", (4, 4)), "PPM"), "accepted format"),
    ]
    for raw, words in cases:
        message = refusal(ImageData.of_bytes(raw), index=4)
        assert message.startswith("image 5: ") and words in message, message
        assert not re.search(r"\b0x[0-9a-f]{4,}|<|BytesIO", message), message


def test_the_byte_cap_is_checked_before_decoding() -> None:
    raw = png(64, 64)
    small = ImageLimits(max_bytes=len(raw) - 1)
    assert "more than the" in refusal(ImageData.of_bytes(raw), limits=small)
    assert "more than the" in refusal(ImageData.of_base64(base64.b64encode(raw).decode()), 0, small)
    # base64 far over the cap is refused from its length: no decoding (it is not even valid)
    huge = ImageData.of_base64("A" * (4 * small.max_bytes) + "!")
    assert "more than the" in refusal(huge, limits=small)
    assert decode_image(ImageData.of_bytes(raw), 0, ImageLimits(max_bytes=len(raw))).width == 64


def test_the_pixel_cap_is_read_from_the_header_before_any_pixel_is_allocated() -> None:
    bombs = {
        "over our cap": png_header(10_000, 6_000),  # 60 MP: past 50 MP, under Pillow's check
        "over Pillow's check": png_header(100_000, 100_000),  # 10 GP, about 30 GB as RGB
    }
    for name, raw in bombs.items():
        assert len(raw) < 200
        tracemalloc.start()
        try:
            message = refusal(ImageData.of_bytes(raw), index=1)
            peak = tracemalloc.get_traced_memory()[1]
        finally:
            tracemalloc.stop()
        assert message.startswith("image 2: "), name
        assert "pixels" in message, (name, message)
        assert peak < 4 << 20, (name, peak)
    limits = ImageLimits(max_pixels=99)
    assert "10x10 pixels is more than the 99" in refusal(ImageData.of_bytes(png(10, 10)), 0, limits)
    assert decode_image(ImageData.of_bytes(png(9, 11)), 0, limits).height == 11


async def test_a_request_decodes_in_order_off_the_loop_and_its_count_is_capped(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    from ollama_compact_server.chat import images

    threads: list[threading.Thread] = []
    real = images.decode_image

    def watched(*args: Any) -> Picture:
        threads.append(threading.current_thread())
        return real(*args)

    monkeypatch.setattr(images, "decode_image", watched)
    pairs: list[tuple[int | None, ImageData]] = [
        (0, ImageData.of_bytes(png(1, 1))),
        (2, ImageData.of_bytes(png(2, 2))),
        (None, ImageData.of_bytes(png(3, 3))),
    ]
    pictures = await decode_images(pairs, LIMITS)
    assert [(p.index, p.message, p.width) for p in pictures] == [(0, 0, 1), (1, 2, 2), (2, None, 3)]
    assert threads and all(t is not threading.main_thread() for t in threads)
    with pytest.raises(ChatError, match=r"too many images: 3 \(at most 2 per request\)"):
        await decode_images(pairs, ImageLimits(max_images=2))
    pairs[1] = (2, ImageData.of_bytes(b"junk"))
    with pytest.raises(ImageError, match=r"^image 2: "):
        await decode_images(pairs, LIMITS)


@pytest.mark.filterwarnings("ignore:Truncated File Read")
def test_random_and_mangled_bytes_are_always_a_400_or_a_picture() -> None:
    """A fuzz-ish loop: random bytes, and valid files of every format with bytes flipped,
    cut or repeated. Whatever Pillow's plugins raise, the caller sees a Picture or an
    ImageError, never another exception."""
    rng = random.Random(16)
    seeds = [
        encoded(Image.new("RGB", (33, 17), (9, 99, 199)), fmt)
        for fmt in ("JPEG", "PNG", "BMP", "TIFF", "GIF", "WEBP")
    ]
    seeds.append(png_header(3000, 3000))
    tried = other = 0
    for _ in range(600):
        seed = bytearray(rng.choice(seeds))
        kind = rng.randrange(4)
        if kind == 0:
            data = bytes(rng.getrandbits(8) for _ in range(rng.randrange(1, 300)))
        elif kind == 1:
            for _ in range(rng.randrange(1, 8)):
                seed[rng.randrange(len(seed))] = rng.getrandbits(8)
            data = bytes(seed)
        elif kind == 2:
            data = bytes(seed[: rng.randrange(1, len(seed))])
        else:
            at = rng.randrange(len(seed))
            data = bytes(seed[:at] + seed[at:] * rng.randrange(1, 4))
        tried += 1
        try:
            picture = decode_image(ImageData.of_bytes(data), 0, ImageLimits(max_pixels=4_000_000))
            assert picture.image.mode == "RGB"
        except ImageError as exc:
            assert not re.search(r"\b0x[0-9a-f]{4,}|<", str(exc)), str(exc)
        except Exception:  # counted: the assertion below reports it
            other += 1
    record("Crafted and random image bytes", "tests/test_images.py", tried, crashes=other)
    assert other == 0


# ------------------------------------------------------------------------------ remote URLs


class ImageServer(BaseHTTPRequestHandler):
    routes: ClassVar[dict[str, tuple[int, dict[str, str], bytes]]] = {}
    seen: ClassVar[list[str]] = []

    def do_GET(self) -> None:  # http.server's name
        self.seen.append(self.path)
        status, headers, body = self.routes.get(self.path, (404, {}, b""))
        self.send_response(status)
        for key, value in headers.items():
            self.send_header(key, value)
        self.end_headers()
        self.wfile.write(body)

    def log_message(self, *args: Any) -> None:
        pass


@contextmanager
def serving_images() -> Iterator[tuple[str, list[str]]]:
    """A loopback HTTP server; yields its base URL and the paths requested."""
    raw = png(5, 4)
    ImageServer.seen = []
    ImageServer.routes = {
        "/cat.png": (200, {"Content-Type": "image/png", "Content-Length": str(len(raw))}, raw),
        "/away": (302, {"Location": "http://169.254.169.254/latest/meta-data/"}, b""),
        "/here": (301, {"Location": "/cat.png"}, b""),
        "/page": (200, {"Content-Type": "text/html"}, b"<html></html>"),
        "/big": (200, {"Content-Type": "image/png"}, raw + b"\0" * 5000),  # no length
        "/said-big": (200, {"Content-Type": "image/png", "Content-Length": "99999999"}, b""),
        "/gone": (404, {}, b""),
    }
    server = ThreadingHTTPServer(("127.0.0.1", 0), ImageServer)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield f"http://127.0.0.1:{server.server_address[1]}", ImageServer.seen
    finally:
        server.shutdown()
        server.server_close()


@pytest.fixture
def image_server() -> Iterator[tuple[str, list[str]]]:
    with serving_images() as served:
        yield served


async def fetched(url: str, limits: ImageLimits) -> list[Picture]:
    return await decode_images([(0, ImageData.of_url(url))], limits, ImageFetcher(limits))


async def test_remote_urls_are_refused_by_default(image_server: tuple[str, list[str]]) -> None:
    base, seen = image_server
    for fetch in (None, ImageFetcher(LIMITS)):
        with pytest.raises(ImageError, match="not fetched by this server") as caught:
            await decode_images([(0, ImageData.of_url(base + "/cat.png"))], LIMITS, fetch)
        assert "base64" in str(caught.value)
    assert seen == []


async def test_an_allowed_host_is_fetched(image_server: tuple[str, list[str]]) -> None:
    base, seen = image_server
    limits = ImageLimits(url_hosts=frozenset({"127.0.0.1"}))
    [picture] = await fetched(base + "/cat.png", limits)
    assert (picture.width, picture.height, picture.format) == (5, 4, "PNG")
    assert seen == ["/cat.png"]


async def test_fetching_refuses_redirects_other_types_and_oversized_bodies(
    image_server: tuple[str, list[str]],
) -> None:
    base, seen = image_server
    limits = ImageLimits(url_hosts=frozenset({"127.0.0.1"}), max_bytes=len(png(5, 4)) + 100)
    cases = {
        "/away": "redirects are not followed",
        "/here": "redirects are not followed",  # even to the same host
        "/page": "sent text/html, not an image",
        "/big": "more than the",
        "/said-big": "99,999,999 bytes is more than",
        "/gone": "answered 404",
    }
    for path, words in cases.items():
        with pytest.raises(ImageError, match=r"^image 1: ") as caught:
            await fetched(base + path, limits)
        assert words in str(caught.value), (path, str(caught.value))
    assert sorted(seen) == sorted(cases)  # one request each: nothing followed


async def test_only_listed_hosts_and_http_schemes_are_fetched(
    image_server: tuple[str, list[str]],
) -> None:
    base, seen = image_server
    port = base.rsplit(":", 1)[1]
    limits = ImageLimits(url_hosts=frozenset({"127.0.0.1", "example.com"}))
    refused = {
        f"http://localhost:{port}/cat.png": 'host "localhost" is not one',
        "http://example.com.evil.test/cat.png": "is not one",
        "http://evil-example.com/cat.png": "is not one",
        "http://sub.example.com/cat.png": "is not one",
        f"http://127.0.0.1:{port}@evil.test/cat.png": "user name or password",
        f"http://user:pw@127.0.0.1:{port}/cat.png": "user name or password",
        "file:///etc/passwd": "must be http or https, not file",
        f"ftp://127.0.0.1:{port}/cat.png": "must be http or https, not ftp",
        "gopher://127.0.0.1/x": "must be http or https",
        "//127.0.0.1/cat.png": "must be http or https",
        "http://[::1/cat.png": "not a valid URL",
    }
    for url, words in refused.items():
        with pytest.raises(ImageError) as caught:
            await fetched(url, limits)
        assert words in str(caught.value), (url, str(caught.value))
    assert seen == []
    [picture] = await fetched(f"HTTP://127.0.0.1:{port}/cat.png", limits)
    assert picture.width == 5


def test_pillows_own_bomb_check_is_a_400_too() -> None:
    """With a pixel cap above Pillow's own limits, Pillow's DecompressionBombError (past
    twice its limit) and its warning (past the limit, when warnings are errors) are 400s."""
    limits = ImageLimits(max_pixels=178_956_970)
    assert "decompression bomb" in refusal(
        ImageData.of_bytes(png_header(20_000, 10_000)), 0, limits
    )
    with warnings.catch_warnings():
        warnings.simplefilter("error", Image.DecompressionBombWarning)
        message = refusal(ImageData.of_bytes(png_header(10_000, 10_000)), 0, limits)
    assert "decompression bomb" in message
