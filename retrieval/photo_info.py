"""What a photo's EXIF says about it: when it was taken, by which camera, and where.

Read from the header (Pillow parses EXIF without decoding pixels). EXIF written by cameras,
phones and editors is often partial or malformed; every field that does not parse is left
out (None), and nothing here ever fails a picture.
"""

from __future__ import annotations

import datetime as dt
import math
import re
from dataclasses import dataclass
from typing import Any

from PIL import Image

# EXIF tags (CIPA DC-008): IFD0, the Exif sub-IFD and the GPS sub-IFD.
_MAKE, _MODEL = 0x010F, 0x0110
_EXIF_IFD, _GPS_IFD = 0x8769, 0x8825
_DATE_TIME_ORIGINAL, _OFFSET_TIME_ORIGINAL = 0x9003, 0x9011
_GPS_LATITUDE_REF, _GPS_LATITUDE, _GPS_LONGITUDE_REF, _GPS_LONGITUDE = 1, 2, 3, 4

# Make and model are free text; the catalog keeps this many characters of each.
MAX_CAMERA_CHARS = 128
_EXIF_DATE = re.compile(r"(\d{4}):(\d{2}):(\d{2})[ T](\d{2}):(\d{2}):(\d{2})")
_EXIF_OFFSET = re.compile(r"([+-])(\d{2}):(\d{2})")


@dataclass(frozen=True)
class PhotoInfo:
    """EXIF facts about one picture; None where the file does not say (or says nonsense).

    `taken_at` is timezone-aware UTC. EXIF's DateTimeOriginal is the camera's wall clock; with
    OffsetTimeOriginal it is converted to UTC, without one it is taken as written (as UTC), so
    a filter without an offset compares camera wall-clock times.
    """

    taken_at: dt.datetime | None = None
    camera_make: str | None = None
    camera_model: str | None = None
    latitude: float | None = None
    longitude: float | None = None


def photo_info(image: Image.Image) -> PhotoInfo:
    """The EXIF facts of an opened image (its pixels need not be loaded)."""
    try:
        exif = image.getexif()
    except Exception:  # broken EXIF must not cost an otherwise good picture
        return PhotoInfo()
    return PhotoInfo(
        taken_at=_taken_at(exif),
        camera_make=_text(exif.get(_MAKE)),
        camera_model=_text(exif.get(_MODEL)),
        **_position(exif),
    )


def capture_time(info: PhotoInfo, mtime_ns: int) -> tuple[dt.datetime, str]:
    """When the picture was taken, and the source: "exif", or "file" (the file's mtime)."""
    if info.taken_at is not None:
        return info.taken_at, "exif"
    return dt.datetime.fromtimestamp(mtime_ns / 1e9, dt.UTC), "file"


def _sub_ifd(exif: Image.Exif, tag: int) -> dict[int, Any]:
    try:
        return dict(exif.get_ifd(tag))
    except Exception:  # a sub-IFD pointer into nowhere
        return {}


def _taken_at(exif: Image.Exif) -> dt.datetime | None:
    fields = _sub_ifd(exif, _EXIF_IFD)
    # Some writers put DateTimeOriginal in IFD0 instead of the Exif sub-IFD.
    raw = fields.get(_DATE_TIME_ORIGINAL, exif.get(_DATE_TIME_ORIGINAL))
    when = _exif_date(raw)
    if when is None:
        return None
    offset = _exif_offset(fields.get(_OFFSET_TIME_ORIGINAL))
    return (when - offset).replace(tzinfo=dt.UTC)


def _exif_date(raw: object) -> dt.datetime | None:
    """'2023:07:14 18:30:05' as a naive datetime; None for blanks, zeros and impossible dates."""
    text = _text(raw)
    match = _EXIF_DATE.fullmatch(text or "")
    if match is None:
        return None
    year, month, day, hour, minute, second = (int(part) for part in match.groups())
    try:
        return dt.datetime(year, month, day, hour, minute, second)
    except ValueError:  # "0000:00:00 00:00:00", month 13, ...
        return None


def _exif_offset(raw: object) -> dt.timedelta:
    match = _EXIF_OFFSET.fullmatch(_text(raw) or "")
    if match is None:
        return dt.timedelta(0)
    sign, hours, minutes = match.groups()
    offset = dt.timedelta(hours=int(hours), minutes=int(minutes))
    if offset > dt.timedelta(hours=14):  # no zone is further from UTC
        return dt.timedelta(0)
    return -offset if sign == "-" else offset


def _text(raw: object) -> str | None:
    """An EXIF ASCII field as clean text: NUL padding, control characters and runs of spaces
    removed; None when nothing is left."""
    if isinstance(raw, bytes):
        raw = raw.decode("latin-1")
    if not isinstance(raw, str):
        return None
    printable = "".join(ch if ch.isprintable() else " " for ch in raw.split("\x00", 1)[0])
    text = " ".join(printable.split())
    return text[:MAX_CAMERA_CHARS] or None


def _position(exif: Image.Exif) -> dict[str, float | None]:
    gps = _sub_ifd(exif, _GPS_IFD)
    latitude = _degrees(gps.get(_GPS_LATITUDE), gps.get(_GPS_LATITUDE_REF), "S", 90.0)
    longitude = _degrees(gps.get(_GPS_LONGITUDE), gps.get(_GPS_LONGITUDE_REF), "W", 180.0)
    # Receivers without a fix often write zeros; (0, 0) lies in the Gulf of Guinea.
    if latitude is None or longitude is None or (latitude == 0.0 and longitude == 0.0):
        return {"latitude": None, "longitude": None}
    return {"latitude": latitude, "longitude": longitude}


def _degrees(raw: object, ref: object, negative: str, limit: float) -> float | None:
    """Degrees, minutes, seconds (three rationals) as signed decimal degrees."""
    if not isinstance(raw, tuple) or len(raw) != 3:
        return None
    try:
        degrees, minutes, seconds = (float(part) for part in raw)
    except (TypeError, ValueError, ZeroDivisionError):
        return None
    value = degrees + minutes / 60.0 + seconds / 3600.0
    if not math.isfinite(value) or min(degrees, minutes, seconds) < 0 or value > limit:
        return None
    if (_text(ref) or "").upper() == negative:
        value = -value
    return round(value, 7)  # about a centimetre; EXIF carries no more
