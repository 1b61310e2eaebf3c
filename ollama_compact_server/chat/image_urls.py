"""Remote image URLs: refused unless their host is one the operator named (OCS_IMAGE_URL_HOSTS);
then fetched with httpx under the byte cap, without redirects, proxies or decompression.

Allowing a host lets every client make the daemon send GET requests to it (on any port, and
to whatever that name resolves to), so name only hosts meant to be reached from here."""

from __future__ import annotations

import asyncio
import logging

import httpx

from .images import MEDIA_TYPES, REMOTE_REFUSED, ImageData, ImageError, ImageLimits

log = logging.getLogger(__name__)


def allowed_url(url: str, index: int, limits: ImageLimits) -> httpx.URL:
    """The URL, parsed once (the same object is fetched: no second parser to disagree),
    if its scheme is http(s) and its host is exactly one of the allowed names."""
    if not limits.url_hosts:
        raise ImageError(index, REMOTE_REFUSED)
    try:
        parsed = httpx.URL(url)
    except (httpx.InvalidURL, ValueError, TypeError):
        raise ImageError(index, "the image URL is not a valid URL") from None
    if parsed.scheme not in ("http", "https"):
        scheme = parsed.scheme[:20] or "no scheme"
        raise ImageError(index, f"image URLs must be http or https, not {scheme}")
    if parsed.userinfo:
        raise ImageError(index, "image URLs with a user name or password are not fetched")
    host = parsed.host.lower().rstrip(".")
    if host not in limits.url_hosts:
        raise ImageError(
            index,
            f'the host "{host[:100]}" is not one this server fetches images from; '
            "send the image inline, as base64 or a data: URI",
        )
    return parsed


class ImageFetcher:
    """Fetches remote images from the allowed hosts (``limits.url_hosts``)."""

    def __init__(self, limits: ImageLimits, transport: httpx.AsyncBaseTransport | None = None):
        self.limits = limits
        self.transport = transport  # tests may route requests elsewhere

    async def __call__(self, data: ImageData, index: int) -> ImageData:
        url = allowed_url(data.url or "", index, self.limits)
        try:
            async with asyncio.timeout(self.limits.fetch_timeout):
                return await self._get(url, index)
        except TimeoutError:
            raise ImageError(index, f"fetching {url.host} took too long") from None
        except httpx.HTTPError as exc:
            log.info("image %d: fetching %s failed: %r", index + 1, url.host, exc)
            raise ImageError(index, f"fetching the image from {url.host} failed") from None

    async def _get(self, url: httpx.URL, index: int) -> ImageData:
        limit = self.limits.max_bytes
        async with (
            httpx.AsyncClient(
                follow_redirects=False,
                trust_env=False,  # no proxy or netrc credentials from the environment
                timeout=self.limits.fetch_timeout,
                transport=self.transport,
            ) as client,
            client.stream("GET", url, headers={"Accept-Encoding": "identity"}) as response,
        ):
            if response.is_redirect:
                raise ImageError(
                    index,
                    f"{url.host} answered with a redirect ({response.status_code}); "
                    "redirects are not followed",
                )
            if response.status_code != 200:
                raise ImageError(index, f"{url.host} answered {response.status_code}")
            media_type = response.headers.get("content-type", "").split(";")[0].strip().lower()
            if media_type not in MEDIA_TYPES:
                shown = media_type[:60] or "no content type"
                raise ImageError(index, f"{url.host} sent {shown}, not an image")
            if response.headers.get("content-encoding", "identity").lower() != "identity":
                raise ImageError(index, f"{url.host} sent a compressed body")
            declared = response.headers.get("content-length", "")
            if declared.isdigit() and int(declared) > limit:
                raise ImageError(
                    index, f"{int(declared):,} bytes is more than the {limit:,} allowed"
                )
            body = bytearray()
            async for chunk in response.aiter_raw():
                body += chunk
                if len(body) > limit:
                    raise ImageError(
                        index, f"the image is more than the {limit:,} bytes allowed per image"
                    )
        return ImageData.of_bytes(bytes(body), media_type)
