"""Search by text, by uploaded image, and "more like this"."""

from __future__ import annotations

import time
from dataclasses import dataclass
from typing import Annotated

import numpy as np
from fastapi import APIRouter, File, Form, Query, Request, UploadFile
from pydantic import ValidationError
from starlette.concurrency import run_in_threadpool

from api.deps import (
    DecodeSlotsDep,
    MetricsDep,
    ReadAccess,
    SearcherDep,
    SettingsDep,
    TextEncoderDep,
)
from api.errors import ApiError
from api.files import read_upload
from api.metrics import Metrics
from api.query_filters import filter_parameters, filters_from_query
from api.schemas import (
    ERROR_RESPONSES,
    Filters,
    HitLabel,
    SearchHit,
    SearchResponse,
    TextSearchRequest,
    Took,
)
from api.text_queries import TextQueryEncoder
from api.validation import ImageId, SafeStr, load_json_field, setting_bound
from retrieval.search import Searcher, SearchResult

router = APIRouter(tags=["search"], dependencies=[ReadAccess], responses=ERROR_RESPONSES)

# Documented limits; the searcher checks them (BadQuery, 400) against the configured values.
K_BOUNDS = {"minimum": 1, **setting_bound(maximum="max_k")}
QUERY_BOUNDS = {"minLength": 1, **setting_bound(maxLength="max_query_chars")}
# GET /search's own parameters; the others are the filters of POST /search/text.
GET_SEARCH_PARAMETERS = frozenset({"q", "k"})


def to_response(request: Request, result: SearchResult, *, cached: bool = False) -> SearchResponse:
    hits = [
        SearchHit(
            id=h.id,
            path=h.path,
            score=round(h.score, 6),
            width=h.width,
            height=h.height,
            format=h.format,
            indexed_at=h.indexed_at,
            **h.photo.to_row(),
            file_url=str(request.url_for("image_file", image_id=h.id).path),
            thumbnail_url=str(request.url_for("image_thumbnail", image_id=h.id).path),
            labels=[HitLabel(**label.to_dict()) for label in h.labels],
        )
        for h in result.hits
    ]
    took = {key: round(value, 3) for key, value in result.took_ms.items()}
    return SearchResponse(
        results=hits,
        generation=result.generation,
        model=result.model,
        took_ms=Took(**took),
        cached_query=cached,
    )


def _record_timings(metrics: Metrics, kind: str, result: SearchResult) -> None:
    for part, name, help_text in (
        ("encode", "clipsearch_query_encode_seconds", "Query encoding time by query kind."),
        ("search", "clipsearch_search_seconds", "Vector search time by query kind."),
        ("metadata", "clipsearch_metadata_seconds", "Catalog lookup time for results."),
    ):
        if part in result.took_ms:
            metrics.observe(name, help_text, result.took_ms[part] / 1000, kind=kind)
    metrics.inc("clipsearch_queries_total", "Searches answered by kind.", kind=kind)


async def _allowed(searcher: Searcher, filters: Filters | None) -> tuple[np.ndarray | None, float]:
    if filters is None:
        return None, 0.0
    started = time.perf_counter()
    ids = await run_in_threadpool(searcher.allowed_ids, filters.to_domain())
    return ids, (time.perf_counter() - started) * 1000


def _add_filter_time(result: SearchResult, filter_ms: float) -> None:
    result.took_ms["filter"] = filter_ms
    result.took_ms["total"] = result.took_ms.get("total", 0.0) + filter_ms


@dataclass(frozen=True)
class TextQuery:
    text: str
    k: int
    filters: Filters | None = None


async def _text_search(
    request: Request,
    searcher: Searcher,
    text_encoder: TextQueryEncoder,
    metrics: Metrics,
    query: TextQuery,
) -> SearchResponse:
    text = searcher.clean_query(query.text)
    searcher.check_k(query.k)
    ids, filter_ms = await _allowed(searcher, query.filters)
    started = time.perf_counter()
    vector, cached = await text_encoder.embed(text)
    took = {"encode": (time.perf_counter() - started) * 1000, "filter": filter_ms}
    result = await run_in_threadpool(
        lambda: searcher.search_vector(vector, query.k, allowed_ids=ids, took=took)
    )
    _record_timings(metrics, "text", result)
    return to_response(request, result, cached=cached)


@router.post("/search/text", response_model=SearchResponse, summary="Search by text")
async def search_text(
    request: Request,
    body: TextSearchRequest,
    searcher: SearcherDep,
    text_encoder: TextEncoderDep,
    metrics: MetricsDep,
) -> SearchResponse:
    """Encode the query with the CLIP text tower and return the k nearest images."""
    query = TextQuery(body.query, body.k, body.filters)
    return await _text_search(request, searcher, text_encoder, metrics, query)


@router.get(
    "/search",
    response_model=SearchResponse,
    summary="Search by text (GET)",
    openapi_extra={"parameters": filter_parameters()},
)
async def search_get(
    request: Request,
    searcher: SearcherDep,
    text_encoder: TextEncoderDep,
    metrics: MetricsDep,
    q: Annotated[
        SafeStr,
        Query(description="Query text.", examples=["a red circle"], json_schema_extra=QUERY_BOUNDS),
    ],
    k: Annotated[int, Query(description="Number of results.", json_schema_extra=K_BOUNDS)] = 10,
) -> SearchResponse:
    """POST /search/text as a URL: every filter is a query parameter of the same name (a list
    filter repeated: `formats=JPEG&formats=PNG`); an unknown parameter is a 422."""
    filters = filters_from_query(request.query_params, own=GET_SEARCH_PARAMETERS)
    query = TextQuery(q, k, filters)
    return await _text_search(request, searcher, text_encoder, metrics, query)


def _parse_filters(raw: str | None) -> Filters | None:
    if raw is None or not raw.strip():
        return None
    try:
        return Filters.model_validate(load_json_field(raw))
    except (ValueError, ValidationError) as exc:
        raise ApiError(
            422, "validation_error", f"filters: not a valid filter object ({exc})"
        ) from None


@router.post("/search/image", response_model=SearchResponse, summary="Search by example image")
async def search_image(
    request: Request,
    settings: SettingsDep,
    searcher: SearcherDep,
    metrics: MetricsDep,
    decode_slots: DecodeSlotsDep,
    file: Annotated[UploadFile, File(description="JPEG, PNG, WebP, GIF, BMP, TIFF, HEIC or AVIF.")],
    k: Annotated[int, Form(description="Number of results.", json_schema_extra=K_BOUNDS)] = 10,
    filters: Annotated[
        str | None,
        Form(description='JSON filter object, e.g. {"formats": ["JPEG"]}.'),
    ] = None,
) -> SearchResponse:
    """Upload an image (multipart field `file`); the decoder refuses bombs and odd formats,
    and images whose decoding would take more than CLIPSEARCH_API_MAX_DECODE_BYTES (413)."""
    searcher.check_k(k)
    parsed = _parse_filters(filters)
    ids, filter_ms = await _allowed(searcher, parsed)
    async with decode_slots.slot():  # the upload is read into memory only with a slot
        data = await read_upload(file, settings.max_upload_bytes)
        result = await run_in_threadpool(lambda: searcher.search_image(data, k, allowed_ids=ids))
    _add_filter_time(result, filter_ms)
    _record_timings(metrics, "image", result)
    return to_response(request, result)


@router.get(
    "/images/{image_id}/similar",
    response_model=SearchResponse,
    summary="More like this (stored embedding, no re-encoding)",
)
async def similar(
    request: Request,
    searcher: SearcherDep,
    metrics: MetricsDep,
    image_id: ImageId,
    k: Annotated[int, Query(description="Number of results.", json_schema_extra=K_BOUNDS)] = 10,
    filters: Annotated[
        str | None,
        Query(
            description="JSON filter object, as in POST /search/text, e.g. "
            '{"path_prefix": "/photos/2024/"}; the top k stays exact among the allowed images.'
        ),
    ] = None,
) -> SearchResponse:
    searcher.check_k(k)
    parsed = _parse_filters(filters)
    ids, filter_ms = await _allowed(searcher, parsed)
    result = await run_in_threadpool(lambda: searcher.similar(image_id, k, allowed_ids=ids))
    _add_filter_time(result, filter_ms)
    _record_timings(metrics, "similar", result)
    return to_response(request, result)
