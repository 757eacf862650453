"""Tests of ``mm15.image``: safe decoding of awkward files, and the exactness of the tile processor.

The first part builds a corpus of malformed and unusual image files in ``tmp_path`` (with PIL, numpy
and raw bytes) and checks that ``load_image`` gives each its documented result: an upright RGB image
converted by the documented rules, or an ``ImageError`` subclass that names the source, never an
unrelated exception. Real images (the SeeClick screenshot fixture, scikit-image's ``page.png`` and
matplotlib's ``grace_hopper.jpg``) are decoded too.

The second part recomputes the ``ImageProcessor`` output independently from the plan (resize, paste
at the top-left of a canvas of ``pad_color``, float64 normalisation, tiles cut one by one at each
tile's offsets, the overview on its own r x r canvas) for several real and synthetic images and plan
configs. With the processor's documented resizer (torch's antialiased bicubic) the output must match
to 1e-5; with PIL's BICUBIC it must match to 2 levels on these images, with identical padding.
"""

from __future__ import annotations

import gc
import io
import os
import struct
import time
import warnings
import zlib
from collections.abc import Callable
from pathlib import Path
from typing import NamedTuple

import matplotlib
import numpy as np
import pytest
import skimage.data
import torch
import torch.nn.functional as F
from PIL import Image, ImageFile, features

from mm15.geometry import ImagePlanConfig, TilePlan, plan_image
from mm15.image import (
    ALPHA_BACKGROUND,
    CLIP_MEAN,
    CLIP_STD,
    DEFAULT_MAX_PIXELS,
    ImageDecodeError,
    ImageError,
    ImageProcessor,
    ImageTooLargeError,
    image_size,
    load_image,
    normalize_pixels,
    to_rgb,
)

SEECLICK = Path(__file__).parent / "fixtures" / "seeclick_calendar.png"
SKIMAGE_PAGE = Path(os.path.dirname(skimage.data.__file__)) / "page.png"
GRACE_HOPPER = Path(matplotlib.get_data_path()) / "sample_data" / "grace_hopper.jpg"

WHITE = (255, 255, 255)
PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"


# --------------------------------------------------------------------------------------------------
# Helpers that build files
# --------------------------------------------------------------------------------------------------


def noise_image(height: int, width: int, seed: int = 0) -> Image.Image:
    """Random RGB pixels: incompressible, so encoded files are long and cutting them loses data."""
    rng = np.random.default_rng(seed)
    return Image.fromarray(rng.integers(0, 256, (height, width, 3), dtype=np.uint8))


def encode(image: Image.Image, fmt: str, **params: object) -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, fmt, **params)
    return buffer.getvalue()


def png_chunk(kind: bytes, data: bytes) -> bytes:
    """One PNG chunk: length, type, data and the CRC-32 of type + data."""
    return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))


def crafted_png(width: int, height: int, idat: bytes) -> bytes:
    """An 8-bit RGB PNG whose IHDR claims ``width`` x ``height``, with ``idat`` as its only IDAT."""
    ihdr = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)
    return PNG_SIGNATURE + png_chunk(b"IHDR", ihdr) + png_chunk(b"IDAT", idat) + png_chunk(b"IEND", b"")


def as_array(image: Image.Image) -> np.ndarray:
    return np.asarray(image, dtype=np.int64)


def composite(color: tuple[int, ...], alpha: int) -> list[float]:
    """Exact value of ``color`` at ``alpha`` over the white background."""
    return [c * alpha / 255 + 255 * (255 - alpha) / 255 for c in color]


# --------------------------------------------------------------------------------------------------
# Corpus 1: files that must raise ImageDecodeError naming the path
# --------------------------------------------------------------------------------------------------


def _zero_byte(tmp: Path) -> Path:
    path = tmp / "empty.png"
    path.write_bytes(b"")
    return path


def _truncated_png(tmp: Path) -> Path:
    data = encode(noise_image(64, 80), "PNG")
    path = tmp / "truncated.png"
    path.write_bytes(data[: len(data) // 2])
    return path


def _truncated_jpeg(tmp: Path) -> Path:
    data = encode(noise_image(64, 80), "JPEG", quality=90)
    path = tmp / "truncated.jpg"
    path.write_bytes(data[: len(data) // 2])
    return path


def _png_cut_after_ihdr(tmp: Path) -> Path:
    data = encode(noise_image(16, 16), "PNG")
    path = tmp / "header-only.png"
    path.write_bytes(data[:33])  # signature + IHDR, no pixel data at all
    return path


def _corrupt_idat(tmp: Path) -> Path:
    path = tmp / "corrupt-idat.png"
    path.write_bytes(crafted_png(8, 8, b"this is not a zlib stream"))
    return path


def _tiff_broken_second_page(tmp: Path) -> Path:
    """A valid one-page TIFF whose IFD chain goes on to a second page holding only a Compression tag.

    Pillow decodes the first page, then raises TypeError ("Missing dimensions") when asked how many
    pages there are.
    """
    data = bytearray(encode(noise_image(17, 23), "TIFF"))
    first = struct.unpack_from("<I", data, 4)[0]
    entries = struct.unpack_from("<H", data, first)[0]
    second = len(data) + len(data) % 2  # IFDs start on a word boundary
    data += b"\0" * (second - len(data)) + struct.pack("<HHHIII", 1, 0x0103, 3, 1, 1, 0)
    struct.pack_into("<I", data, first + 2 + 12 * entries, second)  # the first page's next-IFD offset
    path = tmp / "two-pages.tif"
    path.write_bytes(bytes(data))
    return path


def _text_named_png(tmp: Path) -> Path:
    path = tmp / "notes.png"
    path.write_text("just some text, not an image\n")
    return path


def _missing(tmp: Path) -> Path:
    return tmp / "does-not-exist.png"


def _directory(tmp: Path) -> Path:
    path = tmp / "folder.png"
    path.mkdir()
    return path


def _fifo(tmp: Path) -> Path:
    path = tmp / "pipe.png"
    os.mkfifo(path)  # opening it would block until a writer came: it must be refused unopened
    return path


# (builder, substring of the documented reason; None where only the error type is documented)
DECODE_ERRORS: dict[str, tuple[Callable[[Path], Path], str | None]] = {
    "zero-byte": (_zero_byte, "empty file (0 bytes)"),
    "truncated-png": (_truncated_png, "corrupt or truncated image data"),
    "truncated-jpeg": (_truncated_jpeg, "corrupt or truncated image data"),
    "png-cut-after-ihdr": (_png_cut_after_ihdr, None),
    "corrupt-idat": (_corrupt_idat, "corrupt or truncated image data"),
    "tiff-broken-second-page": (_tiff_broken_second_page, "corrupt or truncated image data"),
    "text-named-png": (_text_named_png, "not a recognised image format"),
    "missing-path": (_missing, "no such file"),
    "directory": (_directory, "is a directory, not a file"),
    "fifo": (_fifo, "not a regular file"),
}


@pytest.mark.parametrize("case", list(DECODE_ERRORS))
@pytest.mark.parametrize("as_str", [False, True], ids=["Path", "str"])
def test_undecodable_file_raises_decode_error_naming_the_path(
    tmp_path: Path, case: str, as_str: bool
) -> None:
    make, reason = DECODE_ERRORS[case]
    path = make(tmp_path)
    src = str(path) if as_str else path
    with pytest.raises(ImageDecodeError) as info:
        load_image(src)
    error = info.value
    assert error.source == str(path)
    assert str(error).startswith(f"{path}: ")
    if reason is not None:
        assert reason in error.reason
    assert isinstance(error, ValueError)  # ImageError is a ValueError, so callers can catch either


# Failures that show in the header: image_size refuses them as load_image does. The others (truncated or
# corrupt pixel data) pass the header check and are found only by decoding.
HEADER_ERRORS = ("zero-byte", "png-cut-after-ihdr", "text-named-png", "missing-path", "directory", "fifo")
BODY_ERROR_SIZES = {
    "truncated-png": (80, 64),
    "truncated-jpeg": (80, 64),
    "corrupt-idat": (8, 8),
    "tiff-broken-second-page": (23, 17),
}


@pytest.mark.parametrize("case", list(DECODE_ERRORS))
def test_image_size_refuses_what_the_header_shows(tmp_path: Path, case: str) -> None:
    make, reason = DECODE_ERRORS[case]
    path = make(tmp_path)
    if case not in HEADER_ERRORS:
        assert image_size(path) == BODY_ERROR_SIZES[case]
        return
    with pytest.raises(ImageDecodeError) as info:
        image_size(path)
    assert info.value.source == str(path)
    if reason is not None:
        assert reason in info.value.reason


def test_image_size_checks_the_pixel_limit_from_the_header(tmp_path: Path) -> None:
    bomb = crafted_png(100_000, 100_000, zlib.compress(b"\0" * 64))
    with pytest.raises(ImageTooLargeError, match="10000000000 pixels"):
        image_size(bomb)
    assert image_size(crafted_png(300, 200, b"garbage"), max_pixels=60_000) == (300, 200)
    with pytest.raises(ImageTooLargeError, match="exceeds the limit of 59999"):
        image_size(crafted_png(300, 200, b"garbage"), max_pixels=59_999, name="x.png")
    with pytest.raises(ImageDecodeError, match=r"^<bytes>: empty data"):
        image_size(b"")


@pytest.mark.parametrize("orientation", range(1, 9))
@pytest.mark.parametrize("fmt", ["jpg", "png", "webp", "tif"])
def test_image_size_is_upright_under_exif_orientation(tmp_path: Path, orientation: int, fmt: str) -> None:
    """TIFF too, whose Pillow plugin reports the upright size at open: it was swapped a second time."""
    path = tmp_path / f"orientation-{orientation}.{fmt}"
    if fmt == "tif":
        Image.new("RGB", (60, 40), WHITE).save(path, tiffinfo={0x0112: orientation})
    else:
        exif = Image.Exif()
        exif[0x0112] = orientation
        Image.new("RGB", (60, 40), WHITE).save(path, exif=exif)
    assert image_size(path) == load_image(path).size == ((40, 60) if orientation >= 5 else (60, 40))


def _garbage_bytes() -> bytes:
    return bytes(range(256)) * 4


def _truncated_png_bytes() -> bytes:
    data = encode(noise_image(32, 32, seed=3), "PNG")
    return data[: len(data) // 3]


@pytest.mark.parametrize(
    ("make", "reason"),
    [
        (lambda: b"", "empty data (0 bytes)"),
        (_garbage_bytes, "not a recognised image format"),
        (lambda: b"plain text\n", "not a recognised image format"),
        (_truncated_png_bytes, "corrupt or truncated image data"),
    ],
    ids=["empty", "garbage", "text", "truncated-png"],
)
@pytest.mark.parametrize("name", [None, "upload/photo.png"])
def test_undecodable_bytes_raise_decode_error_naming_the_source(
    make: Callable[[], bytes], reason: str, name: str | None
) -> None:
    with pytest.raises(ImageDecodeError) as info:
        load_image(make(), name=name)
    expected_source = "<bytes>" if name is None else name
    assert info.value.source == expected_source
    assert str(info.value).startswith(f"{expected_source}: ")
    assert reason in info.value.reason


def test_crafted_png_helper_makes_valid_files() -> None:
    """The IHDR/CRC crafting used for the huge-header tests produces a PNG PIL really decodes."""
    # Three rows of four pixels, each row led by filter type 0 (none).
    pixels = b"".join(bytes([0]) + b"".join(bytes([10 * r, 20 * c, 7]) for c in range(4)) for r in range(3))
    image = load_image(crafted_png(4, 3, zlib.compress(pixels)))
    assert image.size == (4, 3)
    assert image.getpixel((3, 2)) == (20, 60, 7)


def test_huge_dimensions_in_header_are_refused_without_decoding(tmp_path: Path) -> None:
    path = tmp_path / "bomb.png"
    path.write_bytes(crafted_png(100_000, 100_000, zlib.compress(b"\0" * 64)))
    assert path.stat().st_size < 200
    start = time.perf_counter()
    with pytest.raises(ImageTooLargeError) as info:
        load_image(path)
    assert time.perf_counter() - start < 1.0  # decoding 10^10 pixels would take far longer (or OOM)
    assert info.value.source == str(path)
    assert str(info.value).startswith(f"{path}: ")
    with pytest.raises(ImageTooLargeError):
        load_image(path.read_bytes())


def test_size_limit_is_checked_before_any_pixel_is_decoded() -> None:
    """A header over ``max_pixels`` with undecodable data is 'too large', not 'corrupt'."""
    data = crafted_png(300, 300, b"garbage that no zlib decoder accepts")
    with pytest.raises(ImageTooLargeError, match="300x300 = 90000 pixels exceeds the limit of 89999"):
        load_image(data, max_pixels=89_999)
    with pytest.raises(ImageDecodeError):  # within the limit, decoding is attempted and fails
        load_image(data, max_pixels=90_000)
    # 9000 x 9000 is within PIL's own bomb limit but over the default limit: refused by our check.
    with pytest.raises(ImageTooLargeError, match=f"exceeds the limit of {DEFAULT_MAX_PIXELS}"):
        load_image(crafted_png(9000, 9000, b"garbage"))


def test_max_pixels_is_respected_for_a_small_image(tmp_path: Path) -> None:
    path = tmp_path / "small.png"
    noise_image(30, 40).save(path)
    assert load_image(path, max_pixels=1200).size == (40, 30)
    with pytest.raises(ImageTooLargeError) as info:
        load_image(path, max_pixels=1199)
    assert info.value.source == str(path)
    assert "40x30 = 1200 pixels" in info.value.reason
    with Image.open(path) as opened, pytest.raises(ImageTooLargeError):
        load_image(opened, max_pixels=1199)


def test_refused_file_is_closed(tmp_path: Path) -> None:
    """A file refused from its header is closed, not left open until garbage collection."""
    path = tmp_path / "refused.png"
    noise_image(30, 40).save(path)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        with pytest.raises(ImageTooLargeError):
            load_image(path, max_pixels=10)
        gc.collect()
    assert [w for w in caught if issubclass(w.category, ResourceWarning)] == []


def with_chunks_before_iend(png: bytes, *chunks: bytes) -> bytes:
    """``png`` with ``chunks`` inserted before its IEND (the last 12 bytes), i.e. after the pixel data."""
    assert png[-8:-4] == b"IEND"
    return png[:-12] + b"".join(chunks) + png[-12:]


def with_chunks_after_ihdr(png: bytes, *chunks: bytes) -> bytes:
    """``png`` with ``chunks`` inserted after its IHDR, i.e. before the pixel data."""
    ihdr_end = len(PNG_SIGNATURE) + 25
    return png[:ihdr_end] + b"".join(chunks) + png[ihdr_end:]


def exif_chunk(orientation: int) -> bytes:
    """An eXIf chunk holding ``orientation`` (its data is the TIFF header on, without ``Exif\\0\\0``)."""
    exif = Image.Exif()
    exif[0x0112] = orientation
    return png_chunk(b"eXIf", exif.tobytes()[6:])


def xmp_chunk(orientation: int) -> bytes:
    """An iTXt XMP chunk whose ``tiff:Orientation`` is ``orientation``."""
    xmp = (
        f'<x:xmpmeta xmlns:x="adobe:ns:meta/"><rdf:Description tiff:Orientation="{orientation}"/></x:xmpmeta>'
    )
    return png_chunk(b"iTXt", b"XML:com.adobe.xmp\0\0\0\0\0" + xmp.encode())


def refuse_to_decode(monkeypatch: pytest.MonkeyPatch) -> None:
    """Make every pixel decode fail loudly (an AssertionError, which no code under test catches)."""

    def load(self: ImageFile.ImageFile) -> None:
        raise AssertionError(f"pixels of a {self.format} image were decoded")

    monkeypatch.setattr(ImageFile.ImageFile, "load", load)


@pytest.mark.parametrize("orientation", range(1, 9))
def test_image_size_finds_png_exif_after_the_pixel_data_without_decoding(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, orientation: int
) -> None:
    """Pillow's PNG getexif() decodes every pixel to look for an eXIf chunk after the pixel data (where
    some writers put it), so image_size decoded such PNGs and every PNG without EXIF."""
    plain = encode(noise_image(200, 300), "PNG")  # 180 kB of incompressible pixels in several IDATs
    assert plain.count(b"IDAT") > 1
    data = with_chunks_before_iend(plain, exif_chunk(orientation))
    path = tmp_path / "exif-last.png"
    path.write_bytes(data)
    upright = (200, 300) if orientation >= 5 else (300, 200)
    assert load_image(path).size == load_image(data).size == upright
    refuse_to_decode(monkeypatch)
    assert image_size(path) == image_size(data) == upright
    assert image_size(plain) == (300, 200)  # no EXIF at all: not decoded either


@pytest.mark.filterwarnings("ignore:Corrupt EXIF data:UserWarning")
def test_image_size_reads_png_metadata_as_load_image_does(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """XMP after the pixel data, EXIF before it, both (EXIF wins, as in Pillow), and damage after it."""
    plain = encode(noise_image(20, 30), "PNG")
    exif_last = with_chunks_before_iend(plain, exif_chunk(6))
    cases = {
        "xmp-last": with_chunks_before_iend(plain, xmp_chunk(8)),
        "exif-first": with_chunks_after_ihdr(plain, exif_chunk(6)),
        "exif-first-xmp-last": with_chunks_after_ihdr(
            with_chunks_before_iend(plain, xmp_chunk(6)), exif_chunk(1)
        ),
        "text-and-exif-last": with_chunks_before_iend(
            plain, png_chunk(b"tEXt", b"Comment\0hi"), exif_chunk(5)
        ),
        # An IFD cut short: Pillow warns and finds no orientation.
        "short-exif": with_chunks_before_iend(plain, png_chunk(b"eXIf", b"MM\0*\0\0\0\x08\0\x09")),
        # Decoding stops at a chunk type that is not letters, so the EXIF after it is not seen.
        "exif-after-bad-type": with_chunks_before_iend(plain, png_chunk(b"\1\2\3\4", b""), exif_chunk(6)),
    }
    expected = {name: load_image(data).size for name, data in cases.items()}
    assert expected == {
        "xmp-last": (20, 30),
        "exif-first": (20, 30),
        "exif-first-xmp-last": (30, 20),
        "text-and-exif-last": (20, 30),
        "short-exif": (30, 20),
        "exif-after-bad-type": (30, 20),
    }
    # Damage after the header, which only decoding reports: the EXIF it hides (or follows) counts as absent.
    damaged = {
        "cut-in-exif": (exif_last[:-20], (30, 20)),
        "cut-in-pixels": (exif_last[: len(plain) // 2], (30, 20)),
        "huge-length": (
            with_chunks_before_iend(plain, struct.pack(">I", 2**31) + b"tEXt", exif_chunk(6)),
            (30, 20),
        ),
        "garbage-exif": (with_chunks_before_iend(plain, png_chunk(b"eXIf", b"garbage")), (30, 20)),
        "undecodable-pixels": (
            with_chunks_before_iend(crafted_png(30, 20, b"not zlib"), exif_chunk(6)),
            (20, 30),
        ),
    }
    for name, (data, _) in damaged.items():
        with pytest.raises(ImageDecodeError):
            load_image(data, name=name)
    refuse_to_decode(monkeypatch)
    path = tmp_path / "case.png"
    for name, data in cases.items():
        path.write_bytes(data)
        assert image_size(data) == image_size(path) == expected[name], name
    for name, (data, size) in damaged.items():
        path.write_bytes(data)
        assert image_size(data) == image_size(path) == size, name


def test_max_pixels_above_pillows_own_limit_is_honoured() -> None:
    """Pillow refuses more than twice ``Image.MAX_IMAGE_PIXELS`` (178,956,970) at open, whatever
    ``max_pixels`` says; its global limit is not raised for it (other threads rely on it)."""
    pillow_limit = Image.MAX_IMAGE_PIXELS
    assert pillow_limit is not None and 2 * pillow_limit < 200_000_000
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # no DecompressionBombWarning either
        assert image_size(crafted_png(20_000, 10_000, b"garbage"), max_pixels=300_000_000) == (20_000, 10_000)
        assert image_size(crafted_png(20_000, 20_000, b"garbage"), max_pixels=400_000_000) == (20_000, 20_000)
        with pytest.raises(
            ImageTooLargeError, match="20000x20000 = 400000000 pixels exceeds the limit of 399999999"
        ):
            image_size(crafted_png(20_000, 20_000, b"garbage"), max_pixels=399_999_999)
    assert pillow_limit == Image.MAX_IMAGE_PIXELS
    with pytest.raises(ImageTooLargeError):  # within Pillow's limit, the default path, as before
        image_size(crafted_png(20_000, 10_000, b"garbage"))
    # Past twice Pillow's limit Pillow refuses at open; the message names our limit, not Pillow's.
    with pytest.raises(
        ImageTooLargeError, match=r"20000x20000 = 400000000 pixels exceeds the limit of 25000000$"
    ):
        load_image(crafted_png(20_000, 20_000, b"garbage"), max_pixels=25_000_000)
    # Files shorter than a format's signature check: Pillow's BMP check unpacks 4 bytes.
    for short in (b"a", b"ab", b"abc"):
        for limit in (25_000_000, 400_000_000):
            with pytest.raises(ImageDecodeError, match="not a recognised image format"):
                load_image(short, max_pixels=limit)
            with pytest.raises(ImageDecodeError, match="not a recognised image format"):
                image_size(short, max_pixels=limit)


def test_images_past_pillows_limit_decode_when_max_pixels_allows(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The whole load, small: Pillow's limit lowered to 1000 pixels, a 100 x 100 image, every error case."""
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", 1000)
    image = noise_image(100, 100)
    path = tmp_path / "noise.png"
    image.save(path)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert np.array_equal(np.asarray(load_image(path, max_pixels=10_000)), np.asarray(image))
        assert np.array_equal(np.asarray(load_image(path.read_bytes(), max_pixels=10_000)), np.asarray(image))
        assert image_size(path, max_pixels=10_000) == (100, 100)
        with pytest.raises(ImageTooLargeError, match="exceeds the limit of 9999"):
            load_image(path, max_pixels=9_999)
        with pytest.raises(ImageTooLargeError):  # under Pillow's limit: refused by Pillow's check first
            load_image(path, max_pixels=999)
    # Format detection past Pillow's check gives the same errors as Image.open.
    for case, (make, reason) in DECODE_ERRORS.items():
        (tmp_path / case).mkdir()
        bad = make(tmp_path / case)
        with pytest.raises(ImageDecodeError) as info:
            load_image(bad, max_pixels=10**12)
        assert info.value.source == str(bad)
        if reason is not None:
            assert reason in info.value.reason, case


# --------------------------------------------------------------------------------------------------
# Corpus 2: awkward but valid files and their documented conversion to RGB
# --------------------------------------------------------------------------------------------------


class Conversion(NamedTuple):
    path: Path
    source_modes: tuple[str, ...]  # the mode PIL opens the file in (checks the builder itself)
    expected: np.ndarray  # (H, W, 3) expected RGB values
    atol: float


def _cmyk_jpeg(tmp: Path) -> Conversion:
    quadrants = {
        (0, 0): ((255, 0, 0, 0), (0, 255, 255)),  # cyan
        (0, 1): ((0, 255, 0, 0), (255, 0, 255)),  # magenta
        (1, 0): ((0, 0, 255, 0), (255, 255, 0)),  # yellow
        (1, 1): ((0, 0, 0, 255), (0, 0, 0)),  # black
    }
    image = Image.new("CMYK", (32, 32))
    expected = np.zeros((32, 32, 3))
    for (qr, qc), (cmyk, rgb) in quadrants.items():
        image.paste(cmyk, (16 * qc, 16 * qr, 16 * qc + 16, 16 * qr + 16))
        expected[16 * qr : 16 * qr + 16, 16 * qc : 16 * qc + 16] = rgb
    path = tmp / "cmyk.jpg"
    image.save(path, quality=95)
    return Conversion(path, ("CMYK",), expected, 8)


def _gray16_png(tmp: Path) -> Conversion:
    values = np.array([[0, 65535, 32896, 1000], [51528, 51529, 257, 128]], dtype=np.uint16)
    path = tmp / "gray16.png"
    Image.fromarray(values).save(path)
    expected = np.array([[0, 255, 128, 4], [200, 201, 1, 0]])  # round(v / 257)
    return Conversion(path, ("I;16", "I;16B", "I"), np.repeat(expected[..., None], 3, axis=2), 0)


def _gray32_tiff(tmp: Path) -> Conversion:
    values = np.array([[0, 65535, 32896, -5, 70000]], dtype=np.int32)
    path = tmp / "gray32.tif"
    Image.fromarray(values).save(path)
    expected = np.array([[0, 255, 128, 0, 255]])  # 16-bit samples, clipped
    return Conversion(path, ("I",), np.repeat(expected[..., None], 3, axis=2), 0)


def _palette_transparent_png(tmp: Path) -> Conversion:
    image = Image.new("P", (3, 2))
    image.putpalette([255, 0, 0, 0, 0, 255, 10, 20, 30])
    image.paste(Image.fromarray(np.array([[0, 1, 2], [2, 1, 0]], dtype=np.uint8), "P"))
    path = tmp / "palette.png"
    image.save(path, transparency=0)  # index 0 (red) is the transparent colour
    expected = np.array([[WHITE, (0, 0, 255), (10, 20, 30)], [(10, 20, 30), (0, 0, 255), WHITE]])
    return Conversion(path, ("P",), expected, 0)


def _gray_transparent_png(tmp: Path) -> Conversion:
    path = tmp / "gray-trns.png"
    Image.fromarray(np.array([[7, 100, 7]], dtype=np.uint8)).save(path, transparency=7)
    return Conversion(path, ("L",), np.array([[WHITE, (100, 100, 100), WHITE]]), 0)


RGBA_PIXELS = [(255, 0, 0, 128), (0, 0, 0, 128), (100, 50, 200, 128), (10, 20, 30, 255), (10, 20, 30, 0)]


def _rgba_png(tmp: Path) -> Conversion:
    path = tmp / "rgba.png"
    Image.fromarray(np.array([RGBA_PIXELS], dtype=np.uint8), "RGBA").save(path)
    expected = np.array([[composite(p[:3], p[3]) for p in RGBA_PIXELS]])
    return Conversion(path, ("RGBA",), expected, 1)


def _la_png(tmp: Path) -> Conversion:
    pixels = [(0, 128), (200, 64), (40, 255), (90, 0)]
    path = tmp / "la.png"
    Image.fromarray(np.array([pixels], dtype=np.uint8), "LA").save(path)
    expected = np.array([[composite((v, v, v), a) for v, a in pixels]])
    return Conversion(path, ("LA",), expected, 1)


def _bilevel_png(tmp: Path) -> Conversion:
    bits = np.array([[0, 1, 0, 1], [1, 0, 1, 0]], dtype=bool)
    path = tmp / "bilevel.png"
    Image.fromarray(bits).save(path)
    return Conversion(path, ("1",), np.repeat(bits[..., None] * 255, 3, axis=2), 0)


def _float_unit_tiff(tmp: Path) -> Conversion:
    values = np.array([[0.0, 0.2, 0.6, 1.0], [-0.5, 0.4, 0.12, 0.95]], dtype=np.float32)
    path = tmp / "float-unit.tif"
    Image.fromarray(values).save(path)
    expected = np.array([[0, 51, 153, 255], [0, 102, 31, 242]])  # [0, 1] -> [0, 255], clipped
    return Conversion(path, ("F",), np.repeat(expected[..., None], 3, axis=2), 0)


def _float_byte_tiff(tmp: Path) -> Conversion:
    values = np.array([[0.0, 12.4, 100.6, 255.0], [300.0, -7.0, 1.7, 254.6]], dtype=np.float32)
    path = tmp / "float-byte.tif"
    Image.fromarray(values).save(path)
    expected = np.array([[0, 12, 101, 255], [255, 0, 2, 255]])  # read as [0, 255], clipped
    return Conversion(path, ("F",), np.repeat(expected[..., None], 3, axis=2), 0)


FRAME_COLORS = [(255, 0, 0), (0, 255, 0), (0, 0, 255)]


def _animation(tmp: Path, name: str, **params: object) -> Conversion:
    frames = [Image.new("RGB", (8, 6), color) for color in FRAME_COLORS]
    path = tmp / name
    frames[0].save(path, save_all=True, append_images=frames[1:], duration=100, **params)
    with Image.open(path) as written:
        assert written.n_frames == 3
        modes = (written.mode,)
    return Conversion(path, modes, np.full((6, 8, 3), FRAME_COLORS[0]), 0)


def _animated_gif(tmp: Path) -> Conversion:
    return _animation(tmp, "animated.gif", loop=0)


def _animated_png(tmp: Path) -> Conversion:
    return _animation(tmp, "animated.png")


def _animated_webp(tmp: Path) -> Conversion:
    if not features.check("webp"):
        pytest.skip("Pillow built without WebP")
    return _animation(tmp, "animated.webp", lossless=True)


CONVERSIONS: dict[str, Callable[[Path], Conversion]] = {
    "cmyk-jpeg": _cmyk_jpeg,
    "gray16-png": _gray16_png,
    "gray32-tiff": _gray32_tiff,
    "palette-transparent-png": _palette_transparent_png,
    "gray-transparent-png": _gray_transparent_png,
    "rgba-half-alpha-png": _rgba_png,
    "la-png": _la_png,
    "bilevel-png": _bilevel_png,
    "float-unit-tiff": _float_unit_tiff,
    "float-byte-tiff": _float_byte_tiff,
    "animated-gif": _animated_gif,
    "animated-png": _animated_png,
    "animated-webp": _animated_webp,
}


@pytest.mark.parametrize("case", list(CONVERSIONS))
def test_image_size_is_the_decoded_size(tmp_path: Path, case: str) -> None:
    conversion = CONVERSIONS[case](tmp_path)
    assert image_size(conversion.path) == load_image(conversion.path).size


@pytest.mark.parametrize("case", list(CONVERSIONS))
def test_awkward_file_converts_to_documented_rgb(tmp_path: Path, case: str) -> None:
    conversion = CONVERSIONS[case](tmp_path)
    with Image.open(conversion.path) as raw:
        assert raw.mode in conversion.source_modes  # the corpus file really is what it claims
    image = load_image(conversion.path)
    assert image.mode == "RGB"
    expected = conversion.expected
    assert image.size == (expected.shape[1], expected.shape[0])
    np.testing.assert_allclose(as_array(image), expected, atol=conversion.atol, rtol=0)
    # Bytes and an opened PIL image decode identically.
    assert np.array_equal(np.asarray(load_image(conversion.path.read_bytes())), np.asarray(image))
    with Image.open(conversion.path) as raw:
        assert np.array_equal(np.asarray(load_image(raw)), np.asarray(image))


def test_alpha_background_is_white() -> None:
    assert ALPHA_BACKGROUND == WHITE


def test_rgba_half_alpha_exact_values(tmp_path: Path) -> None:
    """Red at alpha 128 over white: R stays 255, G and B are 255 * 127 / 255 = 127 (within 1)."""
    path = tmp_path / "half.png"
    Image.new("RGBA", (3, 2), (255, 0, 0, 128)).save(path)
    pixels = as_array(load_image(path)).reshape(-1, 3)
    assert np.abs(pixels - [255, 127, 127]).max() <= 1


@pytest.mark.parametrize(
    ("orientation", "size", "corner"),
    [
        (1, (60, 40), "top-left"),
        (3, (60, 40), "bottom-right"),
        (6, (40, 60), "top-right"),  # the viewer rotates 90 degrees clockwise
        (8, (40, 60), "bottom-left"),  # the viewer rotates 90 degrees counter-clockwise
    ],
)
def test_exif_orientation_is_applied(
    tmp_path: Path, orientation: int, size: tuple[int, int], corner: str
) -> None:
    stored = Image.new("RGB", (60, 40), WHITE)
    stored.paste((255, 0, 0), (0, 0, 12, 12))  # mark the stored top-left corner red
    exif = Image.Exif()
    exif[0x0112] = orientation
    path = tmp_path / f"orientation-{orientation}.jpg"
    stored.save(path, quality=95, exif=exif)
    with Image.open(path) as raw:
        assert raw.size == (60, 40)
        assert raw.getexif()[0x0112] == orientation

    image = load_image(path)
    assert image.size == size
    width, height = size
    centres = {
        "top-left": (5, 5),
        "top-right": (width - 6, 5),
        "bottom-left": (5, height - 6),
        "bottom-right": (width - 6, height - 6),
    }
    for name, xy in centres.items():
        pixel = np.array(image.getpixel(xy))
        target = (255, 0, 0) if name == corner else WHITE
        assert np.abs(pixel - target).max() <= 24, (name, pixel)


ALL_MODES = [
    "RGBA",
    "RGBa",
    "LA",
    "La",
    "PA",
    "P",
    "L",
    "1",
    "CMYK",
    "YCbCr",
    "HSV",
    "RGBX",
    "I;16B",
    "I",
    "F",
]


@pytest.mark.parametrize("mode", ALL_MODES)
def test_to_rgb_accepts_every_mode(mode: str) -> None:
    image = Image.new(mode, (5, 3))
    out = to_rgb(image)
    assert out.mode == "RGB"
    assert out.size == (5, 3)
    assert load_image(image).mode == "RGB"  # PIL images go through the same path


def _png(image: Image.Image, **options: object) -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, "PNG", **options)
    return buffer.getvalue()


def test_a_transparent_colour_is_background_in_rgb_16_bit_and_palette_images() -> None:
    """A tRNS colour key in an RGB or 16-bit PNG, and an in-memory palette with alpha, were kept as
    their colour instead of composited over white (an L image with tRNS always was)."""
    rgb = Image.new("RGB", (4, 4), (0, 0, 0))
    rgb.putpixel((3, 3), (10, 20, 30))
    deep = Image.fromarray(np.array([[0, 65535], [30000, 0]], dtype=np.uint16))  # mode I;16
    rgba = Image.new("RGBA", (4, 4), (0, 0, 0, 0))
    rgba.putpixel((3, 3), (255, 0, 0, 255))
    palette = rgba.quantize()  # mode P, its alpha in the palette, no "transparency" in info
    for source in (_png(rgb, transparency=(0, 0, 0)), _png(deep, transparency=0), palette):
        image = load_image(source)
        assert image.getpixel((0, 0)) == WHITE
    assert load_image(_png(rgb, transparency=(0, 0, 0))).getpixel((3, 3)) == (10, 20, 30)
    assert load_image(_png(deep, transparency=0)).getpixel((1, 0)) == (255, 255, 255)  # 65535, opaque
    assert load_image(_png(deep, transparency=0)).getpixel((0, 1)) == (117, 117, 117)  # 30000 / 257
    assert load_image(palette).getpixel((3, 3)) == (255, 0, 0)
    assert load_image(_png(rgb)).getpixel((0, 0)) == (0, 0, 0)  # no tRNS: black stays black


def raw_png(width: int, height: int, depth: int, colour_type: int, scanlines: bytes, *chunks: bytes) -> bytes:
    """A PNG of ``scanlines`` (each row: its filter type byte, then its packed samples), with ``chunks``
    (tRNS) before the pixel data: bit depths and keys that Pillow cannot write."""
    ihdr = struct.pack(">IIBBBBB", width, height, depth, colour_type, 0, 0, 0)
    idat = zlib.compress(scanlines)
    return (
        PNG_SIGNATURE
        + png_chunk(b"IHDR", ihdr)
        + b"".join(chunks)
        + png_chunk(b"IDAT", idat)
        + png_chunk(b"IEND", b"")
    )


def pack_samples(values: list[int], depth: int) -> bytes:
    """Grey samples of ``depth`` < 8 bits packed into bytes, the first in the high bits."""
    per_byte = 8 // depth
    padded = values + [0] * (-len(values) % per_byte)
    return bytes(
        sum(v << (8 - depth * (j + 1)) for j, v in enumerate(padded[i : i + per_byte]))
        for i in range(0, len(padded), per_byte)
    )


@pytest.mark.parametrize("depth", [2, 4])
def test_low_bit_depth_grey_colour_key_is_background(tmp_path: Path, depth: int) -> None:
    """Pillow scales 2- and 4-bit grey to 8 bits but keeps the tRNS key unscaled: keyed pixels stayed grey."""
    levels = list(range(1 << depth))
    key = levels[-2]  # 2 of 0..3, 14 of 0..15
    trns = png_chunk(b"tRNS", struct.pack(">H", key))
    data = raw_png(len(levels), 1, depth, 0, b"\0" + pack_samples(levels, depth), trns)
    path = tmp_path / f"grey{depth}-key.png"
    path.write_bytes(data)
    step = 255 // levels[-1]  # 85 or 17
    expected = [WHITE if v == key else (v * step,) * 3 for v in levels]
    with Image.open(path) as raw:
        assert raw.mode == "L" and raw.info["transparency"] == key  # the key as the file states it
        from_pil = load_image(raw)  # unloaded, as Image.open returns it
    for image in (from_pil, load_image(path), load_image(data)):
        assert [image.getpixel((x, 0)) for x in range(len(levels))] == expected


def test_16_bit_rgb_colour_key_is_background(tmp_path: Path) -> None:
    """Pillow keeps the high bytes of 16-bit RGB and compared the key's low bytes with them: the keyed
    pixel stayed, and a pixel whose high bytes equal the key's low bytes went white. A pixel that
    differs from the key only in its low bytes is opaque (the key is exact)."""
    key = (0x1234, 0x5678, 0x9ABC)
    pixels = [
        (key, WHITE),
        ((0x1200, 0x5600, 0x9A00), (0x12, 0x56, 0x9A)),  # same high bytes as the key
        ((0x34FF, 0x7800, 0xBC11), (0x34, 0x78, 0xBC)),  # high bytes = the key's low bytes
        ((0xFFFF, 0, 0), (255, 0, 0)),
    ]
    # Two rows, the second filtered with "sub" (each byte minus the one 6 bytes, a pixel, before it), so
    # the decode must know a pixel is 6 bytes.
    row = b"".join(struct.pack(">HHH", *p) for p, _ in pixels)
    sub = bytes((row[i] - (row[i - 6] if i >= 6 else 0)) % 256 for i in range(len(row)))
    trns = png_chunk(b"tRNS", struct.pack(">HHH", *key))
    data = raw_png(len(pixels), 2, 16, 2, b"\0" + row + b"\1" + sub, trns)
    path = tmp_path / "rgb16-key.png"
    path.write_bytes(data)
    with Image.open(path) as raw:
        assert raw.mode == "RGB" and raw.info["transparency"] == key
        image = load_image(raw)
    expected = np.array([[colour for _, colour in pixels]] * 2)
    assert np.array_equal(as_array(image), expected)
    assert np.array_equal(as_array(load_image(path)), expected)
    assert np.array_equal(as_array(load_image(data)), expected)
    # Without tRNS the same pixels are just their high bytes.
    plain = data.replace(trns, b"")
    assert load_image(plain).getpixel((0, 0)) == (0x12, 0x56, 0x9A)


def test_premultiplied_la_is_composited_like_la() -> None:
    straight = Image.new("LA", (2, 2), (100, 128))
    expected = composite((100, 100, 100), 128)
    got = as_array(to_rgb(straight.convert("La")))
    assert np.abs(got - expected).max() <= 2  # premultiplying loses at most a level or so
    assert np.array_equal(np.asarray(load_image(straight.convert("La"))), to_rgb(straight.convert("La")))


def test_pil_image_source_is_named_and_left_untouched() -> None:
    source = Image.new("RGBA", (4, 4), (0, 0, 0, 0))
    image = load_image(source)
    assert image.getpixel((0, 0)) == WHITE
    assert source.mode == "RGBA" and source.getpixel((0, 0)) == (0, 0, 0, 0)
    with pytest.raises(ImageTooLargeError) as info:
        load_image(source, max_pixels=15)
    assert info.value.source == "<PIL image>"
    with pytest.raises(ImageTooLargeError) as info:
        load_image(source, max_pixels=15, name="mine")
    assert str(info.value).startswith("mine: ")


def test_errors_share_a_base_class() -> None:
    assert issubclass(ImageDecodeError, ImageError) and issubclass(ImageTooLargeError, ImageError)
    error = ImageDecodeError("a.png", "broken")
    assert (error.source, error.reason, str(error)) == ("a.png", "broken", "a.png: broken")


# --------------------------------------------------------------------------------------------------
# Real images
# --------------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("path", "size", "source_mode"),
    [(SEECLICK, (2360, 1640), "RGB"), (SKIMAGE_PAGE, (384, 191), "L"), (GRACE_HOPPER, (512, 600), "RGB")],
    ids=["seeclick-calendar", "skimage-page", "grace-hopper"],
)
def test_real_images_load(path: Path, size: tuple[int, int], source_mode: str) -> None:
    with Image.open(path) as raw:
        assert raw.mode == source_mode
        assert raw.getexif().get(0x0112, 1) == 1  # upright already: pixels must be unchanged
        reference = np.asarray(raw.convert("RGB"))
    image = load_image(path)
    assert image.mode == "RGB"
    assert image.size == size
    assert np.array_equal(np.asarray(image), reference)
    assert np.array_equal(np.asarray(load_image(path.read_bytes(), name=path.name)), reference)
    if source_mode == "L":
        pixels = np.asarray(image)
        assert np.array_equal(pixels[..., 0], pixels[..., 1])
        assert np.array_equal(pixels[..., 0], pixels[..., 2])


# --------------------------------------------------------------------------------------------------
# The processor, recomputed independently
# --------------------------------------------------------------------------------------------------


Resizer = Callable[[Image.Image, tuple[int, int]], np.ndarray]


def pil_bicubic(image: Image.Image, size: tuple[int, int]) -> np.ndarray:
    """PIL's BICUBIC resize to (height, width), HWC uint8."""
    return np.asarray(image.resize((size[1], size[0]), Image.Resampling.BICUBIC))


def torch_bicubic_aa(image: Image.Image, size: tuple[int, int]) -> np.ndarray:
    """torch's antialiased bicubic resize of uint8 pixels (the processor's documented filter)."""
    pixels = np.asarray(image)
    if pixels.shape[:2] == size:
        return pixels
    nchw = torch.from_numpy(pixels.copy()).permute(2, 0, 1).unsqueeze(0).contiguous()
    return F.interpolate(nchw, size=size, mode="bicubic", antialias=True)[0].permute(1, 2, 0).numpy()


def reference_canvas(
    image: Image.Image, size: tuple[int, int], canvas: tuple[int, int], pad: tuple[int, ...], resize: Resizer
) -> np.ndarray:
    """``image`` resized to ``size`` at the top-left of a ``canvas`` filled with ``pad``, HWC uint8."""
    board = np.empty((*canvas, 3), dtype=np.uint8)
    board[:] = pad
    board[: size[0], : size[1]] = resize(image.convert("RGB"), size)
    return board


def normalise(hwc: np.ndarray, mean: tuple[float, ...], std: tuple[float, ...]) -> np.ndarray:
    """HWC uint8 -> CHW float64 with ``(x / 255 - mean) / std``."""
    return ((hwc / 255.0 - np.array(mean)) / np.array(std)).transpose(2, 0, 1)


def reference_tiles(
    image: Image.Image, plan: TilePlan, processor: ImageProcessor, resize: Resizer
) -> tuple[torch.Tensor, np.ndarray | None]:
    """Expected (num_tiles, 3, r, r) float64 output and the grid's uint8 canvas (None if unsplit).

    Built from the plan alone: the grid canvas is cut tile by tile at each tile's (top, left), the
    overview is the image resized to ``plan.overview_resized`` on an r x r pad canvas.
    """
    r = plan.tile_size
    pad, mean, std = processor.pad_color, processor.mean, processor.std
    has_cells = any(not tile.is_overview for tile in plan.tiles)
    grid = reference_canvas(image, plan.resized, plan.canvas, pad, resize) if has_cells else None
    overview = None
    if plan.overview_resized is not None:
        overview = reference_canvas(image, plan.overview_resized, (r, r), pad, resize)
    rows = []
    for tile in plan.tiles:
        if tile.is_overview:
            assert overview is not None
            hwc = overview
        else:
            assert grid is not None
            hwc = grid[tile.top : tile.top + r, tile.left : tile.left + r]
        rows.append(torch.from_numpy(normalise(hwc, mean, std).copy()))
    return torch.stack(rows), grid


def level_difference(a: torch.Tensor, b: torch.Tensor, processor: ImageProcessor) -> float:
    """Largest difference between two normalised tensors, in 8-bit levels."""
    std = torch.tensor(processor.std, dtype=torch.float64).view(3, 1, 1)
    return float(((a.double() - b.double()) * std * 255).abs().max())


def assemble_grid(pixel_values: torch.Tensor, plan: TilePlan) -> torch.Tensor:
    """Put the grid-cell rows back at their canvas offsets; every canvas pixel must be covered once."""
    r = plan.tile_size
    height, width = plan.canvas
    canvas = torch.full((3, height, width), float("nan"), dtype=torch.float64)
    for row, tile in zip(pixel_values, plan.tiles, strict=True):
        if tile.is_overview:
            continue
        block = canvas[:, tile.top : tile.top + r, tile.left : tile.left + r]
        assert torch.isnan(block).all()  # no cell overlaps another
        block.copy_(row)
    assert not torch.isnan(canvas).any()
    return canvas


@pytest.fixture(scope="module")
def images() -> dict[str, Image.Image]:
    """Real and synthetic RGB test images, decoded once per module."""
    gradient = np.linspace(0, 255, 300 * 40 * 3).reshape(300, 40, 3).astype(np.uint8)
    return {
        "seeclick": load_image(SEECLICK),
        "page": load_image(SKIMAGE_PAGE),
        "grace-hopper": load_image(GRACE_HOPPER),
        "noise-37x53": noise_image(37, 53, seed=1),
        "tall-gradient": Image.fromarray(gradient),
        "one-pixel": Image.new("RGB", (1, 1), (200, 10, 90)),
        "exact-112x168": noise_image(112, 168, seed=2),  # a 2x3 grid of 56-px tiles with no resize
    }


# (config, images_in_sample, whether the plan splits)
PLAN_CONFIGS: dict[str, tuple[ImagePlanConfig, int, bool]] = {
    "after-pad-56": (ImagePlanConfig(tile_size=56), 1, True),
    "before-squash-32": (ImagePlanConfig(tile_size=32, overview="before", overview_fit="squash"), 1, True),
    "none-32-n1-4": (ImagePlanConfig(tile_size=32, overview="none", n_min=1, n_max=4), 1, True),
    "after-squash-56-n2-6": (ImagePlanConfig(tile_size=56, n_min=2, n_max=6, overview_fit="squash"), 2, True),
    "single-cell-32": (ImagePlanConfig(tile_size=32, n_min=1, n_max=1), 1, True),
    "unsplit-3-images-32": (ImagePlanConfig(tile_size=32), 3, False),
    "unsplit-squash-56": (ImagePlanConfig(tile_size=56, split=False, overview_fit="squash"), 1, False),
}

IMAGE_NAMES = [
    "seeclick",
    "page",
    "grace-hopper",
    "noise-37x53",
    "tall-gradient",
    "one-pixel",
    "exact-112x168",
]
# The processor resizes with torch's antialiased bicubic: PIL's BICUBIC within 2 levels on these images
# (tall high-contrast downscales can differ by up to about 20, see ImageProcessor).
PIL_TOLERANCE_LEVELS = 2


@pytest.mark.parametrize("image_name", IMAGE_NAMES)
@pytest.mark.parametrize("config_name", list(PLAN_CONFIGS))
def test_processor_matches_independent_computation(
    images: dict[str, Image.Image], image_name: str, config_name: str
) -> None:
    cfg, images_in_sample, splits = PLAN_CONFIGS[config_name]
    image = images[image_name]
    plan = plan_image(
        image.height, image.width, cfg, image_index=images_in_sample - 1, images_in_sample=images_in_sample
    )
    assert plan.split == splits
    processor = ImageProcessor(cfg)
    result = processor([image], [plan])
    out = result.pixel_values
    r = cfg.tile_size
    assert out.shape == (plan.num_tiles, 3, r, r)
    assert out.dtype == torch.float32
    assert result.tiles_per_image == [plan.num_tiles]

    # Exact against the documented pipeline (resize, pad, normalise, cut) rebuilt from the plan.
    expected, grid = reference_tiles(image, plan, processor, torch_bicubic_aa)
    assert torch.allclose(out.double(), expected, atol=1e-5, rtol=0)
    # Within the documented tolerance of PIL's BICUBIC; padding and layout are identical.
    pil_expected, pil_grid = reference_tiles(image, plan, processor, pil_bicubic)
    assert level_difference(out, pil_expected, processor) <= PIL_TOLERANCE_LEVELS + 1e-3

    if grid is not None:
        assert pil_grid is not None
        canvas = assemble_grid(out.double(), plan)
        grid_normalised = torch.from_numpy(normalise(grid, processor.mean, processor.std))
        assert torch.allclose(canvas, grid_normalised, atol=1e-5)
        # De-normalised, the reassembled tiles are exactly an 8-bit canvas whose padding is the pad colour.
        mean = torch.tensor(processor.mean, dtype=torch.float64).view(3, 1, 1)
        std = torch.tensor(processor.std, dtype=torch.float64).view(3, 1, 1)
        levels = ((canvas * std + mean) * 255).permute(1, 2, 0).numpy()
        assert np.abs(levels - np.rint(levels)).max() < 1e-3
        pixels = np.rint(levels).astype(np.int64)
        assert np.array_equal(pixels, grid.astype(np.int64))
        height, width = plan.resized
        assert np.array_equal(pixels[height:], pil_grid[height:].astype(np.int64))
        assert np.array_equal(pixels[:, width:], pil_grid[:, width:].astype(np.int64))


def test_references_can_tell_filters_apart(images: dict[str, Image.Image]) -> None:
    """Both references are discriminating: other filters fall outside the tolerances used above."""
    image = images["grace-hopper"]  # downscaled 600 -> 96 rows: the antialiasing matters
    cfg = ImagePlanConfig(tile_size=32)
    processor = ImageProcessor(cfg)
    plan = processor.plan(image)
    out = processor([image], [plan]).pixel_values

    def bilinear(img: Image.Image, size: tuple[int, int]) -> np.ndarray:
        return np.asarray(img.resize((size[1], size[0]), Image.Resampling.BILINEAR))

    def bicubic_without_antialias(img: Image.Image, size: tuple[int, int]) -> np.ndarray:
        nchw = torch.from_numpy(np.asarray(img).copy()).permute(2, 0, 1).unsqueeze(0)
        return F.interpolate(nchw, size=size, mode="bicubic").permute(0, 2, 3, 1)[0].numpy()

    pil_bilinear, _ = reference_tiles(image, plan, processor, bilinear)
    assert level_difference(out, pil_bilinear, processor) > PIL_TOLERANCE_LEVELS + 1
    aliased, _ = reference_tiles(image, plan, processor, bicubic_without_antialias)
    assert not torch.allclose(out.double(), aliased, atol=1e-3)


def test_custom_mean_and_std(images: dict[str, Image.Image]) -> None:
    mean, std = (0.2, 0.4, 0.6), (0.5, 0.25, 0.125)
    cfg = ImagePlanConfig(tile_size=32, overview="before")
    processor = ImageProcessor(cfg, mean=mean, std=std)
    assert processor.pad_color == (51, 102, 153)
    image = images["tall-gradient"]
    plan = processor.plan(image)
    expected, _ = reference_tiles(image, plan, processor, torch_bicubic_aa)
    out = processor([image]).pixel_values
    assert torch.allclose(out.double(), expected, atol=1e-5, rtol=0)
    pad = normalise(np.array([[[51, 102, 153]]], dtype=np.uint8), mean, std)
    assert np.abs(pad).max() < 1e-12  # an exactly representable mean pads to exactly zero


@pytest.mark.parametrize("position", ["before", "after"])
def test_rows_follow_the_plan_order(images: dict[str, Image.Image], position: str) -> None:
    image = images["grace-hopper"]
    processor = ImageProcessor(ImagePlanConfig(tile_size=32, overview=position))
    result = processor([image])
    plan = result.plans[0]
    overview_row = 0 if position == "before" else plan.num_tiles - 1
    assert plan.tiles[overview_row].is_overview
    assert sum(tile.is_overview for tile in plan.tiles) == 1
    out = result.pixel_values
    assert plan.overview_resized is not None
    overview_canvas = reference_canvas(
        image, plan.overview_resized, (32, 32), processor.pad_color, torch_bicubic_aa
    )
    overview = normalise(overview_canvas, CLIP_MEAN, CLIP_STD)
    assert torch.allclose(out[overview_row].double(), torch.from_numpy(overview), atol=1e-5)
    for i in range(plan.num_tiles):
        if i != overview_row:  # the overview is distinguishable, so its position is observable
            assert not torch.allclose(out[i], out[overview_row], atol=1e-2)
    # Grid cells come in row-major order: compare against the same grid without an overview.
    no_overview = ImageProcessor(ImagePlanConfig(tile_size=32, overview="none"))([image]).pixel_values
    cells = out[1:] if position == "before" else out[:-1]
    assert torch.equal(cells, no_overview)
    assert [(t.row, t.col) for t in plan.tiles if not t.is_overview] == [
        (i, j) for i in range(1, plan.grid[0] + 1) for j in range(1, plan.grid[1] + 1)
    ]


@pytest.mark.parametrize("images_in_sample", [2, 4])
def test_batch_equals_concatenated_single_calls(
    images: dict[str, Image.Image], images_in_sample: int
) -> None:
    batch = [images[name] for name in ("noise-37x53", "tall-gradient", "page", "one-pixel")]
    cfg = ImagePlanConfig(tile_size=32)
    processor = ImageProcessor(cfg)
    count = min(images_in_sample, len(batch))
    batch = batch[:count]
    plans = [
        plan_image(image.height, image.width, cfg, image_index=k, images_in_sample=images_in_sample)
        for k, image in enumerate(batch)
    ]
    result = processor(batch, plans)
    assert result.plans == plans
    assert result.tiles_per_image == [plan.num_tiles for plan in plans]
    assert result.pixel_values.shape[0] == sum(result.tiles_per_image)
    singles = [processor([image], [plan]).pixel_values for image, plan in zip(batch, plans, strict=True)]
    assert torch.equal(result.pixel_values, torch.cat(singles))
    if images_in_sample > cfg.max_images_to_split:
        assert result.tiles_per_image == [1] * count
    else:
        assert all(n > 1 for n in result.tiles_per_image)


def test_default_plans_and_single_image_argument(images: dict[str, Image.Image]) -> None:
    processor = ImageProcessor(ImagePlanConfig(tile_size=32))
    batch = [images["noise-37x53"], images["grace-hopper"]]
    default = processor(batch)
    assert default.plans == [processor.plan(image) for image in batch]
    explicit = processor(batch, [plan_image(i.height, i.width, processor.cfg) for i in batch])
    assert torch.equal(default.pixel_values, explicit.pixel_values)
    single = processor(images["grace-hopper"])
    assert torch.equal(single.pixel_values, processor([images["grace-hopper"]]).pixel_values)


def test_non_rgb_input_is_converted(images: dict[str, Image.Image]) -> None:
    processor = ImageProcessor(ImagePlanConfig(tile_size=32))
    with Image.open(SKIMAGE_PAGE) as raw:
        gray = raw.copy()
    assert gray.mode == "L"
    assert torch.equal(processor([gray]).pixel_values, processor([images["page"]]).pixel_values)
    transparent = Image.new("RGBA", (40, 30), (0, 0, 0, 0))
    white = Image.new("RGB", (40, 30), WHITE)
    assert torch.equal(processor([transparent]).pixel_values, processor([white]).pixel_values)


def test_bfloat16_output(images: dict[str, Image.Image]) -> None:
    cfg = ImagePlanConfig(tile_size=32)
    image = images["grace-hopper"]
    half = ImageProcessor(cfg, dtype=torch.bfloat16)([image])
    full = ImageProcessor(cfg)([image])
    assert half.pixel_values.dtype == torch.bfloat16
    assert half.pixel_values.shape == full.pixel_values.shape
    assert torch.allclose(half.pixel_values.float(), full.pixel_values, atol=0.03, rtol=0)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_low_precision_output_is_the_float32_output_rounded_once(
    images: dict[str, Image.Image], dtype: torch.dtype
) -> None:
    """Normalising in bfloat16 rounded the scale, the shift and each step: 61% of the values of
    grace-hopper differed from the float32 output rounded to bfloat16, by up to 0.0156 (2 bfloat16 steps)."""
    cfg = ImagePlanConfig(tile_size=32)
    batch = [images["grace-hopper"], images["noise-37x53"]]
    full = ImageProcessor(cfg)(batch).pixel_values
    low = ImageProcessor(cfg, dtype=dtype)(batch).pixel_values
    assert low.dtype == dtype
    assert torch.equal(low, full.to(dtype))
    raw = ImageProcessor(cfg, dtype=torch.uint8)(batch).pixel_values
    assert torch.equal(normalize_pixels(raw, CLIP_MEAN, CLIP_STD, dtype), full.to(dtype))
    levels = torch.arange(256, dtype=torch.uint8).expand(3, 1, 256)  # every 8-bit value in every channel
    expected = normalize_pixels(levels, CLIP_MEAN, CLIP_STD).to(dtype)
    assert torch.equal(normalize_pixels(levels, CLIP_MEAN, CLIP_STD, dtype), expected)


def test_uint8_output_normalises_to_the_float_output_bit_for_bit(images: dict[str, Image.Image]) -> None:
    cfg = ImagePlanConfig(tile_size=32)
    batch = [images["grace-hopper"], images["page"]]
    raw = ImageProcessor(cfg, dtype=torch.uint8)(batch)
    full = ImageProcessor(cfg)(batch)
    assert raw.pixel_values.dtype == torch.uint8
    assert raw.tiles_per_image == full.tiles_per_image
    assert torch.equal(normalize_pixels(raw.pixel_values, CLIP_MEAN, CLIP_STD), full.pixel_values)
    # Padding keeps the 8-bit colour nearest the mean: the last grid tile's bottom-right pixel is padding
    # when the resized image is smaller than the canvas (the overview comes after the grid).
    plan = raw.plans[0]
    assert plan.resized != plan.canvas
    pad = torch.tensor(ImageProcessor(cfg).pad_color, dtype=torch.uint8)
    assert torch.equal(raw.pixel_values[plan.num_tiles - 2, :, -1, -1], pad)


def test_normalize_pixels_and_processor_dtype_errors() -> None:
    with pytest.raises(TypeError, match="uint8"):
        normalize_pixels(torch.zeros(1, 3, 4, 4), CLIP_MEAN, CLIP_STD)
    with pytest.raises(ValueError, match=r"float dtype or torch\.uint8"):
        ImageProcessor(ImagePlanConfig(tile_size=32), dtype=torch.int32)
    with pytest.raises(ValueError, match="3 channels"):
        ImageProcessor(ImagePlanConfig(tile_size=32), mean=(0.5, 0.5))


def test_padding_normalises_to_about_zero() -> None:
    cfg = ImagePlanConfig(tile_size=32)
    processor = ImageProcessor(cfg)
    assert processor.pad_color == (123, 117, 104)  # the 8-bit colour nearest the CLIP mean
    image = Image.new("RGB", (200, 20), WHITE)  # very wide: large bottom padding
    result = processor([image])
    plan = result.plans[0]
    assert plan.padding[0] > 0
    canvas = assemble_grid(result.pixel_values.double(), plan)
    content_h, content_w = plan.resized
    padding = torch.cat([canvas[:, content_h:, :].flatten(), canvas[:, :, content_w:].flatten()])
    assert padding.numel() > 0
    assert padding.abs().max() < 0.01
    assert canvas[:, :content_h, :content_w].min() > 1.5  # white is far from zero
    overview = result.pixel_values[next(i for i, t in enumerate(plan.tiles) if t.is_overview)]
    assert plan.overview_resized is not None and plan.overview_resized[0] < 32
    assert overview[:, plan.overview_resized[0] :, :].abs().max() < 0.01
    assert overview[:, : plan.overview_resized[0], : plan.overview_resized[1]].min() > 1.5


def test_plan_and_image_mismatches_are_errors(images: dict[str, Image.Image]) -> None:
    cfg = ImagePlanConfig(tile_size=32)
    processor = ImageProcessor(cfg)
    image = images["noise-37x53"]  # 53 wide, 37 high
    with pytest.raises(ValueError, match="plan is for a 38x53 image, got 37x53"):
        processor([image], [plan_image(38, 53, cfg)])
    with pytest.raises(ValueError, match="plan is for a 53x37 image"):
        processor([image], [plan_image(53, 37, cfg)])  # transposed (width, height) by mistake
    with pytest.raises(ValueError, match="got 2 images but 1 plans"):
        processor([image, image], [processor.plan(image)])
    with pytest.raises(ValueError, match="got 1 images but 2 plans"):
        processor([image], [processor.plan(image)] * 2)
    with pytest.raises(ValueError, match="tile size 56, processor 32"):
        processor([image], [plan_image(37, 53, ImagePlanConfig(tile_size=56))])


@pytest.mark.parametrize(
    ("mean", "std"),
    [((0.5, 0.5), (0.5, 0.5, 0.5)), ((0.5, 0.5, 0.5), (0.5, 0.0, 0.5)), ((0.5, 0.5, 0.5), (0.5, 0.5, -1.0))],
)
def test_processor_rejects_bad_normalisation(mean: tuple[float, ...], std: tuple[float, ...]) -> None:
    with pytest.raises(ValueError, match="mean and std"):
        ImageProcessor(mean=mean, std=std)
