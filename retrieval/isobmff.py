"""What the box structure of a HEIF or AVIF file says, read without any codec.

HEIC and AVIF are ISO base media files: a tree of length-prefixed boxes. The codecs behind
them (libheif, libavif) report a picture's size after cropping (`clap`) or refuse oversized
ones as unidentifiable, so the size a decode will allocate is read here from every `ispe`
(image spatial extents) property; and a file cut short is told by a box that claims more
bytes than remain, which the codecs only report as "cannot identify".
"""

from __future__ import annotations

import struct
from collections.abc import Iterator
from dataclasses import dataclass

# Brands that mark an image file (still pictures, image sequences) rather than a video.
HEIF_BRANDS = frozenset({b"heic", b"heix", b"heim", b"heis", b"hevc", b"hevx", b"mif1", b"msf1"})
AVIF_BRANDS = frozenset({b"avif", b"avis"})
# Boxes whose children hold the image properties; `meta` is a full box (4 bytes of
# version and flags before its children).
_CONTAINERS = {b"meta": 4, b"iprp": 0, b"ipco": 0}
# A hostile file could nest or repeat boxes without end; real files have a few dozen.
_MAX_BOXES = 4096


@dataclass(frozen=True)
class Box:
    kind: bytes
    start: int  # of the payload
    end: int  # declared end of the box (may lie past the data when the file is cut)


def brand(data: bytes) -> str | None:
    """'HEIF' or 'AVIF' when `data` starts with a file-type box naming such a brand, else None."""
    if len(data) < 16 or data[4:8] != b"ftyp":
        return None
    size = int.from_bytes(data[0:4], "big")
    if size < 16:
        return None
    listed = data[8:12] + data[16 : min(size, len(data))]
    brands = {listed[i : i + 4] for i in range(0, len(listed) - 3, 4)}
    if brands & AVIF_BRANDS:
        return "AVIF"
    if brands & HEIF_BRANDS:
        return "HEIF"
    return None


def is_short(data: bytes) -> bool:
    """True when a top-level box of a HEIF/AVIF file claims more bytes than the data holds."""
    if brand(data) is None:
        return False
    return any(box.end > len(data) for box in _boxes(data, 0, len(data)))


def declared_sizes(data: bytes) -> list[tuple[int, int]]:
    """(width, height) of every image the file's `ispe` properties declare (empty: none)."""
    if brand(data) is None:
        return []
    sizes: list[tuple[int, int]] = []
    for box in _walk(data, 0, len(data)):
        if box.kind == b"ispe" and box.end - box.start >= 12 and box.end <= len(data):
            width, height = struct.unpack_from(">II", data, box.start + 4)
            sizes.append((width, height))
    return sizes


def bits_per_channel(data: bytes) -> int:
    """The most bits per channel any `pixi` property declares (8 when none does)."""
    deepest = 8
    for box in _walk(data, 0, len(data)):
        if box.kind == b"pixi" and box.start + 5 <= min(box.end, len(data)):
            channels = data[box.start + 4]
            depths = data[box.start + 5 : min(box.start + 5 + channels, box.end, len(data))]
            deepest = max([deepest, *depths])
    return deepest


def _walk(data: bytes, start: int, end: int) -> Iterator[Box]:
    """Boxes at every level that holds image properties, depth first, at most _MAX_BOXES."""
    stack = [(start, end)]
    seen = 0
    while stack:
        begin, stop = stack.pop()
        for box in _boxes(data, begin, stop):
            seen += 1
            if seen > _MAX_BOXES:
                return
            yield box
            skip = _CONTAINERS.get(box.kind)
            if skip is not None:
                stack.append((box.start + skip, min(box.end, len(data))))


def _boxes(data: bytes, start: int, end: int) -> Iterator[Box]:
    """The boxes laid end to end in data[start:end]; stops at the first malformed header."""
    position = start
    while position + 8 <= end:
        size, kind = struct.unpack_from(">I4s", data, position)
        header = 8
        if size == 1:
            if position + 16 > end:
                return
            size = struct.unpack_from(">Q", data, position + 8)[0]
            header = 16
        elif size == 0:  # the box runs to the end of the file
            size = end - position
        if size < header:
            return
        yield Box(kind, position + header, position + size)
        position += size
