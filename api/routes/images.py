"""Image metadata, the original file, and a bounded thumbnail; files only from inside roots."""

from __future__ import annotations

from typing import Annotated

from fastapi import APIRouter, Query, Request
from fastapi.responses import FileResponse, Response
from starlette.concurrency import run_in_threadpool

from api.deps import CatalogDep, LabelStoreDep, ReadAccess, ServicesDep
from api.files import MEDIA_TYPES, make_thumbnail, resolve_inside
from api.schemas import ERROR_RESPONSES, HitLabel, ImageMetadata
from api.services import Services
from api.validation import INT32_MAX, ImageId
from retrieval.catalog.database import Catalog
from retrieval.catalog.records import ImageRecord
from retrieval.catalog.tables import ACTIVE
from retrieval.errors import NotFound

router = APIRouter(tags=["images"], dependencies=[ReadAccess], responses=ERROR_RESPONSES)

CACHE_SECONDS = 86_400


async def _active_record(catalog: Catalog, image_id: int) -> ImageRecord:
    record = await run_in_threadpool(catalog.record, image_id)
    if record.status != ACTIVE:
        raise NotFound(f"No indexed image with id {image_id}.")
    return record


async def _safe_path(services: Services, record: ImageRecord) -> str:
    roots = await run_in_threadpool(services.allowed_roots)
    return await run_in_threadpool(resolve_inside, record, roots)


def _etag(record: ImageRecord, extra: str = "") -> str:
    return f'"{record.id}-{record.size}-{record.mtime_ns}{extra}"'


@router.get("/images/{image_id}", response_model=ImageMetadata, summary="Image metadata")
async def image_metadata(
    request: Request, catalog: CatalogDep, label_store: LabelStoreDep, image_id: ImageId
) -> ImageMetadata:
    record = await _active_record(catalog, image_id)
    labels = await run_in_threadpool(label_store.labels_for, [record.id])
    return ImageMetadata(
        id=record.id,
        path=record.path,
        status=record.status,
        width=record.width,
        height=record.height,
        format=record.format,
        size=record.size,
        sha256=record.sha256,
        indexed_at=record.indexed_at,
        **record.photo.to_row(),
        shard_id=record.shard_id,
        file_url=str(request.url_for("image_file", image_id=record.id).path),
        thumbnail_url=str(request.url_for("image_thumbnail", image_id=record.id).path),
        labels=[HitLabel(**label.to_dict()) for label in labels.get(record.id, [])],
    )


@router.get(
    "/images/{image_id}/file",
    name="image_file",
    summary="The original file",
    response_class=FileResponse,
)
async def image_file(services: ServicesDep, image_id: ImageId) -> FileResponse:
    record = await _active_record(services.catalog, image_id)
    path = await _safe_path(services, record)
    return FileResponse(
        path,
        media_type=MEDIA_TYPES.get(record.format or "", "application/octet-stream"),
        headers={"Cache-Control": "private, max-age=3600", "X-Content-Type-Options": "nosniff"},
    )


@router.get(
    "/images/{image_id}/thumbnail",
    name="image_thumbnail",
    summary="A JPEG thumbnail (bounded size, cacheable)",
    responses={200: {"content": {"image/jpeg": {}}}},
)
async def image_thumbnail(
    request: Request,
    services: ServicesDep,
    image_id: ImageId,
    size: Annotated[
        int, Query(ge=16, le=INT32_MAX, description="Longest side in pixels (capped).")
    ] = 256,
) -> Response:
    record = await _active_record(services.catalog, image_id)
    path = await _safe_path(services, record)
    side = min(size, services.settings.thumbnail_max_side)
    etag = _etag(record, f"-{side}")
    headers = {
        "Cache-Control": f"private, max-age={CACHE_SECONDS}",
        "ETag": etag,
        "X-Content-Type-Options": "nosniff",
    }
    if request.headers.get("if-none-match") == etag:
        return Response(status_code=304, headers=headers)
    async with services.decode_slots.slot():
        data = await run_in_threadpool(
            make_thumbnail,
            path,
            side=side,
            max_pixels=services.settings.max_image_pixels,
            max_bytes=services.settings.api_max_decode_bytes,
        )
    return Response(data, media_type="image/jpeg", headers=headers)
