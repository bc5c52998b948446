"""Input types and parsers that turn hostile input into a 4xx before it reaches SQL or a model.

Each guards one kind of value wherever the API takes it: integers within what the catalog's
columns hold, strings either database can store, datetimes with a UTC time, and JSON form
fields bounded in size and depth before they are parsed.
"""

from __future__ import annotations

import datetime as dt
import json
import re
from typing import Annotated, Any

from fastapi import FastAPI, Path
from pydantic import AfterValidator, Field, StringConstraints

from retrieval.config import Settings

# Marks a JSON schema keyword whose value is a setting (maximum: max_k), filled in when
# /openapi.json is built; the route checks the value itself (BadQuery, 400).
SETTING_BOUND = "x-clipsearch-setting-bound"
# Postgres INTEGER (image widths and heights) and BIGINT (image ids); SQLite INTEGER is 64-bit.
INT32_MAX = 2**31 - 1
INT64_MAX = 2**63 - 1
# A JSON form field (a filter object, a label list) is small and shallow; bounding both before
# parsing keeps json.loads from recursing 100,000 deep or reading megabytes.
MAX_JSON_FIELD_CHARS = 256 * 1024
MAX_JSON_DEPTH = 32


def storable_text(value: str) -> str:
    """The string itself; ValueError if it holds a NUL or an unpaired surrogate.

    Postgres refuses NUL in text, and neither database (nor the tokenizer) can encode a lone
    surrogate, which a JSON escape such as \\ud800 produces.
    """
    if "\x00" in value:
        raise ValueError("contains a NUL character")
    try:
        value.encode("utf-8")
    except UnicodeEncodeError:
        raise ValueError("contains an unpaired surrogate (not valid Unicode)") from None
    return value


def _utc(value: dt.datetime) -> dt.datetime:
    if value.tzinfo is None:
        return value.replace(tzinfo=dt.UTC)
    try:
        return value.astimezone(dt.UTC)
    except OverflowError:
        raise ValueError("its UTC time is outside years 1 to 9999") from None


def _storable_json(value: Any) -> Any:
    check_json_value(value)
    return value


SafeStr = Annotated[str, AfterValidator(storable_text)]
# The label set code (bad_label_set) judges a new name's spelling; this only bounds lookups.
LabelSetName = Annotated[str, StringConstraints(max_length=128), AfterValidator(storable_text)]
ShortText = Annotated[str, StringConstraints(max_length=200), AfterValidator(storable_text)]
PathPrefix = Annotated[str, StringConstraints(max_length=4096), AfterValidator(storable_text)]
# Any JSON value whose strings (and keys) are storable and whose nesting is bounded.
SafeJson = Annotated[Any, AfterValidator(_storable_json)]
# Numbers and booleans in JSON bodies as JSON has them: pydantic's lax mode would read `true`
# as 1 and "yes" as true, which the schema does not allow.
JsonInt = Annotated[int, Field(strict=True)]
JsonFloat = Annotated[float, Field(strict=True)]
JsonBool = Annotated[bool, Field(strict=True)]
Pixels = Annotated[int, Field(ge=0, le=INT32_MAX, strict=True)]
# In: a time without an offset is UTC. Out: SQLite gives times back without one; they are UTC.
UtcDateTime = Annotated[dt.datetime, AfterValidator(_utc)]
ImageId = Annotated[int, Path(ge=1, le=INT64_MAX, description="An image id, as results give it.")]
SetNamePath = Annotated[LabelSetName, Path(description="A label set's name.")]


def check_json_value(value: Any) -> None:
    """ValueError unless every string and key is storable and nesting is within the limit."""
    stack: list[tuple[Any, int]] = [(value, 1)]
    while stack:  # iterative: a deep value must not exhaust the call stack
        item, depth = stack.pop()
        if isinstance(item, str):
            storable_text(item)
        elif isinstance(item, dict | list):
            if depth > MAX_JSON_DEPTH:
                raise ValueError(f"nested deeper than {MAX_JSON_DEPTH} levels")
            if isinstance(item, dict):
                stack.extend((key, depth) for key in item)
                stack.extend((child, depth + 1) for child in item.values())
            else:
                stack.extend((child, depth + 1) for child in item)


# A string literal (its closing quote optional, so that no match can backtrack over the rest
# of the text: the scan stays linear), or one bracket. Enough to measure nesting.
_JSON_TOKEN = re.compile(r'"[^"\\]*(?:\\.[^"\\]*)*"?|[\[\]{}]', re.DOTALL)


def _nested_deeper_than(text: str, limit: int) -> bool:
    depth = 0
    for match in _JSON_TOKEN.finditer(text):
        token = match.group()
        if token in "[{":
            depth += 1
            if depth > limit:
                return True
        elif token in "]}":
            depth -= 1
    return False


def _refuse_constant(name: str) -> Any:
    raise ValueError(f"{name} is not a JSON number")


def load_json_field(raw: str) -> Any:
    """Parse a JSON form field or query parameter; ValueError when too long, too deep, not
    JSON (NaN and Infinity included), or holding a string no database can store."""
    if len(raw) > MAX_JSON_FIELD_CHARS:
        raise ValueError(f"longer than {MAX_JSON_FIELD_CHARS} characters")
    if _nested_deeper_than(raw, MAX_JSON_DEPTH):
        raise ValueError(f"nested deeper than {MAX_JSON_DEPTH} levels")
    value = json.loads(raw, parse_constant=_refuse_constant)
    check_json_value(value)
    return value


def setting_bound(**bounds: str) -> dict[str, Any]:
    """`json_schema_extra` for limits a setting decides, e.g. `setting_bound(maximum="max_k")`."""
    return {SETTING_BOUND: bounds}


def _fill_setting_bounds(node: Any, settings: Settings) -> None:
    if isinstance(node, dict):
        for keyword, name in node.pop(SETTING_BOUND, {}).items():
            node[keyword] = getattr(settings, name)
        for child in node.values():
            _fill_setting_bounds(child, settings)
    elif isinstance(node, list):
        for child in node:
            _fill_setting_bounds(child, settings)


def document_setting_bounds(app: FastAPI, settings: Settings) -> None:
    """Make `app`'s /openapi.json state the configured limits (k, query length)."""
    build = app.openapi

    def openapi() -> dict[str, Any]:
        if app.openapi_schema is None:
            document = build()
            _fill_setting_bounds(document, settings)
            app.openapi_schema = document
        return app.openapi_schema

    app.openapi = openapi  # type: ignore[method-assign]
