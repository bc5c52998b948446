"""The auth matrix: no key, wrong key, read key, admin key; two header styles."""

from __future__ import annotations

import logging
from collections.abc import Callable

import pytest
from fastapi.testclient import TestClient

from tests.api.conftest import ADMIN_KEY, READ_KEY

READ_ROUTES = [
    ("GET", "/search?q=a+red+circle"),
    ("POST", "/search/text"),
    ("GET", "/index"),
    ("GET", "/metrics"),
    ("GET", "/images/1"),
    ("GET", "/images/1/similar"),
    ("GET", "/images/1/file"),
    ("GET", "/images/1/thumbnail"),
]


def _call(client: TestClient, method: str, url: str, headers: dict[str, str]) -> int:
    if method == "POST":
        return client.post(url, json={"query": "a cat"}, headers=headers).status_code
    return client.get(url, headers=headers).status_code


@pytest.mark.parametrize(("method", "url"), READ_ROUTES)
def test_read_routes(auth_client: TestClient, method: str, url: str) -> None:
    no_key = auth_client.get(url) if method == "GET" else auth_client.post(url, json={})
    assert no_key.status_code == 401
    assert no_key.json()["code"] == "missing_api_key"
    assert _call(auth_client, method, url, {"X-API-Key": "wrong"}) == 401
    assert _call(auth_client, method, url, {"Authorization": f"Bearer {READ_KEY}"}) in (200, 404)
    assert _call(auth_client, method, url, {"X-API-Key": ADMIN_KEY}) in (200, 404)


def test_admin_route(auth_client: TestClient) -> None:
    none = auth_client.post("/admin/reload")
    assert none.status_code == 401 and none.json()["code"] == "missing_api_key"
    wrong = auth_client.post("/admin/reload", headers={"Authorization": "Bearer nope"})
    assert wrong.status_code == 401 and wrong.json()["code"] == "invalid_api_key"
    read = auth_client.post("/admin/reload", headers={"X-API-Key": READ_KEY})
    assert read.status_code == 403 and read.json()["code"] == "insufficient_scope"
    admin = auth_client.post("/admin/reload", headers={"Authorization": f"Bearer {ADMIN_KEY}"})
    assert admin.status_code == 200


def test_health_and_ready_need_no_key(auth_client: TestClient) -> None:
    assert auth_client.get("/health").status_code == 200
    assert auth_client.get("/ready").status_code == 200


def test_auth_off_without_keys_logs_loudly(
    make_client: Callable[..., TestClient], caplog: pytest.LogCaptureFixture
) -> None:
    with caplog.at_level(logging.WARNING, logger="clipsearch.api"):
        client = make_client()
    assert "AUTHENTICATION IS OFF" in caplog.text
    assert client.post("/admin/reload").status_code == 200


def test_cors_headers_when_configured(make_client: Callable[..., TestClient]) -> None:
    client = make_client(cors_origins=["https://app.example"])
    response = client.options(
        "/search/text",
        headers={"Origin": "https://app.example", "Access-Control-Request-Method": "POST"},
    )
    assert response.headers.get("access-control-allow-origin") == "https://app.example"
