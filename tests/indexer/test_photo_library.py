"""Photo libraries: HEIC and AVIF indexed like any format, EXIF facts stored, and the backfill
of catalogs indexed before migration 0007 (headers only: no decode, no encoder)."""

from __future__ import annotations

import datetime as dt
import os
import shutil
from pathlib import Path

import pytest
from alembic import command
from PIL import Image

from indexer.engines import local as local_engine
from indexer.pipeline import IndexJob
from retrieval.catalog.database import Catalog
from retrieval.catalog.migrate import alembic_config
from retrieval.catalog.records import PhotoFields
from retrieval.catalog.tables import ACTIVE
from retrieval.config import Settings
from retrieval.models.encoder import Encoder
from tests.fixtures.bad_images import isobmff_declaring
from tests.fixtures.photos import Shot, photo_bytes, write_photo

UTC = dt.UTC
# A file time far from any EXIF date, so a fallback cannot pass for a capture time.
FILE_TIME_NS = 1_600_000_000_000_000_000  # 2020-09-13T12:26:40Z
IPHONE = Shot("2023:07:14 18:30:05", "+02:00", "Apple", "iPhone 15 Pro", (48.8581944, 2.2945))
PIXEL = Shot("2024:01:02 08:00:00", None, "Google", "Pixel 8", None)
PARIS = PhotoFields(
    dt.datetime(2023, 7, 14, 16, 30, 5, tzinfo=UTC), "exif", "Apple", "iPhone 15 Pro"
)
EXPECTED = {
    "paris.heic": ("HEIF", PARIS, 48.8581944, 2.2945),
    "phone.jpg": ("HEIF", PARIS, 48.8581944, 2.2945),  # a HEIC under a JPEG name
    "morning.avif": (
        "AVIF",
        PhotoFields(dt.datetime(2024, 1, 2, 8, 0, tzinfo=UTC), "exif", "Google", "Pixel 8"),
        None,
        None,
    ),
    "scan.png": (
        "PNG",
        PhotoFields(dt.datetime.fromtimestamp(FILE_TIME_NS / 1e9, UTC), "file"),
        None,
        None,
    ),
}


class NoEncoder:
    """An encoder factory that fails the test if the job asks for a model."""

    def __call__(self) -> Encoder:
        raise AssertionError("the encoder was asked for")


@pytest.fixture
def library(tmp_path: Path) -> Path:
    root = tmp_path / "library"
    red = Image.new("RGB", (80, 60), (210, 30, 30))
    heic = write_photo(root / "2023" / "paris.heic", red, "HEIF", IPHONE)
    (root / "phone.jpg").write_bytes(heic.read_bytes())
    write_photo(root / "2024" / "morning.avif", Image.new("RGB", (64, 48), "blue"), "AVIF", PIXEL)
    write_photo(root / "scan.png", Image.new("RGB", (40, 30), "green"), "PNG", Shot())
    for path in root.rglob("*.*"):
        os.utime(path, ns=(FILE_TIME_NS, FILE_TIME_NS))
    return root


def _photos(catalog: Catalog, root: Path) -> dict[str, tuple[str | None, PhotoFields]]:
    return {
        Path(path).name: (record.format, record.photo)
        for path, record in catalog.records_under([str(root)]).items()
        if record.status == ACTIVE
    }


def _expected() -> dict[str, tuple[str, PhotoFields]]:
    return {
        name: (fmt, PhotoFields(**{**photo.to_row(), "latitude": lat, "longitude": lon}))
        for name, (fmt, photo, lat, lon) in EXPECTED.items()
    }


def test_heic_and_avif_are_indexed_with_their_exif(
    settings: Settings, catalog: Catalog, encoder: Encoder, library: Path
) -> None:
    report = IndexJob(settings, catalog, lambda: encoder, progress=False).run([library])
    assert (report.new, report.failed, report.encoded) == (4, [], 4)
    assert report.photo_info_read == 0  # every row was written with its photo columns
    assert _photos(catalog, library) == _expected()
    # Copies reuse the stored vector, and the EXIF facts that come with the same bytes; a
    # picture dated by its file time is dated by the copy's own.
    shutil.copy(library / "2023" / "paris.heic", library / "2023" / "PARIS_COPY.HEIC")
    shutil.copy(library / "scan.png", library / "scan copy.png")
    copy_time_ns = FILE_TIME_NS + 86_400 * 10**9
    os.utime(library / "scan copy.png", ns=(copy_time_ns, copy_time_ns))
    again = IndexJob(settings, catalog, lambda: encoder, progress=False).run([library])
    assert (again.copied, again.encoded, again.photo_info_read) == (2, 0, 0)
    photos = _photos(catalog, library)
    assert photos["PARIS_COPY.HEIC"] == photos["paris.heic"]
    assert photos["scan copy.png"] == (
        "PNG",
        PhotoFields(dt.datetime.fromtimestamp(copy_time_ns / 1e9, UTC), "file"),
    )


def test_bombs_and_cut_files_fail_with_their_reasons(
    settings: Settings, catalog: Catalog, encoder: Encoder, library: Path
) -> None:
    heic = photo_bytes(Image.effect_noise((64, 48), 60).convert("RGB"), "HEIF", IPHONE)
    avif = photo_bytes(Image.effect_noise((64, 48), 60).convert("RGB"), "AVIF", PIXEL)
    bad = library / "bad"
    bad.mkdir()
    (bad / "bomb.heic").write_bytes(isobmff_declaring(heic, 30_000, 30_000))
    (bad / "bomb.avif").write_bytes(isobmff_declaring(avif, 30_000, 30_000))
    (bad / "cut.heic").write_bytes(heic[: len(heic) // 2])
    (bad / "cut.avif").write_bytes(avif[: len(avif) // 2])
    report = IndexJob(settings, catalog, lambda: encoder, progress=False).run([library])
    failures = {Path(f.path).name: (f.reason, f.detail) for f in report.failed}
    assert failures == {
        "bomb.heic": (
            "too_large",
            "30000x30000 is 900000000 pixels, more than the 100000000 allowed",
        ),
        "bomb.avif": (
            "too_large",
            "30000x30000 is 900000000 pixels, more than the 100000000 allowed",
        ),
        "cut.heic": ("truncated", "the data ends before the image does"),
        "cut.avif": ("truncated", "the data ends before the image does"),
    }
    assert {Path(r.path).name: r.error_reason for r in catalog.errors()} == {
        name: reason for name, (reason, _) in failures.items()
    }
    assert _photos(catalog, library) == _expected()  # the good pictures are all there


def test_a_catalog_from_before_0007_is_backfilled_from_headers_alone(
    settings: Settings,
    catalog: Catalog,
    encoder: Encoder,
    library: Path,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    IndexJob(settings, catalog, lambda: encoder, progress=False).run([library])
    generation = catalog.generation()
    # What a user upgrading clipsearch has: rows written before the photo columns existed.
    with catalog.engine.connect() as connection:
        command.downgrade(alembic_config(connection), "0006")
        connection.commit()
    catalog.upgrade()
    assert {photo for _, photo in _photos(catalog, library).values()} == {PhotoFields()}

    def no_decoding(*args: object, **kwargs: object) -> None:
        raise AssertionError("pixels were decoded")

    monkeypatch.setattr(local_engine, "iterate_decoded", no_decoding)
    report = IndexJob(settings, catalog, NoEncoder(), progress=False).run([library])
    assert report.photo_info_read == report.unchanged == 4
    assert (report.encoded, report.decoded) == (0, 0)
    assert _photos(catalog, library) == _expected()
    assert catalog.generation() == generation  # no vector, shard or generation changed
    again = IndexJob(settings, catalog, NoEncoder(), progress=False).run([library])
    assert again.photo_info_read == 0
