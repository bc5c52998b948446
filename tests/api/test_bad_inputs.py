"""Hostile and mistaken input: always a 4xx with a stable JSON code, never a 500."""

from __future__ import annotations

import io
import os
import random
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest
from fastapi.testclient import TestClient
from PIL import Image

from retrieval.catalog.database import Catalog
from retrieval.catalog.records import GenerationCommit, ImageRecord
from retrieval.catalog.tables import ACTIVE
from retrieval.images import ALLOWED_FORMATS
from tests.fixtures.bad_images import png_declaring


def _jpeg() -> bytes:
    buf = io.BytesIO()
    Image.effect_noise((64, 48), 40).convert("RGB").save(buf, "JPEG", quality=90)
    return buf.getvalue()


def _ico() -> bytes:
    buf = io.BytesIO()
    Image.new("RGB", (32, 32), (200, 30, 30)).save(buf, "ICO")
    return buf.getvalue()


ALLOWED = ", ".join(sorted(ALLOWED_FORMATS))
UPLOADS = {
    "empty": (b"", "x.jpg", 422, "image_empty", "The file is empty."),
    "truncated_jpeg": (
        _jpeg()[:300],
        "t.jpg",
        422,
        "image_truncated",
        "The file is cut short: the picture's data ends early (an incomplete download or copy?).",
    ),
    "random_bytes": (
        random.Random(1).randbytes(4096),
        "noise.jpg",
        422,
        "image_not_an_image",
        f"The file is not a picture, or not in a format this server reads ({ALLOWED}).",
    ),
    "bomb_png": (
        png_declaring(30_000, 30_000),
        "bomb.png",
        413,
        "image_too_large",
        "The picture is too large to decode here: its header declares more pixels than the "
        "decompression-bomb limit allows.",
    ),
    "unsupported": (
        _ico(),
        "icon.png",
        422,
        "image_unsupported_format",
        f"ICO images are not supported (allowed: {ALLOWED}).",
    ),
}


def test_bad_uploads_are_refused_with_a_message_for_a_person(client: TestClient) -> None:
    """The page shows the message as it is: no reason code, library or exception name in it."""
    for case, (data, name, status, code, message) in UPLOADS.items():
        response = client.post("/search/image", files={"file": (name, data, "image/jpeg")})
        assert response.status_code == status, (case, response.text)
        assert response.json() == {"code": code, "message": message}, case


def test_oversized_body_is_refused_while_streaming(
    make_client: Callable[..., TestClient],
) -> None:
    client = make_client(max_upload_bytes=64 * 1024)
    big = b"\xff\xd8" + os.urandom(200 * 1024)
    response = client.post("/search/image", files={"file": ("big.jpg", big, "image/jpeg")})
    assert response.status_code == 413
    assert response.json() == {
        "code": "payload_too_large",
        "message": "The request is larger than the 65536 bytes (0.0625 MiB) this server accepts.",
    }

    def chunks() -> Iterator[bytes]:  # no Content-Length: only the streaming count can catch it
        for _ in range(20):
            yield b"x" * 16 * 1024

    streamed = client.post(
        "/search/text", content=chunks(), headers={"Content-Type": "application/json"}
    )
    assert streamed.status_code == 413
    assert streamed.json()["code"] == "payload_too_large"


def test_missing_file_field(client: TestClient) -> None:
    response = client.post("/search/image", data={"k": "3"})
    assert response.status_code == 422 and response.json()["code"] == "validation_error"


@pytest.mark.parametrize("k", [0, -1, 100_000])
def test_k_out_of_range(client: TestClient, k: int) -> None:
    for response in (
        client.post("/search/text", json={"query": "a cat", "k": k}),
        client.get("/search", params={"q": "a cat", "k": k}),
        client.get("/images/1/similar", params={"k": k}),
        client.post("/search/image", files={"file": ("a.jpg", _jpeg())}, data={"k": str(k)}),
    ):
        assert response.status_code == 400, response.text
        assert response.json()["code"] == "bad_query"


@pytest.mark.parametrize("query", ["", "   ", "x" * 5000])
def test_empty_or_huge_query(client: TestClient, query: str) -> None:
    response = client.post("/search/text", json={"query": query})
    assert response.status_code == 400 and response.json()["code"] == "bad_query"
    response = client.get("/search", params={"q": query})
    assert response.status_code == 400 and response.json()["code"] == "bad_query"


@pytest.mark.parametrize(
    "body",
    [b'{"query": "\xff\xfe caf\xe9"}', b"\xff\xfe\xfd", b"not json", b'{"k": 3}', b"[1,2]"],
)
def test_malformed_text_bodies(client: TestClient, body: bytes) -> None:
    response = client.post(
        "/search/text", content=body, headers={"Content-Type": "application/json"}
    )
    # Undecodable bytes fail while parsing (400), well-formed JSON of the wrong shape later (422).
    assert (response.status_code, response.json()["code"]) in (
        (400, "invalid_body"),
        (422, "validation_error"),
    ), response.text


def test_bad_filters(client: TestClient) -> None:
    response = client.post(
        "/search/text", json={"query": "a", "filters": {"min_width": -1, "colour": "red"}}
    )
    assert response.status_code == 422 and response.json()["code"] == "validation_error"
    response = client.post(
        "/search/image", files={"file": ("a.jpg", _jpeg())}, data={"filters": "{nope"}
    )
    assert response.status_code == 422 and response.json()["code"] == "validation_error"


@pytest.mark.parametrize(
    "url",
    [
        "/images/../../etc/passwd/file",
        "/images/..%2F..%2Fetc%2Fpasswd/file",
        "/images/%2Fetc%2Fpasswd/file",
        "/images/1%2F..%2F..%2Fetc%2Fpasswd/thumbnail",
        "/images/%252e%252e%252fetc/file",
    ],
)
def test_traversal_in_the_url_never_reaches_a_file(client: TestClient, url: str) -> None:
    response = client.get(url)
    assert 400 <= response.status_code < 500
    assert "root:" not in response.text
    assert response.json()["code"] in ("not_found", "validation_error")


def _add_row(catalog: Catalog, path: str) -> int:
    """A catalog row pointing at `path` (as a tampered or stale catalog might hold)."""
    image_id = catalog.max_image_id() + 1
    model = catalog.state().model or {}
    shard = catalog.shards()[0].id
    catalog.commit(
        GenerationCommit(
            model=model,
            upserts=[
                ImageRecord(
                    id=image_id,
                    path=path,
                    sha256=None,
                    size=1,
                    mtime_ns=1,
                    status=ACTIVE,
                    width=8,
                    height=8,
                    format="PNG",
                    shard_id=shard,
                )
            ],
        )
    )
    return image_id


def test_rows_resolving_outside_the_roots_are_refused(
    client: TestClient, catalog: Catalog, indexed: Path, tmp_path: Path
) -> None:
    outside = tmp_path / "secret"
    outside.mkdir()
    secret = outside / "secret.png"
    Image.new("RGB", (8, 8)).save(secret)
    link = indexed / "link.png"
    link.symlink_to(secret)
    dir_link = indexed / "dirlink"
    dir_link.symlink_to(outside, target_is_directory=True)
    cases = [
        str(secret),  # absolute path outside
        f"{indexed}/../secret/secret.png",  # dot-dot spelled inside the root
        str(link),  # symlinked file leaving the root
        str(dir_link / "secret.png"),  # symlinked directory leaving the root
        "/etc/passwd",
        "relative/path.png",
    ]
    for path in cases:
        image_id = _add_row(catalog, path)
        for suffix in ("file", "thumbnail"):
            response = client.get(f"/images/{image_id}/{suffix}")
            assert response.status_code == 403, (path, response.text)
            assert response.json()["code"] == "path_not_allowed"


def test_missing_file_inside_root_is_404(
    client: TestClient, catalog: Catalog, indexed: Path
) -> None:
    image_id = _add_row(catalog, str(indexed / "gone.png"))
    response = client.get(f"/images/{image_id}/file")
    assert response.status_code == 404 and response.json()["code"] == "not_found"
