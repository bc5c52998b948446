"""The API's contract: /openapi.json is exactly the committed tests/api/openapi.json.

A change to a route, a schema or a description shows up here first, so every change to the API
is a deliberate one. After such a change, rewrite the file with
`CLIPSEARCH_UPDATE_OPENAPI=1 bash scripts/test.sh tests/api/test_openapi.py` and commit it.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

from fastapi.testclient import TestClient

from api.app import create_app
from retrieval.config import Settings

SNAPSHOT = Path(__file__).with_name("openapi.json")


def test_openapi_document_is_the_committed_one(tmp_path: Path) -> None:
    # No lifespan (no `with`): the document needs neither a model nor an index.
    client = TestClient(create_app(Settings(data_dir=tmp_path)))
    response = client.get("/openapi.json")
    assert response.status_code == 200
    # Key order is kept, so equal text here means byte-identical documents.
    served = json.dumps(response.json(), indent=2, ensure_ascii=False) + "\n"
    if os.environ.get("CLIPSEARCH_UPDATE_OPENAPI") == "1":
        SNAPSHOT.write_text(served, encoding="utf-8")
    assert served == SNAPSHOT.read_text(encoding="utf-8"), (
        "the OpenAPI document changed; if that is meant, rewrite tests/api/openapi.json "
        "(see this module's docstring) and commit it"
    )
