"""The one text format for boxes and points, and its transforms to and from image pixels.

Boxes and points are written relative to the full original image (never a tile), as integers (ASCII
digits) on a 1000 x 1000 virtual canvas, the Ferret / Ferret-UI convention MM1.5 follows:
``[x1, y1, x2, y2]`` for a box and ``[x, y]`` for a point, comma and space between numbers. A pixel
coordinate ``x`` in an image ``W`` pixels wide becomes ``min(999, max(0, floor(x * 1000 / W)))`` (outside
the image: clamped to its edge); a text unit
``v`` decodes to the centre of its bin, ``(v + 0.5) * W / 1000``, so image -> text -> image moves a
coordinate by at most half a text unit. Pixel boxes are (x1, y1, x2, y2) floats with x2/y2 as the far
edges.
"""

from __future__ import annotations

import math
import re
from collections.abc import Sequence

TEXT_UNITS = 1000

Box = tuple[float, float, float, float]
Point = tuple[float, float]
TextBox = tuple[int, int, int, int]
TextPoint = tuple[int, int]

# Strict forms for our own output, e.g. "[12, 300, 455, 999]" and "[40, 7]". ASCII digits only: Python's
# \d would also take other scripts' digits ("[١٠٠, ...]"), which the format does not have and the web
# page's JavaScript (whose \d is ASCII) would not draw.
BOX_PATTERN = re.compile(r"\[([0-9]{1,3}), ([0-9]{1,3}), ([0-9]{1,3}), ([0-9]{1,3})\]")
POINT_PATTERN = re.compile(r"\[([0-9]{1,3}), ([0-9]{1,3})\]")


def _check_size(height: int, width: int) -> None:
    if height < 1 or width < 1:
        raise ValueError(f"image size must be positive, got height={height}, width={width}")


def _to_units(value: float, extent: int) -> int:
    if not math.isfinite(value):
        raise ValueError(f"coordinate must be finite, got {value}")
    return min(TEXT_UNITS - 1, max(0, math.floor(value * TEXT_UNITS / extent)))


def _from_units(units: int, extent: int) -> float:
    if not 0 <= units < TEXT_UNITS:
        raise ValueError(f"text coordinate must be in [0, {TEXT_UNITS}), got {units}")
    return (units + 0.5) * extent / TEXT_UNITS


def box_to_text_units(box: Sequence[float], height: int, width: int) -> TextBox:
    """Pixel box (x1, y1, x2, y2) in an image of ``height`` x ``width`` -> text units."""
    _check_size(height, width)
    x1, y1, x2, y2 = box
    if x2 < x1 or y2 < y1:
        raise ValueError(f"box must have x1 <= x2 and y1 <= y2, got {tuple(box)}")
    return (
        _to_units(x1, width),
        _to_units(y1, height),
        _to_units(x2, width),
        _to_units(y2, height),
    )


def box_from_text_units(units: Sequence[int], height: int, width: int) -> Box:
    """Text-unit box -> pixel box in the original image (bin centres)."""
    _check_size(height, width)
    x1, y1, x2, y2 = units
    return (
        _from_units(x1, width),
        _from_units(y1, height),
        _from_units(x2, width),
        _from_units(y2, height),
    )


def point_to_text_units(point: Sequence[float], height: int, width: int) -> TextPoint:
    _check_size(height, width)
    x, y = point
    return _to_units(x, width), _to_units(y, height)


def point_from_text_units(units: Sequence[int], height: int, width: int) -> Point:
    _check_size(height, width)
    x, y = units
    return _from_units(x, width), _from_units(y, height)


def format_box(box: Sequence[float], height: int, width: int) -> str:
    """Pixel box -> "[x1, y1, x2, y2]" in text units."""
    return "[{}, {}, {}, {}]".format(*box_to_text_units(box, height, width))


def format_point(point: Sequence[float], height: int, width: int) -> str:
    """Pixel point -> "[x, y]" in text units."""
    return "[{}, {}]".format(*point_to_text_units(point, height, width))


def parse_boxes(text: str, height: int, width: int) -> list[Box]:
    """Every well-formed box in ``text``, decoded to pixels; malformed ones are not boxes."""
    boxes = []
    for match in BOX_PATTERN.finditer(text):
        units = tuple(int(g) for g in match.groups())
        if max(units) < TEXT_UNITS and units[0] <= units[2] and units[1] <= units[3]:
            boxes.append(box_from_text_units(units, height, width))
    return boxes


def parse_points(text: str, height: int, width: int) -> list[Point]:
    """Every well-formed "[x, y]" point in ``text``, decoded to pixels (a box never matches)."""
    points = []
    for match in POINT_PATTERN.finditer(text):
        units = tuple(int(g) for g in match.groups())
        if max(units) < TEXT_UNITS:
            points.append(point_from_text_units(units, height, width))
    return points
