"""The search page's files: served at / and /web/ without a key, never shadowing the API."""

from __future__ import annotations

import re

from fastapi.testclient import TestClient

from api.routes.web import WEB_DIR


def test_the_page_is_served_at_the_root_without_a_key(auth_client: TestClient) -> None:
    response = auth_client.get("/")
    assert response.status_code == 200
    assert response.headers["content-type"].startswith("text/html")
    assert '<script type="module" src="web/app.js">' in response.text
    policy = response.headers["content-security-policy"]
    assert "script-src 'self'" in policy and "img-src 'self' blob:" in policy
    assert response.headers["x-content-type-options"] == "nosniff"


def test_every_asset_the_page_loads_is_served_without_a_key(auth_client: TestClient) -> None:
    page = auth_client.get("/").text
    linked = re.findall(r'(?:href|src)="(web/[^"]+)"', page)
    assert {"web/app.js", "web/style.css"} <= set(linked)
    modules = {f"web/{p.name}" for p in WEB_DIR.glob("*.js")}
    for path in sorted(set(linked) | modules):
        response = auth_client.get("/" + path)
        assert response.status_code == 200, path
        assert response.headers["x-content-type-options"] == "nosniff"
        if path.endswith(".js"):  # a module script needs a JavaScript MIME type under nosniff
            assert "javascript" in response.headers["content-type"], path
    for module in WEB_DIR.glob("*.js"):  # every import names a file that is there
        for target in re.findall(r'from "\./([^"]+)"', module.read_text()):
            assert (WEB_DIR / target).is_file(), f"{module.name} imports missing {target}"


def test_the_api_keeps_its_routes_and_its_auth(auth_client: TestClient) -> None:
    assert auth_client.get("/index").status_code == 401
    assert auth_client.get("/images/1/thumbnail").status_code == 401
    assert auth_client.get("/docs").status_code == 200
    paths = auth_client.get("/openapi.json").json()["paths"]
    assert "/" not in paths and "/search/text" in paths
    missing = auth_client.get("/no-such-route")
    assert missing.status_code == 404 and missing.json()["code"] == "not_found"


def test_the_assets_folder_serves_only_its_own_files(auth_client: TestClient) -> None:
    for path in ("/web/../app.py", "/web/%2e%2e/app.py", "/web/missing.js"):
        response = auth_client.get(path)
        assert response.status_code == 404, path
        assert "create_app" not in response.text
