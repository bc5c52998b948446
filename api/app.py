"""The FastAPI application factory (`uvicorn --factory api.app:create_app`)."""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager

from fastapi import FastAPI
from fastapi.middleware.cors import CORSMiddleware
from starlette.concurrency import run_in_threadpool

from api.admission import AdmissionControl, Gate
from api.batching import MicroBatcher
from api.errors import install_error_handlers
from api.label_prompts import PromptEmbedder
from api.limits import BodyLimits
from api.metrics import Metrics, RequestMetrics
from api.query_cache import EmbeddingCache
from api.routes import images, labels, search, system
from api.routes.web import install_web
from api.security import KeyRing
from api.services import CATALOG_PROBLEMS, Services, unready_code
from api.text_queries import TextQueryEncoder
from api.validation import document_setting_bounds
from retrieval.catalog.database import Catalog
from retrieval.config import Settings, load_settings, warn_about_unknown_settings
from retrieval.models.encoder import Encoder, encoder_from_settings
from retrieval.models.recorded import choose_model
from retrieval.search import Searcher

log = logging.getLogger("clipsearch.api")

DESCRIPTION = """Search indexed images by text, by example image, or by similarity.

Send an API key as `Authorization: Bearer KEY` or `X-API-Key: KEY` when keys are configured.
Every error is JSON `{"code": "...", "message": "..."}` with a stable code.
"""


def _build_services(settings: Settings, encoder: Encoder, metrics: Metrics) -> Services:
    # Never created or migrated here: only `clipsearch index` and `clipsearch db upgrade` do.
    catalog = Catalog(settings.resolved_database_url)
    searcher = Searcher.from_settings(
        catalog, settings, encoder, max_decode_bytes=settings.api_max_decode_bytes
    )
    unready_reason, code = None, "not_ready"
    try:
        # Fail at start-up on a model mismatch, not on a query; corrupt shards are left out
        # (served degraded, see /ready and /index), never fatal.
        searcher.refresh()
    except CATALOG_PROBLEMS as exc:
        # Start unready and say why; the generation poller follows the catalog until it and
        # the index dir agree again (restored, rebuilt, created by the first `clipsearch
        # index`, or migrated by `clipsearch db upgrade`).
        unready_reason = str(exc)
        code = unready_code(exc)
    text_encoder = TextQueryEncoder(encoder, EmbeddingCache(settings.query_cache_size), None)
    services = Services(
        settings=settings,
        catalog=catalog,
        encoder=encoder,
        searcher=searcher,
        text_encoder=text_encoder,
        metrics=metrics,
        keys=KeyRing.build(settings.api_keys, settings.admin_keys),
        unready_reason=unready_reason,
        unready_code=code,
        prompts=PromptEmbedder(
            encoder,
            EmbeddingCache(settings.prompt_cache_size),
            None,
            settings.classify_max_prompts,
        ),
        decode_slots=Gate(
            "concurrent image decodes",
            limit=settings.max_concurrent_decodes,
            max_waiting=settings.max_concurrent_requests,
            wait_s=settings.queue_timeout_seconds,
            on_refuse=_counting_refusals(metrics, "decodes"),
        ),
    )
    _load_gauges(metrics, services)
    metrics.gauge(
        "clipsearch_index_generation",
        "Index generation being served.",
        lambda: searcher.snapshot().generation,
    )
    metrics.gauge(
        "clipsearch_index_vectors",
        "Live vectors being served.",
        lambda: searcher.snapshot().shards.live_count,
    )
    metrics.gauge(
        "clipsearch_index_shards",
        "Shards being served.",
        lambda: len(searcher.snapshot().shards.served_shards),
    )
    metrics.gauge(
        "clipsearch_index_corrupt_shards",
        "Shards of the generation that are corrupt and not served (repair: clipsearch repair).",
        lambda: len(searcher.snapshot().shards.corrupt_shards),
    )
    metrics.gauge(
        "clipsearch_index_unserved_vectors",
        "Vectors in corrupt shards, missing from every result.",
        lambda: searcher.snapshot().shards.unserved_count,
    )
    metrics.gauge(
        "clipsearch_query_cache_entries",
        "Text embeddings in the LRU cache.",
        lambda: len(text_encoder.cache),
    )
    return services


def _index_model_settings(settings: Settings) -> Settings:
    """The settings with the model recorded in the catalog in place of every model setting not
    given explicitly (CLIPSEARCH_MODEL, _PRETRAINED, _MODEL_CONFIG_DIR)."""
    catalog = Catalog(settings.resolved_database_url)
    try:
        return choose_model(settings, catalog.recorded_model()).settings
    finally:
        catalog.dispose()


def _warn_about_auth(keys: KeyRing) -> None:
    if keys.enabled:
        log.warning(
            "API keys required: %d read key(s), %d admin key(s)",
            len(keys.read_keys),
            len(keys.admin_keys),
        )
    else:
        log.warning(
            "!!! AUTHENTICATION IS OFF: no CLIPSEARCH_API_KEYS or CLIPSEARCH_ADMIN_KEYS set; "
            "anyone who can reach this port can search, fetch files and reload the index !!!"
        )


def _counting_refusals(metrics: Metrics, limit: str) -> Callable[[], None]:
    def count() -> None:
        metrics.inc(
            "clipsearch_overload_refusals_total",
            "Requests refused with 503 because a limit was full, by limit.",
            limit=limit,
        )

    return count


def _load_gauges(metrics: Metrics, services: Services) -> None:
    slots = services.decode_slots
    metrics.gauge("clipsearch_decodes_in_flight", "Images being decoded.", lambda: slots.holding)
    metrics.gauge(
        "clipsearch_decodes_waiting", "Uploads waiting for a decode slot.", lambda: slots.waiting
    )
    metrics.gauge(
        "clipsearch_prompt_cache_entries",
        "Label prompt embeddings in the LRU cache.",
        lambda: len(services.prompts.cache),
    )


def create_app(
    settings: Settings | None = None,
    *,
    encoder_factory: Callable[[Settings], Encoder] | None = None,
) -> FastAPI:
    """Build the app. With no arguments (uvicorn's factory call) settings come from the env."""
    warn_about_unknown_settings()
    settings = settings or load_settings()
    build_encoder = encoder_factory or encoder_from_settings
    metrics = Metrics()

    @asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        # The index's model, unless the settings name one explicitly.
        served = await run_in_threadpool(_index_model_settings, settings)
        encoder = await run_in_threadpool(build_encoder, served)
        services = await run_in_threadpool(_build_services, served, encoder, metrics)
        batcher: MicroBatcher | None = None
        if settings.microbatch:
            batcher = MicroBatcher(
                services.text_encoder.encode_batch,
                max_wait_s=settings.microbatch_wait_ms / 1000,
                max_batch=settings.microbatch_max_size,
                max_pending=settings.microbatch_max_pending,
                on_refuse=_counting_refusals(metrics, "encode_queue"),
            )
            services.text_encoder.batcher = batcher
            services.prompts.batcher = batcher
        _warn_about_auth(services.keys)
        services.ready = True
        app.state.services = services
        poller: asyncio.Task[None] | None = None
        if settings.reload_interval_seconds > 0:
            poller = asyncio.create_task(
                services.poll_generations(settings.reload_interval_seconds)
            )
        if services.unready_reason is not None:
            log.error("not ready, serving nothing: %s", services.unready_reason)
        else:
            log.warning(
                "serving generation %d (%s)",
                services.searcher.snapshot().generation,
                encoder.identity.describe(),
            )
        try:
            yield
        finally:
            # Graceful: stop polling, let batched queries finish, then release files and DB.
            services.ready = False
            if poller is not None:
                poller.cancel()
                with contextlib.suppress(asyncio.CancelledError):
                    await poller
            if batcher is not None:
                await batcher.close()
            services.searcher.close()
            services.catalog.dispose()

    app = FastAPI(
        title="clipsearch",
        version="0.1.0",
        description=DESCRIPTION,
        lifespan=lifespan,
    )
    install_error_handlers(app)
    document_setting_bounds(app, settings)
    app.include_router(system.router)
    app.include_router(search.router)
    app.include_router(images.router)
    app.include_router(labels.router)
    install_web(app)  # the search page at /, after the API routes
    requests = Gate(
        "concurrent requests",
        limit=settings.max_concurrent_requests,
        max_waiting=settings.max_queued_requests,
        wait_s=settings.queue_timeout_seconds,
        on_refuse=_counting_refusals(metrics, "requests"),
    )
    metrics.gauge(
        "clipsearch_requests_in_flight", "Requests being served.", lambda: requests.holding
    )
    metrics.gauge(
        "clipsearch_requests_waiting", "Requests waiting for their turn.", lambda: requests.waiting
    )
    # Innermost, so a refusal still passes CORS, the body limits and the request metrics.
    app.add_middleware(AdmissionControl, gate=requests)
    app.state.admission = requests
    if settings.cors_origins:
        app.add_middleware(
            CORSMiddleware,
            allow_origins=settings.cors_origins,
            allow_methods=["GET", "POST"],
            allow_headers=["Authorization", "X-API-Key", "Content-Type"],
        )
    app.add_middleware(
        BodyLimits, max_bytes=settings.max_upload_bytes, timeout_s=settings.body_timeout_seconds
    )
    app.add_middleware(RequestMetrics, metrics=metrics)
    return app
