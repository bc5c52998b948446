"""Search filters as an id set from SQL, so the shard search returns the exact top-k among them."""

from __future__ import annotations

import datetime as dt
from dataclasses import dataclass, replace

import numpy as np
from sqlalchemy import ColumnElement, func, or_, select

from retrieval.catalog.database import Catalog, escape_like
from retrieval.catalog.tables import ACTIVE, ImageRow
from retrieval.labels.store import LabelStore


@dataclass(frozen=True)
class SearchFilters:
    """Every field is optional; the set of ids kept is the intersection of those given."""

    path_prefix: str | None = None
    formats: tuple[str, ...] = ()
    min_width: int | None = None
    max_width: int | None = None
    min_height: int | None = None
    max_height: int | None = None
    indexed_after: dt.datetime | None = None
    indexed_before: dt.datetime | None = None
    # When the photo was taken (EXIF DateTimeOriginal, else the file's mtime); images indexed
    # before the catalog kept it pass neither bound until the next index run reads it.
    taken_after: dt.datetime | None = None
    taken_before: dt.datetime | None = None
    # The camera's model, or its make and model separated by a space, ignoring case.
    camera: str | None = None
    # Zero-shot labels: the image carries any (or all) of these names, each with at least
    # `label_min_score` probability, in `label_set` (None: in any set).
    labels: tuple[str, ...] = ()
    labels_mode: str = "any"
    label_min_score: float = 0.0
    label_set: str | None = None

    def __post_init__(self) -> None:
        # Spaced as the catalog keeps make and model (single spaces, retrieval.photo_info); a
        # camera of blanks alone filters nothing.
        if self.camera is not None:
            object.__setattr__(self, "camera", " ".join(self.camera.split()) or None)

    @property
    def is_empty(self) -> bool:
        return self == SearchFilters()


def _like_prefix(prefix: str) -> str:
    return escape_like(prefix) + "%"


def _conditions(filters: SearchFilters) -> list[ColumnElement[bool]]:
    conds: list[ColumnElement[bool]] = [ImageRow.status == ACTIVE, ImageRow.shard_id.is_not(None)]
    if filters.path_prefix:
        conds.append(ImageRow.path.like(_like_prefix(filters.path_prefix), escape="\\"))
    if filters.formats:
        conds.append(func.upper(ImageRow.format).in_([f.upper() for f in filters.formats]))
    if filters.min_width is not None:
        conds.append(ImageRow.width >= filters.min_width)
    if filters.max_width is not None:
        conds.append(ImageRow.width <= filters.max_width)
    if filters.min_height is not None:
        conds.append(ImageRow.height >= filters.min_height)
    if filters.max_height is not None:
        conds.append(ImageRow.height <= filters.max_height)
    if filters.indexed_after is not None:
        conds.append(ImageRow.indexed_at >= filters.indexed_after)
    if filters.indexed_before is not None:
        conds.append(ImageRow.indexed_at < filters.indexed_before)
    if filters.taken_after is not None:
        conds.append(ImageRow.taken_at >= filters.taken_after)
    if filters.taken_before is not None:
        conds.append(ImageRow.taken_at < filters.taken_before)
    if filters.camera is not None:
        conds.append(_camera_is(filters.camera))
    return conds


def _camera_is(camera: str) -> ColumnElement[bool]:
    # Both sides single-spaced (SearchFilters), and both through the database's own lower().
    wanted = func.lower(camera)
    make_and_model = ImageRow.camera_make + " " + ImageRow.camera_model
    return or_(func.lower(ImageRow.camera_model) == wanted, func.lower(make_and_model) == wanted)


def ids_passing(
    catalog: Catalog, filters: SearchFilters | None, labels: LabelStore | None = None
) -> np.ndarray | None:
    """The ids (sorted int64) that pass `filters`; None when there is nothing to filter.

    Pass the process's LabelStore to reuse its cached label set definitions.
    """
    if filters is None or filters.is_empty:
        return None
    carriers = None
    if filters.labels:
        store = labels or LabelStore(catalog)
        carriers = store.carriers(
            filters.labels, filters.labels_mode, filters.label_min_score, filters.label_set
        )
        others = replace(filters, labels=(), labels_mode="any", label_min_score=0.0, label_set=None)
        if others.is_empty:
            # Carriers are live unless deleted and not yet purged.
            return np.setdiff1d(carriers, catalog.tombstoned_ids(), assume_unique=True)
    query = select(ImageRow.id).where(*_conditions(filters)).order_by(ImageRow.id)
    with catalog.engine.connect() as conn:
        ids = np.fromiter(conn.execute(query).scalars(), dtype=np.int64)
    return ids if carriers is None else np.intersect1d(ids, carriers, assume_unique=True)
