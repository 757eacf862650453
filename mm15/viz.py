"""Pictures for people: a tile plan drawn over its image, and the check on where a picture is written."""

from __future__ import annotations

import math
import os
import stat
from pathlib import Path

from PIL import Image, ImageDraw, ImageFont

from mm15.geometry import TilePlan
from mm15.paths import not_a_dir_reason

PAD_SHADE = (200, 200, 200)
TILE_COLOR = (230, 40, 40)
OVERVIEW_COLOR = (30, 110, 230)


# The formats a picture the user names (``mm15 plan --draw``, ``mm15 data show --out``) may be written in.
PICTURE_SUFFIXES = (".png", ".jpg", ".jpeg")


def check_picture_path(path: Path, option: str) -> None:
    """Refuse, before any work is done, a picture path PIL could not save to (``option`` names the flag).

    Its folder need not exist (it is made before saving) but must be one that can be: not under a file,
    not read-only. A path that exists must be a writable regular file: saving to a FIFO would block.
    """
    if path.suffix.lower() not in PICTURE_SUFFIXES:
        raise ValueError(f"{option} must end in .png, .jpg or .jpeg, got {path.name!r}")
    try:
        mode: int | None = path.stat().st_mode
    except (FileNotFoundError, NotADirectoryError):
        mode = None  # not there yet: its folder is checked below
    except OSError as err:
        # Path.is_dir raises these (a name over the length limit, an unsearchable folder) on 3.11.
        raise ValueError(f"{option} {path}: {err.strerror or err}") from None
    except ValueError as err:  # an embedded NUL
        raise ValueError(f"{option} {path!r} is not a valid path ({err})") from None
    if mode is not None and stat.S_ISDIR(mode):
        raise ValueError(f"{option} {path} is a directory; give a file name")
    if mode is not None:
        if not stat.S_ISREG(mode):
            raise ValueError(f"{option} {path} exists and is not a regular file")
        if not os.access(path, os.W_OK):
            raise ValueError(f"{option} {path} is not writable")
    reason = not_a_dir_reason(path.parent)
    if reason is not None:
        raise ValueError(f"{option} {path}: its folder {path.parent} {reason}")


def _font(size: int) -> ImageFont.ImageFont | ImageFont.FreeTypeFont:
    return ImageFont.load_default(size=size)


def draw_plan(image: Image.Image, plan: TilePlan, max_side: int = 1600) -> Image.Image:
    """The padded canvas with every tile outlined and labelled, and the overview tile beside it.

    Shows exactly what the encoder sees: the resized image at the canvas's top-left, the padding
    shaded, the grid cells in prompt order with their markers, and the overview (if any) to the right.
    """
    if (image.height, image.width) != (plan.height, plan.width):
        raise ValueError(f"plan is for {plan.height}x{plan.width}, image is {image.height}x{image.width}")
    r = plan.tile_size
    canvas_h, canvas_w = plan.canvas
    has_cells = any(not t.is_overview for t in plan.tiles)
    has_overview = any(t.is_overview for t in plan.tiles)
    full_w = (canvas_w if has_cells else 0) + (r if has_overview else 0)
    full_h = max(canvas_h if has_cells else 0, r if has_overview else 0)
    s = min(1.0, max_side / max(full_h, full_w))
    header = 40
    title = (
        f"{plan.height}x{plan.width} -> grid {plan.grid[0]}x{plan.grid[1]}, resized {plan.resized[0]}x"
        f"{plan.resized[1]}, {plan.num_tiles} tiles, {plan.num_image_tokens} image tokens"
    )
    title_font = _font(16)
    # A tall image scales to a narrow sheet: the sheet is widened to hold the whole title.
    width = max(round(full_w * s), math.ceil(title_font.getlength(title)) + 12)
    sheet = Image.new("RGB", (width, round(full_h * s) + header), (255, 255, 255))
    draw = ImageDraw.Draw(sheet)
    font = _font(max(10, round(min(r * s, 400) / 12)))
    draw.text((6, 10), title, fill=(0, 0, 0), font=title_font)

    def paste(size: tuple[int, int], area: tuple[int, int], x0: int) -> None:
        ah, aw = round(area[0] * s), round(area[1] * s)
        draw.rectangle((x0, header, x0 + aw - 1, header + ah - 1), fill=PAD_SHADE)
        h, w = max(1, round(size[0] * s)), max(1, round(size[1] * s))
        sheet.paste(image.resize((w, h), Image.Resampling.BILINEAR), (x0, header))

    if has_cells:
        paste(plan.resized, plan.canvas, 0)
    if has_overview:
        paste(plan.overview_resized or plan.resized, (r, r), round(canvas_w * s) if has_cells else 0)
    for order, tile in enumerate(plan.tiles):
        if tile.is_overview:
            x0, y0, color = (round(canvas_w * s) if has_cells else 0), header, OVERVIEW_COLOR
        else:
            x0, y0, color = round(tile.left * s), header + round(tile.top * s), TILE_COLOR
        size = round(r * s)
        draw.rectangle((x0, y0, x0 + size - 1, y0 + size - 1), outline=color, width=max(2, size // 100))
        label = f"#{order} {tile.marker!r}" if tile.marker else f"#{order}"
        draw.text((x0 + 6, y0 + 4), label, fill=color, font=font, stroke_width=2, stroke_fill=(255, 255, 255))
    return sheet
