"""Images in requests: from an API's content part to the bytes a vision model reads.

Each API's schema turns its image parts (OpenAI ``image_url``, Anthropic ``image`` blocks, Responses
``input_image``) into :class:`ImageRef`\\ s: a URL and the request field that named it. :func:`resolve_images`
then makes them :class:`~mlxcluster.protocol.ImageInput`\\ s: a ``data:`` URL is decoded, an ``http(s)`` URL is
fetched by the app's :class:`ImageFetcher` only when ``controller.image_fetch`` allows it (its host in
``controller.image_fetch_hosts``, at a public address unless ``image_fetch_private``
(:mod:`~mlxcluster.controller.http.image_addresses`), at most ``image_fetch_max_bytes`` within
``image_fetch_timeout_s``; a redirect is not followed, as it could lead to a host not in the list, and is a
400). Every image is checked to be PNG, JPEG, GIF, WebP or BMP by its first bytes; anything else is a 400 naming
the field. A model no worker reports as a vision model keeps the 400 a text-only server gives. A request too
large for one NATS message with its images inline has them parked in JetStream's object store while it runs
(:func:`parked_images`, :mod:`mlxcluster.bus.image_store`); a store that fails mid-way is a 503
``images_unavailable``, and what was parked is deleted.
"""

from __future__ import annotations

import base64
import binascii
import logging
from dataclasses import dataclass
from urllib.parse import urlsplit

import aiohttp
import nats.errors

from mlxcluster.bus.image_store import ImageStore
from mlxcluster.bus.jetstream import JetStreamUnavailable
from mlxcluster.config import ControllerSection
from mlxcluster.controller.http.errors import ApiError, bad_request
from mlxcluster.controller.http.image_addresses import NotPublicAddress, PublicAddressResolver, check_literal
from mlxcluster.controller.routing.dispatch import SUBJECT_HEADROOM
from mlxcluster.controller.routing.registry import WorkerRegistry
from mlxcluster.protocol import ImageInput, InferenceRequest, encode

log = logging.getLogger(__name__)

MAX_IMAGES = 16
"""The most images one request may carry."""

_SIGNATURES: tuple[tuple[bytes, int, str], ...] = (
    (b"\x89PNG\r\n\x1a\n", 0, "image/png"),
    (b"\xff\xd8\xff", 0, "image/jpeg"),
    (b"GIF87a", 0, "image/gif"),
    (b"GIF89a", 0, "image/gif"),
    (b"WEBP", 8, "image/webp"),
    (b"BM", 0, "image/bmp"),
)


@dataclass(frozen=True, slots=True)
class ImageRef:
    """An image as a request gives it: a ``data:`` or ``http(s)`` URL, and the field that holds it."""

    url: str
    param: str


def sniff(data: bytes) -> str | None:
    """The media type of ``data`` from its first bytes (PNG, JPEG, GIF, WebP, BMP), or ``None``."""
    for magic, offset, media_type in _SIGNATURES:
        if data[offset : offset + len(magic)] == magic and (media_type != "image/webp" or data[:4] == b"RIFF"):
            return media_type
    return None


def checked(data: bytes, param: str) -> ImageInput:
    """``data`` as an image input, or a 400 naming ``param`` when it is no image we read."""
    media_type = sniff(data)
    if media_type is None:
        raise bad_request(f"'{param}' is not a PNG, JPEG, GIF, WebP or BMP image", param, code="invalid_image")
    return ImageInput(media_type=media_type, data=data)


def decode_data_url(url: str, param: str) -> ImageInput:
    """A ``data:image/...;base64,...`` URL's image."""
    head, comma, payload = url.partition(",")
    if not comma or not head.startswith("data:") or not head.endswith(";base64"):
        raise bad_request(f"'{param}' must be a data URL of the form data:image/png;base64,...", param)
    try:
        data = base64.b64decode(payload, validate=True)
    except (binascii.Error, ValueError):
        raise bad_request(f"'{param}' holds invalid base64", param, code="invalid_image") from None
    return checked(data, param)


def check_vision(registry: WorkerRegistry, model: str, refs: list[ImageRef]) -> None:
    """A 400 when ``model`` is known and no worker reports it as a vision model (an unknown model is left for
    dispatch's 404)."""
    if not refs or not registry.has_model(model) or registry.is_vision(model):
        return
    raise bad_request(
        f"Unsupported content part: model '{model}' takes only text (it is not a vision model)",
        refs[0].param,
        code="unsupported_content",
    )


READ_CHUNK = 64 * 1024
STORE_RETRY_AFTER_S = 2.0
"""The ``Retry-After`` of the 503 when the object store fails while parking a request's images."""


class ImageFetcher:
    """Fetches ``http(s)`` image URLs as ``controller.image_fetch*`` allow, over one HTTP session for the app
    (opened on first use, closed by :meth:`close` when the app stops)."""

    def __init__(self, settings: ControllerSection) -> None:
        self.settings = settings
        self._session: aiohttp.ClientSession | None = None

    async def close(self) -> None:
        """Close the session (a later fetch opens a new one)."""
        session, self._session = self._session, None
        if session is not None:
            await session.close()

    def _check_allowed(self, url: str, param: str) -> None:
        settings = self.settings
        if not settings.image_fetch:
            raise bad_request(
                f"'{param}': image URLs are not fetched on this server (controller.image_fetch is off); "
                "send the image as a data URL",
                param,
                code="unsupported_value",
            )
        host = urlsplit(url).hostname or ""
        if "*" not in settings.image_fetch_hosts and host not in settings.image_fetch_hosts:
            raise bad_request(f"'{param}': host '{host}' is not in controller.image_fetch_hosts", param)
        if not settings.image_fetch_private:
            try:
                check_literal(host)
            except NotPublicAddress as exc:
                raise _not_public(exc, param) from None

    def _new_session(self) -> aiohttp.ClientSession:
        """The fetching session: its resolver refuses names with addresses that are not public, unless allowed."""
        if self.settings.image_fetch_private:
            return aiohttp.ClientSession()
        from aiohttp.resolver import DefaultResolver

        return aiohttp.ClientSession(connector=aiohttp.TCPConnector(resolver=PublicAddressResolver(DefaultResolver())))

    async def fetch(self, url: str, param: str) -> ImageInput:
        """The image at ``url`` (see the module's docstring); a 400 naming ``param`` when it cannot be had."""
        self._check_allowed(url, param)
        limit = self.settings.image_fetch_max_bytes
        if self._session is None:
            self._session = self._new_session()
        timeout = aiohttp.ClientTimeout(total=self.settings.image_fetch_timeout_s)
        too_large = bad_request(
            f"'{param}': the image is larger than controller.image_fetch_max_bytes ({limit})", param
        )
        try:
            async with self._session.get(url, timeout=timeout, allow_redirects=False) as response:
                if 300 <= response.status < 400:
                    raise bad_request(
                        f"'{param}': fetching the image answered a redirect (HTTP {response.status}), which is not "
                        "followed; give the image's final URL",
                        param,
                    )
                if response.status != 200:
                    raise bad_request(f"'{param}': fetching the image answered HTTP {response.status}", param)
                if (response.content_length or 0) > limit:
                    raise too_large
                data = bytearray()
                async for chunk in response.content.iter_chunked(READ_CHUNK):  # read() returns what is buffered
                    data += chunk
                    if len(data) > limit:
                        raise too_large
        except aiohttp.ClientConnectorDNSError as exc:
            if isinstance(exc.os_error, NotPublicAddress):
                raise _not_public(exc.os_error, param) from None
            raise bad_request(f"'{param}': the image could not be fetched ({exc})", param) from None
        except (TimeoutError, aiohttp.ClientError) as exc:
            reason = exc or type(exc).__name__
            raise bad_request(f"'{param}': the image could not be fetched ({reason})", param) from None
        return checked(bytes(data), param)


def _not_public(exc: NotPublicAddress, param: str) -> ApiError:
    return bad_request(
        f"'{param}': the image's host {exc} (controller.image_fetch_private is off): fetching it is refused",
        param,
    )


async def resolve_images(
    registry: WorkerRegistry, fetcher: ImageFetcher, model: str, refs: list[ImageRef]
) -> list[ImageInput] | None:
    """The images of a request, decoded or fetched and checked (``None`` when it has none)."""
    if not refs:
        return None
    if len(refs) > MAX_IMAGES:
        raise bad_request(f"At most {MAX_IMAGES} images are allowed in one request", refs[MAX_IMAGES].param)
    check_vision(registry, model, refs)
    images = []
    for ref in refs:
        scheme = urlsplit(ref.url).scheme.lower()
        if scheme == "data":
            images.append(decode_data_url(ref.url, ref.param))
        elif scheme in ("http", "https"):
            images.append(await fetcher.fetch(ref.url, ref.param))
        else:
            raise bad_request(f"'{ref.param}' must be a data: or http(s): URL", ref.param)
    return images


class parked_images:  # noqa: N801  (used as ``async with parked_images(...)``, like a function)
    """While the request runs, its images in the object store when inline they would pass ``max_payload``
    (without JetStream they stay inline, and dispatch answers the 413 of a request too large for the bus).
    A store that fails while parking (full, or not answering) is a 503 ``images_unavailable``, what was parked
    deleted. A request without images costs two calls that await nothing (the hot path)."""

    def __init__(self, store: ImageStore | None, max_payload: int, request: InferenceRequest) -> None:
        self.store, self.max_payload, self.request = store, max_payload, request
        self.names: list[str] = []

    async def __aenter__(self) -> None:
        store, request = self.store, self.request
        if store is None or not request.images or len(encode(request)) <= self.max_payload - SUBJECT_HEADROOM:
            return
        try:
            await store.park(request, self.names)
        except JetStreamUnavailable as exc:
            log.warning("request %s: its images cannot be parked (%s)", request.request_id, exc)
        except (nats.errors.Error, TimeoutError) as exc:
            log.warning("request %s: parking its images failed (%s)", request.request_id, exc or type(exc).__name__)
            await store.drop(self.names)
            raise ApiError(
                503,
                "The request's images could not be stored for the worker; try again",
                type="server_error",
                code="images_unavailable",
                retry_after=STORE_RETRY_AFTER_S,
            ) from None

    async def __aexit__(self, *_exc: object) -> None:
        if self.names:
            await self.store.drop(self.names)  # type: ignore[union-attr]


__all__ = ["ImageFetcher", "ImageRef", "parked_images", "check_vision", "decode_data_url", "resolve_images", "sniff"]
