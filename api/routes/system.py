"""Liveness, readiness, metrics, index description, and the admin reload."""

from __future__ import annotations

from collections import Counter

from fastapi import APIRouter, Request
from fastapi.responses import JSONResponse, PlainTextResponse
from starlette.concurrency import run_in_threadpool

from api.deps import AdminAccess, CatalogDep, MetricsDep, ReadAccess, SearcherDep, ServicesDep
from api.schemas import (
    ERROR_RESPONSES,
    CorruptShardInfo,
    Health,
    IndexInfo,
    Readiness,
    ReloadResponse,
)
from api.services import Services
from retrieval.catalog.database import Catalog
from retrieval.models.identity import RANDOM_WEIGHTS_WARNING, recorded_random_weights
from retrieval.search import Searcher

router = APIRouter(tags=["system"])

# The command that replaces corrupt shards (the API names it; it cannot run it).
REPAIR_COMMAND = "clipsearch repair"


@router.get("/health", response_model=Health, summary="Liveness: the process answers")
async def health() -> Health:
    return Health(status="ok")


@router.get(
    "/ready",
    response_model=Readiness,
    summary="Readiness: model and index loaded",
    responses={503: {"model": Readiness}},
)
async def ready(request: Request) -> JSONResponse:
    services: Services | None = getattr(request.app.state, "services", None)
    is_ready = services is not None and services.serving
    snap = services.searcher.snapshot() if is_ready and services else None
    generation = snap.generation if snap else None
    # Degraded stays ready: the healthy shards answer, and every replica sharing the index
    # would otherwise drop out of its load balancer at once over one bad shard.
    corrupt = sorted(snap.shards.corrupt_shards) if snap else []
    reason = None
    if not is_ready:
        reason = services.unready_reason if services else None
        reason = reason or "The model or the index is still loading."
    body = Readiness(
        ready=is_ready,
        model_loaded=services is not None,
        index_loaded=is_ready,
        generation=generation,
        reason=reason,
        degraded=bool(corrupt),
        corrupt_shards=corrupt,
    )
    return JSONResponse(body.model_dump(), status_code=200 if is_ready else 503)


@router.get(
    "/metrics",
    response_class=PlainTextResponse,
    summary="Prometheus metrics (text format)",
    dependencies=[ReadAccess],
    responses=ERROR_RESPONSES,
)
async def metrics(metrics: MetricsDep) -> PlainTextResponse:
    return PlainTextResponse(
        metrics.render(), media_type="text/plain; version=0.0.4; charset=utf-8"
    )


def _index_info(searcher: Searcher, catalog: Catalog) -> IndexInfo:
    snap = searcher.snapshot()
    unserved = snap.shards.unserved
    served = snap.shards.served_shards
    kinds = Counter(shard.kind for shard in served)
    # The index's model, or before anything is indexed, the model that encodes the queries.
    random = recorded_random_weights(snap.model) or (
        searcher.encoder is not None and searcher.encoder.identity.random_weights
    )
    return IndexInfo(
        generation=snap.generation,
        shard_count=len(served),
        vector_count=sum(shard.count for shard in served),
        live_vector_count=snap.shards.live_count,
        index_kinds=dict(kinds),
        model=snap.model,
        images=catalog.counts(),
        degraded=bool(unserved),
        corrupt_shards=[
            CorruptShardInfo(id=shard.shard_id, reason=shard.reason, vector_count=shard.count)
            for shard in unserved
        ],
        unserved_vector_count=sum(shard.count for shard in unserved),
        repair=REPAIR_COMMAND if unserved else None,
        random_weights=random,
        warnings=[RANDOM_WEIGHTS_WARNING] if random else [],
    )


@router.get(
    "/index",
    response_model=IndexInfo,
    summary="The generation being served",
    dependencies=[ReadAccess],
    responses=ERROR_RESPONSES,
)
async def index_info(searcher: SearcherDep, catalog: CatalogDep) -> IndexInfo:
    return await run_in_threadpool(_index_info, searcher, catalog)


@router.post(
    "/admin/reload",
    response_model=ReloadResponse,
    summary="Swap in the newest index generation now",
    dependencies=[AdminAccess],
    responses=ERROR_RESPONSES,
)
async def reload(services: ServicesDep) -> ReloadResponse:
    swapped = await services.reload()
    return ReloadResponse(swapped=swapped, generation=services.searcher.snapshot().generation)
