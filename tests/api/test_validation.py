"""The input guards of api/validation.py, the catch-all of api/errors.py, and times in
responses, one by one."""

from __future__ import annotations

import datetime as dt
import json
from pathlib import Path

import pytest
from fastapi import FastAPI
from fastapi.testclient import TestClient
from pydantic import TypeAdapter, ValidationError

from api.app import create_app
from api.errors import error_body, install_error_handlers
from api.schemas import Filters
from api.validation import (
    MAX_JSON_DEPTH,
    MAX_JSON_FIELD_CHARS,
    SafeJson,
    UtcDateTime,
    load_json_field,
    storable_text,
)
from retrieval.config import Settings


@pytest.mark.parametrize("text", ["a\x00b", "\x00", "caf\ud800", "\udfff x"])
def test_unstorable_strings_are_refused(text: str) -> None:
    with pytest.raises(ValueError):
        storable_text(text)


@pytest.mark.parametrize("text", ["", "café", "猫 🐈", "\u200b\ufeff", "a\nb\tc"])
def test_storable_strings_pass_unchanged(text: str) -> None:
    assert storable_text(text) == text


@pytest.mark.parametrize(
    ("raw", "why"),
    [
        ("[" * (MAX_JSON_DEPTH + 1), "nested deeper"),
        ("[" * 100_000, "nested deeper"),
        ('{"a":' * 3_000 + "1" + "}" * 3_000, "nested deeper"),
        (" " * (MAX_JSON_FIELD_CHARS + 1), "longer than"),
        ('{"path_prefix": "\\u0000"}', "NUL"),
        ('{"\\ud800": 1}', "surrogate"),
        ('{"min_width": NaN}', "not a JSON number"),
        ("[Infinity]", "not a JSON number"),
        ("{nope", "Expecting property name"),
    ],
)
def test_json_fields_are_bounded_before_parsing(raw: str, why: str) -> None:
    with pytest.raises(ValueError, match=why):
        load_json_field(raw)


def test_brackets_inside_strings_do_not_count_as_depth() -> None:
    deep_looking = json.dumps({"path_prefix": "[{" * 1_000, "formats": ['"]', "\\["]})
    assert load_json_field(deep_looking)["path_prefix"] == "[{" * 1_000
    nested = "[" * MAX_JSON_DEPTH + "]" * MAX_JSON_DEPTH
    assert load_json_field(nested) == json.loads(nested)


def test_escaped_quotes_in_an_unterminated_string_are_refused_as_invalid() -> None:
    # A run of escaped quotes with no closing one: the scan must stay linear and the parse fail.
    with pytest.raises(ValueError, match="Unterminated string"):
        load_json_field('"' + '\\"' * 100_000)


def test_deep_values_in_a_json_body_are_refused() -> None:
    adapter = TypeAdapter(SafeJson)
    deep: list[object] = []
    for _ in range(MAX_JSON_DEPTH + 5):
        deep = [deep]
    with pytest.raises(ValidationError, match="nested deeper"):
        adapter.validate_python(deep)
    assert adapter.validate_python({"a": [1, "b", {"c": None}]}) == {"a": [1, "b", {"c": None}]}


@pytest.mark.parametrize(
    ("text", "utc"),
    [
        ("2024-05-01T12:00:00", dt.datetime(2024, 5, 1, 12, tzinfo=dt.UTC)),
        ("2024-05-01T12:00:00+02:00", dt.datetime(2024, 5, 1, 10, tzinfo=dt.UTC)),
        ("0001-01-01T00:00:00Z", dt.datetime(1, 1, 1, tzinfo=dt.UTC)),
        ("9999-12-31T23:59:59Z", dt.datetime(9999, 12, 31, 23, 59, 59, tzinfo=dt.UTC)),
    ],
)
def test_datetimes_come_out_in_utc(text: str, utc: dt.datetime) -> None:
    value = TypeAdapter(UtcDateTime).validate_python(text)
    assert value == utc and value.utcoffset() == dt.timedelta(0)


@pytest.mark.parametrize("text", ["0001-01-01T00:00:00+05:00", "9999-12-31T23:59:59-05:00"])
def test_datetimes_past_the_utc_range_are_a_validation_error(text: str) -> None:
    with pytest.raises(ValidationError, match="outside years 1 to 9999"):
        Filters.model_validate({"indexed_after": text})


@pytest.mark.parametrize(
    "filters",
    [
        {"min_width": 2**31},
        {"max_height": 2**63},
        {"min_height": -1},
        {"min_height": False},  # JSON false is not 0
        {"max_width": "5"},
        {"labels": ["a"], "label_min_score": True},
        {"label_set": "x" * 129},
    ],
)
def test_filter_values_are_bounded_by_the_columns(filters: dict[str, object]) -> None:
    with pytest.raises(ValidationError):
        Filters.model_validate(filters)


def test_error_bodies_are_encodable_and_short() -> None:
    body = error_body("validation_error", "name \ud800: " + "x" * 10_000)
    assert json.dumps(body, ensure_ascii=False).encode("utf-8")
    assert len(body["message"]) < 2_100 and "\\ud800" in body["message"]


def test_an_unexpected_exception_is_a_json_500_that_does_not_escape() -> None:
    app = FastAPI()
    install_error_handlers(app)

    @app.get("/boom")
    async def boom() -> None:
        raise RuntimeError("a bug")

    # TestClient re-raises whatever escapes the app (what makes uvicorn drop the connection).
    response = TestClient(app).get("/boom")
    assert response.status_code == 500
    assert response.json() == {
        "code": "internal_error",
        "message": "Internal server error; see the server log.",
    }


def test_openapi_states_the_configured_limits(tmp_path: Path) -> None:
    settings = Settings(data_dir=tmp_path, max_k=77, max_query_chars=333)
    document = TestClient(create_app(settings)).get("/openapi.json").json()
    text_request = document["components"]["schemas"]["TextSearchRequest"]["properties"]
    assert text_request["k"]["minimum"] == 1 and text_request["k"]["maximum"] == 77
    assert text_request["query"]["maxLength"] == 333
    search = {p["name"]: p["schema"] for p in document["paths"]["/search"]["get"]["parameters"]}
    assert search["k"]["maximum"] == 77 and search["q"]["maxLength"] == 333
    image_id = document["paths"]["/images/{image_id}"]["get"]["parameters"][0]["schema"]
    assert (image_id["minimum"], image_id["maximum"]) == (1, 2**63 - 1)
    assert "x-clipsearch-setting-bound" not in json.dumps(document)


def _utc_offset(text: str) -> dt.timedelta | None:
    return dt.datetime.fromisoformat(text).utcoffset()


def test_times_in_responses_carry_their_utc_offset(client: TestClient) -> None:
    # SQLite gives stored times back without an offset; the OpenAPI date-time format needs one.
    hits = client.get("/search", params={"q": "a red circle", "k": 3}).json()["results"]
    assert hits and all(_utc_offset(hit["indexed_at"]) == dt.timedelta(0) for hit in hits)
    metadata = client.get(f"/images/{hits[0]['id']}").json()
    assert _utc_offset(metadata["indexed_at"]) == dt.timedelta(0)
    label_set = client.put("/label-sets/colours", json={"labels": ["red", "blue"]}).json()
    assert _utc_offset(label_set["created_at"]) == dt.timedelta(0)
    assert _utc_offset(label_set["updated_at"]) == dt.timedelta(0)
