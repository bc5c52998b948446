"""Safe image decoding: the only way the product turns bytes into pixels.

Real corpora hold truncated, huge, hostile and mislabelled files, so every failure becomes an
`ImageError` with a stable `reason`, and the pixel cap and the decode budget (bytes, see
`DecodeCost`) are checked from the header before any pixel is decoded. Conversions to RGB run
in bands of rows, so a decode holds little beyond its frame whatever the image's mode.

HEIC/HEIF pictures decode through pillow-heif (libheif), AVIF through Pillow's own plugin
(libavif); for both, the sizes their header boxes declare are checked too (see
`retrieval.isobmff`), since the codecs report only the size after cropping.
"""

from __future__ import annotations

import io
import math
import os
import stat
import warnings
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass

import numpy as np
import pillow_heif
from PIL import Image, ImageFile, UnidentifiedImageError, features

from retrieval import isobmff
from retrieval.errors import ImageError
from retrieval.memory import release_free_heap
from retrieval.photo_info import PhotoInfo, photo_info

# Thumbnails, depth maps and auxiliary images inside a HEIC are never needed: not even parsed.
pillow_heif.register_heif_opener(thumbnails=False, depth_images=False, aux_images=False)

IMAGE_EXTENSIONS: frozenset[str] = frozenset(
    {".jpg", ".jpeg", ".jpe", ".png", ".webp", ".gif", ".bmp", ".tif", ".tiff"}
    | {".heic", ".heif", ".hif", ".avif"}
)
# MPO is what phones write for multi-picture JPEGs; Pillow reports it instead of JPEG.
ALLOWED_FORMATS: frozenset[str] = frozenset(
    {"JPEG", "PNG", "WEBP", "GIF", "BMP", "TIFF", "MPO", "HEIF", "AVIF"}
)
# Measured peak memory beyond the RGB frame, per pixel the header declares (4000x3000 and
# 2000x1500 pictures): libheif's planes and its RGB copy (3.3 to 4.7 bytes; 10-bit HEICs
# are converted to 8 bits and take the same), libavif's planes and RGBA copy (5.0 to 5.1).
_CODEC_BYTES_PER_PIXEL = {"HEIF": 5, "AVIF": 6}

# A file is read into memory whole, so its size needs a bound of its own; no legitimate
# photo comes near this, while /dev/zero or a mislabelled video would.
MAX_FILE_BYTES = 256 * 1024 * 1024

_EXIF_ORIENTATION_TAG = 0x0112
# EXIF orientation value -> the transpose that shows the picture upright.
_ORIENTATION_TRANSPOSE: dict[int, Image.Transpose] = {
    2: Image.Transpose.FLIP_LEFT_RIGHT,
    3: Image.Transpose.ROTATE_180,
    4: Image.Transpose.FLIP_TOP_BOTTOM,
    5: Image.Transpose.TRANSPOSE,
    6: Image.Transpose.ROTATE_270,
    7: Image.Transpose.TRANSVERSE,
    8: Image.Transpose.ROTATE_90,
}
_SWAPS_AXES = frozenset({5, 6, 7, 8})
_ALPHA_MODES = frozenset({"RGBA", "RGBa", "LA", "La", "PA"})
_WIDE_GREY_MODES = frozenset({"I;16", "I;16L", "I;16B", "I;16N", "I", "F"})
# Pillow holds these modes in one byte per pixel, 16-bit grey in two, every other mode in four
# (RGB too: its pixels are padded to 32 bits).
_ONE_BYTE_MODES = frozenset({"1", "L", "P"})
# With `min_side`, a frame over this many pixels is reduced (box-averaged by a whole factor that
# keeps both sides >= min_side) band by band before its conversion to RGB, as libjpeg's DCT
# scaling does for JPEGs; smaller frames convert as they are.
REDUCE_ABOVE_PIXELS = 4_000_000
# Rows are converted in bands of about this many bytes, so conversions never copy a whole frame.
BAND_BYTES = 4 * 1024 * 1024
# After a decode that held this much, free heap pages go back to the system (glibc keeps
# them otherwise, and a server's RSS would stay at its peak).
TRIM_ABOVE_BYTES = 32 * 1024 * 1024

Source = str | os.PathLike[str] | bytes


@dataclass(frozen=True)
class DecodeCost:
    """What decoding one image holds in memory at its peak, known from its header.

    `frame`: the pixels as Pillow stores them (by mode: 1, 2 or 4 bytes a pixel; a float or
    32-bit image counts 4, a 16-bit grey one 2). `decoder`: the codec's own buffer (a
    compressed TIFF strip or tile, WebP's RGBA canvases). `output`: the RGB result, reduced by
    `factor` (twice when it is turned upright). Conversions add at most a band of rows.
    """

    frame: int
    decoder: int
    output: int
    factor: int

    @property
    def total(self) -> int:
        return self.frame + self.decoder + self.output


@dataclass(frozen=True)
class DecodedImage:
    """A fully loaded RGB image, upright per its EXIF orientation, and what its EXIF says."""

    image: Image.Image
    width: int
    height: int
    format: str
    photo: PhotoInfo = PhotoInfo()


@dataclass(frozen=True)
class ImageHeader:
    """What the header says, without decoding pixels: width and height are upright."""

    format: str
    width: int
    height: int
    photo: PhotoInfo = PhotoInfo()


def decode_image(
    source: Source,
    *,
    max_pixels: int,
    name: str | None = None,
    min_side: int | None = None,
    max_bytes: int | None = None,
) -> DecodedImage:
    """Decode the first frame of `source` (a path, or the file's bytes) to upright RGB.

    With `min_side`, a JPEG may be decoded at a reduced scale (1/2, 1/4 or 1/8, done in the
    DCT by libjpeg) as long as both sides stay >= min_side: a 1024x768 photo headed for a
    224-px model decodes at 512x384, about 3x faster. Other frames over REDUCE_ABOVE_PIXELS
    are reduced the same way after decoding. `width`/`height` still report the full upright
    size.

    Raises `ImageError` for every failure. The effective pixel cap is the smaller of
    `max_pixels` and Pillow's own decompression-bomb limit (2 * Image.MAX_IMAGE_PIXELS),
    because Pillow refuses larger images while opening them and we leave its globals alone.
    `max_bytes` caps `DecodeCost.total`, checked before any pixel is decoded (too_large).
    """
    shown_as = _shown_as(source, name)
    data = _read_source(source, shown_as)
    declared = _check_declared(data, max_pixels, shown_as)
    with _pillow_warnings_silenced():
        opened = _open_allowed(data, shown_as)
        with opened:
            fmt = opened.format or "unknown"
            _check_pixels(opened.size, max_pixels, shown_as)
            stored = _stored_size(opened)
            header_orientation = _orientation(opened, header_only=True)
            if min_side and fmt in ("JPEG", "MPO"):
                opened.draft("RGB", (min_side, min_side))
            cost = decode_cost(
                opened,
                min_side=min_side,
                turned=header_orientation != 1,
                declared_pixels=declared,
                deep=declared > 0 and isobmff.bits_per_channel(data) > 8,
            )
            if max_bytes is not None and cost.total > max_bytes:
                raise ImageError("too_large", _over_budget(opened, cost, max_bytes), shown_as)
            try:
                opened.load()
                # Read orientation after load: a PNG may keep its eXIf chunk after the pixels.
                orientation = _orientation(opened)
                photo = photo_info(opened)
                rgb = _render_rgb(opened, cost.factor, orientation)
            except Exception as exc:  # Pillow raises almost anything on bad data
                raise _classify(exc, data, shown_as) from exc
            finally:
                # Leaving `with` frees nothing (Image.__exit__ only closes the file); the frame
                # must be gone before its memory can go back to the system.
                opened.close()
    if cost.total >= TRIM_ABOVE_BYTES:
        release_free_heap()
    width, height = stored
    # Recent Pillow turns a TIFF upright while loading it and drops its orientation tag, so the
    # header says how a TIFF stands; other formats may name their orientation only after load.
    if (header_orientation if fmt == "TIFF" else orientation) in _SWAPS_AXES:
        width, height = height, width
    return DecodedImage(image=rgb, width=width, height=height, format=fmt, photo=photo)


def decode_cost(
    image: ImageFile.ImageFile,
    *,
    min_side: int | None,
    turned: bool,
    declared_pixels: int = 0,
    deep: bool = False,
) -> DecodeCost:
    """The memory decoding `image` (opened, not loaded; after any draft) will take.

    `declared_pixels`: the largest picture a HEIF/AVIF file's boxes declare, which its codec
    decodes whole before cropping to `image.size`; `deep`: more than 8 bits per channel."""
    width, height = image.size
    factor = _reduction_factor(image.size, min_side)
    out_pixels = math.ceil(width / factor) * math.ceil(height / factor)
    return DecodeCost(
        frame=width * height * bytes_per_pixel(image.mode),
        decoder=_decoder_buffer_bytes(image, declared_pixels, deep),
        output=out_pixels * 4 * (2 if turned else 1),
        factor=factor,
    )


def bytes_per_pixel(mode: str) -> int:
    """How many bytes Pillow holds per pixel of `mode`."""
    if mode in _ONE_BYTE_MODES:
        return 1
    if mode.startswith("I;16"):
        return 2
    return 4


def _reduction_factor(size: tuple[int, int], min_side: int | None) -> int:
    width, height = size
    if not min_side or width * height <= REDUCE_ABOVE_PIXELS:
        return 1
    return max(1, min(width, height) // min_side)


def _decoder_buffer_bytes(image: ImageFile.ImageFile, declared_pixels: int, deep: bool) -> int:
    width, height = image.size
    per_pixel = _CODEC_BYTES_PER_PIXEL.get(image.format or "")
    if per_pixel is not None:
        # More than 8 bits a channel: the codec's planes hold two bytes a sample.
        return max(declared_pixels, width * height) * per_pixel * (2 if deep else 1)
    if image.format == "WEBP":
        # Measured: Pillow's WebP decoder holds three RGBA canvases beside the frame.
        return 3 * width * height * 4
    if image.format != "TIFF":
        return 0
    # Recent Pillow turns a TIFF with an orientation tag upright into a second frame.
    turning = width * height * bytes_per_pixel(image.mode) if _orientation(image) != 1 else 0
    if image.info.get("compression", "raw") != "raw":
        # libtiff decodes a whole strip (or tile) into a buffer of its own first; a TIFF
        # written as one strip doubles the decode.
        tags = getattr(image, "tag_v2", {})
        bits = tags.get(258, (8,))  # BitsPerSample, one per sample
        bits_per_pixel = sum(bits) if isinstance(bits, tuple) else int(bits)
        tile_width, tile_length = tags.get(322), tags.get(323)
        if isinstance(tile_width, int) and isinstance(tile_length, int):
            return turning + tile_length * math.ceil(tile_width * bits_per_pixel / 8)
        rows = tags.get(278, height)  # RowsPerStrip
        rows = min(rows, height) if isinstance(rows, int) and rows > 0 else height
        return turning + rows * math.ceil(width * bits_per_pixel / 8)
    return turning


def _over_budget(image: Image.Image, cost: DecodeCost, limit: int) -> str:
    width, height = image.size
    return (
        f"decoding {width}x{height} {image.mode} pixels takes about {cost.total} bytes, "
        f"more than the {limit} allowed"
    )


def read_header(
    source: Source, *, max_pixels: int, name: str | None = None
) -> tuple[str, int, int]:
    """Return (format, width, height) without decoding pixels; width and height are upright.

    Runs every check of `decode_image` except those that need the pixel data (truncation,
    a broken stream). Orientation stored after the pixels (rare, PNG only) is not seen.
    """
    header = read_image_header(source, max_pixels=max_pixels, name=name)
    return header.format, header.width, header.height


def read_image_header(source: Source, *, max_pixels: int, name: str | None = None) -> ImageHeader:
    """`read_header` and the EXIF facts (capture time, camera, position); no pixel decoded.

    EXIF stored after the pixels (a PNG's late eXIf chunk) is not seen. A HEIF or AVIF file
    cut short fails here as truncated: its codec cannot parse the header without its end.
    """
    shown_as = _shown_as(source, name)
    data = _read_source(source, shown_as)
    _check_declared(data, max_pixels, shown_as)
    with _pillow_warnings_silenced():
        opened = _open_allowed(data, shown_as)
        with opened:
            fmt = opened.format or "unknown"
            _check_pixels(opened.size, max_pixels, shown_as)
            width, height = _stored_size(opened)
            if _orientation(opened, header_only=True) in _SWAPS_AXES:
                width, height = height, width
            late_exif = fmt == "PNG" and "exif" not in opened.info
            photo = PhotoInfo() if late_exif else photo_info(opened)
    return ImageHeader(fmt, width, height, photo)


def _shown_as(source: Source, name: str | None) -> str | None:
    """How errors name the image: the caller's name for it, else its path (bytes: nothing)."""
    if name is not None:
        return name
    if isinstance(source, bytes):
        return None
    return os.fspath(source)


def _read_source(source: Source, shown_as: str | None) -> bytes:
    if isinstance(source, bytes):
        data = source
    else:
        data = _read_file(os.fspath(source), shown_as)
    if not data:
        raise ImageError("empty", "the file has zero bytes", shown_as)
    if len(data) > MAX_FILE_BYTES:
        raise ImageError("too_large", _too_many_bytes(len(data)), shown_as)
    return data


def _read_file(path: str, shown_as: str | None) -> bytes:
    # O_NONBLOCK keeps a FIFO in the corpus from hanging the open; fstat then turns away
    # anything that is not a regular file (directories, devices) before we read it.
    flags = os.O_RDONLY | getattr(os, "O_NONBLOCK", 0) | getattr(os, "O_BINARY", 0)
    try:
        fd = os.open(path, flags)
    except OSError as exc:
        raise ImageError(
            "unreadable", f"cannot open the file ({_os_reason(exc)})", shown_as
        ) from exc
    try:
        info = os.fstat(fd)
        if not stat.S_ISREG(info.st_mode):
            raise ImageError("unreadable", "not a regular file", shown_as)
        if info.st_size > MAX_FILE_BYTES:
            raise ImageError("too_large", _too_many_bytes(info.st_size), shown_as)
        with os.fdopen(fd, "rb", closefd=False) as stream:
            # One byte past the cap, so a file that grew after fstat is still caught.
            return stream.read(MAX_FILE_BYTES + 1)
    except OSError as exc:
        raise ImageError(
            "unreadable", f"cannot read the file ({_os_reason(exc)})", shown_as
        ) from exc
    finally:
        os.close(fd)


def _os_reason(exc: OSError) -> str:
    return exc.strerror or type(exc).__name__


def _too_many_bytes(size: int) -> str:
    return f"the file has {size} bytes, more than the {MAX_FILE_BYTES} allowed"


@contextmanager
def _pillow_warnings_silenced() -> Iterator[None]:
    # Pillow warns on corrupt EXIF, odd palettes and near-bomb sizes; those are normal input
    # here and must not reach stderr. The filters are narrow on purpose: catch_warnings is not
    # thread-safe before Python 3.14, and if concurrent decodes restore the filter list out of
    # order, the filter that outlives them hides only Pillow's warnings, nothing else.
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", category=Image.DecompressionBombWarning)
        warnings.filterwarnings("ignore", module=r"PIL(\.|$)")
        yield


def _allowed_openers() -> tuple[str, ...]:
    # MPO has no opener of its own (the JPEG opener returns MPO images), and naming a format
    # Pillow has no opener for makes Image.open raise KeyError on non-matching input.
    Image.init()
    return tuple(sorted(f for f in ALLOWED_FORMATS if f in Image.OPEN))


def _open_allowed(data: bytes, shown_as: str | None) -> ImageFile.ImageFile:
    """Identify `data` among the allowed formats only; no other plugin sees the bytes first."""
    try:
        return Image.open(io.BytesIO(data), formats=_allowed_openers())
    except UnidentifiedImageError:
        pass
    except Exception as exc:  # a plugin recognised the header, then failed
        raise _classify(exc, data, shown_as) from exc
    raise _unidentified(data, shown_as)


def _check_declared(data: bytes, max_pixels: int, shown_as: str | None) -> int:
    """For a HEIF or AVIF file: refuse it if any picture its boxes declare is over the pixel cap
    (Pillow's limit included, which these codecs do not apply to what they decode before
    cropping). Returns the largest declared pixel count (0: not such a file, or none)."""
    sizes = isobmff.declared_sizes(data)
    if not sizes:
        return 0
    cap = max_pixels
    if Image.MAX_IMAGE_PIXELS:
        cap = min(cap, 2 * Image.MAX_IMAGE_PIXELS)
    for size in sizes:
        _check_pixels(size, cap, shown_as)
    return max(width * height for width, height in sizes)


def _unidentified(data: bytes, shown_as: str | None) -> ImageError:
    """Tell an unsupported image format from bytes that are no image at all."""
    if isobmff.is_short(data):
        # libheif and libavif cannot even identify a HEIF/AVIF file that is cut short.
        return ImageError("truncated", "the data ends before the image does", shown_as)
    family = isobmff.brand(data)
    if family == "AVIF" and not features.check("avif"):
        return ImageError(
            "unsupported_format",
            "AVIF images need Pillow built with libavif (Pillow's own wheels, 11.3 or later)",
            shown_as,
        )
    if family is not None:
        return ImageError("decode_failed", f"the {family} header could not be parsed", shown_as)
    others = tuple(f for f in Image.ID if f not in ALLOWED_FORMATS)
    try:
        # Header parsing only; the pixels of an unsupported format are never decoded.
        with Image.open(io.BytesIO(data), formats=others) as other:
            found = other.format
    except Exception:  # any failure here just means "not an image"
        return ImageError("not_an_image", "the data is not a picture in any known format", shown_as)
    allowed = ", ".join(sorted(ALLOWED_FORMATS))
    return ImageError(
        "unsupported_format", f"{found} images are not supported (allowed: {allowed})", shown_as
    )


def _check_pixels(size: tuple[int, int], max_pixels: int, shown_as: str | None) -> None:
    width, height = size
    if width <= 0 or height <= 0:
        raise ImageError(
            "decode_failed", f"the image declares no pixels ({width}x{height})", shown_as
        )
    if width * height > max_pixels:
        raise ImageError(
            "too_large",
            f"{width}x{height} is {width * height} pixels, more than the {max_pixels} allowed",
            shown_as,
        )


def _classify(exc: BaseException, data: bytes, shown_as: str | None) -> ImageError:
    """Map whatever Pillow raised to the reason that best explains it."""
    if isinstance(exc, ImageError):
        return exc
    if isinstance(exc, Image.DecompressionBombError):
        return ImageError(
            "too_large",
            "its header declares more pixels than the decompression-bomb limit allows",
            shown_as,
        )
    message = str(exc)
    if isinstance(exc, MemoryError) or (isinstance(exc, OSError) and "out of memory" in message):
        return ImageError("too_large", "not enough memory to decode the image", shown_as)
    if (
        isinstance(exc, EOFError)
        or (isinstance(exc, OSError) and _says_truncated(message))
        or _riff_is_short(data)
        or isobmff.is_short(data)
    ):
        return ImageError("truncated", "the data ends before the image does", shown_as)
    if isinstance(exc, ValueError) and "too large" in message.lower():
        # PNG text chunks that decompress past Pillow's limit land here.
        return ImageError("too_large", _short(message), shown_as)
    return ImageError("decode_failed", _short(f"{type(exc).__name__}: {message}"), shown_as)


def _says_truncated(message: str) -> bool:
    # "broken data stream" is Pillow's codec status for a stream that stops making sense
    # (a zlib or Huffman error); a cut-off or overwritten tail is its usual cause.
    lowered = message.lower()
    return "truncated" in lowered or "broken data stream" in lowered


def _riff_is_short(data: bytes) -> bool:
    # libwebp only says "could not create decoder object" about a cut-off file, but the RIFF
    # header states the full length, so a short file gives itself away.
    if len(data) < 12 or data[:4] != b"RIFF" or data[8:12] != b"WEBP":
        return False
    return int.from_bytes(data[4:8], "little") + 8 > len(data)


def _short(text: str, limit: int = 160) -> str:
    text = " ".join(text.split())
    return text if len(text) <= limit else text[: limit - 3] + "..."


def _orientation(image: Image.Image, *, header_only: bool = False) -> int:
    """The EXIF orientation (1 = upright); unreadable EXIF counts as upright."""
    if header_only and image.format == "PNG" and "exif" not in image.info:
        # PngImageFile.getexif() loads the pixels to look for a late eXIf chunk.
        return 1
    try:
        value = image.getexif().get(_EXIF_ORIENTATION_TAG, 1)
    except Exception:  # broken EXIF must not cost an otherwise good picture
        return 1
    return value if isinstance(value, int) else 1


def _stored_size(image: ImageFile.ImageFile) -> tuple[int, int]:
    """Width and height as stored, before any orientation."""
    if image.format == "TIFF":
        # Recent Pillow reports a TIFF's size already turned upright (and turns the pixels on
        # load), older Pillow does not; the raw tags are the same in both.
        tags = getattr(image, "tag_v2", {})
        width, height = tags.get(256), tags.get(257)  # ImageWidth, ImageLength
        if isinstance(width, int) and isinstance(height, int):
            return width, height
    return image.size


def _upright(image: Image.Image, orientation: int) -> Image.Image:
    # ImageOps.exif_transpose does the same, but it also re-serialises the EXIF block, which
    # can fail on corrupt EXIF; we need only the pixels, and read_header must agree with us.
    method = _ORIENTATION_TRANSPOSE.get(orientation)
    return image if method is None else image.transpose(method)


def _render_rgb(frame: Image.Image, factor: int, orientation: int) -> Image.Image:
    """The loaded frame as upright RGB, reduced by `factor`, converted a band of rows at a
    time: a float or 16-bit frame never gets whole-frame temporaries beside it."""
    if factor == 1 and frame.mode == "RGB" and "transparency" not in frame.info:
        upright = _upright(frame, orientation)
        # The opened image is closed on leaving decode_image; return an independent copy.
        return upright.copy() if upright is frame else upright
    grey = _grey_map(frame) if frame.mode in _WIDE_GREY_MODES else None
    width, height = frame.size
    out = Image.new("RGB", (math.ceil(width / factor), math.ceil(height / factor)))
    rows = _band_rows(width, factor)
    for top in range(0, height, rows):
        band = frame.crop((0, top, width, min(height, top + rows)))
        if grey is not None:
            band = _apply_grey(band, grey)
        if factor > 1:
            band = _reducible(band).reduce(factor)
        out.paste(_to_rgb(band), (0, top // factor))
    return _upright(out, orientation)


def _band_rows(width: int, factor: int) -> int:
    """Rows per band: about BAND_BYTES of 4-byte pixels, a whole multiple of `factor`, so
    reducing band by band gives exactly what reducing the whole frame would."""
    rows = max(1, BAND_BYTES // (width * 4))
    return max(factor, rows - rows % factor)


def _bands(frame: Image.Image) -> Iterator[Image.Image]:
    width, height = frame.size
    rows = _band_rows(width, 1)
    for top in range(0, height, rows):
        yield frame.crop((0, top, width, min(height, top + rows)))


def _reducible(band: Image.Image) -> Image.Image:
    """`band` in a mode whose pixels Image.reduce may average (not palette indices or bits)."""
    if band.mode in ("P", "PA"):
        has_alpha = band.mode == "PA" or "transparency" in band.info
        return band.convert("RGBA" if has_alpha else "RGB")
    if "transparency" in band.info:  # one colour is transparent: average it as alpha
        return band.convert("RGBA")
    if band.mode == "1":
        return band.convert("L")
    return band


def _to_rgb(image: Image.Image) -> Image.Image:
    if image.mode in _ALPHA_MODES or "transparency" in image.info:
        # Transparent pixels often hold black; show them on white, as a viewer would.
        rgba = image.convert("RGBA")
        background = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
        background.alpha_composite(rgba)
        return background.convert("RGB")
    if image.mode == "RGB":
        return image
    return image.convert("RGB")


GreyMap = Callable[[np.ndarray], np.ndarray]


def _grey_map(frame: Image.Image) -> GreyMap:
    """How the values of a 16-bit, 32-bit or float grey frame become 0..255, decided from all
    of its pixels (read a band at a time)."""
    # Pillow's convert("L") clips 16-bit values at 255, which turns most of a 16-bit image
    # white; scale by the value range instead.
    if frame.mode.startswith("I;16"):
        return lambda values: values.astype(np.float32) / 257.0
    is_float = frame.mode == "F"
    lows, highs = [], []
    for band in _bands(frame):
        values = _finite(np.asarray(band)) if is_float else np.asarray(band)
        lows.append(values.min())
        highs.append(values.max())
    if is_float:
        low, high = float(min(lows)), float(max(highs))
        if low >= 0.0 and high <= 1.0:
            return lambda values: _finite(values) * 255.0
        return lambda values: _stretch(_finite(values), low, high)
    # 32-bit integers: use the smallest usual depth that holds the values; anything
    # wider or negative (depth maps, scientific data) is stretched to its own range.
    int_low, int_high = int(min(lows)), int(max(highs))
    if int_low >= 0 and int_high <= 255:
        return lambda values: values.astype(np.float32)
    if int_low >= 0 and int_high <= 65535:
        return lambda values: values.astype(np.float32) / 257.0
    return lambda values: _stretch(values.astype(np.float64), int_low, int_high)


def _finite(values: np.ndarray) -> np.ndarray:
    return np.nan_to_num(values.astype(np.float32), nan=0.0, posinf=0.0, neginf=0.0)


def _apply_grey(band: Image.Image, grey: GreyMap) -> Image.Image:
    scaled = grey(np.asarray(band))
    return Image.fromarray(np.clip(np.rint(scaled), 0, 255).astype(np.uint8))


def _stretch(values: np.ndarray, low: float, high: float) -> np.ndarray:
    if high <= low:
        return np.zeros_like(values, dtype=np.float32)
    return ((values - low) * (255.0 / (high - low))).astype(np.float32)
