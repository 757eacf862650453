"""The one sample schema every reader, generator, mixture and the chat renderer share.

A ``Sample`` is a conversation (``turns``) over zero or more images (or video frames), with regions
(boxes and points) kept in **original-image pixels** until the chat renderer writes them as text with
``mm15.boxes`` (so a resize, a crop or a different text format never desynchronises them). Turn text
refers to images with ``<image>`` (in order) and to regions with ``<region0>``, ``<region1>``, ...: a
region is written as its box ``[x1, y1, x2, y2]`` or, when it has only a point, ``[x, y]``.

``category`` is one of MM1.5's data categories (``CATEGORIES``), which mixtures weight; ``source`` names
the data set or generator (per-source loss and mixture logging use it). ``truth`` holds the ground
truth a generator rendered (for checking the image against it, and for evaluation).
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

from PIL import Image

from mm15.checks import is_int, is_number

Role = Literal["system", "user", "assistant"]
ROLES: tuple[str, ...] = ("system", "user", "assistant")

# MM1.5's categories: pre-training (caption, interleaved, text), continual pre-training (ocr) and the
# SFT categories (mm15-spec.md sections 3 and 6).
CATEGORIES: tuple[str, ...] = (
    "caption",
    "interleaved",
    "text",
    "ocr",
    "general",
    "text-rich",
    "refer-ground",
    "math",
    "code",
    "science",
    "multi-image",
    "icl",
    "text-only",
    "video",
    "ui",
)

IMAGE_PLACEHOLDER = "<image>"
REGION_PATTERN = re.compile(r"<region(\d+)>")

ImageRef = str | Path | bytes | Image.Image


@dataclass
class Turn:
    role: Role
    content: str

    def __post_init__(self) -> None:
        if self.role not in ROLES:
            raise ValueError(f"Turn.role must be one of {ROLES}, got {self.role!r}")
        if not isinstance(self.content, str):
            raise ValueError(f"Turn.content must be a string, got {type(self.content).__name__}")


@dataclass
class Region:
    """A box (x1, y1, x2, y2) or a point (x, y) in pixels of image ``image`` of the sample."""

    image: int
    box: tuple[float, float, float, float] | None = None
    point: tuple[float, float] | None = None

    def __post_init__(self) -> None:
        if not is_int(self.image):
            raise ValueError(f"Region.image must be an image index (an integer), got {self.image!r}")
        if (self.box is None) == (self.point is None):
            raise ValueError("Region needs exactly one of box or point")
        # The coordinates are unpacked when the region is written as text: a wrong count failed there.
        for name, size in (("box", 4), ("point", 2)):
            value = getattr(self, name)
            if value is not None and (
                not isinstance(value, tuple | list) or len(value) != size or not all(map(is_number, value))
            ):
                raise ValueError(f"Region.{name} must be {size} finite numbers, got {value!r}")
        if self.box is not None:
            x1, y1, x2, y2 = self.box
            if not (x1 <= x2 and y1 <= y2):
                raise ValueError(f"Region.box must have x1 <= x2 and y1 <= y2, got {self.box}")
        if self.image < 0:
            raise ValueError(f"Region.image must be >= 0, got {self.image}")


@dataclass
class Sample:
    """One training or evaluation example (module docstring)."""

    id: str
    turns: list[Turn]
    category: str
    source: str
    images: list[ImageRef] = field(default_factory=list)
    regions: list[Region] = field(default_factory=list)
    is_video: bool = False
    truth: dict[str, Any] = field(default_factory=dict)

    def validate(self) -> None:
        """Raise ValueError naming what is wrong: placeholders vs images, region references, roles."""
        if self.category not in CATEGORIES:
            raise ValueError(f"sample {self.id}: unknown category {self.category!r} (one of {CATEGORIES})")
        if not self.turns:
            raise ValueError(f"sample {self.id}: no turns")
        if not all(isinstance(turn, Turn) for turn in self.turns):
            raise ValueError(f"sample {self.id}: turns must be Turn objects")
        if not all(isinstance(region, Region) for region in self.regions):
            raise ValueError(f"sample {self.id}: regions must be Region objects")
        placeholders = sum(turn.content.count(IMAGE_PLACEHOLDER) for turn in self.turns)
        if placeholders != len(self.images):
            raise ValueError(
                f"sample {self.id}: {placeholders} {IMAGE_PLACEHOLDER} placeholders "
                f"but {len(self.images)} images"
            )
        for turn in self.turns:
            for ref in REGION_PATTERN.findall(turn.content):
                if int(ref) >= len(self.regions):
                    raise ValueError(f"sample {self.id}: <region{ref}> but only {len(self.regions)} regions")
        for region in self.regions:
            if region.image >= len(self.images):
                raise ValueError(
                    f"sample {self.id}: a region names image {region.image} of {len(self.images)}"
                )
