"""Files in and out of the API: uploads read within a size limit, and indexed files served
only from paths that resolve inside a configured root."""

from __future__ import annotations

import io
import os
from collections.abc import Iterable

from fastapi import UploadFile
from PIL import Image

from api.errors import ApiError
from retrieval.catalog.records import ImageRecord
from retrieval.errors import ImageError, NotFound, PathNotAllowed
from retrieval.images import decode_image

UPLOAD_CHUNK = 1 << 16

MEDIA_TYPES = {
    "JPEG": "image/jpeg",
    "MPO": "image/jpeg",
    "PNG": "image/png",
    "WEBP": "image/webp",
    "GIF": "image/gif",
    "BMP": "image/bmp",
    "TIFF": "image/tiff",
    "HEIF": "image/heic",
    "AVIF": "image/avif",
}


def resolve_inside(record: ImageRecord, roots: Iterable[str]) -> str:
    """The real path of the record's file; PathNotAllowed unless it lies under a real root.

    Both sides are resolved with realpath, so `..` components and symlinks (the file's or a
    parent's) are judged by where they lead, not by how the path is spelled.
    """
    if not os.path.isabs(record.path) or "\x00" in record.path:
        raise PathNotAllowed(record.id, record.path)
    real = os.path.realpath(record.path)
    for root in roots:
        real_root = os.path.realpath(root)
        try:
            if os.path.commonpath([real, real_root]) == real_root:
                if not os.path.isfile(real):
                    raise NotFound(f"The file of image {record.id} is missing.")
                return real
        except ValueError:  # different drives, or mixed absolute and relative paths
            continue
    raise PathNotAllowed(record.id, record.path)


def make_thumbnail(path: str, *, side: int, max_pixels: int, max_bytes: int | None = None) -> bytes:
    """A JPEG no larger than side x side, from the product's safe decoder (within `max_bytes`)."""
    decoded = decode_image(path, max_pixels=max_pixels, min_side=side, max_bytes=max_bytes)
    image: Image.Image = decoded.image
    image.thumbnail((side, side), Image.Resampling.LANCZOS)
    out = io.BytesIO()
    try:
        image.save(out, "JPEG", quality=85)
    except OSError as exc:
        raise ImageError("decode_failed", str(exc), path) from exc
    return out.getvalue()


async def read_upload(upload: UploadFile, limit: int) -> bytes:
    """The whole upload; 413 as soon as it passes `limit` bytes (never read past it)."""
    chunks: list[bytes] = []
    total = 0
    while chunk := await upload.read(UPLOAD_CHUNK):
        total += len(chunk)
        if total > limit:
            raise ApiError(413, "payload_too_large", f"The upload exceeds {limit} bytes.")
        chunks.append(chunk)
    return b"".join(chunks)
