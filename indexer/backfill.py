"""Fill in the photo columns of images indexed before the catalog kept them (migration 0007).

Only headers are read: EXIF is parsed, no pixel is decoded and no vector is computed, so a
library indexed by an older clipsearch gains capture dates and cameras in one cheap pass.
"""

from __future__ import annotations

from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor

from tqdm import tqdm

from retrieval.catalog.database import Catalog, chunks
from retrieval.catalog.records import ImageRecord, PhotoFields
from retrieval.errors import ImageError
from retrieval.images import read_image_header
from retrieval.photo_info import PhotoInfo, capture_time

# Rows written per transaction: a run stopped half way keeps what it read.
BATCH = 1000


def photo_fields(info: PhotoInfo, mtime_ns: int) -> PhotoFields:
    """The catalog's photo columns for a picture: its EXIF facts, else the file's mtime."""
    taken_at, source = capture_time(info, mtime_ns)
    return PhotoFields(
        taken_at=taken_at,
        taken_at_source=source,
        camera_make=info.camera_make,
        camera_model=info.camera_model,
        latitude=info.latitude,
        longitude=info.longitude,
    )


def _read(record: ImageRecord, max_pixels: int) -> PhotoFields:
    try:
        info = read_image_header(record.path, max_pixels=max_pixels).photo
    except ImageError:
        # The file decoded when it was indexed and has not changed since (the scan saw the
        # same size and mtime): a header that fails now is a race, and the vector stays good.
        info = PhotoInfo()
    return photo_fields(info, record.mtime_ns)


def backfill_photo_info(
    catalog: Catalog,
    roots: Sequence[str],
    *,
    max_pixels: int,
    threads: int = 4,
    progress_disabled: bool | None = None,
) -> int:
    """Read the headers of active images under `roots` whose photo columns are empty and store
    what they say; returns how many were filled in (0 on every run after the first)."""
    pending = catalog.missing_photo_info(roots)
    if not pending:
        return 0
    bar = tqdm(total=len(pending), desc="photo info", unit=" img", disable=progress_disabled)
    with bar, ThreadPoolExecutor(max_workers=max(1, threads)) as pool:
        for batch in chunks(pending, BATCH):
            fields = pool.map(lambda record: _read(record, max_pixels), batch)
            catalog.set_photo_info({r.id: f for r, f in zip(batch, fields, strict=True)})
            bar.update(len(batch))
    return len(pending)
