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
(PIL, antialiased), pasted at the top-left of the padded canvas, converted and normalised with the
encoder's mean and std in one pass, and the canvas is cut into tiles by a tensor view. Padding is the
8-bit colour nearest the encoder's mean, so it normalises to (almost exactly) zero.
"""

from __future__ import annotations

import io
import os
import warnings
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from PIL import Image, ImageOps, UnidentifiedImageError

from mm15.geometry import ImagePlanConfig, TilePlan, plan_image

DEFAULT_MAX_PIXELS = 64_000_000
ALPHA_BACKGROUND = (255, 255, 255)
# Mean and std of OpenAI CLIP / DFN-CLIP preprocessing, the encoder family MM1.5 uses.
CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
CLIP_STD = (0.26862954, 0.26130258, 0.27577711)

ImageSource = str | os.PathLike | bytes | Image.Image


class ImageError(ValueError):
    """An image could not be used; ``source`` names the file (or "<bytes>")."""

    def __init__(self, source: str, reason: str) -> None:
        super().__init__(f"{source}: {reason}")
        self.source = source
        self.reason = reason


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
        array = np.nan_to_num(array, nan=0.0) * (255.0 / top)
    else:  # I;16 variants and 32-bit I hold 16-bit samples
        array = array / 257.0
    gray = np.clip(np.rint(array), 0, 255).astype(np.uint8)
    return Image.fromarray(gray, mode="L").convert("RGB")


def to_rgb(image: Image.Image) -> Image.Image:
    """Convert any PIL mode to RGB with the documented rules (alpha over white, 16-bit scaled)."""
    mode = image.mode
    if mode == "RGB":
        return image
    if mode in ("F", "I") or mode.startswith("I;16"):
        return _high_bit_depth_to_rgb(image)
    if mode in ("RGBA", "LA", "PA", "RGBa", "La") or "transparency" in image.info:
        return _composite(image.convert("RGBA"))
    return image.convert("RGB")


def load_image(
    src: ImageSource,
    *,
    max_pixels: int = DEFAULT_MAX_PIXELS,
    name: str | None = None,
) -> Image.Image:
    """Decode ``src`` (path, bytes or PIL image) into an upright RGB image; see the module docstring."""
    source = _source_name(src, name)
    if isinstance(src, Image.Image):
        image = src
    else:
        if isinstance(src, bytes):
            if not src:
                raise ImageDecodeError(source, "empty data (0 bytes)")
            fp: io.BytesIO | str = io.BytesIO(src)
        else:
            path = Path(src)
            if not path.is_file():
                raise ImageDecodeError(source, "no such file")
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
    width, height = image.size
    if width < 1 or height < 1:
        raise ImageDecodeError(source, f"image has no pixels ({width}x{height})")
    if width * height > max_pixels:
        raise ImageTooLargeError(
            source, f"{width}x{height} = {width * height} pixels exceeds the limit of {max_pixels}"
        )
    try:
        image.seek(0)  # the first frame of an animation
        image.load()
        # exif_transpose returns a new image, so a file we opened can be closed below.
        return to_rgb(ImageOps.exif_transpose(image))
    except Image.DecompressionBombError as err:
        raise ImageTooLargeError(source, str(err)) from None
    except (OSError, SyntaxError, ValueError, EOFError) as err:
        raise ImageDecodeError(source, f"corrupt or truncated image data ({err})") from None
    finally:
        if image is not src:
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
    """Images + tile plans -> normalised tile tensors, one resize per image and one pass per tile."""

    def __init__(
        self,
        cfg: ImagePlanConfig | None = None,
        mean: Sequence[float] = CLIP_MEAN,
        std: Sequence[float] = CLIP_STD,
        dtype: torch.dtype = torch.float32,
        resample: Image.Resampling = Image.Resampling.BICUBIC,
    ) -> None:
        if len(mean) != 3 or len(std) != 3 or min(std) <= 0:
            raise ValueError(f"mean and std need 3 channels with std > 0, got mean={mean}, std={std}")
        self.cfg = cfg or ImagePlanConfig()
        self.mean = tuple(float(m) for m in mean)
        self.std = tuple(float(s) for s in std)
        self.dtype = dtype
        self.resample = resample
        self.pad_color = tuple(round(m * 255) for m in self.mean)
        # x_normalised = x_uint8 * scale + shift, per channel.
        self._scale = torch.tensor([1.0 / (255.0 * s) for s in self.std]).view(3, 1, 1)
        self._shift = torch.tensor([-m / s for m, s in zip(self.mean, self.std, strict=True)]).view(3, 1, 1)

    def plan(self, image: Image.Image, image_index: int = 0, images_in_sample: int = 1) -> TilePlan:
        return plan_image(
            image.height, image.width, self.cfg, image_index=image_index, images_in_sample=images_in_sample
        )

    def _padded(self, image: Image.Image, size: tuple[int, int], canvas: tuple[int, int]) -> np.ndarray:
        """The image resized to ``size`` on a ``canvas`` filled with the pad colour, as HWC uint8."""
        resized = image if image.size == (size[1], size[0]) else image.resize(
            (size[1], size[0]), self.resample, reducing_gap=None
        )
        if size == canvas:
            return np.asarray(resized)
        board = Image.new("RGB", (canvas[1], canvas[0]), self.pad_color)
        board.paste(resized, (0, 0))
        return np.asarray(board)

    def _write(self, out: torch.Tensor, hwc: np.ndarray) -> None:
        """Normalise a HWC uint8 canvas into ``out`` laid out as (rows, cols, 3, r, r) tiles."""
        r = self.cfg.tile_size
        rows, cols = hwc.shape[0] // r, hwc.shape[1] // r
        with warnings.catch_warnings():
            # PIL's arrays are read-only and torch warns about that; this tensor is only read.
            warnings.simplefilter("ignore", UserWarning)
            pixels = torch.from_numpy(hwc)
        source = pixels.view(rows, r, cols, r, 3).permute(0, 2, 4, 1, 3)
        tiles = out.view(rows, cols, 3, r, r)
        tiles.copy_(source)
        tiles.mul_(self._scale.to(out.dtype)).add_(self._shift.to(out.dtype))

    def __call__(self, images: Sequence[Image.Image], plans: Sequence[TilePlan] | None = None) -> ProcessedImages:
        """Process a batch; ``plans`` default to each image planned on its own (one image per sample)."""
        if isinstance(images, Image.Image):
            images = [images]
        plans = list(plans) if plans is not None else [self.plan(image) for image in images]
        if len(plans) != len(images):
            raise ValueError(f"got {len(images)} images but {len(plans)} plans")
        r = self.cfg.tile_size
        total = sum(plan.num_tiles for plan in plans)
        out = torch.empty(total, 3, r, r, dtype=self.dtype)
        start = 0
        for image, plan in zip(images, plans, strict=True):
            if (image.height, image.width) != (plan.height, plan.width):
                raise ValueError(
                    f"plan is for a {plan.height}x{plan.width} image, got {image.height}x{image.width}"
                )
            if plan.tile_size != r:
                raise ValueError(f"plan has tile size {plan.tile_size}, processor {r}")
            if image.mode != "RGB":
                image = to_rgb(image)
            cells = [i for i, tile in enumerate(plan.tiles) if not tile.is_overview]
            if cells:
                # Grid cells are contiguous in the plan's order (the overview is first or last).
                first = start + cells[0]
                self._write(out[first : first + len(cells)], self._padded(image, plan.resized, plan.canvas))
            for i, tile in enumerate(plan.tiles):
                if tile.is_overview:
                    self._write(out[start + i : start + i + 1], self._padded(image, plan.overview_resized, (r, r)))
            start += plan.num_tiles
        return ProcessedImages(out, plans)
