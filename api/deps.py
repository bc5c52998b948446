"""Typed dependency aliases, read from app.state (filled in by the lifespan)."""

from __future__ import annotations

from typing import Annotated

from fastapi import Depends, Request

from api.admission import Gate
from api.errors import ApiError
from api.label_prompts import PromptEmbedder
from api.metrics import Metrics
from api.security import ADMIN, READ, api_key_scheme, bearer_scheme, require_scope
from api.services import Services
from api.text_queries import TextQueryEncoder
from retrieval.catalog.database import Catalog
from retrieval.config import Settings
from retrieval.labels.store import LabelStore
from retrieval.models.encoder import Encoder
from retrieval.search import Searcher


def get_services(request: Request) -> Services:
    services: Services | None = getattr(request.app.state, "services", None)
    if services is None or not services.ready:
        raise ApiError(503, "not_ready", "The model or the index is still loading.")
    if services.unready_reason is not None:
        raise ApiError(503, services.unready_code, services.unready_reason)
    return services


ServicesDep = Annotated[Services, Depends(get_services)]


def get_settings(services: ServicesDep) -> Settings:
    return services.settings


def get_encoder(services: ServicesDep) -> Encoder:
    return services.encoder


def get_searcher(services: ServicesDep) -> Searcher:
    return services.searcher


def get_catalog(services: ServicesDep) -> Catalog:
    return services.catalog


def get_label_store(services: ServicesDep) -> LabelStore:
    return services.searcher.label_store


def get_text_encoder(services: ServicesDep) -> TextQueryEncoder:
    return services.text_encoder


def get_metrics(services: ServicesDep) -> Metrics:
    return services.metrics


def get_prompts(services: ServicesDep) -> PromptEmbedder:
    return services.prompts


def get_decode_slots(services: ServicesDep) -> Gate:
    return services.decode_slots


SettingsDep = Annotated[Settings, Depends(get_settings)]
EncoderDep = Annotated[Encoder, Depends(get_encoder)]
SearcherDep = Annotated[Searcher, Depends(get_searcher)]
CatalogDep = Annotated[Catalog, Depends(get_catalog)]
LabelStoreDep = Annotated[LabelStore, Depends(get_label_store)]
TextEncoderDep = Annotated[TextQueryEncoder, Depends(get_text_encoder)]
MetricsDep = Annotated[Metrics, Depends(get_metrics)]
PromptsDep = Annotated[PromptEmbedder, Depends(get_prompts)]
DecodeSlotsDep = Annotated[Gate, Depends(get_decode_slots)]


def _security_schemes(
    _bearer: Annotated[object, Depends(bearer_scheme)],
    _key: Annotated[object, Depends(api_key_scheme)],
) -> None:
    """Only documents the two ways to send a key in OpenAPI."""


def require_read(
    request: Request, services: ServicesDep, _: Annotated[None, Depends(_security_schemes)]
) -> None:
    require_scope(services.keys, request, READ)


def require_admin(
    request: Request, services: ServicesDep, _: Annotated[None, Depends(_security_schemes)]
) -> None:
    require_scope(services.keys, request, ADMIN)


ReadAccess = Depends(require_read)
AdminAccess = Depends(require_admin)
