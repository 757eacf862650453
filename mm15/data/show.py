"""Contact sheets of samples for a person to check: images with their regions drawn, and the dialogue.

``sample_card`` draws one sample: its images side by side (up to ``MAX_THUMBS``; video frames are
sampled evenly), every region as a box or a point labelled with its number, and the turns below with
``<regionK>`` shown as ``<K>``. ``contact_sheet`` lays cards out in a grid. An image that does not
decode is drawn as a grey slot with ``load_image``'s reason, and ``contact_sheet`` returns the ids of
such samples: a sheet is for finding them, so it must not stop at the first.
"""

from __future__ import annotations

import math
import textwrap
from collections.abc import Sequence

from PIL import Image, ImageDraw

from mm15.data.sample import REGION_PATTERN, Sample
from mm15.data.synth.render import font
from mm15.image import ImageError, load_image

CARD_WIDTH = 520
THUMB_HEIGHT = 240
MAX_THUMBS = 4
TEXT_LINES = 12
REGION_COLORS = ((230, 40, 40), (30, 120, 230), (20, 160, 60), (230, 140, 0), (150, 50, 200))


def _thumbs(sample: Sample) -> list[tuple[int, Image.Image | ImageError]]:
    """(image index, loaded image or why it does not load), evenly spaced when there are many."""
    count = len(sample.images)
    if count <= MAX_THUMBS:
        picks = list(range(count))
    else:
        picks = [round(i * (count - 1) / (MAX_THUMBS - 1)) for i in range(MAX_THUMBS)]
    thumbs: list[tuple[int, Image.Image | ImageError]] = []
    for i in picks:
        try:
            thumbs.append((i, load_image(sample.images[i], name=f"image {i}")))
        except ImageError as err:
            thumbs.append((i, err))
    return thumbs


def sample_card(sample: Sample) -> tuple[Image.Image, int]:
    """One sample drawn as a card (module docstring), and how many of its shown images do not decode."""
    thumbs = _thumbs(sample)
    slot = CARD_WIDTH // max(1, len(thumbs))
    image_area = THUMB_HEIGHT if thumbs else 0
    line_height = 15
    card = Image.new("RGB", (CARD_WIDTH, 24 + image_area + 8 + TEXT_LINES * line_height + 8), (255, 255, 255))
    draw = ImageDraw.Draw(card)
    title = f"{sample.category} | {sample.source} | {sample.id}"
    draw.text((6, 4), title[:80], fill=(0, 0, 0), font=font("sans-bold", 13))
    for slot_index, (image_index, image) in enumerate(thumbs):
        if isinstance(image, ImageError):
            x0 = slot_index * slot
            draw.rectangle((x0 + 2, 26, x0 + slot - 3, 24 + THUMB_HEIGHT - 3), fill=(200, 200, 200))
            for k, line in enumerate(textwrap.wrap(f"does not decode: {image}", width=max(10, slot // 8))):
                draw.text((x0 + 8, 32 + 15 * k), line, fill=(150, 0, 0), font=font("sans", 11))
            continue
        scale = min(slot / image.width, THUMB_HEIGHT / image.height)
        shown = image.resize((max(1, round(image.width * scale)), max(1, round(image.height * scale))))
        x0, y0 = slot_index * slot, 24
        card.paste(shown, (x0, y0))
        for number, region in enumerate(sample.regions):
            if region.image != image_index:
                continue
            color = REGION_COLORS[number % len(REGION_COLORS)]
            if region.box is not None:
                x1, y1, x2, y2 = (v * scale for v in region.box)
                draw.rectangle((x0 + x1, y0 + y1, x0 + x2, y0 + y2), outline=color, width=2)
                anchor = (x0 + x1 + 2, y0 + y1 + 1)
            else:
                px, py = (v * scale for v in region.point)  # type: ignore[union-attr]
                draw.ellipse((x0 + px - 4, y0 + py - 4, x0 + px + 4, y0 + py + 4), outline=color, width=2)
                anchor = (x0 + px + 5, y0 + py - 6)
            draw.text(anchor, str(number), fill=color, font=font("sans-bold", 12))
        if sample.is_video:
            label = f"frame {image_index}"
            draw.text((x0 + 4, y0 + shown.height - 16), label, fill=(255, 255, 0), font=font())
    lines: list[str] = []
    for turn in sample.turns:
        text = REGION_PATTERN.sub(lambda m: f"<{m.group(1)}>", turn.content).replace("\n", " ")
        lines += textwrap.wrap(f"{turn.role}: {text}", width=86) or [f"{turn.role}:"]
    if len(lines) > TEXT_LINES:
        lines = [*lines[: TEXT_LINES - 1], "..."]
    y = 24 + image_area + 8
    for line in lines:
        draw.text((6, y), line, fill=(30, 30, 30), font=font("sans", 11))
        y += line_height
    return card, sum(isinstance(image, ImageError) for _, image in thumbs)


def contact_sheet(samples: Sequence[Sample], columns: int = 2) -> tuple[Image.Image, list[str]]:
    """Cards of ``samples`` in a grid of ``columns`` columns, and the ids of samples whose images do not
    all decode."""
    if not samples:
        raise ValueError("contact_sheet needs at least one sample")
    drawn = [sample_card(sample) for sample in samples]
    cards = [card for card, _ in drawn]
    broken = [sample.id for sample, (_, failed) in zip(samples, drawn, strict=True) if failed]
    # No wider than the cards: --columns 100000 would allocate a canvas of 52 million pixels per row.
    columns = min(columns, len(cards))
    rows = math.ceil(len(cards) / columns)
    height = max(card.height for card in cards)
    sheet = Image.new("RGB", (columns * (CARD_WIDTH + 8), rows * (height + 8)), (225, 225, 225))
    for index, card in enumerate(cards):
        sheet.paste(card, ((index % columns) * (CARD_WIDTH + 8), (index // columns) * (height + 8)))
    return sheet, broken
