"""A photo library end to end, with meaning: HEIC and AVIF pictures indexed by `clipsearch index`
and found by what they show, and their EXIF capture dates and cameras filtered exactly, from
the CLI and the API, on SQLite and Postgres.

The corpus is the shapes the semantic test model knows, without any red circle or blue square
except one HEIC (a red circle, from an iPhone) and one AVIF (a blue square, from a Pixel).
"""

from __future__ import annotations

import contextlib
import io
import json
import os
import random
import shutil
import sys
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest
from fastapi.testclient import TestClient

from api.app import create_app
from indexer.cli.app import main
from retrieval.config import load_settings
from retrieval.models.encoder import Encoder, load_encoder
from retrieval.models.identity import ModelSpec
from retrieval.training.shapes import draw_shape, generate_shapes
from retrieval.training.shapes_model import SHAPES_MODEL
from tests.conftest import BOTH_DATABASES, fresh_database
from tests.fixtures.bad_images import isobmff_declaring
from tests.fixtures.photos import Shot, write_photo

pytestmark = pytest.mark.slow  # trains the semantic model once per session

FILE_TIME_NS = 1_600_000_000_000_000_000  # 2020-09-13T12:26:40Z: every file's mtime
IPHONE = Shot("2023:07:14 18:30:05", "+02:00", "Apple", "iPhone 15 Pro", (48.8581944, 2.2945))
PIXEL = Shot("2024:01:02 08:00:00", None, "Google", "Pixel 8", None)
CANON = Shot("2019:05:01 10:00:00", None, "Canon", "Canon EOS 5D Mark IV", None)
SHAPES = 48  # two of each class; the red circles and blue squares are removed
EVERYTHING = 100  # a k above the corpus size: every image that passes the filters


@dataclass(frozen=True)
class Library:
    root: Path
    env: dict[str, str]
    client: TestClient

    @property
    def heic(self) -> str:
        return str(self.root / "phone" / "paris.heic")

    @property
    def avif(self) -> str:
        return str(self.root / "phone" / "morning.avif")

    @property
    def jpeg(self) -> str:
        return str(self.root / "camera" / "old.jpg")

    def cli(self, *args: str) -> tuple[int, str, str]:
        return run_cli(self.env, *args)

    def cli_paths(self, *args: str) -> list[str]:
        code, out, err = self.cli("search", *args, "--json")
        assert code == 0, err
        return [hit["path"] for hit in json.loads(out)["results"]]

    def api_paths(self, query: str, k: int = EVERYTHING, **filters: str) -> list[str]:
        body = {"query": query, "k": k, "filters": filters}
        response = self.client.post("/search/text", json=body)
        assert response.status_code == 200, response.text
        posted = [hit["path"] for hit in response.json()["results"]]
        # GET /search takes the same filters as query parameters, with the same results.
        got = self.client.get("/search", params={"q": query, "k": k, **filters})
        assert got.status_code == 200, got.text
        assert [hit["path"] for hit in got.json()["results"]] == posted
        return posted


def run_cli(env: dict[str, str], *args: str) -> tuple[int, str, str]:
    """`clipsearch ARGS` in this process, with these settings in the environment."""
    out, err = io.StringIO(), io.StringIO()
    code = 0
    with (
        pytest.MonkeyPatch.context() as patch,
        contextlib.redirect_stdout(out),
        contextlib.redirect_stderr(err),
    ):
        for name, value in env.items():
            patch.setenv(name, value)
        patch.setattr(sys, "argv", ["clipsearch", *args])
        try:
            main()
        except SystemExit as exc:
            code = int(exc.code or 0)
    return code, out.getvalue(), err.getvalue()


@pytest.fixture(scope="module")
def semantic_encoder(semantic_checkpoint: Path) -> Encoder:
    return load_encoder(ModelSpec(SHAPES_MODEL, str(semantic_checkpoint), device="cpu"))


@pytest.fixture(scope="module", params=BOTH_DATABASES)
def library(
    request: pytest.FixtureRequest,
    tmp_path_factory: pytest.TempPathFactory,
    semantic_checkpoint: Path,
    semantic_encoder: Encoder,
) -> Iterator[Library]:
    tmp = tmp_path_factory.mktemp(f"library-{request.param}")
    root = tmp / "photos"
    generate_shapes(root, SHAPES, seed=11)
    for taken_out in ("red_circle", "blue_square", "captions.csv"):
        path = root / taken_out
        shutil.rmtree(path) if path.is_dir() else path.unlink()
    write_photo(
        root / "phone" / "paris.heic",
        draw_shape("red", "circle", random.Random("paris")),
        "HEIF",
        IPHONE,
    )
    write_photo(
        root / "phone" / "morning.avif",
        draw_shape("blue", "square", random.Random("morning")),
        "AVIF",
        PIXEL,
    )
    write_photo(
        root / "camera" / "old.jpg",
        draw_shape("green", "triangle", random.Random("old")),
        "JPEG",
        CANON,
    )
    for path in root.rglob("*.*"):
        os.utime(path, ns=(FILE_TIME_NS, FILE_TIME_NS))
    with contextlib.contextmanager(fresh_database)(request.param, tmp) as db_url:
        env = {
            "CLIPSEARCH_DATA_DIR": str(tmp / "data"),
            "CLIPSEARCH_DATABASE_URL": db_url,
            "CLIPSEARCH_MODEL": SHAPES_MODEL,
            "CLIPSEARCH_PRETRAINED": str(semantic_checkpoint),
            "CLIPSEARCH_DEVICE": "cpu",
            "CLIPSEARCH_WORKERS": "0",
        }
        settings = load_settings(
            data_dir=tmp / "data",
            database_url=db_url,
            model=SHAPES_MODEL,
            pretrained=str(semantic_checkpoint),
            device="cpu",
            workers=0,
            reload_interval_seconds=0,
        )
        code, out, err = run_cli(env, "index", str(root), "--json")
        assert code == 0, err
        report = json.loads(out)
        assert (report["new"], report["failed"]) == (SHAPES - 4 + 3, [])
        app = create_app(settings, encoder_factory=lambda _: semantic_encoder)
        with TestClient(app) as client:
            yield Library(root, env, client)


def test_heic_and_avif_pictures_are_found_by_what_they_show(library: Library) -> None:
    assert library.cli_paths("a red circle", "-k", "1") == [library.heic]
    assert library.cli_paths("a blue square", "-k", "1") == [library.avif]
    assert library.api_paths("a red circle", k=1) == [library.heic]
    assert library.api_paths("a blue square", k=1) == [library.avif]


def test_capture_dates_and_cameras_filter_exactly_from_the_cli(library: Library) -> None:
    everything = ("-k", str(EVERYTHING))
    assert library.cli_paths("a photo", "--camera", "apple iphone 15 pro", *everything) == [
        library.heic
    ]
    assert library.cli_paths("a photo", "--camera", " Pixel   8 ", *everything) == [library.avif]
    assert library.cli_paths("a photo", "--camera", "iPhone", *everything) == []
    after = library.cli_paths("a photo", "--taken-after", "2023-07-14T16:30:05Z", *everything)
    assert sorted(after) == sorted([library.heic, library.avif])
    # 18:30:06 at +02:00 is one second after the iPhone's picture.
    later = ("--taken-after", "2023-07-14T18:30:06+02:00")
    assert library.cli_paths("a photo", *later, *everything) == [library.avif]
    assert library.cli_paths("a photo", "--taken-before", "2020-01-01", *everything) == [
        library.jpeg
    ]
    # Pictures without an EXIF date are dated by their file's modification time.
    file_day = ("--taken-after", "2020-09-13", "--taken-before", "2020-09-14")
    assert len(library.cli_paths("a photo", *file_day, *everything)) == SHAPES - 4

    code, out, err = library.cli("search", "a red circle", "-k", "1", "--json")
    assert code == 0, err
    hit = json.loads(out)["results"][0]
    assert {key: hit[key] for key in hit if key not in ("id", "score", "labels")} == {
        "path": library.heic,
        "width": hit["width"],
        "height": hit["height"],
        "format": "HEIF",
        "indexed_at": hit["indexed_at"],
        "taken_at": "2023-07-14T16:30:05+00:00",
        "taken_at_source": "exif",
        "camera_make": "Apple",
        "camera_model": "iPhone 15 Pro",
        "latitude": 48.8581944,
        "longitude": 2.2945,
    }

    code, out, err = library.cli("search", "a photo", "--taken-after", "yesterday")
    assert code == 2
    assert "Invalid value for '--taken-after': not a date or time: 'yesterday' (e.g. " in err


def test_capture_dates_and_cameras_filter_exactly_from_the_api(library: Library) -> None:
    assert library.api_paths("a photo", camera="Apple iPhone 15 Pro") == [library.heic]
    assert library.api_paths("a photo", camera="GOOGLE PIXEL 8") == [library.avif]
    assert library.api_paths("a photo", camera="Canon EOS 5D Mark IV") == [library.jpeg]
    assert sorted(library.api_paths("a photo", taken_after="2023-07-14T16:30:05Z")) == sorted(
        [library.heic, library.avif]
    )
    assert library.api_paths("a photo", taken_after="2023-07-14T18:30:06+02:00") == [library.avif]
    assert library.api_paths("a photo", taken_before="2020-01-01T00:00:00") == [library.jpeg]
    assert (
        library.api_paths("a photo", camera="pixel 8", taken_before="2024-01-02T08:00:00Z") == []
    )  # taken at exactly that time: before is exclusive

    response = library.client.post("/search/text", json={"query": "a blue square", "k": 1})
    hit = response.json()["results"][0]
    photo = {key: hit[key] for key in ("format", "taken_at", "taken_at_source", "camera_make")}
    assert photo == {
        "format": "AVIF",
        "taken_at": "2024-01-02T08:00:00Z",  # no offset in its EXIF: taken as written
        "taken_at_source": "exif",
        "camera_make": "Google",
    }
    assert (hit["camera_model"], hit["latitude"], hit["longitude"]) == ("Pixel 8", None, None)
    metadata = library.client.get(f"/images/{hit['id']}").json()
    assert {key: metadata[key] for key in photo} == photo
    assert library.client.get(hit["file_url"]).headers["content-type"] == "image/avif"


def test_heic_and_avif_uploads_search_and_their_broken_versions_are_refused(
    library: Library,
) -> None:
    for path in (library.heic, library.avif):
        data = Path(path).read_bytes()
        response = library.client.post(
            "/search/image", files={"file": (Path(path).name, data, "application/octet-stream")}
        )
        assert response.status_code == 200, response.text
        best = response.json()["results"][0]
        assert best["path"] == path and best["score"] > 0.99
        cut = data[: len(data) // 2]
        bomb = isobmff_declaring(data, 30_000, 30_000)
        refused = {
            (422, "image_truncated"): (
                cut,
                "The file is cut short: the picture's data ends early (an incomplete download "
                "or copy?).",
            ),
            (413, "image_too_large"): (
                bomb,
                "The picture is too large to decode here: 30000x30000 is 900000000 pixels, "
                "more than the 100000000 allowed.",
            ),
        }
        for (status, code), (payload, message) in refused.items():
            response = library.client.post(
                "/search/image", files={"file": ("upload", payload, "image/heic")}
            )
            assert response.status_code == status, response.text
            assert response.json() == {"code": code, "message": message}
