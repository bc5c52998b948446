"""retrieval.photo_info: capture time, camera and position from EXIF, in every format."""

from __future__ import annotations

import datetime as dt
import io

import pytest
from PIL import Image
from PIL.TiffImagePlugin import IFDRational

from retrieval.images import decode_image, read_image_header
from retrieval.photo_info import PhotoInfo, capture_time, photo_info
from tests.fixtures.photos import Shot, photo_bytes

CAP = 100_000_000
PICTURE = Image.new("RGB", (48, 32), (200, 40, 40))
IPHONE = Shot(
    taken="2023:07:14 18:30:05",
    offset="+02:00",
    make="Apple",
    model="iPhone 15 Pro",
    position=(48.8581944, 2.2945),
)


def _info(shot: Shot, fmt: str = "JPEG") -> PhotoInfo:
    return read_image_header(photo_bytes(PICTURE, fmt, shot), max_pixels=CAP).photo


@pytest.mark.parametrize("fmt", ["JPEG", "PNG", "WEBP", "TIFF", "HEIF", "AVIF"])
def test_every_format_gives_time_camera_and_position(fmt: str) -> None:
    data = photo_bytes(PICTURE, fmt, IPHONE)
    expected = PhotoInfo(
        taken_at=dt.datetime(2023, 7, 14, 16, 30, 5, tzinfo=dt.UTC),  # 18:30:05 at +02:00
        camera_make="Apple",
        camera_model="iPhone 15 Pro",
        latitude=48.8581944,
        longitude=2.2945,
    )
    assert read_image_header(data, max_pixels=CAP).photo == expected
    assert decode_image(data, max_pixels=CAP).photo == expected


def test_a_time_without_offset_is_taken_as_written() -> None:
    info = _info(Shot(taken="2021:12:31 23:59:58"))
    assert info.taken_at == dt.datetime(2021, 12, 31, 23, 59, 58, tzinfo=dt.UTC)
    west = _info(Shot(taken="2021:12:31 23:59:58", offset="-05:30"))
    assert west.taken_at == dt.datetime(2022, 1, 1, 5, 29, 58, tzinfo=dt.UTC)


@pytest.mark.parametrize(
    "raw",
    ["0000:00:00 00:00:00", "    :  :     :  :  ", "2023:13:01 10:00:00", "yesterday", ""],
)
def test_blank_or_impossible_dates_are_left_out(raw: str) -> None:
    assert _info(Shot(taken=raw, make="Canon")) == PhotoInfo(camera_make="Canon")


def test_a_nonsense_offset_is_ignored() -> None:
    info = _info(Shot(taken="2020:02:29 12:00:00", offset="+25:00"))
    assert info.taken_at == dt.datetime(2020, 2, 29, 12, 0, tzinfo=dt.UTC)


def test_camera_text_is_cleaned_and_bounded() -> None:
    info = _info(Shot(make="  NIKON CORPORATION\x00\x00", model="NIKON\tD750  " + "x" * 300))
    assert info.camera_make == "NIKON CORPORATION"
    assert info.camera_model is not None
    assert info.camera_model.startswith("NIKON D750 xxx") and len(info.camera_model) == 128


def test_southern_and_western_positions_are_negative() -> None:
    info = _info(Shot(position=(-33.856784, -70.648270)))
    assert (info.latitude, info.longitude) == (-33.8567833, -70.6482694)  # 1/100 s as written


def test_a_zero_position_or_a_zero_denominator_means_no_fix() -> None:
    assert _info(Shot(position=(0.0, 0.0))) == PhotoInfo()
    exif = Image.Exif()
    gps = exif.get_ifd(0x8825)
    gps[1], gps[2] = "N", (IFDRational(48, 1), IFDRational(0, 0), IFDRational(0, 1))
    gps[3], gps[4] = "E", (IFDRational(2, 1), IFDRational(17, 1), IFDRational(0, 1))
    buffer = io.BytesIO()
    PICTURE.save(buffer, "JPEG", exif=exif.tobytes())
    assert read_image_header(buffer.getvalue(), max_pixels=CAP).photo == PhotoInfo()


def test_no_exif_and_broken_exif_give_nothing() -> None:
    with Image.open(io.BytesIO(photo_bytes(PICTURE, "PNG", Shot()))) as plain:
        assert photo_info(plain) == PhotoInfo()
    buffer = io.BytesIO()
    PICTURE.save(buffer, "JPEG", exif=b"Exif\x00\x00II*\x00\xff\xff\xff\x7f")
    assert read_image_header(buffer.getvalue(), max_pixels=CAP).photo == PhotoInfo()


def test_capture_time_falls_back_to_the_file_time() -> None:
    mtime_ns = 1_700_000_000_123_456_789
    assert capture_time(PhotoInfo(), mtime_ns) == (
        dt.datetime(2023, 11, 14, 22, 13, 20, 123457, tzinfo=dt.UTC),
        "file",
    )
    taken = dt.datetime(2001, 1, 1, tzinfo=dt.UTC)
    assert capture_time(PhotoInfo(taken_at=taken), mtime_ns) == (taken, "exif")
