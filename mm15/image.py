"""Safe image decoding and the tile processor.

``load_image`` turns a path or bytes into an RGB ``PIL.Image`` or raises an ``ImageError`` that names
the source. What it does with awkward files:

* EXIF orientation is applied, so the pixels are upright as a viewer shows them.
* Every mode becomes RGB. Transparency (RGBA, LA, PA, P or L with a transparent colour) is composited
  over ``ALPHA_BACKGROUND`` (white, as documents and screenshots usually are); a PNG's transparent
  colour (``tRNS``) is matched exactly at every bit depth, 2- and 4-bit grey and 16-bit RGB included,
  though Pillow decodes those to other values than the key's. 16-bit integer images
  (I;16*, I) are scaled from [0, 65535] to 8 bits; float images (F) are read as [0, 1] when their
  maximum is at most 1, else as [0, 255], and clipped.
* Animated images (GIF, APNG, WebP) give their first frame.
* Images over ``max_pixels`` are refused from the header alone, before any pixel is decoded
  (``ImageTooLargeError``), so a small file claiming huge dimensions cannot exhaust memory.
  ``max_pixels`` may exceed Pillow's own limit (``Image.MAX_IMAGE_PIXELS``, which it enforces at open
  at twice its value); Pillow's global is never changed. Pillow's TIFF decoder and GIF frames repeat its
  check while decoding, so those need its limit raised for the process too.
* Empty, truncated, corrupt or non-image files raise ``ImageDecodeError``.

``ImageProcessor`` turns images and their ``TilePlan`` into encoder inputs: the image is resized once
(antialiased bicubic), pasted at the top-left of the padded canvas, cut into tiles by a tensor view and
converted and normalised with the encoder's mean and std straight into the output (in float32, and
rounded once for a bfloat16 or float16 output). Padding is the
8-bit colour nearest the encoder's mean, so it normalises to (almost exactly) zero. With
``dtype=torch.uint8`` it returns the raw 8-bit tiles instead and the encoder normalises them
(``normalize_pixels``, the same arithmetic, so the encoder sees the same values bit for bit): a quarter of
the memory and copying between the data path and the model, as training uses it.
"""

from __future__ import annotations

import io
import os
import struct
import warnings
import zlib
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import IO, Any

import numpy as np
import torch
import torch.nn.functional as F
from PIL import ExifTags, Image, ImageFile, ImageOps, PngImagePlugin, UnidentifiedImageError

from mm15.geometry import ImagePlanConfig, TilePlan, plan_image
from mm15.paths import not_a_file_reason

DEFAULT_MAX_PIXELS = 64_000_000
_PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"
ALPHA_BACKGROUND = (255, 255, 255)
# Mean and std of OpenAI CLIP / DFN-CLIP preprocessing, the encoder family MM1.5 uses.
CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
CLIP_STD = (0.26862954, 0.26130258, 0.27577711)

ImageSource = str | os.PathLike | bytes | Image.Image


def pixel_affine(
    mean: Sequence[float], std: Sequence[float], dtype: torch.dtype = torch.float32
) -> tuple[torch.Tensor, torch.Tensor]:
    """(scale, shift), each (3, 1, 1), with ``normalised = uint8 * scale + shift`` per channel."""
    if len(mean) != 3 or len(std) != 3 or min(std) <= 0:
        raise ValueError(f"mean and std need 3 channels with std > 0, got mean={mean}, std={std}")
    scale = torch.tensor([1.0 / (255.0 * s) for s in std], dtype=dtype).view(3, 1, 1)
    shift = torch.tensor([-m / s for m, s in zip(mean, std, strict=True)], dtype=dtype).view(3, 1, 1)
    return scale, shift


def _compute_dtype(dtype: torch.dtype) -> torch.dtype:
    """The dtype the normalisation is computed in for a ``dtype`` output: at least float32.

    In bfloat16 or float16 the scale, the shift and each of the two steps would round on their own
    (bfloat16 keeps 8 significant bits), so those outputs are computed in float32 and rounded once.
    """
    return torch.promote_types(dtype, torch.float32)


def normalize_pixels(
    pixels: torch.Tensor, mean: Sequence[float], std: Sequence[float], dtype: torch.dtype = torch.float32
) -> torch.Tensor:
    """uint8 tiles (..., 3, r, r) -> normalised ``dtype`` tiles, as ``ImageProcessor`` computes them.

    Computed in float32 (float64 for a float64 ``dtype``) and cast to ``dtype`` once at the end.
    """
    if pixels.dtype != torch.uint8:
        raise TypeError(f"normalize_pixels expects uint8 pixels, got {pixels.dtype}")
    compute = _compute_dtype(dtype)
    scale, shift = pixel_affine(mean, std, compute)
    out = pixels.to(compute).mul_(scale.to(pixels.device)).add_(shift.to(pixels.device))
    return out.to(dtype)


class ImageError(ValueError):
    """An image could not be used; ``source`` names the file (or "<bytes>")."""

    def __init__(self, source: str, reason: str) -> None:
        super().__init__(f"{source}: {reason}")
        self.source = source
        self.reason = reason

    def __reduce__(self) -> tuple[Any, ...]:
        # Rebuilt from its fields (and notes), so it crosses processes (the data worker) as itself.
        return type(self), (self.source, self.reason), self.__dict__


class ImageDecodeError(ImageError):
    """The data is empty, truncated, corrupt or not an image."""


class ImageTooLargeError(ImageError):
    """The image has more pixels than allowed (a decompression-bomb guard)."""


def _source_name(src: ImageSource, name: str | None) -> str:
    if name is not None:
        return name
    if isinstance(src, bytes):
        return "<bytes>"
    if isinstance(src, Image.Image):
        return "<PIL image>"
    return os.fspath(src)


def _composite(image: Image.Image) -> Image.Image:
    background = Image.new("RGB", image.size, ALPHA_BACKGROUND)
    background.paste(image, mask=image.getchannel("A"))
    return background


def _high_bit_depth_to_rgb(image: Image.Image) -> Image.Image:
    array = np.asarray(image, dtype=np.float64)
    if image.mode == "F":
        finite = array[np.isfinite(array)]
        top = 1.0 if finite.size == 0 or finite.max() <= 1.0 else 255.0
        array = np.nan_to_num(array, nan=0.0, posinf=top, neginf=0.0) * (255.0 / top)
    else:  # I;16 variants and 32-bit I hold 16-bit samples
        array = array / 257.0
    gray = np.clip(np.rint(array), 0, 255).astype(np.uint8)
    return Image.fromarray(gray, mode="L").convert("RGB")


def to_rgb(image: Image.Image) -> Image.Image:
    """Convert any PIL mode to RGB with the documented rules (alpha over white, 16-bit scaled).

    Transparency comes as an alpha band, as a palette with alpha, or as one transparent colour (a PNG
    ``tRNS`` chunk, in RGB and 16-bit images too): each is composited over ``ALPHA_BACKGROUND``. The
    key of a 2- or 4-bit grey or 16-bit RGB PNG is in the file's sample values, which the decoded image
    no longer holds: ``load_image`` matches it before decoding, this cannot.
    """
    mode = image.mode
    transparent = image.has_transparency_data
    if mode == "RGB" and not transparent:
        return image
    if mode in ("F", "I") or mode.startswith("I;16"):
        rgb = _high_bit_depth_to_rgb(image)
        if "transparency" in image.info:  # one transparent sample value
            clear = np.asarray(image) == image.info["transparency"]
            rgb.paste(ALPHA_BACKGROUND, mask=Image.fromarray(clear.astype(np.uint8) * 255, mode="L"))
        return rgb
    if mode == "La":  # premultiplied alpha, which PIL converts only to LA
        image, mode = image.convert("LA"), "LA"
    if mode in ("RGBA", "LA", "PA", "RGBa", "La") or transparent:
        return _composite(image.convert("RGBA"))
    return image.convert("RGB")


def _open_past_pillow_limit(fp: str | io.BytesIO) -> ImageFile.ImageFile:
    """``Image.open`` without Pillow's pixel-count check, for a ``max_pixels`` above Pillow's own limit.

    Pillow reads its limit from the global ``Image.MAX_IMAGE_PIXELS`` at every check. Raising it for one
    call would loosen it for every thread of the process while the call runs (and a concurrent change to
    it would be undone), so the limit is left alone: this runs Pillow's format detection itself (its
    registered openers in its order, as ``Image.open`` does) and leaves the size to ``_check_size``,
    which the callers run at once. ``fp`` is a path (the opener then owns and closes the file) or bytes.
    """
    if isinstance(fp, str):
        with open(fp, "rb") as file:
            prefix = file.read(16)
    else:
        fp.seek(0)
        prefix = fp.read(16)
    Image.init()
    for fmt in Image.ID:
        factory, accept = Image.OPEN[fmt]
        # As in Pillow's own loop, a check that fails on a short prefix (BMP's unpacks 4 bytes) means
        # "not this format", like an opener that fails.
        try:
            verdict = accept(prefix) if accept is not None else True
            if isinstance(verdict, str) or not verdict:  # a string says why the format does not apply
                continue
            if not isinstance(fp, str):
                fp.seek(0)
            return factory(fp, fp if isinstance(fp, str) else None)
        except (SyntaxError, IndexError, TypeError, struct.error):  # not this format: try the next
            continue
    raise UnidentifiedImageError("cannot identify image file")


def _open(src: str | os.PathLike | bytes, source: str, max_pixels: int) -> Image.Image:
    """``Image.open`` of a path or bytes: reads the header only; every failure is an ``ImageError``.

    A ``max_pixels`` above Pillow's own limit replaces it (see ``_open_past_pillow_limit``).
    """
    if isinstance(src, bytes):
        if not src:
            raise ImageDecodeError(source, "empty data (0 bytes)")
        fp: io.BytesIO | str = io.BytesIO(src)
    else:
        path = Path(src)
        if (problem := not_a_file_reason(path)) is not None:
            raise ImageDecodeError(source, problem)
        if path.stat().st_size == 0:
            raise ImageDecodeError(source, "empty file (0 bytes)")
        fp = os.fspath(path)
    try:
        pillow_limit = Image.MAX_IMAGE_PIXELS
        if pillow_limit is not None and max_pixels > pillow_limit:
            image = _open_past_pillow_limit(fp)
        else:
            image = Image.open(fp)
    except UnidentifiedImageError:
        raise ImageDecodeError(source, "not a recognised image format") from None
    except (Image.DecompressionBombError, Image.DecompressionBombWarning):
        # Pillow's own limit tripped (the warning arrives as an exception where warnings are errors):
        # its message names Pillow's limit, so read the header again past it and report ours.
        if not isinstance(fp, str):
            fp.seek(0)
        with _open_past_pillow_limit(fp) as image:
            _check_size(image, source, max_pixels)
        raise  # unreachable unless max_pixels exceeds Pillow's limit, which the branch above handles
    except (OSError, SyntaxError, ValueError) as err:
        raise ImageDecodeError(source, f"cannot read image header ({err})") from None
    return image


def _check_size(image: Image.Image, source: str, max_pixels: int) -> None:
    width, height = image.size
    if width < 1 or height < 1:
        raise ImageDecodeError(source, f"image has no pixels ({width}x{height})")
    if width * height > max_pixels:
        raise ImageTooLargeError(
            source, f"{width}x{height} = {width * height} pixels exceeds the limit of {max_pixels}"
        )


# Text chunks whose keyword names a source of EXIF orientation for Pillow: EXIF itself, EXIF as hex
# text (ImageMagick's "Raw profile type exif") and XMP.
_PNG_EXIF_KEYWORDS = frozenset({b"exif", b"Raw profile type exif", b"XML:com.adobe.xmp"})


def _png_chunk(kind: bytes, data: bytes) -> bytes:
    """One PNG chunk: length, type, data and the CRC-32 of type + data."""
    return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))


def _png_exif_chunks(fp: IO[bytes]) -> tuple[list[tuple[bytes, bytes]], bool]:
    """(type, data) of the chunks a PNG's EXIF orientation can come from, in file order, wherever they
    are, and whether any of them follows the pixel data.

    Pillow reads the chunks after the pixel data (where eXIf often is) only when it decodes the pixels;
    this walk reads chunk headers and seeks past every other chunk, the pixel data above all. It stops
    where decoding stops reading: at IEND, at the second animation frame (an fcTL after image data),
    or at damage (a chunk cut short or a malformed type), which only decoding reports.
    """
    size = fp.seek(0, os.SEEK_END)
    position = len(_PNG_SIGNATURE)
    found: list[tuple[bytes, bytes]] = []
    after_pixels = any_after = False
    while position + 12 <= size:
        fp.seek(position)
        length, kind = struct.unpack(">I4s", fp.read(8))
        end = position + 12 + length  # length, type, data, CRC
        if not kind.isalpha() or end > size or kind == b"IEND" or (after_pixels and kind == b"fcTL"):
            break
        if kind == b"eXIf":
            found.append((kind, fp.read(length)))
            any_after = any_after or after_pixels
        elif kind in (b"tEXt", b"zTXt", b"iTXt"):
            head = fp.read(min(length, 80))  # a keyword is 1 to 79 bytes, then a NUL
            if head.split(b"\0", 1)[0] in _PNG_EXIF_KEYWORDS:
                found.append((kind, head + fp.read(length - len(head))))
                any_after = any_after or after_pixels
        after_pixels = after_pixels or kind in (b"IDAT", b"fdAT")
        position = end
    return found, any_after


def _png_orientation(image: Image.Image, src: str | os.PathLike | bytes) -> int:
    """The EXIF orientation ``load_image`` applies to the PNG ``image`` opened from ``src``, found
    without decoding its pixels."""
    with io.BytesIO(src) if isinstance(src, bytes) else open(src, "rb", buffering=0) as fp:
        chunks, any_after_pixels = _png_exif_chunks(fp)
    if not any_after_pixels:
        # Open has read them all. The base method reads what open found; PngImageFile's would decode the
        # pixels to look for more.
        return Image.Image.getexif(image).get(ExifTags.Base.Orientation, 1)
    # Pillow parses the chunks itself, so the keys, text decoding and limits and the merging of EXIF, EXIF
    # as text and XMP stay its own: a 1x1 stand-in carries them before its (absent) pixel data, where it
    # reads them at open. Its CRCs are fresh: decoding does not check those of chunks after the pixels.
    ihdr = struct.pack(">IIBBBBB", 1, 1, 8, 0, 0, 0, 0)  # 1x1, 8-bit grey
    parts = [_PNG_SIGNATURE, _png_chunk(b"IHDR", ihdr), *(_png_chunk(k, d) for k, d in chunks)]
    with Image.open(io.BytesIO(b"".join([*parts, _png_chunk(b"IEND", b"")])), formats=["PNG"]) as stand_in:
        return Image.Image.getexif(stand_in).get(ExifTags.Base.Orientation, 1)


def image_size(
    src: str | os.PathLike | bytes,
    *,
    max_pixels: int = DEFAULT_MAX_PIXELS,
    name: str | None = None,
) -> tuple[int, int]:
    """(width, height) of an encoded image as ``load_image`` returns it, from its header alone.

    The size is the upright one: an EXIF orientation that transposes (5 to 8) swaps the stored sides,
    as ``load_image`` does. Raises the ``ImageError`` that ``load_image`` would for a missing or 0-byte
    file, unrecognised data, a corrupt header, no pixels or too many, without decoding pixels (tens of
    microseconds; a PNG's chunk list is walked, headers only, since its EXIF may follow the pixel data:
    about a microsecond a chunk more): the check ``mm15 data pack`` runs on every image. Damage past the
    header (a truncated body, a chunk list cut short, a damaged EXIF block) shows only when the pixels
    are decoded; here the EXIF it hides or spoils counts as absent (orientation 1).
    """
    source = _source_name(src, name)
    with _open(src, source, max_pixels) as image:
        _check_size(image, source, max_pixels)
        width, height = image.size
        try:
            if image.format == "PNG":  # Pillow's PNG getexif() decodes the pixels to look past them
                orientation = _png_orientation(image, src)
            else:
                orientation = image.getexif().get(ExifTags.Base.Orientation, 1)
        except (OSError, SyntaxError, ValueError, struct.error):  # a damaged EXIF block
            orientation = 1
        # Pillow's TIFF plugin reports the upright size at open already (its stored size is
        # ``_tile_size``); the other formats report the stored one, which the orientation transposes.
        stored = getattr(image, "_tile_size", (width, height))
        transposes = orientation in (5, 6, 7, 8) and tuple(stored) == (width, height)
        return (height, width) if transposes else (width, height)


def _png_low_bytes(image: Image.Image) -> np.ndarray:
    """(H, W, 3) low bytes of a 16-bit RGB PNG's samples, which Pillow drops: a second decode of the same
    data by the little-endian unpacker, whose "high" byte is the big-endian low one. Before ``load()``."""
    assert image.fp is not None
    image.fp.seek(0)  # Image.open reads from the start; load() seeks to the pixel data itself
    with _open_past_pillow_limit(io.BytesIO(image.fp.read())) as twin:  # its size is checked already
        twin.tile = [tile._replace(args="RGB;16L") for tile in twin.tile]
        twin.load()
        return np.asarray(twin)


def _png_key_opaque(image: Image.Image) -> np.ndarray | None:
    """(H, W) bool, False at the pixels of a PNG's tRNS colour key where Pillow would miss them; else None.

    Pillow keeps the key in the file's sample scale but compares it with decoded pixels: 2- and 4-bit
    grey are scaled to 8 bits (v * 85, v * 17) and 16-bit RGB keeps its high bytes, so a keyed pixel
    stays opaque (and in 16-bit RGB the key's low bytes match other pixels' high bytes). Call it before
    ``image.load()``: the decoder's raw mode is known only until then. It loads the image.
    """
    key = image.info.get("transparency")
    if not isinstance(image, PngImagePlugin.PngImageFile) or key is None or not image.tile:
        return None
    rawmode = image.tile[0].args
    if rawmode in ("L;2", "L;4") and isinstance(key, int):
        step = 255 // ((1 << int(rawmode[-1])) - 1)  # Pillow's 8-bit value of one step
        image.load()
        return np.asarray(image) != key * step
    if rawmode == "RGB;16B" and isinstance(key, tuple):
        low = _png_low_bytes(image)
        image.load()
        high = np.asarray(image)
        keyed = (high == [k >> 8 for k in key]) & (low == [k & 0xFF for k in key])
        return ~keyed.all(axis=-1)
    return None


def load_image(
    src: ImageSource,
    *,
    max_pixels: int = DEFAULT_MAX_PIXELS,
    name: str | None = None,
) -> Image.Image:
    """Decode ``src`` (path, bytes or PIL image) into an upright RGB image; see the module docstring."""
    source = _source_name(src, name)
    image = src if isinstance(src, Image.Image) else _open(src, source, max_pixels)
    result: Image.Image | None = None
    try:
        _check_size(image, source, max_pixels)
        image.seek(0)  # the first frame of an animation
        opaque = _png_key_opaque(image)
        image.load()
        upright = image
        if opaque is not None:  # the key as an alpha band, which to_rgb composites as any other
            alpha = Image.fromarray(opaque.astype(np.uint8) * 255)
            upright = Image.merge("LA" if image.mode == "L" else "RGBA", (*image.split(), alpha))
            # The rest of the info (EXIF, XMP) goes along, for exif_transpose.
            upright.info = {k: v for k, v in image.info.items() if k != "transparency"}
        if image.getexif().get(ExifTags.Base.Orientation, 1) != 1:
            upright = ImageOps.exif_transpose(upright)
        result = to_rgb(upright)
        if result is image and getattr(image, "n_frames", 1) > 1:
            result = image.copy()  # an animation keeps its file open for the other frames: detach
        return result
    except ImageError:
        raise
    except (Image.DecompressionBombError, Image.DecompressionBombWarning) as err:
        raise ImageTooLargeError(source, str(err)) from None
    # Pillow's plugins raise TypeError on some corrupt structures (TIFF: a later page without
    # dimensions, found when the page count is asked for).
    except (OSError, SyntaxError, ValueError, EOFError, TypeError, struct.error) as err:
        raise ImageDecodeError(source, f"corrupt or truncated image data ({err})") from None
    finally:
        # Close what we opened unless it is the image we return (then PIL already closed its file).
        if image is not src and (result is None or result is not image):
            image.close()


@dataclass
class ProcessedImages:
    """Encoder inputs of a batch of images.

    ``pixel_values`` is (total tiles, 3, r, r) with each image's tiles contiguous, in its plan's
    order; ``tiles_per_image[i] == plans[i].num_tiles``.
    """

    pixel_values: torch.Tensor
    plans: list[TilePlan]

    @property
    def tiles_per_image(self) -> list[int]:
        return [plan.num_tiles for plan in self.plans]


class ImageProcessor:
    """Images + tile plans -> normalised tile tensors: one resize per encoder view, one pass per tile.

    Resizing is torch's antialiased bicubic interpolation on uint8 pixels (PIL's BICUBIC filter,
    multi-threaded, and 2-3x faster here). The two libraries round to 8 bits between their horizontal
    and vertical passes in a different order: most values agree within 2 levels, but on strongly
    downscaled, tall, high-contrast images (text screenshots) a value can differ by up to about 20
    levels, and neither is closer than the other to an exact float64 resize. The resized image is
    pasted at the top-left of a uint8 canvas filled with the pad colour; the canvas is cut into tiles
    by a view and converted and normalised straight into the output tensor (through a float32 buffer for a
    bfloat16 or float16 output, rounded once). ``pad_color`` is public: it is the
    documented padding value. ``dtype=torch.uint8`` skips the normalisation (the encoder does it).
    """

    def __init__(
        self,
        cfg: ImagePlanConfig | None = None,
        mean: Sequence[float] = CLIP_MEAN,
        std: Sequence[float] = CLIP_STD,
        dtype: torch.dtype = torch.float32,
    ) -> None:
        if dtype != torch.uint8 and not dtype.is_floating_point:
            raise ValueError(f"ImageProcessor dtype must be a float dtype or torch.uint8, got {dtype}")
        self.cfg = cfg or ImagePlanConfig()
        self.mean = tuple(float(m) for m in mean)
        self.std = tuple(float(s) for s in std)
        self.dtype = dtype
        self.pad_color = tuple(round(m * 255) for m in self.mean)
        # x_normalised = x_uint8 * scale + shift, per channel, computed in at least float32 (unused for
        # uint8 output).
        self._compute = _compute_dtype(torch.float32 if dtype == torch.uint8 else dtype)
        self._scale, self._shift = pixel_affine(self.mean, self.std, self._compute)

    def plan(self, image: Image.Image, image_index: int = 0, images_in_sample: int = 1) -> TilePlan:
        return plan_image(
            image.height, image.width, self.cfg, image_index=image_index, images_in_sample=images_in_sample
        )

    def _canvas(self, pixels: torch.Tensor, size: tuple[int, int], canvas: tuple[int, int]) -> torch.Tensor:
        """``pixels`` (1, 3, H, W) uint8 resized to ``size`` on a pad-coloured canvas, as CHW uint8."""
        resized = pixels
        if size != tuple(pixels.shape[-2:]):
            resized = F.interpolate(pixels, size=size, mode="bicubic", antialias=True)
        if size == canvas:
            return resized[0]
        # CHW throughout: the interpolation writes CHW, so the paste is row copies and the
        # padding is one memset per channel and stripe.
        board = torch.empty(3, *canvas, dtype=torch.uint8)
        h, w = size
        board[:, :h, :w] = resized[0]
        for channel, value in enumerate(self.pad_color):
            board[channel, h:].fill_(value)
            board[channel, :h, w:].fill_(value)
        return board

    def _write(self, out: torch.Tensor, chw: torch.Tensor) -> None:
        """Cut a CHW uint8 canvas into (rows * cols, 3, r, r) tiles of ``out``, normalised."""
        r = self.cfg.tile_size
        rows, cols = chw.shape[1] // r, chw.shape[2] // r
        tiles = out.view(rows, cols, 3, r, r)
        cut = chw.reshape(3, rows, r, cols, r).permute(1, 3, 0, 2, 4)
        if out.dtype in (torch.uint8, self._compute):
            tiles.copy_(cut)
            if out.dtype != torch.uint8:  # the same two in-place steps as normalize_pixels
                tiles.mul_(self._scale).add_(self._shift)
        else:  # bfloat16 or float16: the same steps in float32, rounded once into the output
            tiles.copy_(cut.to(self._compute).mul_(self._scale).add_(self._shift))

    def __call__(
        self, images: Sequence[Image.Image], plans: Sequence[TilePlan] | None = None
    ) -> ProcessedImages:
        """Process a batch; ``plans`` default to each image planned on its own (one image per sample)."""
        if isinstance(images, Image.Image):
            images = [images]
        plans = list(plans) if plans is not None else [self.plan(image) for image in images]
        if len(plans) != len(images):
            raise ValueError(f"got {len(images)} images but {len(plans)} plans")
        r = self.cfg.tile_size
        out = torch.empty(sum(plan.num_tiles for plan in plans), 3, r, r, dtype=self.dtype)
        start = 0
        for image, plan in zip(images, plans, strict=True):
            if (image.height, image.width) != (plan.height, plan.width):
                raise ValueError(
                    f"plan is for a {plan.height}x{plan.width} image, got {image.height}x{image.width}"
                )
            if plan.tile_size != r:
                raise ValueError(f"plan has tile size {plan.tile_size}, processor {r}")
            with warnings.catch_warnings():
                # PIL's arrays are read-only and torch warns about that; this tensor is only read.
                warnings.simplefilter("ignore", UserWarning)
                hwc = torch.from_numpy(np.asarray(to_rgb(image)))
            # An NCHW view in channels-last memory, no copy. Unsqueezing before permuting gives the batch
            # dimension a real stride, which torch's fast uint8 antialiased kernels require (3x faster).
            pixels = hwc.unsqueeze(0).permute(0, 3, 1, 2)
            cells = [i for i, tile in enumerate(plan.tiles) if not tile.is_overview]
            if cells:
                # Grid cells are contiguous in the plan's order (the overview is first or last).
                first = start + cells[0]
                self._write(out[first : first + len(cells)], self._canvas(pixels, plan.resized, plan.canvas))
            for i, tile in enumerate(plan.tiles):
                if tile.is_overview:
                    overview = self._canvas(pixels, plan.overview_resized, (r, r))
                    self._write(out[start + i : start + i + 1], overview)
            start += plan.num_tiles
        return ProcessedImages(out, plans)
