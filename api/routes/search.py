"""Search by text, by uploaded image, and "more like this"."""

from __future__ import annotations

import json
import time
from typing import Annotated

import numpy as np
from fastapi import APIRouter, File, Form, Query, Request, UploadFile
from pydantic import ValidationError
from starlette.concurrency import run_in_threadpool

from api.deps import ReadAccess, ServicesDep
from api.errors import ApiError
from api.schemas import (
    ERROR_RESPONSES,
    Filters,
    HitLabel,
    SearchHit,
    SearchResponse,
    TextSearchRequest,
    Took,
)
from api.services import Services
from retrieval.filters import allowed_ids
from retrieval.search import SearchResult

router = APIRouter(tags=["search"], dependencies=[ReadAccess], responses=ERROR_RESPONSES)

UPLOAD_CHUNK = 1 << 16


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


def _record_timings(services: Services, kind: str, result: SearchResult) -> None:
    metrics = services.metrics
    for part, name, help_text in (
        ("encode", "clipsearch_query_encode_seconds", "Query encoding time by query kind."),
        ("search", "clipsearch_search_seconds", "Vector search time by query kind."),
        ("metadata", "clipsearch_metadata_seconds", "Catalog lookup time for results."),
    ):
        if part in result.took_ms:
            metrics.observe(name, help_text, result.took_ms[part] / 1000, kind=kind)
    metrics.inc("clipsearch_queries_total", "Searches answered by kind.", kind=kind)


async def _allowed(services: Services, filters: Filters | None) -> tuple[np.ndarray | None, float]:
    if filters is None:
        return None, 0.0
    started = time.perf_counter()
    ids = await run_in_threadpool(
        allowed_ids, services.catalog, filters.to_domain(), services.searcher.labels
    )
    return ids, (time.perf_counter() - started) * 1000


async def _text_search(
    request: Request, services: Services, query: str, k: int, filters: Filters | None
) -> SearchResponse:
    searcher = services.searcher
    text = searcher.clean_query(query)
    searcher.check_k(k)
    ids, filter_ms = await _allowed(services, filters)
    started = time.perf_counter()
    vector, cached = await services.text_encoder.embed(text)
    took = {"encode": (time.perf_counter() - started) * 1000, "filter": filter_ms}
    result = await run_in_threadpool(
        lambda: searcher.search_vector(vector, k, allowed_ids=ids, took=took)
    )
    _record_timings(services, "text", result)
    return to_response(request, result, cached=cached)


@router.post("/search/text", response_model=SearchResponse, summary="Search by text")
async def search_text(
    request: Request, body: TextSearchRequest, services: ServicesDep
) -> SearchResponse:
    """Encode the query with the CLIP text tower and return the k nearest images."""
    return await _text_search(request, services, body.query, body.k, body.filters)


@router.get("/search", response_model=SearchResponse, summary="Search by text (GET)")
async def search_get(
    request: Request,
    services: ServicesDep,
    q: Annotated[str, Query(description="Query text.", examples=["a red circle"])],
    k: Annotated[int, Query(description="Number of results.")] = 10,
) -> SearchResponse:
    return await _text_search(request, services, q, k, None)


async def read_upload(upload: UploadFile, limit: int) -> bytes:
    chunks: list[bytes] = []
    total = 0
    while chunk := await upload.read(UPLOAD_CHUNK):
        total += len(chunk)
        if total > limit:
            raise ApiError(413, "payload_too_large", f"The upload exceeds {limit} bytes.")
        chunks.append(chunk)
    return b"".join(chunks)


def _parse_filters(raw: str | None) -> Filters | None:
    if raw is None or not raw.strip():
        return None
    try:
        return Filters.model_validate(json.loads(raw))
    except (ValueError, ValidationError) as exc:
        raise ApiError(
            422, "validation_error", f"filters: not a valid filter object ({exc})"
        ) from None


@router.post("/search/image", response_model=SearchResponse, summary="Search by example image")
async def search_image(
    request: Request,
    services: ServicesDep,
    file: Annotated[UploadFile, File(description="JPEG, PNG, WebP, GIF, BMP or TIFF.")],
    k: Annotated[int, Form()] = 10,
    filters: Annotated[
        str | None,
        Form(description='JSON filter object, e.g. {"formats": ["JPEG"]}.'),
    ] = None,
) -> SearchResponse:
    """Upload an image (multipart field `file`); the decoder refuses bombs and odd formats."""
    settings = services.settings
    searcher = services.searcher
    searcher.check_k(k)
    parsed = _parse_filters(filters)
    data = await read_upload(file, settings.max_upload_bytes)
    ids, filter_ms = await _allowed(services, parsed)
    result = await run_in_threadpool(
        lambda: searcher.search_image(
            data, k, max_pixels=settings.max_image_pixels, allowed_ids=ids
        )
    )
    result.took_ms["filter"] = filter_ms
    result.took_ms["total"] = result.took_ms.get("total", 0.0) + filter_ms
    _record_timings(services, "image", result)
    return to_response(request, result)


@router.get(
    "/images/{image_id}/similar",
    response_model=SearchResponse,
    summary="More like this (stored embedding, no re-encoding)",
)
async def similar(
    request: Request,
    services: ServicesDep,
    image_id: int,
    k: Annotated[int, Query(description="Number of results.")] = 10,
    filters: Annotated[
        str | None,
        Query(
            description="JSON filter object, as in POST /search/text, e.g. "
            '{"path_prefix": "/photos/2024/"}; the top k stays exact among the allowed images.'
        ),
    ] = None,
) -> SearchResponse:
    searcher = services.searcher
    searcher.check_k(k)
    parsed = _parse_filters(filters)
    ids, filter_ms = await _allowed(services, parsed)
    result = await run_in_threadpool(lambda: searcher.similar(image_id, k, allowed_ids=ids))
    result.took_ms["filter"] = filter_ms
    result.took_ms["total"] = result.took_ms.get("total", 0.0) + filter_ms
    _record_timings(services, "similar", result)
    return to_response(request, result)
