"""Rendering helpers shared by the generators: fonts that need no system install, and colours."""

from __future__ import annotations

import functools
from pathlib import Path

import matplotlib
from PIL import ImageFont

FONT_DIR = Path(matplotlib.get_data_path()) / "fonts" / "ttf"
# DejaVu ships inside matplotlib's wheel, so rendering needs no apt step. Fonts are loaded with Pillow's
# basic layout engine: Pillow would otherwise use Raqm (HarfBuzz shaping, other kerning) wherever
# libraqm/libfribidi happen to be installed, and the same sample would get other pixels and text boxes
# on another machine. With the basic engine (always built in) the layout does not depend on the
# system's libraries; what is left is the FreeType Pillow bundles, fixed by the Pillow version.
LAYOUT = ImageFont.Layout.BASIC
FONTS = {
    "sans": "DejaVuSans.ttf",
    "sans-bold": "DejaVuSans-Bold.ttf",
    "serif": "DejaVuSerif.ttf",
    "serif-italic": "DejaVuSerif-Italic.ttf",
    "mono": "DejaVuSansMono.ttf",
    "mono-bold": "DejaVuSansMono-Bold.ttf",
}

COLORS: dict[str, tuple[int, int, int]] = {
    "red": (220, 40, 40),
    "green": (40, 170, 60),
    "blue": (40, 90, 220),
    "yellow": (240, 210, 40),
    "orange": (245, 140, 30),
    "purple": (140, 60, 190),
    "black": (20, 20, 20),
    "white": (250, 250, 250),
    "gray": (128, 128, 128),
    "brown": (130, 80, 40),
    "pink": (240, 130, 180),
    "cyan": (40, 200, 210),
}


@functools.lru_cache(maxsize=256)
def font(name: str = "sans", size: int = 16) -> ImageFont.FreeTypeFont:
    """A DejaVu font by short name (``FONTS``) and pixel size, cached; laid out by Pillow's basic engine."""
    if name not in FONTS:
        raise ValueError(f"unknown font {name!r}; choose one of {sorted(FONTS)}")
    return ImageFont.truetype(str(FONT_DIR / FONTS[name]), size, layout_engine=LAYOUT)
