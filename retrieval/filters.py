"""Search filters as an id set from SQL, so the shard search returns the exact top-k among them."""

from __future__ import annotations

import datetime as dt
from dataclasses import dataclass

import numpy as np
from sqlalchemy import ColumnElement, func, select

from retrieval.catalog import ACTIVE, Catalog, ImageRow, escape_like


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
    return conds


def allowed_ids(catalog: Catalog, filters: SearchFilters | None) -> np.ndarray | None:
    """The ids (sorted int64) that pass `filters`; None when there is nothing to filter."""
    if filters is None or filters.is_empty:
        return None
    query = select(ImageRow.id).where(*_conditions(filters)).order_by(ImageRow.id)
    with catalog.engine.connect() as conn:
        return np.fromiter(conn.execute(query).scalars(), dtype=np.int64)
