"""Pydantic models at the HTTP edge: one request and one response model per use."""

from __future__ import annotations

import datetime as dt

from pydantic import BaseModel, ConfigDict, Field

from retrieval.filters import SearchFilters


class Filters(BaseModel):
    """Restrict results to images matching every given field; top-k stays exact."""

    model_config = ConfigDict(
        extra="forbid",
        json_schema_extra={"examples": [{"path_prefix": "/photos/2024/", "formats": ["JPEG"]}]},
    )

    path_prefix: str | None = Field(default=None, max_length=4096)
    formats: list[str] = Field(default_factory=list, max_length=16, examples=[["JPEG", "PNG"]])
    min_width: int | None = Field(default=None, ge=0)
    max_width: int | None = Field(default=None, ge=0)
    min_height: int | None = Field(default=None, ge=0)
    max_height: int | None = Field(default=None, ge=0)
    indexed_after: dt.datetime | None = None
    indexed_before: dt.datetime | None = None

    def to_domain(self) -> SearchFilters:
        def utc(value: dt.datetime | None) -> dt.datetime | None:
            if value is None:
                return None
            if value.tzinfo is None:
                return value.replace(tzinfo=dt.UTC)
            return value.astimezone(dt.UTC)

        return SearchFilters(
            path_prefix=self.path_prefix or None,
            formats=tuple(f.strip().upper() for f in self.formats if f.strip()),
            min_width=self.min_width,
            max_width=self.max_width,
            min_height=self.min_height,
            max_height=self.max_height,
            indexed_after=utc(self.indexed_after),
            indexed_before=utc(self.indexed_before),
        )


class TextSearchRequest(BaseModel):
    model_config = ConfigDict(
        extra="forbid",
        json_schema_extra={
            "examples": [
                {"query": "a red circle", "k": 10},
                {"query": "a dog on a beach", "k": 5, "filters": {"formats": ["JPEG"]}},
            ]
        },
    )

    query: str = Field(description="Free text; limited to CLIPSEARCH_MAX_QUERY_CHARS.")
    k: int = Field(default=10, description="Number of results, 1..CLIPSEARCH_MAX_K.")
    filters: Filters | None = None


class Took(BaseModel):
    encode: float = 0.0
    search: float = 0.0
    metadata: float = 0.0
    filter: float = 0.0
    total: float = 0.0


class SearchHit(BaseModel):
    id: int = Field(examples=[42])
    path: str = Field(examples=["/photos/2024/beach.jpg"])
    score: float = Field(examples=[0.3127])
    width: int | None = Field(examples=[1024])
    height: int | None = Field(examples=[768])
    format: str | None = Field(examples=["JPEG"])
    indexed_at: dt.datetime | None
    file_url: str = Field(examples=["/images/42/file"])
    thumbnail_url: str = Field(examples=["/images/42/thumbnail"])


class SearchResponse(BaseModel):
    results: list[SearchHit]
    generation: int = Field(examples=[7])
    model: str = Field(examples=["ViT-B-32"])
    took_ms: Took
    cached_query: bool = Field(default=False, description="The text embedding came from cache.")


class ImageMetadata(BaseModel):
    id: int
    path: str
    status: str
    width: int | None
    height: int | None
    format: str | None
    size: int
    sha256: str | None
    indexed_at: dt.datetime | None
    shard_id: str | None
    file_url: str
    thumbnail_url: str


class IndexInfo(BaseModel):
    generation: int
    shard_count: int
    vector_count: int
    live_vector_count: int
    index_kinds: dict[str, int] = Field(description="Shard count per index kind.")
    model: dict[str, object] | None
    images: dict[str, int]


class ReloadResponse(BaseModel):
    swapped: bool
    generation: int


class Health(BaseModel):
    status: str = Field(examples=["ok"])


class Readiness(BaseModel):
    ready: bool
    model_loaded: bool
    index_loaded: bool
    generation: int | None


class ErrorBody(BaseModel):
    code: str = Field(examples=["bad_query"])
    message: str = Field(examples=["The query is empty."])


ERROR_RESPONSES: dict[int | str, dict[str, object]] = {
    status: {"model": ErrorBody, "description": description}
    for status, description in {
        400: "Bad query (empty text, k out of range, ...)",
        401: "Missing or invalid API key",
        403: "Key lacks the scope, or the file lies outside the roots",
        404: "Not found",
        413: "Body or image too large",
        422: "Invalid request or undecodable image",
        503: "Model or index not loaded",
    }.items()
}
