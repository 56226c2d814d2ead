"""Images too large to ride inside their request: parked in a JetStream object store bucket by the controller,
fetched from it by the worker.

A request whose encoded size passes the bus's ``max_payload`` (its images are most of it) has each image put
in the bucket ``<prefix>_images`` under ``<request id>-<n>`` (nats-py sends it in chunks), the image in the
request keeping only that name (:attr:`~mlxcluster.protocol.ImageInput.object`). The worker reads them back
before the engine sees the request; the controller deletes them once the request ends, and the bucket's TTL
removes what a crashed controller left. Without JetStream on the server the request keeps its images inline
and is refused with the 413 any request too large for the bus gets.
"""

from __future__ import annotations

import asyncio
import logging

import nats.errors

from mlxcluster.bus.client import Bus
from mlxcluster.bus.jetstream import JetStreamUnavailable, ObjectBucket, open_jetstream
from mlxcluster.protocol import InferenceRequest

IMAGES_TTL_S = 600.0
"""How long a parked image lives at most (a request's ``request_timeout_s`` is the usual bound; this one catches
what a controller that died mid-request left)."""
OPEN_WAIT_S = 2.0

log = logging.getLogger(__name__)


class ImageMissing(Exception):
    """A parked image is not in the bucket (expired, or the bucket is gone)."""


class ImagesUnavailable(Exception):
    """The bucket cannot be read (no JetStream, or it does not answer)."""


def bucket_name(subject_prefix: str) -> str:
    """The bucket of parked images for ``nats.subject_prefix`` (bucket names allow no dots)."""
    return f"{subject_prefix.replace('.', '_')}_images"


class ImageStore:
    """The bucket of parked images over one bus, opened on first use."""

    def __init__(self, bus: Bus) -> None:
        self.bus = bus
        self._bucket: ObjectBucket | None = None
        self._lock = asyncio.Lock()

    async def bucket(self) -> ObjectBucket:
        """The bucket, created if missing; raises :class:`~mlxcluster.bus.jetstream.JetStreamUnavailable`."""
        async with self._lock:
            if self._bucket is None:
                jetstream = await open_jetstream(self.bus, wait_s=OPEN_WAIT_S)
                self._bucket = await jetstream.objects(
                    bucket_name(self.bus.subjects.prefix),
                    description="mlxcluster images of requests in flight",
                    ttl_s=IMAGES_TTL_S,
                )
            return self._bucket

    async def park(self, request: InferenceRequest, names: list[str]) -> None:
        """Put ``request``'s images in the bucket, leaving their names in the request and adding each to ``names``
        once it is stored (the caller's list: after a failure mid-way it holds what to :meth:`drop`)."""
        bucket = await self.bucket()
        for index, image in enumerate(request.images or []):
            name = f"{request.request_id}-{index}"
            await bucket.put(name, image.data)
            image.object, image.data = name, b""
            names.append(name)

    async def drop(self, names: list[str]) -> None:
        """Delete parked images (a request that ended); a name that cannot be deleted is logged and left to the
        bucket's TTL, the others are still deleted."""
        try:
            bucket = await self.bucket()
        except JetStreamUnavailable as exc:
            log.warning("parked images %s not deleted (%s)", names, exc)
            return
        for name in names:
            try:
                await bucket.delete(name)
            except Exception as exc:  # the bucket's TTL removes it later
                log.warning("parked image %s not deleted (%s)", name, exc or type(exc).__name__)

    async def fetch(self, request: InferenceRequest) -> None:
        """Read ``request``'s parked images back into it; :class:`ImageMissing` when one is gone,
        :class:`ImagesUnavailable` when the bucket cannot be read."""
        parked = [image for image in request.images or [] if image.object]
        if not parked:
            return
        try:
            bucket = await self.bucket()
            found = [await bucket.get(image.object or "") for image in parked]
        except (JetStreamUnavailable, nats.errors.Error, TimeoutError) as exc:
            raise ImagesUnavailable(f"the request's images cannot be read: {exc or type(exc).__name__}") from None
        for image, data in zip(parked, found, strict=True):
            if data is None:
                raise ImageMissing(f"image {image.object!r} of the request is no longer in the bucket")
            image.data, image.object = data, None
