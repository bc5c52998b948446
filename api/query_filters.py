"""The filters of POST /search/text as query parameters of GET /search.

Both are derived from the one `Filters` model, so a filter added there is taken (and documented)
by GET /search too, and a parameter GET /search does not know is refused rather than dropped.
"""

from __future__ import annotations

import typing
from typing import Any

from fastapi.exceptions import RequestValidationError
from pydantic import ValidationError
from starlette.datastructures import QueryParams

from api.errors import ApiError
from api.schemas import Filters


def _is_list(name: str) -> bool:
    return typing.get_origin(Filters.model_fields[name].annotation) is list


def _query_schema(schema: dict[str, Any]) -> dict[str, Any]:
    """A property's JSON schema as a query parameter's: an absent parameter is the null."""
    options = [s for s in schema.get("anyOf", ()) if s.get("type") != "null"]
    if len(options) == 1:
        rest = {k: v for k, v in schema.items() if k not in ("anyOf", "default")}
        return {**rest, **options[0]}
    return {k: v for k, v in schema.items() if k != "default" or v is not None}


def filter_parameters() -> list[dict[str, Any]]:
    """OpenAPI parameters of the filters: a list field is its parameter repeated."""
    properties = Filters.model_json_schema()["properties"]
    out = []
    for name, schema in properties.items():
        parameter: dict[str, Any] = {
            "name": name,
            "in": "query",
            "required": False,
            "schema": _query_schema(schema),
            "description": schema.get("description", "As in POST /search/text's filters."),
        }
        if _is_list(name):
            parameter.update(style="form", explode=True)
        out.append(parameter)
    return out


def filters_from_query(params: QueryParams, own: frozenset[str]) -> Filters | None:
    """The filters given as query parameters; None when there are none.

    `own` names the route's other parameters. Any other name is a 422 that names it: a misspelt
    filter silently dropped would widen the search without a word.
    """
    unknown = sorted(set(params) - own - set(Filters.model_fields))
    if unknown:
        known = ", ".join([*sorted(own), *Filters.model_fields])
        names = ", ".join(repr(name) for name in unknown)
        raise ApiError(
            422, "validation_error", f"unknown query parameter {names}; this route takes {known}"
        )
    data: dict[str, Any] = {}
    errors: list[dict[str, Any]] = []
    for name in Filters.model_fields:
        values = params.getlist(name)
        if not values:
            continue
        if _is_list(name):
            data[name] = values
        elif len(values) > 1:
            errors.append(
                {"loc": ("query", name), "msg": "given more than once", "type": "value_error"}
            )
        else:
            data[name] = values[0]
    if not data and not errors:
        return None
    try:
        # Lax: query values are text ("50", "true"); the JSON body's fields are strict.
        parsed = Filters.model_validate(data, strict=False)
    except ValidationError as exc:
        errors += [{**e, "loc": ("query", *e["loc"])} for e in exc.errors()]
    if errors:
        raise RequestValidationError(errors)
    return parsed
