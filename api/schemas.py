"""Pydantic models at the HTTP edge: one request and one response model per use."""

from __future__ import annotations

from typing import Annotated, Any, Literal

from pydantic import BaseModel, ConfigDict, Field

from api.validation import (
    JsonBool,
    JsonFloat,
    JsonInt,
    LabelSetName,
    PathPrefix,
    Pixels,
    SafeJson,
    SafeStr,
    ShortText,
    UtcDateTime,
    setting_bound,
)
from retrieval.filters import SearchFilters


class Filters(BaseModel):
    """Restrict results to images matching every given field; top-k stays exact."""

    model_config = ConfigDict(
        extra="forbid",
        json_schema_extra={"examples": [{"path_prefix": "/photos/2024/", "formats": ["JPEG"]}]},
    )

    path_prefix: PathPrefix | None = None
    formats: list[ShortText] = Field(
        default_factory=list, max_length=16, examples=[["JPEG", "PNG"]]
    )
    min_width: Pixels | None = None
    max_width: Pixels | None = None
    min_height: Pixels | None = None
    max_height: Pixels | None = None
    indexed_after: UtcDateTime | None = Field(
        default=None, description="Indexed at or after this time (no offset: UTC)."
    )
    indexed_before: UtcDateTime | None = Field(
        default=None, description="Indexed before this time (no offset: UTC)."
    )
    taken_after: UtcDateTime | None = Field(
        default=None,
        description="Taken at or after this time (no offset: UTC): EXIF DateTimeOriginal, else "
        "the file's modification time.",
    )
    taken_before: UtcDateTime | None = Field(
        default=None, description="Taken before this time (no offset: UTC)."
    )
    camera: ShortText | None = Field(
        default=None,
        description="The camera: its model, or its make and model, ignoring case.",
        examples=["iPhone 15 Pro", "Apple iPhone 15 Pro"],
    )
    labels: list[ShortText] = Field(
        default_factory=list,
        max_length=64,
        description="Zero-shot labels the image must carry (see labels_mode).",
        examples=[["invoice", "receipt"]],
    )
    labels_mode: Literal["any", "all"] = Field(
        default="any", description="any: at least one of `labels`; all: every one of them."
    )
    label_min_score: JsonFloat = Field(
        default=0.0, ge=0.0, le=1.0, description="Smallest probability a label counts with."
    )
    label_set: LabelSetName | None = Field(
        default=None, description="Match labels in this set only (default: all)."
    )

    def to_domain(self) -> SearchFilters:
        return SearchFilters(
            path_prefix=self.path_prefix or None,
            formats=tuple(f.strip().upper() for f in self.formats if f.strip()),
            min_width=self.min_width,
            max_width=self.max_width,
            min_height=self.min_height,
            max_height=self.max_height,
            indexed_after=self.indexed_after,
            indexed_before=self.indexed_before,
            taken_after=self.taken_after,
            taken_before=self.taken_before,
            camera=self.camera,
            **self._label_filter(),
        )

    def _label_filter(self) -> dict[str, Any]:
        names = tuple(name.strip() for name in self.labels if name.strip())
        if not names:
            return {}  # the other label fields only qualify `labels`
        return {
            "labels": names,
            "labels_mode": self.labels_mode,
            "label_min_score": self.label_min_score,
            "label_set": self.label_set or None,
        }


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

    query: SafeStr = Field(
        description="Free text; limited to CLIPSEARCH_MAX_QUERY_CHARS.",
        json_schema_extra={"minLength": 1, **setting_bound(maxLength="max_query_chars")},
    )
    k: JsonInt = Field(
        default=10,
        description="Number of results, 1..CLIPSEARCH_MAX_K.",
        json_schema_extra={"minimum": 1, **setting_bound(maximum="max_k")},
    )
    filters: Filters | None = None


class Took(BaseModel):
    encode: float = 0.0
    search: float = 0.0
    metadata: float = 0.0
    filter: float = 0.0
    total: float = 0.0


class HitLabel(BaseModel):
    set: str = Field(examples=["documents"])
    label: str = Field(examples=["invoice"])
    score: float = Field(examples=[0.91], description="Probability among the set's labels.")


# What an image's file says of the photo, in search hits and in image metadata alike.
TakenAt = Annotated[
    UtcDateTime | None,
    Field(
        description="When the photo was taken: EXIF DateTimeOriginal (converted with its "
        "OffsetTimeOriginal; without one, as written), else the file's modification time.",
    ),
]
TakenAtSource = Annotated[
    Literal["exif", "file"] | None,
    Field(
        description="Where taken_at comes from: exif, or file (the file's modification time). "
        "Null for an image indexed before capture dates were kept, until the next index run.",
    ),
]
CameraMake = Annotated[str | None, Field(examples=["Apple"])]
CameraModel = Annotated[str | None, Field(examples=["iPhone 15 Pro"])]
Latitude = Annotated[
    float | None, Field(examples=[48.8581944], description="GPS position, decimal degrees.")
]
Longitude = Annotated[float | None, Field(examples=[2.2945])]


class SearchHit(BaseModel):
    id: int = Field(examples=[42])
    path: str = Field(examples=["/photos/2024/beach.jpg"])
    score: float = Field(examples=[0.3127])
    width: int | None = Field(examples=[1024])
    height: int | None = Field(examples=[768])
    format: str | None = Field(examples=["JPEG"])
    indexed_at: UtcDateTime | None
    taken_at: TakenAt = None
    taken_at_source: TakenAtSource = None
    camera_make: CameraMake = None
    camera_model: CameraModel = None
    latitude: Latitude = None
    longitude: Longitude = None
    file_url: str = Field(examples=["/images/42/file"])
    thumbnail_url: str = Field(examples=["/images/42/thumbnail"])
    labels: list[HitLabel] = Field(
        default_factory=list, description="Zero-shot labels of every label set, best first."
    )


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
    indexed_at: UtcDateTime | None
    taken_at: TakenAt = None
    taken_at_source: TakenAtSource = None
    camera_make: CameraMake = None
    camera_model: CameraModel = None
    latitude: Latitude = None
    longitude: Longitude = None
    shard_id: str | None
    file_url: str
    thumbnail_url: str
    labels: list[HitLabel] = Field(default_factory=list)


class CorruptShardInfo(BaseModel):
    id: str
    reason: str = Field(description="What is wrong with its files, or with what it returned.")
    vector_count: int = Field(description="Its vectors, which no result includes.")


class IndexInfo(BaseModel):
    generation: int
    shard_count: int = Field(description="Shards being served (corrupt ones not counted).")
    vector_count: int
    live_vector_count: int
    index_kinds: dict[str, int] = Field(description="Shard count per index kind.")
    model: dict[str, object] | None
    images: dict[str, int]
    degraded: bool = Field(
        default=False,
        description="Some shards are corrupt and not served: results come from the others.",
    )
    corrupt_shards: list[CorruptShardInfo] = Field(default_factory=list)
    unserved_vector_count: int = Field(
        default=0, description="Vectors in corrupt shards, missing from every result."
    )
    repair: str | None = Field(
        default=None,
        description="The command that replaces the corrupt shards (null when there are none).",
        examples=["clipsearch repair"],
    )
    random_weights: bool = Field(
        default=False,
        description="The model has random weights (pretrained=none): results carry no meaning.",
    )
    warnings: list[str] = Field(
        default_factory=list,
        description="What a user must know about the results (the random weights warning).",
    )


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
    reason: str | None = Field(
        default=None,
        description="Why the service is not ready (null when it is), e.g. a catalog that was "
        "removed, replaced or reset under the running service.",
    )
    degraded: bool = Field(
        default=False,
        description="Ready, but some shards are corrupt and not served (see /index): results "
        "come from the healthy shards.",
    )
    corrupt_shards: list[str] = Field(default_factory=list, description="Their ids.")


class LabelEntry(BaseModel):
    """A label with settings of its own (a plain string is a label with none)."""

    model_config = ConfigDict(extra="forbid")

    name: SafeStr
    synonyms: list[SafeStr] | None = Field(default=None, description="Extra names, templated too.")
    prompts: list[SafeStr] | None = Field(
        default=None, description="Full sentences used instead of the templates."
    )
    threshold: JsonFloat | None = Field(default=None, description="Smallest probability stored.")
    min_cosine: JsonFloat | None = Field(default=None, description="Smallest raw cosine stored.")


class LabelSetDefinition(BaseModel):
    """A label set as PUT /label-sets/{name} takes it (the same keys as a label set file)."""

    model_config = ConfigDict(
        extra="forbid",
        json_schema_extra={
            "examples": [
                {
                    "labels": ["invoice", "receipt", {"name": "cat", "synonyms": ["kitten"]}],
                    "templates": "openai",
                    "top_k": 3,
                    "threshold": 0.2,
                }
            ]
        },
    )

    name: SafeStr | None = Field(default=None, description="Optional; must equal the path's name.")
    labels: list[SafeStr | LabelEntry] = Field(min_length=1)
    label_options: dict[SafeStr, dict[SafeStr, SafeJson]] | None = Field(
        default=None, description="Label name -> settings, as GET returns them."
    )
    templates: SafeStr | list[SafeStr] = Field(
        default="openai",
        description="openai, simple, photo, zh, zh-photo, zh-simple, or templates with {}.",
    )
    top_k: JsonInt = Field(default=3, description="Labels stored per image.")
    threshold: JsonFloat = Field(default=0.0, description="Smallest probability stored.")
    min_cosine: JsonFloat | None = Field(default=None, description="Smallest raw cosine stored.")
    store_cosine: JsonBool = Field(default=False, description="Also keep raw cosine scores.")


class LabelSetOut(BaseModel):
    name: str
    version: int = Field(description="The newest definition.")
    labelled_version: int | None = Field(
        description="The version whose corpus labels are served (null until first labelled)."
    )
    labels: list[str]
    label_options: dict[str, dict[str, Any]]
    templates: str | list[str]
    top_k: int
    threshold: float
    min_cosine: float | None
    store_cosine: bool
    created_at: UtcDateTime
    updated_at: UtcDateTime


class LabelSetList(BaseModel):
    label_sets: list[LabelSetOut]


class LabelCountsOut(BaseModel):
    set: str
    version: int | None = Field(description="The labelled version counted (null: none yet).")
    counts: dict[str, int] = Field(description="Live images whose best label this is.")
    unlabelled: int = Field(description="Live images with no label passing its threshold.")


class ClassifiedLabel(BaseModel):
    label: str
    score: float = Field(description="Probability among the labels.")


class ClassifyTook(BaseModel):
    encode: float = 0.0
    prompts: float = Field(default=0.0, description="Encoding the labels (0 when cached).")
    classify: float = 0.0
    total: float = 0.0


class ClassifyResponse(BaseModel):
    labels: list[ClassifiedLabel]
    took_ms: ClassifyTook


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
