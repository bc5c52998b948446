"""Zero-shot labels: label sets (read, write, delete), corpus counts, and classifying an upload."""

from __future__ import annotations

import time
from typing import Annotated, Any

from fastapi import APIRouter, File, Form, Response, UploadFile
from starlette.concurrency import run_in_threadpool

from api.deps import (
    AdminAccess,
    DecodeSlotsDep,
    LabelStoreDep,
    PromptsDep,
    ReadAccess,
    SearcherDep,
    SettingsDep,
)
from api.files import read_upload
from api.label_prompts import PromptEmbedder
from api.schemas import (
    ERROR_RESPONSES,
    ClassifiedLabel,
    ClassifyResponse,
    ClassifyTook,
    LabelCountsOut,
    LabelSetDefinition,
    LabelSetList,
    LabelSetOut,
)
from api.validation import INT32_MAX, LabelSetName, SafeStr, SetNamePath, load_json_field
from retrieval.errors import BadQuery
from retrieval.labels.definitions import DEFAULT_TEMPLATES, LabelSet
from retrieval.labels.scoring import ClassEmbeddings, rank_labels
from retrieval.labels.store import LabelStore, StoredLabelSet

router = APIRouter(tags=["labels"], responses=ERROR_RESPONSES)

# An inline label list is encoded per request (then cached); keep it small. The cost bound is
# CLIPSEARCH_CLASSIFY_MAX_PROMPTS (labels x templates); these bound the parsing.
MAX_INLINE_LABELS = 200
MAX_FIELD_CHARS = 65_536  # the labels and templates form fields


def _out(stored: StoredLabelSet) -> LabelSetOut:
    return LabelSetOut.model_validate(stored.to_dict())


@router.get(
    "/label-sets",
    response_model=LabelSetList,
    summary="All label sets",
    dependencies=[ReadAccess],
)
async def list_label_sets(label_store: LabelStoreDep) -> LabelSetList:
    stored = await run_in_threadpool(label_store.all)
    return LabelSetList(label_sets=[_out(s) for s in stored])


@router.get(
    "/label-sets/{name}",
    response_model=LabelSetOut,
    summary="One label set",
    dependencies=[ReadAccess],
)
async def get_label_set(label_store: LabelStoreDep, name: SetNamePath) -> LabelSetOut:
    return _out(await run_in_threadpool(label_store.get, name))


@router.put(
    "/label-sets/{name}",
    response_model=LabelSetOut,
    summary="Create or change a label set (a change is a new version)",
    dependencies=[AdminAccess],
    responses={201: {"model": LabelSetOut, "description": "Created"}},
)
async def put_label_set(
    label_store: LabelStoreDep,
    settings: SettingsDep,
    name: SetNamePath,
    body: LabelSetDefinition,
    response: Response,
) -> LabelSetOut:
    """The corpus is labelled (or relabelled) under the new version by the next
    `clipsearch label` or `clipsearch index`; until then searches keep the served labels.
    A set may need at most CLIPSEARCH_LABEL_SET_MAX_PROMPTS prompts (too_many_prompts, 422)."""
    definition = LabelSet.from_dict(body.model_dump(exclude_none=True), name=name)
    definition.require_prompts_within(
        settings.label_set_max_prompts, "CLIPSEARCH_LABEL_SET_MAX_PROMPTS"
    )
    stored, outcome = await run_in_threadpool(label_store.put, definition)
    if outcome == "created":
        response.status_code = 201
    return _out(stored)


@router.delete(
    "/label-sets/{name}",
    status_code=204,
    summary="Delete a label set and every label stored under it",
    dependencies=[AdminAccess],
)
async def delete_label_set(label_store: LabelStoreDep, name: SetNamePath) -> Response:
    await run_in_threadpool(label_store.delete, name)
    return Response(status_code=204)


@router.get(
    "/labels/{set_name}/counts",
    response_model=LabelCountsOut,
    summary="How many live images have each label as their best one",
    dependencies=[ReadAccess],
)
async def label_counts(label_store: LabelStoreDep, set_name: SetNamePath) -> LabelCountsOut:
    counts = await run_in_threadpool(label_store.counts, set_name)
    return LabelCountsOut.model_validate(counts.to_dict())


def parse_label_list(raw: str) -> list[Any]:
    """A JSON list (names or label objects), or comma-separated names."""
    text = raw.strip()
    if text.startswith("["):
        try:
            parsed = load_json_field(text)
        except ValueError as exc:
            raise BadQuery(f"labels: not a valid JSON list ({exc}).") from None
        if not isinstance(parsed, list):
            raise BadQuery("labels: not a JSON list.")
        return parsed
    return [part.strip() for part in text.split(",") if part.strip()]


async def _classes(
    store: LabelStore,
    prompts: PromptEmbedder,
    label_set: str | None,
    labels: str | None,
    templates: str | None,
) -> tuple[list[str], ClassEmbeddings]:
    if label_set:
        stored = await run_in_threadpool(store.get, label_set)
        return stored.definition.names, await prompts.stored(store, stored)
    assert labels is not None
    names = parse_label_list(labels)
    if not names:
        raise BadQuery("labels: give at least one label.")
    if len(names) > MAX_INLINE_LABELS:
        raise BadQuery(
            f"labels: {len(names)} inline labels; the limit is {MAX_INLINE_LABELS} "
            "(store a label set for more)."
        )
    spec = {"labels": names, "templates": templates or DEFAULT_TEMPLATES}
    definition = LabelSet.from_dict(spec, name="inline", source="labels")
    return definition.names, await prompts.inline(definition)


@router.post(
    "/classify",
    response_model=ClassifyResponse,
    summary="Zero-shot labels for an uploaded image",
    dependencies=[ReadAccess],
)
async def classify(
    settings: SettingsDep,
    searcher: SearcherDep,
    prompts: PromptsDep,
    decode_slots: DecodeSlotsDep,
    file: Annotated[UploadFile, File(description="JPEG, PNG, WebP, GIF, BMP, TIFF, HEIC or AVIF.")],
    label_set: Annotated[
        LabelSetName | None, Form(description="A stored label set's name (or give `labels`).")
    ] = None,
    labels: Annotated[
        SafeStr | None,
        Form(description='Inline labels: "cat, dog" or a JSON list (or give `label_set`).'),
    ] = None,
    templates: Annotated[
        SafeStr | None,
        Form(description="Templates for inline labels: openai (default), simple, photo, 'a {}'."),
    ] = None,
    k: Annotated[
        int | None, Form(ge=1, le=INT32_MAX, description="Return only the best k labels.")
    ] = None,
) -> ClassifyResponse:
    """Every label, ranked by probability: the softmax of the model's scaled cosines (CLIP), or
    each label's own sigmoid (SigLIP models, whose probabilities need not sum to one).

    At most CLIPSEARCH_CLASSIFY_MAX_PROMPTS prompts (labels x templates, synonyms counted) are
    encoded for one request (too_many_prompts, 422); prompts are cached across requests."""
    if bool(label_set) == bool(labels and labels.strip()):
        raise BadQuery("Give either label_set (a stored set's name) or labels (an inline list).")
    for field, value in (("labels", labels), ("templates", templates)):
        if value is not None and len(value) > MAX_FIELD_CHARS:
            raise BadQuery(f"{field}: {len(value)} characters; the limit is {MAX_FIELD_CHARS}.")
    started = time.perf_counter()
    names, classes = await _classes(searcher.label_store, prompts, label_set, labels, templates)
    prompts_ms = (time.perf_counter() - started) * 1000
    async with decode_slots.slot():
        data = await read_upload(file, settings.max_upload_bytes)
        started = time.perf_counter()
        vector = await run_in_threadpool(searcher.embed_image, data)
        encode_ms = (time.perf_counter() - started) * 1000
    started = time.perf_counter()
    ranked = rank_labels(vector, classes)[:k]
    classify_ms = (time.perf_counter() - started) * 1000
    took = ClassifyTook(
        encode=round(encode_ms, 3),
        prompts=round(prompts_ms, 3),
        classify=round(classify_ms, 3),
        total=round(encode_ms + prompts_ms + classify_ms, 3),
    )
    return ClassifyResponse(
        labels=[ClassifiedLabel(label=names[i], score=round(p, 6)) for i, p, _ in ranked],
        took_ms=took,
    )
