"""retrieval.images: every reason code, every allowed format, and hostile bytes."""

from __future__ import annotations

import io
import random
import struct
import warnings
import zlib
from pathlib import Path

import numpy as np
import pytest
from PIL import Image, ImageFile

from retrieval import images, isobmff
from retrieval.errors import ImageError
from retrieval.images import (
    ALLOWED_FORMATS,
    IMAGE_EXTENSIONS,
    DecodedImage,
    decode_image,
    read_header,
)
from tests.fixtures.bad_images import (
    DEFAULT_MAX_PIXELS,
    png_declaring,
    png_with_idat,
    write_bad_images,
    write_good_images,
)

CAP = DEFAULT_MAX_PIXELS


def encode(image: Image.Image, fmt: str, **options: object) -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, fmt, **options)
    return buffer.getvalue()


def noisy(width: int = 64, height: int = 48, seed: int = 0) -> Image.Image:
    return Image.frombytes(
        "RGB", (width, height), random.Random(seed).randbytes(width * height * 3)
    )


def decode(data: bytes) -> DecodedImage:
    return decode_image(data, max_pixels=CAP)


@pytest.fixture(scope="module")
def bad_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tmp_path_factory.mktemp("bad")


@pytest.fixture(scope="module")
def bad_reasons(bad_dir: Path) -> dict[str, str]:
    return write_bad_images(bad_dir)


def test_bad_images_cover_every_reason_a_file_can_have(bad_reasons: dict[str, str]) -> None:
    # "unreadable" and "decode_failed" need no fixture file: see the tests below.
    assert set(bad_reasons.values()) == {
        "empty",
        "truncated",
        "not_an_image",
        "too_large",
        "unsupported_format",
    }


def test_each_bad_file_fails_with_its_reason(bad_dir: Path, bad_reasons: dict[str, str]) -> None:
    for name, reason in bad_reasons.items():
        path = bad_dir / name
        with pytest.raises(ImageError) as caught:
            decode_image(path, max_pixels=CAP)
        assert (name, caught.value.reason) == (name, reason)
        assert caught.value.path == str(path)
        assert caught.value.detail


def test_read_header_fails_like_decode_except_for_truncation(
    bad_dir: Path, bad_reasons: dict[str, str]
) -> None:
    for name, reason in bad_reasons.items():
        if reason == "truncated":
            continue
        with pytest.raises(ImageError) as caught:
            read_header(bad_dir / name, max_pixels=CAP)
        assert (name, caught.value.reason) == (name, reason)
    # A JPEG cut in its pixel data still has a complete header.
    assert read_header(bad_dir / "truncated.jpg", max_pixels=CAP) == ("JPEG", 64, 48)


def test_bytes_source_reports_the_given_name(bad_dir: Path) -> None:
    with pytest.raises(ImageError) as caught:
        decode_image((bad_dir / "notes.png").read_bytes(), max_pixels=CAP, name="upload.png")
    assert caught.value.reason == "not_an_image"
    assert caught.value.path == "upload.png"
    with pytest.raises(ImageError) as caught:
        decode_image(b"", max_pixels=CAP)
    assert (caught.value.reason, caught.value.path) == ("empty", None)


def test_header_bomb_is_refused_by_read_header(bad_dir: Path) -> None:
    with pytest.raises(ImageError) as caught:
        read_header(bad_dir / "bomb.png", max_pixels=CAP)
    assert caught.value.reason == "too_large"


def test_pillow_bomb_limit_applies_even_under_a_higher_cap() -> None:
    # We never raise Pillow's global limit, so it caps max_pixels from above.
    with pytest.raises(ImageError) as caught:
        read_header(png_declaring(30_000, 30_000), max_pixels=10**12)
    assert caught.value.reason == "too_large"


def test_own_cap_is_checked_before_pixels(bad_dir: Path) -> None:
    # bomb_1bit.png lies under Pillow's hard limit, so only our cap can stop it; below its
    # size, decoding goes ahead and the real pixel data decodes.
    bomb = (bad_dir / "bomb_1bit.png").read_bytes()
    with pytest.raises(ImageError) as caught:
        decode_image(bomb, max_pixels=11_000 * 10_000 - 1)
    assert caught.value.reason == "too_large"
    assert read_header(bomb, max_pixels=11_000 * 10_000) == ("PNG", 11_000, 10_000)


def test_small_cap_refuses_an_ordinary_image() -> None:
    data = encode(noisy(), "PNG")
    for call in (decode_image, read_header):
        with pytest.raises(ImageError) as caught:
            call(data, max_pixels=64 * 48 - 1)
        assert caught.value.reason == "too_large"
    assert read_header(data, max_pixels=64 * 48) == ("PNG", 64, 48)


def test_directory_and_missing_file_are_unreadable(tmp_path: Path) -> None:
    directory = tmp_path / "album.jpg"
    directory.mkdir()
    for path in (directory, tmp_path / "missing.jpg"):
        with pytest.raises(ImageError) as caught:
            decode_image(path, max_pixels=CAP)
        assert caught.value.reason == "unreadable"
        assert caught.value.path == str(path)


def test_file_over_the_byte_cap_is_too_large(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    path = tmp_path / "big.png"
    path.write_bytes(encode(noisy(), "PNG"))
    monkeypatch.setattr(images, "MAX_FILE_BYTES", 1000)
    for source in (path, path.read_bytes()):
        with pytest.raises(ImageError) as caught:
            decode_image(source, max_pixels=CAP)
        assert caught.value.reason == "too_large"


def test_image_declaring_no_pixels_fails_to_decode() -> None:
    with pytest.raises(ImageError) as caught:
        decode(png_declaring(0, 10))
    # Pillow itself may refuse the header first; either way it is one of ours.
    assert caught.value.reason in {"decode_failed", "not_an_image"}


def _rgb_png(idat: bytes) -> bytes:
    return png_with_idat(struct.pack(">IIBBBBB", 16, 16, 8, 2, 0, 0, 0), idat)


def test_undecodable_pixel_data_is_decode_failed() -> None:
    # Filter type 9 does not exist: the stream is complete but means nothing.
    rows = b"".join(b"\x09" + bytes(48) for _ in range(16))
    with pytest.raises(ImageError) as caught:
        decode(_rgb_png(zlib.compress(rows)))
    assert caught.value.reason == "decode_failed"


def test_broken_compressed_stream_counts_as_truncated() -> None:
    with pytest.raises(ImageError) as caught:
        decode(_rgb_png(b"\x78\x9c" + b"\xff" * 40))
    assert caught.value.reason == "truncated"


def test_good_images_decode_to_rgb_of_the_right_size(tmp_path: Path) -> None:
    paths = write_good_images(tmp_path, 12, seed=3)
    seen = set()
    for path in paths:
        with Image.open(path) as reference:
            expected = (reference.format, *reference.size)
        decoded = decode_image(path, max_pixels=CAP)
        assert decoded.image.mode == "RGB"
        assert (decoded.format, decoded.width, decoded.height) == expected
        assert decoded.image.size == (decoded.width, decoded.height)
        assert read_header(path, max_pixels=CAP) == expected
        assert decode_image(path.read_bytes(), max_pixels=CAP).image.tobytes() == (
            decoded.image.tobytes()
        )
        seen.add(decoded.format)
    assert seen == ALLOWED_FORMATS - {"MPO"}


def test_mpo_decodes_its_first_picture() -> None:
    first, second = Image.new("RGB", (32, 24), (230, 20, 20)), Image.new("RGB", (32, 24), "blue")
    decoded = decode(encode(first, "MPO", save_all=True, append_images=[second]))
    assert (decoded.format, decoded.width, decoded.height) == ("MPO", 32, 24)
    red, green, blue = decoded.image.getpixel((16, 12))  # type: ignore[misc]
    assert red > 200 and green < 60 and blue < 60


@pytest.mark.parametrize("fmt", ["GIF", "WEBP", "TIFF"])
def test_multi_frame_images_give_their_first_frame(fmt: str) -> None:
    frames = [Image.new("RGB", (20, 10), colour) for colour in ((255, 0, 0), (0, 0, 255))]
    options: dict[str, object] = {"save_all": True, "append_images": frames[1:]}
    if fmt == "WEBP":
        options["lossless"] = True
    decoded = decode(encode(frames[0], fmt, **options))
    assert (decoded.width, decoded.height) == (20, 10)
    assert decoded.image.getpixel((5, 5)) == (255, 0, 0)


# HEIF and AVIF turn pictures with an irot box (their spec ignores EXIF orientation). Given the
# EXIF as bytes, pillow-heif writes one, as phones do, and turns the pixels itself when
# decoding (its EXIF then says 1); Pillow's AVIF plugin reads irot back as EXIF orientation.
@pytest.mark.parametrize("fmt", ["JPEG", "PNG", "WEBP", "TIFF", "HEIF", "AVIF"])
def test_exif_orientation_6_swaps_width_and_height(fmt: str) -> None:
    picture = Image.new("RGB", (40, 20), (0, 0, 255))
    picture.paste((255, 0, 0), (0, 0, 20, 20))  # left half red
    exif = Image.Exif()
    exif[0x0112] = 6  # stored rotated; shown after turning 90 degrees clockwise
    data = encode(picture, fmt, exif=exif.tobytes())
    decoded = decode(data)
    assert (decoded.width, decoded.height) == (20, 40)
    assert read_header(data, max_pixels=CAP) == (fmt, 20, 40)
    # Turning clockwise brings the stored left half to the top.
    top, bottom = decoded.image.getpixel((10, 5)), decoded.image.getpixel((10, 35))
    assert top[0] > 200 and top[2] < 60  # type: ignore[index]
    assert bottom[2] > 200 and bottom[0] < 60  # type: ignore[index]


def test_corrupt_exif_keeps_the_picture() -> None:
    data = encode(noisy(), "JPEG", exif=b"Exif\x00\x00II*\x00\xff\xff\xff\x7f")
    decoded = decode(data)
    assert (decoded.width, decoded.height) == (64, 48)


def test_transparent_pixels_become_white() -> None:
    rgba = Image.new("RGBA", (8, 8), (0, 0, 0, 0))
    rgba.putpixel((1, 1), (255, 0, 0, 255))
    rgba.putpixel((2, 2), (0, 0, 0, 128))
    decoded = decode(encode(rgba, "PNG")).image
    assert decoded.getpixel((0, 0)) == (255, 255, 255)
    assert decoded.getpixel((1, 1)) == (255, 0, 0)
    assert 120 <= decoded.getpixel((2, 2))[0] <= 135  # type: ignore[index]


@pytest.mark.parametrize(
    ("mode", "fmt", "options"),
    [
        ("P", "GIF", {"transparency": 0}),
        ("P", "PNG", {"transparency": 0}),
        ("LA", "PNG", {}),
        ("L", "PNG", {"transparency": 0}),
    ],
)
def test_other_transparency_kinds_become_white(
    mode: str, fmt: str, options: dict[str, object]
) -> None:
    picture = Image.new(mode, (4, 4), 0)
    if mode == "P":
        picture.putpalette([0, 0, 0] * 256)
    decoded = decode(encode(picture, fmt, **options)).image
    assert decoded.getpixel((0, 0)) == (255, 255, 255)


@pytest.mark.parametrize("fmt", ["PNG", "TIFF"])
def test_16_bit_grey_scales_to_8_bit(fmt: str) -> None:
    ramp = np.linspace(0, 65535, 64 * 32).astype(np.uint16).reshape(32, 64)
    picture = Image.fromarray(ramp)
    assert picture.mode.startswith("I;16")
    decoded = np.asarray(decode(encode(picture, fmt)).image)
    grey = decoded[:, :, 0]
    assert grey.min() == 0 and grey.max() == 255
    # Pillow's own convert("L") would clip: nearly every pixel would be 255.
    assert abs(float(grey.mean()) - 127.5) < 2


def test_32_bit_grey_is_stretched_to_8_bit() -> None:
    ramp = np.linspace(-(2**20), 2**24, 64 * 32).astype(np.int32).reshape(32, 64)
    decoded = np.asarray(decode(encode(Image.fromarray(ramp), "TIFF")).image)
    assert decoded.min() == 0 and decoded.max() == 255


@pytest.mark.parametrize("mode", ["CMYK", "L", "1"])
def test_plain_modes_convert_to_rgb(mode: str) -> None:
    picture = Image.new(mode, (10, 6), 0)
    decoded = decode(encode(picture, "TIFF" if mode == "1" else "JPEG"))
    assert decoded.image.mode == "RGB"
    assert (decoded.width, decoded.height) == (10, 6)


def test_mislabelled_png_reports_its_real_format(tmp_path: Path) -> None:
    path = tmp_path / "holiday.jpg"
    path.write_bytes(encode(noisy(), "PNG"))
    assert decode_image(path, max_pixels=CAP).format == "PNG"
    assert read_header(path, max_pixels=CAP) == ("PNG", 64, 48)


def test_decoded_image_outlives_the_source(tmp_path: Path) -> None:
    path = tmp_path / "x.jpg"
    path.write_bytes(encode(noisy(), "JPEG"))
    decoded = decode_image(path, max_pixels=CAP)
    path.unlink()
    assert decoded.image.resize((8, 8)).size == (8, 8)


def test_pillow_globals_untouched_and_no_warning_escapes(bad_dir: Path) -> None:
    limit, truncated = Image.MAX_IMAGE_PIXELS, ImageFile.LOAD_TRUNCATED_IMAGES
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        # Over Pillow's warning threshold, under its hard limit: Pillow warns at open.
        with pytest.raises(ImageError):
            decode_image(bad_dir / "bomb_1bit.png", max_pixels=CAP)
        decode(encode(noisy(), "JPEG", exif=b"Exif\x00\x00II*\x00\xff\xff\xff\x7f"))
    assert [str(w.message) for w in caught] == []
    assert (Image.MAX_IMAGE_PIXELS, ImageFile.LOAD_TRUNCATED_IMAGES) == (limit, truncated)


def test_extension_list() -> None:
    assert {".jpg", ".jpeg", ".jpe", ".png", ".webp", ".gif", ".bmp", ".tif", ".tiff"} | {
        ".heic",
        ".heif",
        ".hif",
        ".avif",
    } == set(IMAGE_EXTENSIONS)
    assert all(ext == ext.lower() for ext in IMAGE_EXTENSIONS)


def mutations(data: bytes, rng: random.Random, count: int) -> list[bytes]:
    variants = []
    for _ in range(count):
        mutated = bytearray(data)
        kind = rng.random()
        if kind < 0.6 or len(mutated) < 4:
            for _ in range(rng.randint(1, 12)):
                mutated[rng.randrange(len(mutated))] = rng.randrange(256)
        if kind >= 0.4:
            del mutated[rng.randint(1, len(mutated) - 1) :]
        variants.append(bytes(mutated))
    return variants


@pytest.mark.parametrize("fmt", ["JPEG", "PNG", "HEIF", "AVIF"])
def test_fuzzed_bytes_only_ever_raise_image_error(fmt: str) -> None:
    rng = random.Random(f"fuzz-{fmt}")
    original = encode(noisy(48, 32, seed=5), fmt)
    reasons: set[str] = set()
    for variant in mutations(original, rng, 200):
        for call in (decode_image, read_header):
            try:
                call(variant, max_pixels=CAP)
            except ImageError as error:
                reasons.add(error.reason)
    # The mutations must actually hit the error paths for the loop to mean anything.
    assert reasons and reasons <= {
        "truncated",
        "not_an_image",
        "unsupported_format",
        "too_large",
        "decode_failed",
    }


def test_jpeg_draft_decodes_smaller_but_reports_full_size(tmp_path: Path) -> None:
    path = tmp_path / "big.jpg"
    Image.effect_noise((1024, 768), 40).convert("RGB").save(path, "JPEG")
    full = decode_image(path, max_pixels=DEFAULT_MAX_PIXELS)
    drafted = decode_image(path, max_pixels=DEFAULT_MAX_PIXELS, min_side=224)
    assert full.image.size == (1024, 768)
    assert drafted.image.size == (512, 384)  # the largest DCT reduction keeping both sides >= 224
    assert (drafted.width, drafted.height) == (1024, 768)
    # PNGs have no DCT scaling: min_side changes nothing
    png = tmp_path / "big.png"
    Image.effect_noise((300, 300), 40).convert("RGB").save(png)
    assert decode_image(png, max_pixels=DEFAULT_MAX_PIXELS, min_side=64).image.size == (300, 300)


# --- the decode budget, reduction of large frames, banded conversion ----------------------


def _declared_png(width: int, height: int, bit_depth: int, colour_type: int) -> bytes:
    """A PNG whose header declares width x height but whose data stream breaks off."""
    ihdr = struct.pack(">IIBBBBB", width, height, bit_depth, colour_type, 0, 0, 0)
    return png_with_idat(ihdr, zlib.compress(b"\x00" * (1 + width * 8) * 4)[:-6])


def _cost(data: bytes, min_side: int | None = None) -> images.DecodeCost:
    with Image.open(io.BytesIO(data)) as opened:
        return images.decode_cost(opened, min_side=min_side, turned=False)


def test_decode_cost_counts_the_mode_not_only_pixels() -> None:
    grey = _cost(_declared_png(1000, 1000, 8, 0))
    grey16 = _cost(_declared_png(1000, 1000, 16, 0))
    rgba = _cost(_declared_png(1000, 1000, 8, 6))
    assert (grey.frame, grey16.frame, rgba.frame) == (1_000_000, 2_000_000, 4_000_000)
    assert grey.output == rgba.output == 4_000_000  # the RGB result, not reduced
    ramp = np.linspace(0, 1, 100 * 100, dtype=np.float32).reshape(100, 100)
    one_strip = encode(
        Image.fromarray(ramp, "F"), "TIFF", compression="tiff_adobe_deflate", tiffinfo={278: 100}
    )
    tiff = _cost(one_strip)
    assert tiff.frame == 40_000 and tiff.decoder == 40_000  # libtiff's strip buffer
    webp = _cost(encode(noisy(100, 100), "WEBP", lossless=True))
    assert webp.decoder == 3 * webp.frame


def test_over_budget_upload_is_refused_before_decoding() -> None:
    # Only one row of data: decoding it would fail as truncated, so too_large proves the
    # budget was checked from the header first.
    data = _declared_png(4000, 4000, 16, 0)
    cost = _cost(data)
    with pytest.raises(ImageError) as caught:
        decode_image(data, max_pixels=CAP, max_bytes=cost.total - 1)
    assert caught.value.reason == "too_large"
    assert str(cost.total) in caught.value.detail
    with pytest.raises(ImageError) as caught:
        decode_image(data, max_pixels=CAP, max_bytes=cost.total)
    assert caught.value.reason == "truncated"


def test_same_pixels_in_a_wider_mode_cost_more() -> None:
    grey = encode(Image.new("L", (300, 200), 9), "PNG")
    floats = encode(Image.new("F", (300, 200), 0.5), "TIFF")
    budget = _cost(grey).total
    assert decode_image(grey, max_pixels=CAP, max_bytes=budget).image.size == (300, 200)
    with pytest.raises(ImageError) as caught:
        decode_image(floats, max_pixels=CAP, max_bytes=budget)
    assert caught.value.reason == "too_large"


def test_large_frames_are_reduced_like_the_whole_frame_would_be() -> None:
    ramp = (np.arange(2100 * 2000, dtype=np.uint32) * 7919 % 251).astype(np.uint8)
    picture = Image.fromarray(ramp.reshape(2000, 2100))
    data = encode(picture, "PNG", compress_level=1)
    decoded = decode_image(data, max_pixels=CAP, min_side=64)
    assert _cost(data, min_side=64).factor == 2000 // 64
    assert (decoded.width, decoded.height) == (2100, 2000)
    expected = picture.reduce(2000 // 64).convert("RGB")
    assert decoded.image.size == expected.size == (68, 65)
    assert decoded.image.tobytes() == expected.tobytes()  # bands stitched without seams
    # Below REDUCE_ABOVE_PIXELS nothing is reduced (the indexer's vectors stay as they were).
    small = encode(picture.crop((0, 0, 1000, 1000)), "PNG")
    assert decode_image(small, max_pixels=CAP, min_side=64).image.size == (1000, 1000)


def test_float_frames_converted_in_bands_are_stretched_over_the_whole_frame(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setattr(images, "BAND_BYTES", 64 * 4 * 3)  # three rows a band
    values = np.linspace(-5.0, 20.0, 64 * 48, dtype=np.float32).reshape(48, 64)
    values[10, 10] = np.nan
    decoded = np.asarray(decode(encode(Image.fromarray(values, "F"), "TIFF")).image)[:, :, 0]
    finite = np.nan_to_num(values, nan=0.0)
    expected = np.clip(np.rint((finite + 5.0) * (255.0 / 25.0)), 0, 255).astype(np.uint8)
    assert np.array_equal(decoded, expected)


def test_large_palette_frames_reduce_their_colours_not_their_indices() -> None:
    picture = Image.new("P", (2400, 2000), 1)
    picture.putpalette([0, 0, 0, 250, 10, 10] + [0, 0, 0] * 254)
    decoded = decode_image(encode(picture, "PNG"), max_pixels=CAP, min_side=100)
    assert decoded.image.size == (120, 100)
    assert decoded.image.getpixel((5, 5)) == (250, 10, 10)


# --- HEIC/HEIF (pillow-heif) and AVIF (Pillow's plugin) -------------------------------------


@pytest.mark.parametrize(("fmt", "suffix"), [("HEIF", ".heic"), ("AVIF", ".avif")])
def test_heif_and_avif_decode_and_pass_for_their_real_format_under_any_name(
    tmp_path: Path, fmt: str, suffix: str
) -> None:
    data = encode(noisy(80, 60), fmt, quality=90)
    for name in (f"photo{suffix}", f"photo{suffix.upper()}", "holiday.jpg", "scan.png"):
        path = tmp_path / name
        path.write_bytes(data)
        decoded = decode_image(path, max_pixels=CAP)
        assert (decoded.format, decoded.width, decoded.height) == (fmt, 80, 60)
        assert decoded.image.mode == "RGB" and decoded.image.size == (80, 60)
        assert read_header(path, max_pixels=CAP) == (fmt, 80, 60)
    # Lossy, but the picture survives: compare with the original pixel by pixel.
    original = np.asarray(noisy(80, 60), dtype=np.float32)
    assert np.abs(np.asarray(decoded.image, dtype=np.float32) - original).mean() < 60


@pytest.mark.parametrize("fmt", ["HEIF", "AVIF"])
def test_heif_and_avif_header_bombs_are_refused_before_any_decode(fmt: str) -> None:
    from tests.fixtures.bad_images import isobmff_declaring

    # 80x60 coded pictures whose boxes declare 12000x10000: over the default cap, under
    # Pillow's limit, and pillow-heif reports the cropped size, not this one.
    bomb = isobmff_declaring(encode(noisy(80, 60), fmt), 12_000, 10_000)
    for call in (decode_image, read_header):
        with pytest.raises(ImageError) as caught:
            call(bomb, max_pixels=CAP)
        assert (caught.value.reason, caught.value.detail) == (
            "too_large",
            "12000x10000 is 120000000 pixels, more than the 100000000 allowed",
        )
    # Pillow's own limit caps a higher max_pixels, as for every other format.
    huge = isobmff_declaring(encode(noisy(80, 60), fmt), 30_000, 30_000)
    with pytest.raises(ImageError) as caught:
        read_header(huge, max_pixels=10**12)
    limit = 2 * (Image.MAX_IMAGE_PIXELS or 0)
    assert caught.value.detail == f"30000x30000 is 900000000 pixels, more than the {limit} allowed"


@pytest.mark.parametrize("fmt", ["HEIF", "AVIF"])
def test_heif_and_avif_cut_short_are_truncated(fmt: str) -> None:
    data = encode(noisy(), fmt)
    for cut in (len(data) // 2, len(data) - 10, 40):
        with pytest.raises(ImageError) as caught:
            decode(data[:cut])
        assert (caught.value.reason, caught.value.detail) == (
            "truncated",
            "the data ends before the image does",
        )


@pytest.mark.parametrize(("fmt", "per_pixel"), [("HEIF", 5), ("AVIF", 6)])
def test_heif_and_avif_budget_counts_the_codec_buffers(fmt: str, per_pixel: int) -> None:
    data = encode(noisy(80, 60), fmt)
    # What the codec decodes before any crop: HEVC codes whole 8x8 blocks, so 80x64.
    declared = max(width * height for width, height in isobmff.declared_sizes(data))
    assert declared == (80 * 64 if fmt == "HEIF" else 80 * 60)
    with Image.open(io.BytesIO(data)) as opened:
        cost = images.decode_cost(opened, min_side=None, turned=False, declared_pixels=declared)
    assert cost.decoder == declared * per_pixel
    with pytest.raises(ImageError) as caught:
        decode_image(data, max_pixels=CAP, max_bytes=cost.total - 1)
    assert caught.value.reason == "too_large"
    assert decode_image(data, max_pixels=CAP, max_bytes=cost.total).width == 80


def test_avif_without_libavif_says_what_is_missing(monkeypatch: pytest.MonkeyPatch) -> None:
    data = encode(noisy(), "AVIF")
    monkeypatch.setattr(images.features, "check", lambda feature: feature != "avif")
    monkeypatch.setattr(
        images, "_allowed_openers", lambda: tuple(f for f in ("JPEG", "PNG") if f in Image.OPEN)
    )
    with pytest.raises(ImageError) as caught:
        decode(data)
    assert (caught.value.reason, caught.value.detail) == (
        "unsupported_format",
        "AVIF images need Pillow built with libavif (Pillow's own wheels, 11.3 or later)",
    )
