"""The hostile-input matrix: a real `clipsearch serve` on each database, one kept-alive
connection, and every case answered below 500 (a JSON error for each refusal) without the
connection being dropped.

The cases cover every kind of input the API takes (path, query, form and JSON body) with what
an adversary sends: numbers past what the columns hold, datetimes that overflow in UTC, deeply
nested JSON, NUL bytes and lone surrogates, long strings, bad UTF-8, wrong content types.
"""

from __future__ import annotations

import http.client
import io
import json
import uuid
from dataclasses import dataclass, field
from urllib.parse import quote

import pytest
from PIL import Image

from tests.serving import ServeProcess

CLIENT_ERROR = tuple(range(400, 500))
INT64_MAX = 2**63 - 1
INT32_MAX = 2**31 - 1
LABEL_SET = "shapes"


def _jpeg() -> bytes:
    buf = io.BytesIO()
    Image.effect_noise((48, 40), 40).convert("RGB").save(buf, "JPEG", quality=90)
    return buf.getvalue()


JPEG = _jpeg()


@dataclass(frozen=True)
class Case:
    """One request and the statuses that are right for it (any 4xx unless said)."""

    name: str
    method: str
    path: str
    body: bytes = b""
    headers: dict[str, str] = field(default_factory=dict)
    expect: tuple[int, ...] = CLIENT_ERROR


def _json_case(
    name: str, method: str, path: str, raw: str | bytes, expect: tuple[int, ...] = CLIENT_ERROR
) -> Case:
    body = raw.encode() if isinstance(raw, str) else raw
    return Case(name, method, path, body, {"Content-Type": "application/json"}, expect)


def _text_search(name: str, filters: str, expect: tuple[int, ...] = CLIENT_ERROR) -> Case:
    """POST /search/text with `filters` spliced in as raw JSON text."""
    body = f'{{"query": "a circle", "filters": {filters}}}'
    return _json_case(name, "POST", "/search/text", body, expect)


def _multipart(fields: dict[str, str | bytes]) -> tuple[bytes, dict[str, str]]:
    """A multipart body with `fields` and a small JPEG as `file`."""
    boundary = uuid.uuid4().hex
    parts: list[bytes] = []
    for name, value in fields.items():
        data = value.encode() if isinstance(value, str) else value
        parts.append(
            f'--{boundary}\r\nContent-Disposition: form-data; name="{name}"\r\n\r\n'.encode()
            + data
            + b"\r\n"
        )
    parts.append(
        f'--{boundary}\r\nContent-Disposition: form-data; name="file"; filename="a.jpg"\r\n'
        "Content-Type: image/jpeg\r\n\r\n".encode()
        + JPEG
        + b"\r\n"
    )
    body = b"".join(parts) + f"--{boundary}--\r\n".encode()
    return body, {"Content-Type": f"multipart/form-data; boundary={boundary}"}


def _form_case(
    name: str, path: str, fields: dict[str, str | bytes], expect: tuple[int, ...] = CLIENT_ERROR
) -> Case:
    body, headers = _multipart(fields)
    return Case(name, "POST", path, body, headers, expect)


def _similar(name: str, filters: str, expect: tuple[int, ...] = CLIENT_ERROR) -> Case:
    return Case(name, "GET", f"/images/1/similar?filters={quote(filters)}", expect=expect)


def _deep(depth: int) -> str:
    return "[" * depth + "]" * depth


def _deep_object(depth: int) -> str:
    return '{"a":' * depth + "1" + "}" * depth


LABEL_BODY = '{"labels": ["circle", "square", "triangle"], "templates": "simple"}'


def cases() -> list[Case]:
    """Every row of the issue's table, and more of each kind."""
    big = [2**63, 2**64, 10**30]
    out: list[Case] = []
    # Image ids out of the 64-bit range, negative, or zero, on every route that takes one.
    for suffix in ("", "/file", "/thumbnail", "/similar"):
        for value in (*big, -1, -(2**63) - 1):
            out.append(Case(f"id {value} {suffix or '/'}", "GET", f"/images/{value}{suffix}"))
    out.append(Case("id 0", "GET", "/images/0"))
    out.append(Case("id not a number", "GET", "/images/1e3/file"))
    out.append(Case("id int64 max (absent)", "GET", f"/images/{INT64_MAX}", expect=(404,)))
    # Integer filters beyond what the columns hold (Postgres INTEGER is 32-bit).
    for key in ("min_width", "max_width", "min_height", "max_height"):
        out.append(_text_search(f"{key} 2^63", f'{{"{key}": {2**63}}}', (422,)))
        out.append(_text_search(f"{key} 2^31", f'{{"{key}": {2**31}}}', (422,)))
    out.append(_text_search("min_width int32 max", f'{{"min_width": {INT32_MAX}}}', (200,)))
    out.append(_text_search("max_width -2^63", f'{{"max_width": {-(2**63)}}}', (422,)))
    out.append(_text_search("min_width 5000 digits", '{"min_width": ' + "9" * 5000 + "}"))
    out.append(_similar("similar min_height 2^63", f'{{"min_height": {2**63}}}', (422,)))
    out.append(
        _form_case(
            "image max_width 2^31",
            "/search/image",
            {"filters": f'{{"max_width": {2**31}}}'},
            (422,),
        )
    )
    # Datetimes whose UTC time falls outside what a datetime holds; naive ones are UTC.
    for key, moment in (
        ("indexed_after", "0001-01-01T00:00:00+05:00"),
        ("indexed_before", "9999-12-31T23:59:59-05:00"),
        ("indexed_after", "9999-12-31T23:59:59-23:59"),
    ):
        out.append(_text_search(f"{key} {moment}", json.dumps({key: moment}), (422,)))
    out.append(
        _similar(
            "similar indexed_after year 1 +05",
            '{"indexed_after": "0001-01-01T00:00:00+05:00"}',
            (422,),
        )
    )
    out.append(
        _form_case(
            "image indexed_before 9999 -05",
            "/search/image",
            {"filters": '{"indexed_before": "9999-12-31T23:59:59-05:00"}'},
            expect=(422,),
        )
    )
    out.append(
        _text_search("indexed_after naive", '{"indexed_after": "2020-01-01T00:00:00"}', (200,))
    )
    out.append(
        _text_search(
            "indexed_after year 1 UTC", '{"indexed_after": "0001-01-01T00:00:00Z"}', (200,)
        )
    )
    out.append(
        _text_search(
            "indexed_before 9999 UTC", '{"indexed_before": "9999-12-31T23:59:59Z"}', (200,)
        )
    )
    out.append(_text_search("indexed_after 1e20", '{"indexed_after": 1e20}', (422,)))
    # JSON nested 3,000 to 100,000 deep in form fields, query parameters and bodies.
    for depth in (3_000, 100_000):
        out.append(
            _form_case(f"image filters [ x{depth}", "/search/image", {"filters": "[" * depth})
        )
        out.append(_form_case(f"classify labels [ x{depth}", "/classify", {"labels": "[" * depth}))
    out.append(
        _form_case(
            "image filters object x3000 closed", "/search/image", {"filters": _deep_object(3_000)}
        )
    )
    out.append(_form_case("classify labels closed x3000", "/classify", {"labels": _deep(3_000)}))
    out.append(
        _form_case(
            "classify labels object x50", "/classify", {"labels": "[" + _deep_object(50) + "]"}
        )
    )
    # In a URL, 3,000 brackets (9 KB percent-encoded): uvicorn itself refuses, with a plain-text
    # 400 and a closed connection, a request head over 16 KB that arrives in pieces.
    out.append(_similar("similar filters x3000", "{" * 3_000))
    out.append(_text_search("text filters x100000", _deep(100_000)))
    out.append(_json_case("label set body x100000", "PUT", "/label-sets/deep", "[" * 100_000))
    out.append(
        _json_case(
            "label set options x900",
            "PUT",
            "/label-sets/deep",
            '{"labels": ["a"], "label_options": {"a": ' + _deep_object(900) + "}}",
        )
    )
    # NUL bytes and unpaired surrogates in every string that reaches SQL or the tokenizer.
    out.append(_text_search("path_prefix NUL", '{"path_prefix": "/a\\u0000b"}', (422,)))
    out.append(_similar("similar path_prefix NUL", '{"path_prefix": "\\u0000"}', (422,)))
    out.append(_text_search("formats NUL", '{"formats": ["JP\\u0000EG"]}', (422,)))
    out.append(_text_search("labels NUL", '{"labels": ["a\\u0000"]}', (422,)))
    out.append(_text_search("label_set NUL", '{"labels": ["a"], "label_set": "\\u0000"}', (422,)))
    out.append(_text_search("path_prefix surrogate", '{"path_prefix": "/\\ud800"}', (422,)))
    out.append(_text_search("filters key surrogate", '{"\\udfff": 1}', (422,)))
    out.append(
        _json_case("query surrogate", "POST", "/search/text", '{"query": "a \\ud83d cat"}', (422,))
    )
    out.append(_json_case("query NUL", "POST", "/search/text", '{"query": "a\\u0000cat"}', (422,)))
    out.append(Case("GET search q NUL", "GET", "/search?q=a%00b", expect=(422,)))
    for method in ("GET", "DELETE"):
        out.append(Case(f"{method} label set NUL", method, "/label-sets/a%00b", expect=(422,)))
    out.append(_json_case("PUT label set name NUL", "PUT", "/label-sets/a%00b", LABEL_BODY, (422,)))
    out.append(Case("label counts NUL", "GET", "/labels/a%00b/counts", expect=(422,)))
    out.append(
        _json_case("PUT label NUL", "PUT", "/label-sets/nul", '{"labels": ["a\\u0000"]}', (422,))
    )
    out.append(
        _json_case(
            "PUT label surrogate", "PUT", "/label-sets/sur", '{"labels": ["\\ud800"]}', (422,)
        )
    )
    out.append(
        _json_case(
            "PUT label option surrogate",
            "PUT",
            "/label-sets/sur",
            '{"labels": ["a"], "label_options": {"a": {"synonyms": ["\\udc00"]}}}',
            expect=(422,),
        )
    )
    out.append(_form_case("classify label_set NUL", "/classify", {"label_set": "a\x00b"}, (422,)))
    out.append(_form_case("classify labels surrogate", "/classify", {"labels": '["\\ud800"]'}))
    out.append(
        _form_case(
            "classify templates NUL", "/classify", {"labels": "cat", "templates": "a\x00{}"}, (422,)
        )
    )
    out.append(
        _json_case("PUT label set name newline", "PUT", "/label-sets/docs%0A", LABEL_BODY, (422,))
    )
    # Very long strings.
    long_name = "a" * 300
    out.append(Case("GET label set 300 chars", "GET", f"/label-sets/{long_name}", expect=(422,)))
    out.append(
        _json_case("PUT label set 300 chars", "PUT", f"/label-sets/{long_name}", LABEL_BODY, (422,))
    )
    out.append(Case("label counts 300 chars", "GET", f"/labels/{long_name}/counts", expect=(422,)))
    out.append(
        _text_search("path_prefix 10000 chars", json.dumps({"path_prefix": "/" * 10_000}), (422,))
    )
    out.append(_text_search("label 10000 chars", json.dumps({"labels": ["x" * 10_000]}), (422,)))
    out.append(Case("GET search q 8000 chars", "GET", "/search?q=" + "x" * 8_000, expect=(400,)))
    # The limit (1000 by default) counts spaces too, as the schema's maxLength does.
    padded = json.dumps({"query": "\t " + "x" * 999})
    out.append(_json_case("query 1002 chars with spaces", "POST", "/search/text", padded, (400,)))
    out.append(
        _json_case(
            "PUT label 1000 chars", "PUT", "/label-sets/long", json.dumps({"labels": ["x" * 1000]})
        )
    )
    out.append(
        _form_case("classify label_set 300 chars", "/classify", {"label_set": long_name}, (422,))
    )
    out.append(_form_case("image filters 2 MB", "/search/image", {"filters": " " * 2_000_000}))
    # Invalid UTF-8.
    out.append(
        _json_case("text body invalid utf-8", "POST", "/search/text", b'{"query": "caf\xe9 \xff"}')
    )
    out.append(Case("GET search q invalid utf-8", "GET", "/search?q=%FF%FEcat", expect=(200,)))
    out.append(Case("label set name invalid utf-8", "GET", "/label-sets/%C3%28", expect=(404,)))
    # Starlette reads a form field that is not UTF-8 as Latin-1: answered, never a 500.
    out.append(
        _form_case(
            "image filters invalid utf-8",
            "/search/image",
            {"filters": b'{"path_prefix": "\xff"}'},
            expect=(200, *CLIENT_ERROR),
        )
    )
    out.append(
        _form_case(
            "classify labels invalid utf-8",
            "/classify",
            {"labels": b"caf\xe9, \xff\xfe"},
            expect=(200, *CLIENT_ERROR),
        )
    )
    # Wrong or broken content types.
    out.append(
        Case(
            "text body as text/plain",
            "POST",
            "/search/text",
            b'{"query": "a"}',
            {"Content-Type": "text/plain"},
        )
    )
    out.append(
        Case(
            "text body no content type",
            "POST",
            "/search/text",
            b'{"query": "a"}',
            expect=(*CLIENT_ERROR, 200),
        )
    )
    out.append(_json_case("image search as JSON", "POST", "/search/image", '{"k": 3}'))
    out.append(
        Case(
            "multipart without boundary",
            "POST",
            "/search/image",
            b"--x\r\n",
            {"Content-Type": "multipart/form-data"},
        )
    )
    out.append(
        Case(
            "multipart broken",
            "POST",
            "/classify",
            b"garbage",
            {"Content-Type": "multipart/form-data; boundary=zz"},
        )
    )
    out.append(
        Case(
            "classify urlencoded",
            "POST",
            "/classify",
            b"labels=a,b",
            {"Content-Type": "application/x-www-form-urlencoded"},
        )
    )
    out.append(
        Case(
            "label set as XML",
            "PUT",
            "/label-sets/xml",
            b"<labels/>",
            {"Content-Type": "application/xml"},
        )
    )
    out.append(_json_case("text body JSON null", "POST", "/search/text", "null"))
    out.append(_json_case("text body NaN k", "POST", "/search/text", '{"query": "a", "k": NaN}'))
    # Huge, negative and odd k and sizes.
    out.append(Case("GET search k 10^30", "GET", f"/search?q=a&k={10**30}"))
    out.append(Case("GET search k 1e3", "GET", "/search?q=a&k=1e3", expect=(422,)))
    out.append(_json_case("text k 2^63", "POST", "/search/text", f'{{"query": "a", "k": {2**63}}}'))
    out.append(_json_case("text k 1e999", "POST", "/search/text", '{"query": "a", "k": 1e999}'))
    out.append(Case("similar k -2^63", "GET", f"/images/1/similar?k={-(2**63)}"))
    out.append(_form_case("image k 2^64", "/search/image", {"k": str(2**64)}))
    out.append(
        _form_case("classify k 10^20", "/classify", {"label_set": LABEL_SET, "k": str(10**20)})
    )
    out.append(_form_case("classify k 0", "/classify", {"label_set": LABEL_SET, "k": "0"}))
    out.append(Case("thumbnail size 2^63", "GET", f"/images/1/thumbnail?size={2**63}"))
    # Floats and numbers the label set validation must refuse.
    out.append(
        _text_search("label_min_score NaN", '{"labels": ["a"], "label_min_score": NaN}', (422,))
    )
    out.append(
        _json_case(
            "label set threshold Infinity",
            "PUT",
            "/label-sets/inf",
            '{"labels": ["a"], "threshold": Infinity}',
        )
    )
    out.append(
        _json_case(
            "label set top_k 2^63",
            "PUT",
            "/label-sets/topk",
            f'{{"labels": ["a"], "top_k": {2**63}}}',
        )
    )
    out.append(_similar("similar labels_mode odd", '{"labels_mode": "some"}', (422,)))
    # JSON booleans and strings where the schema wants numbers or booleans.
    out.append(_text_search("min_height false", '{"min_height": false}', (422,)))
    out.append(
        _text_search("label_min_score true", '{"labels": ["a"], "label_min_score": true}', (422,))
    )
    out.append(
        _json_case("text k true", "POST", "/search/text", '{"query": "a", "k": true}', (422,))
    )
    out.append(
        _json_case(
            "label set store_cosine yes",
            "PUT",
            "/label-sets/strict",
            '{"labels": ["a"], "store_cosine": "yes"}',
            (422,),
        )
    )
    out.append(Case("PATCH search", "PATCH", "/search", expect=(405,)))
    # The page's static files: a NUL or an over-long name is simply not there.
    out.append(Case("web asset NUL", "GET", "/web/app.js%00.png", expect=(404,)))
    out.append(Case("web asset 5000 chars", "GET", "/web/" + "a" * 5_000, expect=(404,)))
    return out


def _send(conn: http.client.HTTPConnection, case: Case) -> tuple[int, dict[str, str], bytes]:
    conn.request(case.method, case.path, body=case.body or None, headers=case.headers)
    response = conn.getresponse()
    data = response.read()
    return response.status, {k.lower(): v for k, v in response.getheaders()}, data


def _problems(conn: http.client.HTTPConnection, case: Case) -> list[str]:
    """What is wrong with the server's answer to `case` (empty: nothing)."""
    status, headers, data = _send(conn, case)
    found: list[str] = []
    if status not in case.expect:
        found.append(f"status {status}: {data[:300]!r}")
    if status >= 400:
        try:
            body = json.loads(data)
            assert set(body) == {"code", "message"}
        except (ValueError, AssertionError, TypeError):
            found.append(f"not a JSON error body: {data[:300]!r}")
    if headers.get("connection", "").lower() == "close":
        found.append("answered with Connection: close")
    # The same socket must still answer: a dropped keep-alive fails here.
    sock = conn.sock
    try:
        probe, _, _ = _send(conn, Case("probe", "GET", "/health"))
        if probe != 200 or conn.sock is not sock:
            found.append("the connection was not kept open")
    except (http.client.HTTPException, OSError) as exc:
        found.append(f"the connection was dropped ({type(exc).__name__})")
        conn.close()
    return found


@pytest.mark.slow
def test_hostile_input_matrix(live_server: ServeProcess) -> None:
    matrix = cases()
    assert len(matrix) >= 40
    host, port = live_server.base_url.removeprefix("http://").split(":")
    conn = http.client.HTTPConnection(host, int(port), timeout=120)
    label_set = _json_case("label set", "PUT", f"/label-sets/{LABEL_SET}", LABEL_BODY)
    assert _send(conn, label_set)[0] in (200, 201)
    failures = {case.name: _problems(conn, case) for case in matrix}
    conn.close()
    failures = {name: found for name, found in failures.items() if found}
    server_errors = sum(any(p.startswith("status 5") for p in found) for found in failures.values())
    dropped = sum(any("connection" in p for p in found) for found in failures.values())
    print(
        f"\nhostile-input matrix: {len(matrix)} cases, {server_errors} answered >= 500, "
        f"{dropped} connections not kept open, {len(failures)} with any problem"
    )
    assert not failures, json.dumps(failures, indent=1)
    assert "Traceback" not in live_server.log(), live_server.log()[-3000:]
