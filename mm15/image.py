"""Safe image decoding and the tile processor.

``load_image`` turns a path or bytes into an RGB ``PIL.Image`` or raises an ``ImageError`` that names
the source. What it does with awkward files:

* EXIF orientation is applied, so the pixels are upright as a viewer shows them.
* Every mode becomes RGB. Transparency (RGBA, LA, PA, P or L with a transparent colour) is composited
  over ``ALPHA_BACKGROUND`` (white, as documents and screenshots usually are). 16-bit integer images
  (I;16*, I) are scaled from [0, 65535] to 8 bits; float images (F) are read as [0, 1] when their
  maximum is at most 1, else as [0, 255], and clipped.
* Animated images (GIF, APNG, WebP) give their first frame.
* Images over ``max_pixels`` are refused from the header alone, before any pixel is decoded
  (``ImageTooLargeError``), so a small file claiming huge dimensions cannot exhaust memory.
* Empty, truncated, corrupt or non-image files raise ``ImageDecodeError``.

``ImageProcessor`` turns images and their ``TilePlan`` into encoder inputs: the image is resized once
(antialiased bicubic), pasted at the top-left of the padded canvas, cut into tiles by a tensor view and
converted and normalised with the encoder's mean and std straight into the output. Padding is the
8-bit colour nearest the encoder's mean, so it normalises to (almost exactly) zero. With
``dtype=torch.uint8`` it returns the raw 8-bit tiles instead and the encoder normalises them
(``normalize_pixels``, the same arithmetic, so the encoder sees the same values bit for bit): a quarter of
the memory and copying between the data path and the model, as training uses it.
"""

from __future__ import annotations

import io
import os
import warnings
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from PIL import ExifTags, Image, ImageOps, UnidentifiedImageError

from mm15.geometry import ImagePlanConfig, TilePlan, plan_image
from mm15.paths import not_a_file_reason

DEFAULT_MAX_PIXELS = 64_000_000
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


def normalize_pixels(
    pixels: torch.Tensor, mean: Sequence[float], std: Sequence[float], dtype: torch.dtype = torch.float32
) -> torch.Tensor:
    """uint8 tiles (..., 3, r, r) -> normalised ``dtype`` tiles, as ``ImageProcessor`` computes them."""
    if pixels.dtype != torch.uint8:
        raise TypeError(f"normalize_pixels expects uint8 pixels, got {pixels.dtype}")
    scale, shift = pixel_affine(mean, std, dtype)
    return pixels.to(dtype).mul_(scale.to(pixels.device)).add_(shift.to(pixels.device))


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
    ``tRNS`` chunk, in RGB and 16-bit images too): each is composited over ``ALPHA_BACKGROUND``.
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


def _open(src: str | os.PathLike | bytes, source: str) -> Image.Image:
    """``Image.open`` of a path or bytes: reads the header only; every failure is an ``ImageError``."""
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
        image = Image.open(fp)
    except UnidentifiedImageError:
        raise ImageDecodeError(source, "not a recognised image format") from None
    except Image.DecompressionBombError as err:
        raise ImageTooLargeError(source, str(err)) from None
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
    microseconds): the check ``mm15 data pack`` runs on every image. Damage past the header (a truncated
    body) shows only when the pixels are decoded.
    """
    source = _source_name(src, name)
    with _open(src, source) as image:
        _check_size(image, source, max_pixels)
        width, height = image.size
        try:
            orientation = image.getexif().get(ExifTags.Base.Orientation, 1)
        except (OSError, SyntaxError, ValueError):  # a damaged EXIF block: load_image will report it
            orientation = 1
        # Pillow's TIFF plugin reports the upright size at open already (its stored size is
        # ``_tile_size``); the other formats report the stored one, which the orientation transposes.
        stored = getattr(image, "_tile_size", (width, height))
        transposes = orientation in (5, 6, 7, 8) and tuple(stored) == (width, height)
        return (height, width) if transposes else (width, height)


def load_image(
    src: ImageSource,
    *,
    max_pixels: int = DEFAULT_MAX_PIXELS,
    name: str | None = None,
) -> Image.Image:
    """Decode ``src`` (path, bytes or PIL image) into an upright RGB image; see the module docstring."""
    source = _source_name(src, name)
    image = src if isinstance(src, Image.Image) else _open(src, source)
    result: Image.Image | None = None
    try:
        _check_size(image, source, max_pixels)
        image.seek(0)  # the first frame of an animation
        image.load()
        upright = image
        if image.getexif().get(ExifTags.Base.Orientation, 1) != 1:
            upright = ImageOps.exif_transpose(image)
        result = to_rgb(upright)
        if result is image and getattr(image, "n_frames", 1) > 1:
            result = image.copy()  # an animation keeps its file open for the other frames: detach
        return result
    except ImageError:
        raise
    except Image.DecompressionBombError as err:
        raise ImageTooLargeError(source, str(err)) from None
    except (OSError, SyntaxError, ValueError, EOFError) as err:
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
    by a view and converted and normalised straight into the output tensor. ``pad_color`` is public: it is the
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
        # x_normalised = x_uint8 * scale + shift, per channel (unused for uint8 output).
        affine_dtype = torch.float32 if dtype == torch.uint8 else dtype
        self._scale, self._shift = pixel_affine(self.mean, self.std, affine_dtype)

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
        tiles.copy_(chw.reshape(3, rows, r, cols, r).permute(1, 3, 0, 2, 4))
        if out.dtype != torch.uint8:  # the same two in-place steps as normalize_pixels
            tiles.mul_(self._scale).add_(self._shift)

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
