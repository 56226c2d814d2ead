"""Images in requests: from an API's content part to the bytes a vision model reads.

Each API's schema turns its image parts (OpenAI ``image_url``, Anthropic ``image`` blocks, Responses
``input_image``) into :class:`ImageRef`\\ s: a URL and the request field that named it. :func:`resolve_images`
then makes them :class:`~mlxcluster.protocol.ImageInput`\\ s: a ``data:`` URL is decoded, an ``http(s)`` URL is
fetched only when ``controller.image_fetch`` allows it (its host in ``controller.image_fetch_hosts``, at most
``image_fetch_max_bytes`` within ``image_fetch_timeout_s``). Every image is checked to be PNG, JPEG, GIF, WebP or
BMP by its first bytes; anything else is a 400 naming the field. A model no worker reports as a vision model
keeps the 400 a text-only server gives. A request too large for one NATS message with its images inline has
them parked in JetStream's object store while it runs (:func:`parked_images`, :mod:`mlxcluster.bus.image_store`).
"""

from __future__ import annotations

import base64
import binascii
import contextlib
import logging
from collections.abc import AsyncIterator
from dataclasses import dataclass
from urllib.parse import urlsplit

import aiohttp

from mlxcluster.bus.image_store import ImageStore
from mlxcluster.bus.jetstream import JetStreamUnavailable
from mlxcluster.config import ControllerSection
from mlxcluster.controller.http.errors import bad_request
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


async def fetch_image(url: str, param: str, settings: ControllerSection) -> ImageInput:
    """An ``http(s)`` image URL fetched as ``controller.image_fetch*`` allow (see the module's docstring)."""
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
    limit = settings.image_fetch_max_bytes
    timeout = aiohttp.ClientTimeout(total=settings.image_fetch_timeout_s)
    try:
        async with aiohttp.ClientSession(timeout=timeout) as session, session.get(url) as response:
            if response.status != 200:
                raise bad_request(f"'{param}': fetching the image answered HTTP {response.status}", param)
            data = await response.content.read(limit + 1)
    except (TimeoutError, aiohttp.ClientError) as exc:
        raise bad_request(f"'{param}': the image could not be fetched ({exc or type(exc).__name__})", param) from None
    if len(data) > limit:
        raise bad_request(f"'{param}': the image is larger than controller.image_fetch_max_bytes ({limit})", param)
    return checked(data, param)


async def resolve_images(
    registry: WorkerRegistry, settings: ControllerSection, model: str, refs: list[ImageRef]
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
            images.append(await fetch_image(ref.url, ref.param, settings))
        else:
            raise bad_request(f"'{ref.param}' must be a data: or http(s): URL", ref.param)
    return images


@contextlib.asynccontextmanager
async def parked_images(store: ImageStore | None, max_payload: int, request: InferenceRequest) -> AsyncIterator[None]:
    """While the request runs, its images in the object store when inline they would pass ``max_payload``
    (without JetStream they stay inline, and dispatch answers the 413 of a request too large for the bus)."""
    names: list[str] = []
    if store is not None and request.images and len(encode(request)) > max_payload - SUBJECT_HEADROOM:
        try:
            names = await store.park(request)
        except JetStreamUnavailable as exc:
            log.warning("request %s: its images cannot be parked (%s)", request.request_id, exc)
    try:
        yield
    finally:
        if names:
            try:
                await store.drop(names)  # type: ignore[union-attr]
            except Exception as exc:  # the bucket's TTL removes them later
                log.warning("request %s: parked images not deleted (%s)", request.request_id, exc)


__all__ = ["ImageRef", "parked_images", "check_vision", "decode_data_url", "resolve_images", "sniff"]
