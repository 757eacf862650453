"""Text-rich synthetic generators: documents, receipts, tables, signs, charts, diagrams, code and mobile UIs.

They stand in for MM1.5's stage-2 OCR data (PDFA, IDL, RenderedText, DocStruct-4M; mm15-spec.md section
3.2), the text-rich, math, science and code SFT categories (section 3.3) and the Ferret-UI elementary
tasks of MM1.5-UI (section 6). Every image is drawn with PIL primitives from the ``random.Random`` the
registry hands in, so a sample is a pure function of its seed, and the ground truth is recorded while
drawing, never re-derived from the pixels.

Boxes are pixel boxes ``(x1, y1, x2, y2)`` with x2/y2 the far edges (``mm15.boxes``): the box covers
pixel columns ``x1 .. x2 - 1``. A text box is the exact ink box of the string as rendered: the string is
rasterised once into a coverage mask, the box is the mask's non-zero extent, and that same mask is
composited onto the image, so box and pixels cannot disagree. Word boxes cut a line's mask halfway
through each space. Shapes (bars, buttons, toggles, ...) are drawn into their recorded box, with PIL's
inclusive far corner adjusted.

Rotation (``ocr-document`` only): the page is laid out upright and every line and word records its
upright ink box as ``unrotated_box``. The page is then rotated by ``truth["angle"]`` degrees
(counter-clockwise, about the image centre, same canvas, paper-coloured fill) through the forward affine
``truth["transform"] = (a, b, c, d, e, f)`` with ``x' = a x + b y + c`` and ``y' = d x + e y + f``. Each
line and word carries ``quad``, the four mapped corners of its upright box (top-left, top-right,
bottom-right, bottom-left), and ``box``, the axis-aligned box enclosing the quad in final-image pixels:
the box that regions and answers use.
"""

from __future__ import annotations

import itertools
import math
import random
import re
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image, ImageChops, ImageDraw, ImageFont

from mm15.data.sample import Region, Sample, Turn
from mm15.data.synth import register
from mm15.data.synth.render import COLORS, FONTS, font

Box = tuple[int, int, int, int]
RGB = tuple[int, int, int]
Font = ImageFont.FreeTypeFont
Affine = tuple[float, float, float, float, float, float]
Truth = dict[str, Any]

_FONT_NAMES = {file: name for name, file in FONTS.items()}


def _pool(text: str) -> tuple[str, ...]:
    """A pool of strings written as one comma-separated literal (keeps long pools compact)."""
    return tuple(item.strip() for item in text.split(",") if item.strip())


# ----------------------------------------------------------------------------------------------------
# Text content: a fixed vocabulary, so text is word-like but never copied from anywhere.

_VOCAB_TEXT = """
    able about above across action after again against age air all almost along also always among
    amount animal answer any area around art away back ball base basic bear become before begin behind
    being below best better between big bird black blue board boat body book both bottom box bring
    build busy call came car care carry case cause center certain change check children city class
    clear close cold color come common company complete could country course cover cross current
    cut dark data day deep design detail develop did direction does done door down draw dry during
    each early earth east easy edge effect end energy enough even event every example face fact fall
    family far farm fast field figure fill final find fine fire first fish five floor follow food
    force form found four free friend from front full game garden general give glass good green
    ground group grow half hand happen hard have head hear heat help high hill hold home horse hour
    house idea important inch include inside interest island just keep kind land language large last
    late layer lead learn leave letter level light line list little live long look low machine main
    make many map mark market matter mean measure method middle might mind minute model moment money
    month more morning most mountain move much music must name near need never new next night north
    note number object ocean offer often open order other over page paper part pass past pattern
    people period picture piece place plan plant point port power present problem process produce
    program question quick rain reach read ready record region remain report rest result river road
    rock room round rule run safe same sand school science sea season second section seem self sense
    service set shape short show side signal simple since single size small snow soft soil some sound
    south space special speed spring square stand star start state station step still stone store
    story street strong study subject summer sun system table take test text their there thing think
    third those though through time today together total toward town trade travel tree true turn
    under unit until upon usual valley value very view village visit voice wait walk wall warm watch
    water wave weather week weight well west where while white whole wide wind window winter with
    within without wood word work world write year young
"""
VOCAB: tuple[str, ...] = tuple(_VOCAB_TEXT.split())

FIRST_NAMES = _pool(
    "Anna, Ben, Carla, David, Elena, Farid, Grace, Hugo, Iris, James, Kenji, Laura, Mateo, Nina, Omar, "
    "Priya, Quinn, Rosa, Sven, Tara, Umar, Vera, Wei, Yusuf, Zoe"
)
LAST_NAMES = _pool(
    "Adams, Baker, Chen, Diaz, Evans, Fischer, Garcia, Hansen, Ito, Jones, Khan, Lopez, Muller, Novak, "
    "Olsen, Patel, Rossi, Silva, Tanaka, Weber, Young, Zhang"
)
CITIES = _pool(
    "Austin, Berlin, Cairo, Denver, Dublin, Lagos, Lima, Lisbon, Madrid, Milan, Osaka, Oslo, Paris, Perth, "
    "Quito, Rome, Seoul, Sydney, Tokyo, Toronto, Vienna, Warsaw, Zurich"
)
MONTHS = _pool(
    "January, February, March, April, May, June, July, August, September, October, November, December"
)
FRUITS = _pool(
    "Apples, Bananas, Cherries, Grapes, Kiwis, Lemons, Mangoes, Oranges, Pears, Plums, Peaches, Melons"
)
GADGETS = ("Laptops", "Phones", "Tablets", "Cameras", "Monitors", "Printers", "Speakers", "Watches")
TEAMS = ("Alpha", "Bravo", "Delta", "Echo", "Falcon", "Orion", "Titan", "Nova", "Comet", "Atlas")
STREETS = ("Main", "Oak", "Pine", "Maple", "Cedar", "Elm", "Park", "Lake", "Hill", "River", "Market")
GROCERIES = _pool(
    "Coffee, Bagel, Milk 1L, Bread, Eggs 12ct, Butter, Apples, Bananas, Cheese, Yogurt, Orange Juice, Pasta, "
    "Rice 2kg, Tomatoes, Chicken, Salad, Muffin, Green Tea, Water 6pk, Cookies, Chips, Soap, Batteries, "
    "Notebook, Pen Set, Olive Oil, Honey"
)
PAPERS: tuple[RGB, ...] = (
    (255, 255, 255),
    (250, 248, 240),
    (246, 244, 236),
    (252, 252, 248),
    (244, 246, 250),
)
INKS: tuple[RGB, ...] = ((20, 20, 20), (35, 35, 45), (20, 30, 80), (50, 40, 30), (0, 0, 0))
# Colours that read as "a colour" on both light and dark backgrounds (no white, black or gray).
VIVID: tuple[RGB, ...] = tuple(
    COLORS[c] for c in ("red", "green", "blue", "orange", "purple", "brown", "pink", "cyan", "yellow")
)


def _words(rng: random.Random, n: int) -> list[str]:
    return [rng.choice(VOCAB) for _ in range(n)]


def _title(rng: random.Random, lo: int, hi: int) -> str:
    return " ".join(w.capitalize() for w in _words(rng, rng.randint(lo, hi)))


def _person(rng: random.Random) -> str:
    return f"{rng.choice(FIRST_NAMES)} {rng.choice(LAST_NAMES)}"


def _sentence(rng: random.Random, lo: int = 6, hi: int = 16) -> str:
    words = _words(rng, rng.randint(lo, hi))
    # Numbers and proper names are what OCR gets wrong most often, so sentences carry some.
    if len(words) > 2 and rng.random() < 0.3:
        words[rng.randrange(1, len(words))] = str(rng.choice((rng.randint(2, 99), rng.randint(1900, 2030))))
    if len(words) > 2 and rng.random() < 0.25:
        words[rng.randrange(1, len(words))] = rng.choice(CITIES + LAST_NAMES)
    if len(words) > 7 and rng.random() < 0.5:
        words[rng.randrange(2, len(words) - 2)] += ","
    words[0] = words[0].capitalize()
    return " ".join(words) + rng.choices((".", "?", "!"), weights=(0.9, 0.07, 0.03))[0]


def _date(rng: random.Random) -> str:
    year, month, day = rng.randint(2015, 2030), rng.randint(1, 12), rng.randint(1, 28)
    style = rng.randrange(3)
    if style == 0:
        return f"{MONTHS[month - 1]} {day}, {year}"
    if style == 1:
        return f"{year}-{month:02d}-{day:02d}"
    return f"{day:02d}/{month:02d}/{year}"


def _money(rng: random.Random) -> str:
    return f"${rng.randint(10, 9999):,}.{rng.randint(0, 99):02d}"


def _cents(cents: int) -> str:
    return f"{cents // 100}.{cents % 100:02d}"


def _number(value: float) -> str:
    """A number as an answer: an integer when whole, else at most two decimals."""
    if abs(value - round(value)) < 1e-9:
        return str(round(value))
    return f"{value:.2f}".rstrip("0").rstrip(".")


def _luma(color: RGB) -> float:
    return 0.299 * color[0] + 0.587 * color[1] + 0.114 * color[2]


def _font_name(fnt: Font) -> str:
    return _FONT_NAMES[Path(str(fnt.path)).name]


# ----------------------------------------------------------------------------------------------------
# Drawing primitives that return exact boxes.

_MASK_PAD = 2


def _glyph_mask(text: str, fnt: Font) -> tuple[Image.Image, int, int]:
    """``text`` rasterised once as a coverage mask, and the mask's offset from the text origin."""
    left, top, right, bottom = fnt.getbbox(text)
    mask = Image.new("L", (right - left + 2 * _MASK_PAD, bottom - top + 2 * _MASK_PAD), 0)
    ImageDraw.Draw(mask).text((_MASK_PAD - left, _MASK_PAD - top), text, font=fnt, fill=255)
    return mask, left - _MASK_PAD, top - _MASK_PAD


def _ink_extent(text: str, fnt: Font) -> Box:
    """The ink box of ``text`` drawn with its origin (top-left anchor) at (0, 0)."""
    mask, dx, dy = _glyph_mask(text, fnt)
    bx = mask.getbbox()
    if bx is None:
        raise ValueError(f"text {text!r} renders no ink")
    return (dx + bx[0], dy + bx[1], dx + bx[2], dy + bx[3])


def _text(img: Image.Image, xy: tuple[int, int], text: str, fnt: Font, fill: RGB) -> Box:
    """Draw ``text`` with its top-left anchor at ``xy``; return the exact box of the pixels it inked."""
    mask, dx, dy = _glyph_mask(text, fnt)
    x, y = xy[0] + dx, xy[1] + dy
    img.paste(fill, (x, y), mask)
    bx = mask.getbbox()
    if bx is None:
        raise ValueError(f"text {text!r} renders no ink")
    return (x + bx[0], y + bx[1], x + bx[2], y + bx[3])


def _text_words(
    img: Image.Image, xy: tuple[int, int], text: str, fnt: Font, fill: RGB
) -> tuple[Box, list[Box]]:
    """Draw a line like ``_text``; also return the exact ink box of each space-separated word."""
    mask, dx, dy = _glyph_mask(text, fnt)
    x, y = xy[0] + dx, xy[1] + dy
    img.paste(fill, (x, y), mask)
    ink = np.asarray(mask) > 0
    spans = [(m.start(), m.end()) for m in re.finditer(r"\S+", text)]
    # Word k owns the mask columns from the middle of the space before it to the middle of the space
    # after it; spaces are wider than any kerning error, so no glyph is cut.
    widths = [fnt.getlength(text[s:e]) for s, e in spans]
    space = fnt.getlength(" ")
    cuts = [0]
    pos = 0.0
    for k in range(len(spans) - 1):
        gap = (spans[k + 1][0] - spans[k][1]) * space
        pos += widths[k]
        cuts.append(round(pos + gap / 2) - dx)
        pos += gap
    cuts.append(ink.shape[1])
    boxes: list[Box] = []
    for c0, c1 in itertools.pairwise(cuts):
        sub = ink[:, c0:c1]
        cols, rows = np.flatnonzero(sub.any(0)), np.flatnonzero(sub.any(1))
        boxes.append(
            (x + c0 + int(cols[0]), y + int(rows[0]), x + c0 + int(cols[-1]) + 1, y + int(rows[-1]) + 1)
        )
    return _union(boxes), boxes


def _union(boxes: Sequence[Box]) -> Box:
    return (
        min(b[0] for b in boxes),
        min(b[1] for b in boxes),
        max(b[2] for b in boxes),
        max(b[3] for b in boxes),
    )


def _grow(box: Box, margin: int) -> Box:
    return (box[0] - margin, box[1] - margin, box[2] + margin, box[3] + margin)


def _overlaps(box: Box, others: Sequence[Box]) -> bool:
    return any(box[0] < o[2] and o[0] < box[2] and box[1] < o[3] and o[1] < box[3] for o in others)


def _rect(draw: ImageDraw.ImageDraw, box: Box, **kwargs: Any) -> None:
    """Fill/outline exactly ``box`` (far edges exclusive; PIL's corners are inclusive)."""
    draw.rectangle((box[0], box[1], box[2] - 1, box[3] - 1), **kwargs)


def _rounded(draw: ImageDraw.ImageDraw, box: Box, radius: int, **kwargs: Any) -> None:
    draw.rounded_rectangle((box[0], box[1], box[2] - 1, box[3] - 1), radius=radius, **kwargs)


def _ellipse(draw: ImageDraw.ImageDraw, box: Box, **kwargs: Any) -> None:
    draw.ellipse((box[0], box[1], box[2] - 1, box[3] - 1), **kwargs)


def _wrap(words: Sequence[str], fnt: Font, width: float) -> list[str]:
    """Greedy word wrap to ``width`` pixels (word widths summed: fast, and within a pixel of exact)."""
    space = fnt.getlength(" ")
    lines: list[str] = []
    current: list[str] = []
    used = 0.0
    for word in words:
        w = fnt.getlength(word)
        if current and used + space + w > width:
            lines.append(" ".join(current))
            current, used = [word], w
        else:
            used = w if not current else used + space + w
            current.append(word)
    if current:
        lines.append(" ".join(current))
    return lines


def _line_height(fnt: Font) -> int:
    ascent, descent = fnt.getmetrics()
    return ascent + descent


def _noise(img: Image.Image, rng: random.Random, amplitude: int) -> Image.Image:
    """Uniform grain of +-``amplitude`` grey levels (one value per pixel, shared by the channels)."""
    if amplitude <= 0:
        return img
    # Seeded random bytes folded to 0..2a by a lookup table, then one clipped add in C: about twice as
    # fast as the same thing in int16 numpy (the bytes' modulo bias is irrelevant for grain).
    gen = np.random.default_rng(rng.getrandbits(64))
    lut = [v % (2 * amplitude + 1) for v in range(256)]
    grain = Image.frombytes("L", img.size, gen.bytes(img.size[0] * img.size[1])).point(lut).convert("RGB")
    return ImageChops.add(img, grain, scale=1.0, offset=-amplitude)


def _rotation(angle: float, width: int, height: int) -> Affine:
    """Forward affine of a counter-clockwise rotation by ``angle`` degrees about the image centre."""
    t = math.radians(angle)
    c, s = math.cos(t), math.sin(t)
    cx, cy = width / 2, height / 2
    return (c, s, cx - c * cx - s * cy, -s, c, cy + s * cx - c * cy)


def _invert(m: Affine) -> Affine:
    a, b, c, d, e, f = m
    det = a * e - b * d
    ia, ib, id_, ie = e / det, -b / det, -d / det, a / det
    return (ia, ib, -(ia * c + ib * f), id_, ie, -(id_ * c + ie * f))


def _quad(m: Affine, box: Box) -> list[tuple[float, float]]:
    a, b, c, d, e, f = m
    corners = ((box[0], box[1]), (box[2], box[1]), (box[2], box[3]), (box[0], box[3]))
    return [(round(a * x + b * y + c, 2), round(d * x + e * y + f, 2)) for x, y in corners]


def _quad_box(quad: Sequence[tuple[float, float]], width: int, height: int) -> Box:
    xs, ys = [p[0] for p in quad], [p[1] for p in quad]
    return (
        max(0, math.floor(min(xs))),
        max(0, math.floor(min(ys))),
        min(width, math.ceil(max(xs))),
        min(height, math.ceil(max(ys))),
    )


def _sample(
    category: str,
    image: Image.Image,
    question: str,
    answer: str,
    truth: Truth,
    regions: Sequence[Box] = (),
) -> Sample:
    """A one-image, one-exchange sample; ``generate`` fills in id and source."""
    truth.setdefault("question", question)
    truth.setdefault("answer", answer)
    return Sample(
        id="",
        turns=[Turn("user", f"<image>\n{question}"), Turn("assistant", answer)],
        category=category,
        source="",
        images=[image],
        regions=[Region(0, box=(float(b[0]), float(b[1]), float(b[2]), float(b[3]))) for b in regions],
        truth=truth,
    )


OCR_PROMPTS = (
    "Transcribe all the text in this image.",
    "Read the text in the image and write it out exactly.",
    "What does this image say? Give the full transcription.",
    "Perform OCR on this image and output all of its text.",
)

# ----------------------------------------------------------------------------------------------------
# ocr-document: high-resolution pages.


def _render_document(rng: random.Random) -> tuple[Image.Image, Truth]:
    width, height = rng.randrange(900, 1301, 2), rng.randrange(1100, 1801, 2)
    paper, ink = rng.choice(PAPERS), rng.choice(INKS)
    img = Image.new("RGB", (width, height), paper)
    margin = rng.randrange(84, 121)
    body = font(rng.choice(("serif", "sans")), rng.randrange(18, 27))
    title_font = font(rng.choice(("sans-bold", "serif", "sans-bold", "mono-bold")), rng.randrange(34, 53))
    head_font = font(rng.choice(("sans-bold", "mono-bold", "serif-italic")), body.size + rng.randrange(2, 7))
    byline_font = font("serif-italic", max(16, body.size - 2))
    lead = rng.uniform(1.35, 1.6)
    lines: list[Truth] = []

    def put(text: str, fnt: Font, x: int, y: int, block: int) -> None:
        box, words = _text_words(img, (x, y), text, fnt, ink)
        lines.append(
            {
                "text": text,
                "unrotated_box": box,
                "font": _font_name(fnt),
                "size": fnt.size,
                "origin": (x, y),
                "block": block,
                "words": [{"text": w, "unrotated_box": b} for w, b in zip(text.split(), words, strict=True)],
            }
        )

    y = margin
    block = 0
    centred = rng.random() < 0.5
    for line in _wrap(_title(rng, 3, 9).split(), title_font, width - 2 * margin):
        x = (width - round(title_font.getlength(line))) // 2 if centred else margin
        put(line, title_font, x, y, block)
        y += round(title_font.size * 1.25)
    block += 1
    if rng.random() < 0.7:
        y += round(body.size * 0.4)
        month = rng.choice(MONTHS)
        byline = f"By {_person(rng)}, {month} {rng.randint(1, 28)}, {rng.randint(1990, 2030)}"
        x = (width - round(byline_font.getlength(byline))) // 2 if centred else margin
        put(byline, byline_font, x, y, block)
        y += round(byline_font.size * lead)
        block += 1
    y += round(body.size * 1.2)

    footer = f"Page {rng.randint(1, 40)}" if rng.random() < 0.5 else str(rng.randint(1, 400))
    bottom = height - margin - 2 * body.size  # room for the footer line
    columns = 2 if width >= 1100 and rng.random() < 0.35 else 1
    gutter = rng.randrange(36, 61)
    col_w = (width - 2 * margin - gutter * (columns - 1)) // columns
    col, col_top, cy = 0, y, y

    def place(text: str, fnt: Font, block: int) -> bool:
        """Put one line in the current column, moving to the next column when full; False when the page is."""
        nonlocal col, cy
        if cy + _line_height(fnt) > bottom:
            if col + 1 >= columns:
                return False
            col, cy = col + 1, col_top
        put(text, fnt, margin + col * (col_w + gutter), cy, block)
        cy += round(fnt.size * lead)
        return True

    section = 0
    full = False
    while not full:
        section += 1
        heading = _title(rng, 1, 4)
        if rng.random() < 0.5:
            heading = f"{section}. {heading}"
        for line in _wrap(heading.split(), head_font, col_w):
            full = full or not place(line, head_font, block)
        block += 1
        cy += round(body.size * 0.3)
        for _ in range(rng.randint(1, 3)):
            if full:
                break
            paragraph = " ".join(_sentence(rng) for _ in range(rng.randint(2, 6)))
            for line in _wrap(paragraph.split(), body, col_w):
                if not place(line, body, block):
                    full = True
                    break
            block += 1
            cy += round(body.size * 0.7)
    footer_y = height - margin + body.size // 2 - _line_height(body)
    put(footer, body, (width - round(body.getlength(footer))) // 2, footer_y, block)

    # Rotate the finished page like a slightly skewed scan; the truth follows through the same affine.
    angle = round(rng.uniform(-2.0, 2.0), 2)
    forward = _rotation(angle, width, height)
    img = img.transform(
        (width, height), Image.Transform.AFFINE, _invert(forward), Image.Resampling.BILINEAR, fillcolor=paper
    )
    for item in [*lines, *(w for line in lines for w in line["words"])]:
        item["quad"] = _quad(forward, item["unrotated_box"])
        item["box"] = _quad_box(item["quad"], width, height)
    img = _noise(img, rng, rng.randint(3, 12))

    blocks: dict[int, list[str]] = {}
    for line in lines:
        blocks.setdefault(line["block"], []).append(line["text"])
    text = "\n\n".join("\n".join(b) for b in blocks.values())
    truth = {
        "kind": "document",
        "size": (width, height),
        "angle": angle,
        "transform": forward,
        "paper": paper,
        "ink": ink,
        "columns": columns,
        "lines": lines,
        "text": text,
    }
    return img, truth


@register("ocr-document", "ocr")
def ocr_document(rng: random.Random, index: int) -> Sample:
    """High-res document page (title, byline, sections, 1-2 columns, +-2 deg skew, grain) -> full text."""
    img, truth = _render_document(rng)
    return _sample("ocr", img, rng.choice(OCR_PROMPTS), truth["text"], truth)


# ----------------------------------------------------------------------------------------------------
# ocr-receipt


def _render_receipt(rng: random.Random) -> tuple[Image.Image, Truth]:
    size = rng.randrange(16, 23)
    regular, bold = font("mono", size), font("mono-bold", size)
    big = font("mono-bold", round(size * 1.4))
    columns = rng.randrange(30, 41)
    margin = rng.randrange(24, 45)
    width = round(columns * regular.getlength("0")) + 2 * margin
    pitch = round(size * rng.uniform(1.4, 1.65))
    paper, ink = rng.choice(PAPERS[:4]), rng.choice(INKS)

    # (kind, left, right, font, item index or -1): kinds are centre, lr (left and right aligned) and sep.
    specs: list[tuple[str, str, str, Font, int]] = []
    store = f"{rng.choice(TEAMS + STREETS)} {rng.choice(('Market', 'Grocery', 'Foods', 'Mart', 'Deli'))}"
    specs.append(("centre", store.upper(), "", big, -1))
    specs.append(("centre", f"{rng.randint(1, 999)} {rng.choice(STREETS)} St", "", regular, -1))
    phone = f"TEL {rng.randint(200, 989)}-{rng.randint(1000, 9999)}"
    specs.append(("centre", f"{rng.choice(CITIES)} {phone}", "", regular, -1))
    specs.append(("sep", "", "", regular, -1))
    stamp = f"{rng.randint(2018, 2030)}-{rng.randint(1, 12):02d}-{rng.randint(1, 28):02d} "
    stamp += f"{rng.randint(7, 22):02d}:{rng.randint(0, 59):02d}"
    specs.append(("lr", stamp, f"#{rng.randint(1000, 99999)}", regular, -1))
    specs.append(("sep", "", "", regular, -1))

    items: list[Truth] = []
    for name in rng.sample(GROCERIES, rng.randint(3, 12)):
        qty = rng.choices((1, 2, 3, 4), weights=(6, 2, 1, 1))[0]
        unit = rng.randint(1, 29) * 100 + rng.choice((0, 25, 49, 50, 75, 99))
        amount = qty * unit
        left = name if qty == 1 else f"{name} x{qty}"
        right = _cents(amount)
        left = left[: columns - len(right) - 1]
        specs.append(("lr", left, right, regular, len(items)))
        items.append({"name": name, "qty": qty, "unit_cents": unit, "amount_cents": amount, "line": -1})
    subtotal = sum(i["amount_cents"] for i in items)
    rate_bp = rng.choice((0, 500, 625, 700, 800, 875, 1000))  # basis points
    tax = (subtotal * rate_bp + 5000) // 10000  # round half up, in cents
    total = subtotal + tax
    specs.append(("sep", "", "", regular, -1))
    specs.append(("lr", "SUBTOTAL", _cents(subtotal), regular, -1))
    specs.append(("lr", f"TAX {_number(rate_bp / 100)}%", _cents(tax), regular, -1))
    specs.append(("lr", "TOTAL", f"${_cents(total)}", bold, -1))
    payment: Truth
    if rng.random() < 0.5:
        step = rng.choice((500, 1000, 2000))
        cash = (total // step + 1) * step
        payment = {"method": "cash", "tendered_cents": cash, "change_cents": cash - total}
        specs.append(("lr", "CASH", _cents(cash), regular, -1))
        specs.append(("lr", "CHANGE", _cents(cash - total), regular, -1))
    else:
        card = rng.choice(("VISA", "MASTERCARD", "AMEX"))
        payment = {"method": card.lower(), "tendered_cents": total, "change_cents": 0}
        specs.append(("lr", f"{card} **** {rng.randint(1000, 9999)}", _cents(total), regular, -1))
    specs.append(("sep", "", "", regular, -1))
    specs.append(("lr", f"ITEMS {len(items)}", "", regular, -1))
    thanks = rng.choice(("THANK YOU!", "THANK YOU FOR SHOPPING", "PLEASE COME AGAIN"))
    specs.append(("centre", thanks, "", bold, -1))

    def advance(fnt: Font) -> int:
        return max(pitch, round(fnt.size * 1.35))

    height = 2 * margin + sum(advance(spec[3]) for spec in specs)
    img = Image.new("RGB", (width, height), paper)
    draw = ImageDraw.Draw(img)
    lines: list[Truth] = []
    rules: list[Box] = []
    y = margin
    for kind, left, right, fnt, item in specs:
        if kind == "sep":
            yy = y + advance(fnt) // 2
            for x in range(margin, width - margin - 4, 10):
                draw.line((x, yy, x + 5, yy), fill=ink, width=1)
            rules.append((margin, yy, width - margin - 4, yy + 1))
        elif kind == "centre":
            box = _text(img, ((width - round(fnt.getlength(left))) // 2, y), left, fnt, ink)
            lines.append({"text": left, "box": box, "parts": [{"text": left, "box": box}]})
        else:
            parts = [{"text": left, "box": _text(img, (margin, y), left, fnt, ink)}]
            if right:
                rx = width - margin - round(fnt.getlength(right))
                parts.append({"text": right, "box": _text(img, (rx, y), right, fnt, ink)})
            text = f"{left} {right}" if right else left
            lines.append({"text": text, "box": _union([p["box"] for p in parts]), "parts": parts})
            if item >= 0:
                items[item]["line"] = len(lines) - 1
        y += advance(fnt)
    img = _noise(img, rng, rng.randint(2, 8))
    truth = {
        "kind": "receipt",
        "size": (width, height),
        "store": store.upper(),
        "items": items,
        "subtotal_cents": subtotal,
        "tax_rate_bp": rate_bp,
        "tax_cents": tax,
        "total_cents": total,
        "payment": payment,
        "lines": lines,
        "rules": rules,
        "paper": paper,
        "ink": ink,
        "text": "\n".join(line["text"] for line in lines),
    }
    return img, truth


@register("ocr-receipt", "ocr")
def ocr_receipt(rng: random.Random, index: int) -> Sample:
    """Monospace till receipt (items, subtotal, tax, total that sum exactly, payment) -> full text."""
    img, truth = _render_receipt(rng)
    return _sample("ocr", img, rng.choice(OCR_PROMPTS), truth["text"], truth)


# ----------------------------------------------------------------------------------------------------
# Tables (ocr-table, table-qa)

TABLE_KEYS: tuple[tuple[str, tuple[str, ...]], ...] = (
    ("Name", tuple(f"{f} {ln[0]}." for f in FIRST_NAMES for ln in LAST_NAMES[:3])),
    ("City", CITIES),
    ("Product", GADGETS + FRUITS),
    ("Team", TEAMS),
    ("Month", MONTHS),
)
TABLE_COLUMNS: tuple[tuple[str, Callable[[random.Random], str], bool], ...] = (
    ("Price", lambda r: f"${r.randint(1, 999)}.{r.choice(('00', '49', '50', '99'))}", True),
    ("Qty", lambda r: str(r.randint(1, 250)), True),
    ("Score", lambda r: str(r.randint(40, 100)), True),
    ("Year", lambda r: str(r.randint(1990, 2030)), True),
    ("Rating", lambda r: f"{r.randint(10, 50) / 10:.1f}", True),
    ("Growth", lambda r: f"{r.randint(-150, 300) / 10:+.1f}%", True),
    ("Status", lambda r: r.choice(("Active", "Pending", "Closed", "On hold", "Shipped")), False),
    ("Region", lambda r: r.choice(("North", "South", "East", "West", "Central")), False),
    ("Code", lambda r: f"{r.choice('ABCDEFGHJK')}{r.choice('LMNPRSTUVX')}-{r.randint(100, 999)}", False),
    ("Color", lambda r: r.choice(("Red", "Blue", "Green", "Black", "White", "Silver")), False),
)
_BOLD = {"sans": "sans-bold", "serif": "sans-bold", "mono": "mono-bold"}


def _cell_value(text: str) -> float:
    """A numeric cell's value ("$12.50", "+3.5%", "2019" -> float)."""
    return float(text.replace("$", "").replace("%", "").replace(",", ""))


def _render_table(rng: random.Random, caption: bool) -> tuple[Image.Image, Truth]:
    key_header, key_pool = rng.choice(TABLE_KEYS)
    specs = rng.sample(TABLE_COLUMNS, rng.randint(2, 4))
    keys = rng.sample(key_pool, rng.randint(3, min(9, len(key_pool))))
    header = [key_header] + [s[0] for s in specs]
    numeric = [False] + [s[2] for s in specs]
    rows = [[k] + [s[1](rng) for s in specs] for k in keys]

    face = rng.choice(("sans", "serif", "mono"))
    size = rng.randrange(15, 22)
    body, head = font(face, size), font(_BOLD[face], size)
    pad_x, pad_y = rng.randint(10, 16), rng.randint(7, 11)
    row_h, head_h = _line_height(body) + 2 * pad_y, _line_height(head) + 2 * pad_y
    col_w = [
        max(round(head.getlength(header[c])), *(round(body.getlength(r[c])) for r in rows)) + 2 * pad_x
        for c in range(len(header))
    ]
    margin = rng.randint(20, 48)
    paper, ink = rng.choice(PAPERS), rng.choice(INKS)
    caption_text = f"Table {rng.randint(1, 12)}: {_title(rng, 2, 5)}" if caption else ""
    cap_font = font("serif-italic", size)
    cap_h = round(size * 2.0) if caption else 0
    table_w = sum(col_w)
    width = max(table_w, round(cap_font.getlength(caption_text)) if caption else 0) + 2 * margin + 1
    height = 2 * margin + cap_h + head_h + len(rows) * row_h + 1
    img = Image.new("RGB", (width, height), paper)
    draw = ImageDraw.Draw(img)
    style = rng.choice(("grid", "rules", "zebra"))
    dark_header = rng.random() < 0.35
    header_fill = rng.choice(((220, 228, 242), (232, 232, 232), (226, 240, 226)))
    if dark_header:
        header_fill = rng.choice(((40, 70, 140), (50, 50, 60), (30, 110, 80)))
    line_color = rng.choice(((60, 60, 60), (150, 150, 150), ink))

    texts: list[Truth] = []
    if caption:
        box = _text(img, (margin, margin), caption_text, cap_font, ink)
        texts.append({"role": "caption", "text": caption_text, "box": box})
    x0, y0 = margin, margin + cap_h
    xs = [x0]
    for w in col_w:
        xs.append(xs[-1] + w)
    ys = [y0, y0 + head_h]
    for _ in rows:
        ys.append(ys[-1] + row_h)

    _rect(draw, (x0, ys[0], xs[-1], ys[1]), fill=header_fill)
    if style == "zebra":
        for i in range(1, len(rows), 2):  # data row i spans ys[i + 1] .. ys[i + 2]
            _rect(draw, (x0, ys[i + 1], xs[-1], ys[i + 2]), fill=(238, 238, 238))
    if style == "grid":
        for x in xs:
            draw.line((x, ys[0], x, ys[-1]), fill=line_color)
        for yy in ys:
            draw.line((xs[0], yy, xs[-1], yy), fill=line_color)
    else:
        for yy in (ys[0], ys[1], ys[-1]):
            draw.line((xs[0], yy, xs[-1], yy), fill=line_color, width=1)

    cells: list[Truth] = []
    for r, values in enumerate([header, *rows]):
        fnt = head if r == 0 else body
        color = (250, 250, 250) if r == 0 and dark_header else ink
        for c, value in enumerate(values):
            cell = (xs[c], ys[r], xs[c + 1], ys[r + 1])
            # Numbers align right, like in any spreadsheet; text aligns left.
            right_aligned = numeric[c] and r > 0
            x = xs[c + 1] - pad_x - round(fnt.getlength(value)) if right_aligned else xs[c] + pad_x
            box = _text(img, (x, ys[r] + pad_y), value, fnt, color)
            cells.append({"row": r, "col": c, "text": value, "box": box, "cell": cell})
    texts.extend({"role": "cell", "text": c["text"], "box": c["box"]} for c in cells)
    lines = ([caption_text] if caption else []) + [" | ".join(v) for v in [header, *rows]]
    truth = {
        "kind": "table",
        "size": (width, height),
        "style": style,
        "caption": caption_text,
        "header": header,
        "rows": rows,
        "numeric": numeric,
        "cells": cells,
        "texts": texts,
        "text": "\n".join(lines),
    }
    return img, truth


@register("ocr-table", "ocr")
def ocr_table(rng: random.Random, index: int) -> Sample:
    """Table with a header row (grid, rules or zebra style, optional caption) -> rows as "a | b | c" lines."""
    img, truth = _render_table(rng, caption=rng.random() < 0.5)
    img = _noise(img, rng, rng.randint(0, 6))
    question = (
        rng.choice(OCR_PROMPTS) + ' Write each table row on its own line with cells separated by " | ".'
    )
    return _sample("ocr", img, question, truth["text"], truth)


@register("table-qa", "text-rich")
def table_qa(rng: random.Random, index: int) -> Sample:
    """Table image + a lookup, arg-max or row-count question with a short exact answer."""
    img, truth = _render_table(rng, caption=rng.random() < 0.3)
    header, rows, numeric = truth["header"], truth["rows"], truth["numeric"]
    kind = ("lookup", "lookup", "max", "count")[index % 4]
    num_cols = [c for c in range(1, len(header)) if numeric[c]]
    if kind == "max" and num_cols:
        col = rng.choice(num_cols)
        values = [_cell_value(r[col]) for r in rows]
        best = max(values)
        if values.count(best) == 1:
            question = f"Which {header[0].lower()} has the highest {header[col]}?"
            answer = rows[values.index(best)][0]
            truth.update(question_type="max", column=col)
            return _sample("text-rich", img, question, answer, truth)
    if kind == "count":
        question = "How many data rows does the table have, not counting the header row?"
        truth.update(question_type="count")
        return _sample("text-rich", img, question, str(len(rows)), truth)
    r, col = rng.randrange(len(rows)), rng.randrange(1, len(header))
    question = f"What is the {header[col]} of {rows[r][0]}?"
    truth.update(question_type="lookup", row=r, column=col)
    return _sample("text-rich", img, question, rows[r][col], truth)


# ----------------------------------------------------------------------------------------------------
# ocr-sign

SIGN_PHRASES: tuple[Callable[[random.Random], str], ...] = (
    lambda r: r.choice(("EXIT", "ENTRANCE", "PUSH", "PULL", "STOP", "CAUTION", "OPEN", "CLOSED", "TICKETS")),
    lambda r: r.choice(("NO PARKING", "KEEP OUT", "WET FLOOR", "NO SMOKING", "STAFF ONLY", "OPEN 24 HOURS")),
    lambda r: f"{r.randint(10, 70)}% OFF",
    lambda r: f"PLATFORM {r.randint(1, 12)}",
    lambda r: f"GATE {r.choice('ABCDEF')}{r.randint(1, 40)}",
    lambda r: f"SPEED LIMIT {r.choice((20, 30, 40, 50, 60))}",
    lambda r: f"{r.choice(STREETS).upper()} ST",
    lambda r: f"WELCOME TO {r.choice(CITIES).upper()}",
    lambda r: f"{r.choice(FIRST_NAMES).upper()}'S CAFE",
    lambda r: f"FRESH {r.choice(FRUITS).upper()}",
    lambda r: f"{r.choice(CITIES)} {r.randint(3, 480)} km",
    lambda r: r.choice(VOCAB).upper() + " " + r.choice(VOCAB).upper(),
)
SIGN_PANELS: tuple[RGB, ...] = (
    (200, 30, 40),
    (20, 110, 60),
    (30, 70, 160),
    (245, 200, 30),
    (250, 250, 245),
    (25, 25, 30),
    (235, 120, 20),
    (110, 40, 130),
)


def _render_sign(rng: random.Random) -> tuple[Image.Image, Truth]:
    width, height = rng.randrange(480, 901, 2), rng.randrange(300, 641, 2)
    wall: RGB = (rng.randint(90, 200), rng.randint(90, 200), rng.randint(90, 200))
    img = Image.new("RGB", (width, height), wall)
    # A soft vertical gradient on the wall; cheap in numpy and breaks the flat-colour look.
    arr = np.asarray(img, dtype=np.int16)
    arr = arr + np.linspace(-18, 18, height, dtype=np.float32).astype(np.int16)[:, None, None]
    img = Image.fromarray(np.clip(arr, 0, 255).astype(np.uint8))
    draw = ImageDraw.Draw(img)
    inset = rng.randint(16, 50)
    panel = (inset, inset, width - inset, height - inset)
    panel_color = rng.choice(SIGN_PANELS)
    ink: RGB = (250, 250, 250) if _luma(panel_color) < 140 else (20, 20, 20)
    if ink[0] > 200 and rng.random() < 0.3:
        ink = (250, 215, 40) if panel_color != SIGN_PANELS[3] else ink
    if rng.random() < 0.5:
        _rounded(draw, panel, radius=rng.randint(8, 40), fill=panel_color)
    else:
        _rect(draw, panel, fill=panel_color)
    border = rng.random() < 0.5
    if border:
        _rounded(draw, _grow(panel, -10), radius=12, outline=ink, width=rng.randint(3, 6))
    phrases: list[str] = []
    while len(phrases) < rng.choice((1, 1, 2, 2, 3)):
        phrase = rng.choice(SIGN_PHRASES)(rng)
        if phrase not in phrases:
            phrases.append(phrase)
    face = rng.choice(("sans-bold", "sans-bold", "sans", "serif", "mono-bold"))
    pad = 36  # text keeps clear of the border (at 10 px inset) by a good margin
    avail_w = panel[2] - panel[0] - 2 * pad
    avail_h = (panel[3] - panel[1] - 2 * pad) / len(phrases) / 1.2
    size = max(16, min(160, int(avail_h)) // 4 * 4)
    while size > 16 and max(font(face, size).getlength(p) for p in phrases) > avail_w:
        size -= 4
    fnt = font(face, size)
    extents = [_ink_extent(p, fnt) for p in phrases]
    gap = round(size * 0.25)
    block_h = sum(e[3] - e[1] for e in extents) + gap * (len(phrases) - 1)
    y = (panel[1] + panel[3] - block_h) // 2
    lines: list[Truth] = []
    for phrase, ext in zip(phrases, extents, strict=True):
        x = (panel[0] + panel[2] - (ext[2] - ext[0])) // 2 - ext[0]
        box = _text(img, (x, y - ext[1]), phrase, fnt, ink)
        lines.append({"text": phrase, "box": box, "font": face, "size": size})
        y += ext[3] - ext[1] + gap
    img = _noise(img, rng, rng.randint(0, 6))
    truth = {
        "kind": "sign",
        "size": (width, height),
        "panel": panel,
        "panel_color": panel_color,
        "ink": ink,
        "border": border,
        "lines": lines,
        "text": "\n".join(phrases),
    }
    return img, truth


@register("ocr-sign", "ocr")
def ocr_sign(rng: random.Random, index: int) -> Sample:
    """Sign or poster: 1-3 lines of big text on a coloured panel over a wall -> the text."""
    img, truth = _render_sign(rng)
    return _sample("ocr", img, rng.choice(OCR_PROMPTS), truth["text"], truth)


# ----------------------------------------------------------------------------------------------------
# doc-qa

FORM_TITLES = _pool(
    "Invoice, Purchase Order, Shipping Notice, Service Report, Membership Form, Expense Report, "
    "Delivery Receipt, Work Order, Lab Results, Rental Agreement, Registration Form, Payment Summary"
)
ORG_A = _pool(
    "Northfield, Bluewater, Summit, Redwood, Lakeside, Silverline, Harbor, Crescent, Oakridge, Brightpath, "
    "Ironwood, Meadow"
)
ORG_B = _pool(
    "Supply Co., Logistics, Medical Center, Holdings, Services Ltd., Labs, Properties, Trading Inc., Foods, "
    "Energy"
)
FORM_FIELDS: tuple[tuple[str, Callable[[random.Random], str]], ...] = (
    ("Invoice No.", lambda r: f"INV-{r.randint(10000, 99999)}"),
    ("Order ID", lambda r: f"{r.randint(100, 999)}-{r.randint(1000000, 9999999)}"),
    ("Date", _date),
    ("Due Date", _date),
    ("Customer", _person),
    ("Contact", _person),
    ("Prepared By", _person),
    ("Amount Due", _money),
    ("Total", _money),
    ("Deposit", _money),
    ("Phone", lambda r: f"({r.randint(200, 989)}) {r.randint(200, 999)}-{r.randint(1000, 9999)}"),
    ("Account", lambda r: f"{r.randint(1000, 9999)} {r.randint(1000, 9999)}"),
    ("Reference", lambda r: f"REF{r.randint(1000, 99999)}"),
    ("Status", lambda r: r.choice(("Paid", "Pending", "Overdue", "Approved", "Draft"))),
    ("Department", lambda r: r.choice(("Finance", "Sales", "Operations", "Research", "Support", "Legal"))),
    ("City", lambda r: r.choice(CITIES)),
    ("Quantity", lambda r: str(r.randint(1, 500))),
    ("Email", lambda r: f"{r.choice(FIRST_NAMES).lower()}.{r.choice(LAST_NAMES).lower()}@example.com"),
)


def _render_form(rng: random.Random) -> tuple[Image.Image, Truth]:
    width, height = rng.randrange(700, 901, 2), rng.randrange(880, 1121, 2)
    margin = rng.randrange(50, 81)
    paper, ink = rng.choice(PAPERS), rng.choice(INKS)
    img = Image.new("RGB", (width, height), paper)
    draw = ImageDraw.Draw(img)
    texts: list[Truth] = []

    def put(role: str, text: str, fnt: Font, x: int, y: int, color: RGB = ink) -> Box:
        box = _text(img, (x, y), text, fnt, color)
        texts.append({"role": role, "text": text, "box": box})
        return box

    org = f"{rng.choice(ORG_A)} {rng.choice(ORG_B)}"
    org_font = font("sans-bold", rng.randrange(16, 21))
    y = margin
    put("organization", org, org_font, margin, y)
    y += round(org_font.size * 2.2)
    title = rng.choice(FORM_TITLES)
    title_font = font(rng.choice(("sans-bold", "serif", "mono-bold")), rng.randrange(30, 41))
    centred = rng.random() < 0.5
    x = (width - round(title_font.getlength(title))) // 2 if centred else margin
    title_box = put("title", title, title_font, x, y)
    y = title_box[3] + 16
    draw.line((margin, y, width - margin, y), fill=(150, 150, 150), width=2)
    y += 26

    face = rng.choice(("sans", "serif"))
    size = rng.randrange(17, 22)
    key_font, value_font = font("sans-bold", size), font(face, size)
    specs = rng.sample(FORM_FIELDS, rng.randint(4, 8))
    fields: list[Truth] = []
    aligned = rng.random() < 0.5
    key_col = max(round(key_font.getlength(k + ":")) for k, _ in specs) + 40
    pitch = round(size * rng.uniform(1.7, 2.1))
    for key, make in specs:
        value = make(rng)
        key_box = put("key", f"{key}:", key_font, margin, y)
        vx = (
            margin + key_col if aligned else margin + round(key_font.getlength(f"{key}:")) + round(size * 0.6)
        )
        value_box = put("value", value, value_font, vx, y)
        fields.append({"key": key, "value": value, "key_box": key_box, "value_box": value_box})
        y += pitch
    y += pitch // 2
    body = font(face, size - 2)
    lead = round(body.size * 1.45)
    for _ in range(rng.randint(1, 3)):
        paragraph = " ".join(_sentence(rng) for _ in range(rng.randint(2, 4)))
        for line in _wrap(paragraph.split(), body, width - 2 * margin):
            if y + _line_height(body) > height - margin:
                break
            put("body", line, body, margin, y)
            y += lead
        y += lead // 2
    # Half the forms are clean, like digital-born PDFs; the rest carry light scan grain.
    img = _noise(img, rng, rng.choice((0, 0, 3, 5)))
    truth = {
        "kind": "form",
        "size": (width, height),
        "organization": org,
        "title": title,
        "fields": fields,
        "texts": texts,
    }
    return img, truth


@register("doc-qa", "text-rich")
def doc_qa(rng: random.Random, index: int) -> Sample:
    """Form-like document (organisation, title, key-value fields, body text) + a question, short answer."""
    img, truth = _render_form(rng)
    kind = ("field", "title", "field", "organization")[index % 4]
    if kind == "title":
        question = rng.choice(("What is the title of this document?", "What kind of document is this?"))
        answer = truth["title"]
    elif kind == "organization":
        question = "Which organization issued this document?"
        answer = truth["organization"]
    else:
        field = rng.choice(truth["fields"])
        question = rng.choice(
            (
                f'What is the value of the field "{field["key"]}"?',
                f"What is the {field['key']} on this document?",
            )
        )
        answer = field["value"]
        truth["field"] = field["key"]
    truth["question_type"] = kind
    return _sample("text-rich", img, question + " Answer briefly.", answer, truth)


# ----------------------------------------------------------------------------------------------------
# Charts (chart-qa, math-chart), drawn with PIL primitives.

CHART_DIMENSIONS: tuple[tuple[str, tuple[str, ...], bool], ...] = (
    ("Fruit", FRUITS, False),
    ("City", CITIES, False),
    ("Product", GADGETS, False),
    ("Team", TEAMS, False),
    ("Month", tuple(m[:3] for m in MONTHS), True),
    ("Year", tuple(str(y) for y in range(2010, 2031)), True),
)
CHART_METRICS = _pool(
    "Sales, Revenue, Visitors, Orders, Downloads, Rainfall, Score, Units Sold, Members, Votes"
)


def _nice_axis(vmax: int) -> tuple[int, int]:
    """(axis maximum, tick step) with at most 6 ticks above zero."""
    for base in (1, 2, 5, 10, 20, 25, 50, 100, 200, 250, 500, 1000, 2000, 5000):
        if math.ceil(vmax / base) <= 6:
            return math.ceil(vmax / base) * base, base
    raise ValueError(f"value {vmax} too large for the chart axis")


def _chart_data(rng: random.Random, kind: str) -> tuple[str, str, list[str], list[int]]:
    dim, pool, ordered = rng.choice(CHART_DIMENSIONS)
    n = rng.randint(3, 6) if kind == "pie" else rng.randint(3, 7)
    if ordered:
        start = rng.randrange(len(pool) - n + 1)
        cats = list(pool[start : start + n])
    else:
        cats = rng.sample(pool, n)
    top = rng.choice((20, 50, 100, 200, 500, 1000)) if kind != "pie" else 60
    lo = max(1, top // 20) if kind != "pie" else 5
    # Distinct values, so "the largest" and "the smallest" always have one answer.
    values = rng.sample(range(lo, top + 1), n)
    return dim, rng.choice(CHART_METRICS), cats, values


def _render_chart(rng: random.Random, kind: str) -> tuple[Image.Image, Truth]:
    dim, metric, cats, values = _chart_data(rng, kind)
    width, height = rng.randrange(560, 801, 2), rng.randrange(400, 561, 2)
    bg = rng.choice(((255, 255, 255), (250, 250, 247), (246, 248, 252)))
    fg = (30, 30, 30)
    img = Image.new("RGB", (width, height), bg)
    draw = ImageDraw.Draw(img)
    texts: list[Truth] = []

    def put(role: str, text: str, fnt: Font, x: int, y: int, color: RGB = fg) -> Box:
        box = _text(img, (x, y), text, fnt, color)
        texts.append({"role": role, "text": text, "box": box})
        return box

    title = f"{metric} by {dim}" if kind != "pie" else f"Share of {metric} by {dim}"
    title_font = font(rng.choice(("sans-bold", "serif")), rng.randrange(18, 23))
    title_box = put("title", title, title_font, (width - round(title_font.getlength(title))) // 2, 14)
    palette = rng.sample(VIVID, len(VIVID))
    truth: Truth = {
        "kind": "chart",
        "chart": kind,
        "size": (width, height),
        "title": title,
        "dimension": dim,
        "metric": metric,
        "categories": cats,
        "values": values,
        "background": bg,
    }

    if kind == "pie":
        plot_top, plot_bottom = title_box[3] + 24, height - 24
        radius = min(plot_bottom - plot_top, round(width * 0.55) - 48) // 2
        cx, cy = 24 + radius, (plot_top + plot_bottom) // 2
        total = sum(values)
        start = -90.0
        slices = []
        for v, color in zip(values, palette, strict=False):
            end = start + 360.0 * v / total
            draw.pieslice(
                (cx - radius, cy - radius, cx + radius, cy + radius),
                start,
                end,
                fill=color,
                outline=bg,
                width=2,
            )
            slices.append({"start": start, "end": end, "color": color})
            start = end
        legend_font = font("sans", rng.randrange(14, 18))
        lx = cx + radius + 40
        pitch = round(legend_font.size * 1.9)
        ly = cy - pitch * len(cats) // 2
        swatches = []
        for cat, v, color in zip(cats, values, palette, strict=False):
            sw = (lx, ly + 2, lx + 14, ly + 16)
            _rect(draw, sw, fill=color)
            swatches.append(sw)
            put("legend", f"{cat}: {v}", legend_font, lx + 24, ly)
            ly += pitch
        truth.update(
            center=(cx, cy), radius=radius, slices=slices, swatches=swatches, colors=palette[: len(cats)]
        )
    else:
        axis_max, step = _nice_axis(max(values))
        tick_font = font("sans", rng.randrange(12, 15))
        tick_w = max(round(tick_font.getlength(str(t))) for t in range(0, axis_max + 1, step))
        plot_left, plot_right = 18 + tick_w + 12, width - 24
        plot_top, zero_y = title_box[3] + 40, height - 52
        ppu = (zero_y - plot_top) / axis_max
        grid = tuple(min(255, c - 22) for c in bg)
        for t in range(0, axis_max + 1, step):
            yy = zero_y - round(t * ppu)
            draw.line((plot_left, yy, plot_right, yy), fill=grid)
            ext = _ink_extent(str(t), tick_font)
            put("tick", str(t), tick_font, plot_left - 10 - ext[2], yy - (ext[1] + ext[3]) // 2)
        slot = (plot_right - plot_left) / len(cats)
        label_size = 14
        while label_size > 9 and max(font("sans", label_size).getlength(c) for c in cats) > slot - 14:
            label_size -= 1
        label_font = font("sans", label_size)
        value_font = font("sans-bold", rng.randrange(12, 15))
        centers = [round(plot_left + slot * (i + 0.5)) for i in range(len(cats))]
        for cat, x in zip(cats, centers, strict=True):
            put("category", cat, label_font, x - round(label_font.getlength(cat)) // 2, zero_y + 10)
        if kind == "bar":
            bar_w = max(8, round(slot * rng.uniform(0.45, 0.72)))
            single = rng.random() < 0.5
            bars, colors = [], []
            for i, (v, x) in enumerate(zip(values, centers, strict=True)):
                color = palette[0] if single else palette[i % len(palette)]
                top = zero_y - round(v * ppu)
                bar = (x - bar_w // 2, top, x - bar_w // 2 + bar_w, zero_y)
                _rect(draw, bar, fill=color)
                bars.append(bar)
                colors.append(color)
                ext = _ink_extent(str(v), value_font)
                put("value", str(v), value_font, x - (ext[0] + ext[2]) // 2, top - 7 - ext[3])
            truth.update(bars=bars, colors=colors)
        else:
            color = palette[0]
            points = [(x, zero_y - v * ppu) for v, x in zip(values, centers, strict=True)]
            draw.line([(x, round(y)) for x, y in points], fill=color, width=3)
            for x, y in points:
                _ellipse(draw, (x - 5, round(y) - 5, x + 6, round(y) + 6), fill=color)
            # Value labels sit on small badges so the line never runs through them.
            for v, (x, y) in zip(values, points, strict=True):
                ext = _ink_extent(str(v), value_font)
                tx, ty = x - (ext[0] + ext[2]) // 2, round(y) - 14 - ext[3]
                _rect(draw, (tx + ext[0] - 5, ty + ext[1] - 5, tx + ext[2] + 5, ty + ext[3] + 5), fill=bg)
                put("value", str(v), value_font, tx, ty)
            truth.update(points=[(x, round(y, 2)) for x, y in points], colors=[color])
        draw.line((plot_left - 1, plot_top - 12, plot_left - 1, zero_y), fill=fg, width=1)
        draw.line((plot_left - 1, zero_y, plot_right, zero_y), fill=fg, width=1)
        truth.update(
            axis_max=axis_max,
            tick_step=step,
            zero_y=zero_y,
            pixels_per_unit=ppu,
            plot=(plot_left, plot_top, plot_right, zero_y),
        )
    truth["texts"] = texts
    return img, truth


CHART_KINDS = ("bar", "line", "pie")


@register("chart-qa", "text-rich")
def chart_qa(rng: random.Random, index: int) -> Sample:
    """Bar, line or pie chart with labelled values + value / largest / smallest / difference question."""
    img, truth = _render_chart(rng, CHART_KINDS[index % 3])
    cats, values = truth["categories"], truth["values"]
    kind = rng.choice(("value", "value", "max", "min", "difference"))
    unit = truth["dimension"].lower()
    operands: list[str] = []
    if kind == "value":
        i = rng.randrange(len(cats))
        operands = [cats[i]]
        question, answer = f"What is the value of {cats[i]}?", str(values[i])
    elif kind == "max":
        question, answer = f"Which {unit} has the highest value?", cats[values.index(max(values))]
    elif kind == "min":
        question, answer = f"Which {unit} has the lowest value?", cats[values.index(min(values))]
    else:
        i, j = rng.sample(range(len(cats)), 2)
        if values[i] < values[j]:
            i, j = j, i
        operands = [cats[i], cats[j]]
        question = f"What is the difference between the values of {cats[i]} and {cats[j]}?"
        answer = str(values[i] - values[j])
    truth.update(question_type=kind, operands=operands)
    return _sample("text-rich", img, question + " Answer with a single word or number.", answer, truth)


@register("math-chart", "math")
def math_chart(rng: random.Random, index: int) -> Sample:
    """Bar or line chart + arithmetic over its values (sum, difference, total, average) -> a number."""
    img, truth = _render_chart(rng, ("bar", "line")[index % 2])
    cats, values = truth["categories"], truth["values"]
    op = ("sum", "difference", "total", "average")[(index // 2) % 4]
    operands: list[str] = []
    if op == "sum":
        i, j = rng.sample(range(len(cats)), 2)
        operands = [cats[i], cats[j]]
        result: float = values[i] + values[j]
        question = f"What is the sum of the values of {cats[i]} and {cats[j]}?"
    elif op == "difference":
        i, j = rng.sample(range(len(cats)), 2)
        if values[i] < values[j]:
            i, j = j, i
        operands = [cats[i], cats[j]]
        result = values[i] - values[j]
        question = f"How much greater is the value of {cats[i]} than that of {cats[j]}?"
    elif op == "total":
        operands = list(cats)
        result = sum(values)
        question = "What is the total of all the values in the chart?"
    else:
        operands = list(cats)
        result = sum(values) / len(values)
        question = (
            "What is the average of all the values in the chart? Round to two decimal places if needed."
        )
    answer = _number(round(result, 2))
    truth.update(operation=op, operands=operands, result=result)
    return _sample("math", img, question + " Answer with a number.", answer, truth)


# ----------------------------------------------------------------------------------------------------
# read-text: scattered text, read a region or find a text.


def _render_scene_text(rng: random.Random) -> tuple[Image.Image, Truth]:
    width, height = rng.randrange(560, 801, 2), rng.randrange(420, 601, 2)
    dark = rng.random() < 0.3
    lo, hi = (10, 60) if dark else (200, 255)
    bg: RGB = (rng.randint(lo, hi), rng.randint(lo, hi), rng.randint(lo, hi))
    img = Image.new("RGB", (width, height), bg)
    draw = ImageDraw.Draw(img)
    occupied: list[Box] = []
    shapes: list[Truth] = []
    for _ in range(rng.randint(0, 4)):
        w, h = rng.randint(40, 160), rng.randint(40, 160)
        x, y = rng.randrange(0, width - w), rng.randrange(0, height - h)
        box = (x, y, x + w, y + h)
        color = rng.choice(VIVID)
        if rng.random() < 0.5:
            _rect(draw, box, fill=color)
        else:
            _ellipse(draw, box, fill=color)
        occupied.append(box)
        shapes.append({"box": box, "color": color})
    inks = (
        ((250, 250, 250), (250, 220, 60), (130, 220, 255), (255, 170, 170))
        if dark
        else ((20, 20, 20), (150, 20, 20), (20, 40, 140), (20, 100, 40), (90, 30, 120))
    )
    lines: list[Truth] = []
    seen: set[str] = set()
    makers: tuple[Callable[[], str], ...] = (
        lambda: _title(rng, 1, 3),
        lambda: rng.choice(SIGN_PHRASES)(rng),
        lambda: f"{rng.choice(VOCAB)} {rng.randint(1, 999)}",
        lambda: _person(rng),
        lambda: " ".join(_words(rng, rng.randint(2, 4))),
    )
    for _ in range(rng.randint(4, 8)):
        text = rng.choice(makers)()
        if text.lower() in seen:
            continue
        fnt = font(rng.choice(tuple(FONTS)), rng.randrange(18, 49, 2))
        ext = _ink_extent(text, fnt)
        if ext[2] - ext[0] > width - 48:
            continue
        for _ in range(40):
            x = rng.randrange(12 - ext[0], width - 12 - ext[2])
            y = rng.randrange(12 - ext[1], height - 12 - ext[3])
            box = (x + ext[0], y + ext[1], x + ext[2], y + ext[3])
            # 8 px of clear space around every text, so its box is unambiguous in the pixels.
            if not _overlaps(_grow(box, 8), occupied):
                break
        else:
            continue
        color = rng.choice(inks)
        drawn = _text(img, (x, y), text, fnt, color)
        occupied.append(drawn)
        seen.add(text.lower())
        lines.append(
            {
                "text": text,
                "box": drawn,
                "origin": (x, y),
                "font": _font_name(fnt),
                "size": fnt.size,
                "color": color,
            }
        )
    truth = {
        "kind": "scene-text",
        "size": (width, height),
        "background": bg,
        "shapes": shapes,
        "lines": lines,
        "dark": dark,
    }
    return img, truth


@register("read-text", "text-rich")
def read_text(rng: random.Random, index: int) -> Sample:
    """Scattered text snippets: read the text in <region0>, or find a given text (answer: its box)."""
    img, truth = _render_scene_text(rng)
    while not truth["lines"]:  # every retry draws new content; practically never taken
        img, truth = _render_scene_text(rng)
    line = rng.choice(truth["lines"])
    truth["target"] = truth["lines"].index(line)
    if index % 2 == 0:
        truth["task"] = "read"
        question = rng.choice(("What does the text in <region0> say?", "Read the text in <region0>."))
        return _sample("text-rich", img, question, line["text"], truth, regions=[line["box"]])
    truth["task"] = "find"
    question = f'Where is the text "{line["text"]}"? Answer in [x1, y1, x2, y2] format.'
    return _sample("text-rich", img, question, "<region0>", truth, regions=[line["box"]])


# ----------------------------------------------------------------------------------------------------
# science-diagram: labelled diagrams with leader lines, multiple choice.

Part = dict[str, Any]


def _diagram_cell(draw: ImageDraw.ImageDraw, area: Box, rng: random.Random, plant: bool) -> list[Part]:
    x0, y0, x1, y1 = area
    w, h = x1 - x0, y1 - y0

    def at(fx: float, fy: float) -> tuple[int, int]:
        return round(x0 + fx * w), round(y0 + fy * h)

    def box_at(fx0: float, fy0: float, fx1: float, fy1: float) -> Box:
        return (*at(fx0, fy0), *at(fx1, fy1))

    parts: list[Part] = []
    j = rng.uniform(-0.04, 0.04)
    if plant:
        wall = box_at(0, 0, 1, 1)
        _rounded(draw, wall, 18, fill=(150, 200, 120), outline=(50, 100, 40), width=8)
        membrane = _grow(wall, -12)
        _rounded(draw, membrane, 12, fill=(205, 235, 185), outline=(80, 140, 60), width=3)
        parts.append({"name": "cell wall", "box": wall, "anchor": (wall[0] + 4, at(0, 0.3 + j)[1])})
        parts.append({"name": "cell membrane", "box": membrane, "anchor": (at(0, 0)[0] + 13, at(0, 0.75)[1])})
        vacuole = box_at(0.4, 0.18 + j, 0.85, 0.72 + j)
        _rounded(draw, vacuole, 30, fill=(170, 210, 245), outline=(60, 110, 170), width=2)
        parts.append({"name": "vacuole", "box": vacuole, "anchor": at(0.62, 0.45 + j)})
        for fx, fy in ((0.12, 0.78), (0.3, 0.84), (0.9, 0.86)):
            _ellipse(
                draw,
                box_at(fx - 0.06, fy - 0.04, fx + 0.06, fy + 0.04),
                fill=(40, 140, 50),
                outline=(20, 80, 30),
            )
        chloro = box_at(0.24, 0.80, 0.36, 0.88)
        parts.append({"name": "chloroplast", "box": chloro, "anchor": at(0.3, 0.84)})
        cytoplasm_anchor = at(0.2, 0.6)
        nucleus = box_at(0.1, 0.15, 0.32, 0.45)
    else:
        membrane = box_at(0, 0, 1, 1)
        _ellipse(draw, membrane, fill=(250, 215, 215), outline=(170, 70, 90), width=4)
        parts.append({"name": "cell membrane", "box": membrane, "anchor": (membrane[0] + 2, at(0, 0.5)[1])})
        for fx, fy in ((0.22, 0.62), (0.72, 0.3)):
            _ellipse(
                draw,
                box_at(fx - 0.09, fy - 0.05, fx + 0.09, fy + 0.05),
                fill=(240, 150, 60),
                outline=(150, 80, 20),
                width=2,
            )
        parts.append(
            {"name": "mitochondrion", "box": box_at(0.13, 0.57, 0.31, 0.67), "anchor": at(0.22, 0.62)}
        )
        vacuole = box_at(0.62, 0.58 + j, 0.78, 0.78 + j)
        _ellipse(draw, vacuole, fill=(180, 215, 245), outline=(70, 120, 170), width=2)
        parts.append({"name": "vacuole", "box": vacuole, "anchor": at(0.7, 0.68 + j)})
        cytoplasm_anchor = at(0.45, 0.8)
        nucleus = box_at(0.36, 0.3, 0.6, 0.6)
    _ellipse(draw, nucleus, fill=(170, 130, 210), outline=(90, 50, 130), width=3)
    parts.append(
        {"name": "nucleus", "box": nucleus, "anchor": (nucleus[0] + 8, (nucleus[1] + nucleus[3]) // 2)}
    )
    ncx, ncy = (nucleus[0] + nucleus[2]) // 2, (nucleus[1] + nucleus[3]) // 2
    r = max(5, (nucleus[2] - nucleus[0]) // 7)
    nucleolus = (ncx - r + 4, ncy - r, ncx + r + 4, ncy + r)
    _ellipse(draw, nucleolus, fill=(80, 40, 110))
    parts.append({"name": "nucleolus", "box": nucleolus, "anchor": (ncx + 4, ncy)})
    parts.append({"name": "cytoplasm", "box": membrane, "anchor": cytoplasm_anchor})
    return parts


def _diagram_plant(draw: ImageDraw.ImageDraw, area: Box, rng: random.Random) -> list[Part]:
    x0, y0, x1, y1 = area
    w, h = x1 - x0, y1 - y0
    cx = x0 + w // 2 + rng.randint(-w // 12, w // 12)
    soil_top = y0 + round(h * 0.72)
    soil = (x0, soil_top, x1, y1)
    _rect(draw, soil, fill=(150, 105, 60))
    roots: list[tuple[int, int, int, int]] = []
    for k in range(5):
        dx = round((k - 2) * w * 0.08)
        end = (cx + dx * 2, soil_top + round(h * rng.uniform(0.14, 0.24)))
        draw.line((cx, soil_top + 4, *end), fill=(245, 235, 200), width=3)
        roots.append((cx, soil_top + 4, *end))
    root_box = (
        min(r[2] for r in roots) - 2,
        soil_top + 3,
        max(r[2] for r in roots) + 2,
        max(r[3] for r in roots) + 2,
    )
    stem_top = y0 + round(h * 0.25)
    stem = (cx - 5, stem_top, cx + 5, soil_top)
    _rect(draw, stem, fill=(50, 140, 50))
    leaves = []
    for side, fy in ((-1, 0.5), (1, 0.42)):
        ly = y0 + round(h * fy)
        tip = (cx + side * round(w * 0.3), ly - round(h * 0.08))
        pts = [(cx, ly)]
        for t in np.linspace(0, 1, 9)[1:-1]:
            px = cx + (tip[0] - cx) * t
            py = ly + (tip[1] - ly) * t
            bulge = math.sin(math.pi * t) * h * 0.07
            pts.append((round(px), round(py - bulge)))
        pts.append(tip)
        for t in np.linspace(1, 0, 9)[1:-1]:
            px = cx + (tip[0] - cx) * t
            py = ly + (tip[1] - ly) * t
            bulge = math.sin(math.pi * t) * h * 0.07
            pts.append((round(px), round(py + bulge)))
        draw.polygon(pts, fill=(70, 170, 60), outline=(30, 100, 30))
        xs, ys = [p[0] for p in pts], [p[1] for p in pts]
        leaves.append(
            (
                (min(xs), min(ys), max(xs) + 1, max(ys) + 1),
                (round((cx + tip[0]) / 2), round((ly + tip[1]) / 2)),
            )
        )
    petal_r = round(min(w, h) * 0.07)
    fcx, fcy = cx, stem_top - petal_r
    color = rng.choice(((230, 60, 90), (240, 150, 40), (170, 80, 200), (240, 100, 160)))
    for k in range(6):
        a = k * math.pi / 3
        px, py = fcx + round(math.cos(a) * petal_r * 1.3), fcy + round(math.sin(a) * petal_r * 1.3)
        _ellipse(draw, (px - petal_r, py - petal_r, px + petal_r, py + petal_r), fill=color)
    _ellipse(draw, (fcx - petal_r, fcy - petal_r, fcx + petal_r, fcy + petal_r), fill=(250, 210, 40))
    flower_r = round(petal_r * 2.3) + 1
    flower = (fcx - flower_r, fcy - flower_r, fcx + flower_r, fcy + flower_r)
    sun_r = round(min(w, h) * 0.08)
    sun = (x1 - 2 * sun_r, y0, x1, y0 + 2 * sun_r)
    _ellipse(draw, sun, fill=(250, 200, 40))
    leaf_box, leaf_anchor = leaves[rng.randrange(2)]
    return [
        {"name": "soil", "box": soil, "anchor": (x0 + round(w * 0.15), soil_top + round(h * 0.06))},
        {"name": "roots", "box": root_box, "anchor": (roots[0][2], roots[0][3] - 3)},
        {"name": "stem", "box": stem, "anchor": (cx, y0 + round(h * 0.62))},
        {"name": "leaf", "box": leaf_box, "anchor": leaf_anchor},
        {"name": "flower", "box": flower, "anchor": (fcx + round(petal_r * 1.3), fcy)},
        {"name": "sun", "box": sun, "anchor": (sun[0] + sun_r, sun[1] + sun_r)},
    ]


def _diagram_circuit(draw: ImageDraw.ImageDraw, area: Box, rng: random.Random) -> list[Part]:
    x0, y0, x1, y1 = area
    w, h = x1 - x0, y1 - y0
    left, right = x0 + round(w * 0.08), x1 - round(w * 0.08)
    top, bottom = y0 + round(h * 0.18), y1 - round(h * 0.12)
    wire = (30, 30, 30)
    my, mx = (top + bottom) // 2, (left + right) // 2
    gap = round(h * 0.08)
    # Wire loop with gaps where the components sit.
    draw.line((left, top, mx - 30, top), fill=wire, width=3)
    draw.line((mx + 30, top, right, top), fill=wire, width=3)
    draw.line((right, top, right, my - gap), fill=wire, width=3)
    draw.line((right, my + gap, right, bottom), fill=wire, width=3)
    draw.line((right, bottom, mx + 40, bottom), fill=wire, width=3)
    draw.line((mx - 40, bottom, left, bottom), fill=wire, width=3)
    draw.line((left, bottom, left, my + 12), fill=wire, width=3)
    draw.line((left, my - 12, left, top), fill=wire, width=3)
    # Battery: a long thin plate and a short thick one.
    draw.line((left - 22, my - 10, left + 22, my - 10), fill=wire, width=3)
    draw.line((left - 11, my + 10, left + 11, my + 10), fill=wire, width=7)
    battery = (left - 23, my - 12, left + 24, my + 14)
    # Bulb: a glass circle with a filament cross, sitting in the top gap.
    bulb = (mx - 30, top - 30, mx + 31, top + 31)
    _ellipse(draw, bulb, fill=(255, 245, 170), outline=wire, width=3)
    draw.line((mx - 20, top - 20, mx + 20, top + 20), fill=wire, width=2)
    draw.line((mx - 20, top + 20, mx + 20, top - 20), fill=wire, width=2)
    # Switch: two contacts and an open blade on the right side.
    for yy in (my - gap, my + gap):
        _ellipse(draw, (right - 5, yy - 5, right + 6, yy + 6), fill=wire)
    blade_end = (right + round(gap * 1.2), my - gap + 4)
    draw.line((right, my + gap, *blade_end), fill=wire, width=3)
    switch = (right - 5, my - gap - 5, max(right + 6, blade_end[0] + 2), my + gap + 6)
    # Resistor: a zigzag in the bottom gap.
    pts = [(mx - 40, bottom)]
    for k in range(1, 8):
        pts.append((mx - 40 + k * 10, bottom + (12 if k % 2 else -12)))
    pts.append((mx + 40, bottom))
    draw.line(pts, fill=wire, width=3, joint="curve")
    resistor = (mx - 41, bottom - 14, mx + 42, bottom + 15)
    return [
        {"name": "battery", "box": battery, "anchor": (left + 20, my - 10)},
        {"name": "bulb", "box": bulb, "anchor": (mx - 12, top - 22)},
        {"name": "switch", "box": switch, "anchor": (right + round(gap * 0.6), my + 2)},
        {"name": "resistor", "box": resistor, "anchor": (mx + 10, bottom - 12)},
        {
            "name": "wire",
            "box": (left - 1, top - 1, right + 2, bottom + 2),
            "anchor": (left + round(w * 0.15), bottom),
        },
    ]


def _diagram_earth(draw: ImageDraw.ImageDraw, area: Box, rng: random.Random) -> list[Part]:
    x0, y0, x1, y1 = area
    cx, cy = (x0 + x1) // 2, (y0 + y1) // 2
    r = min(x1 - x0, y1 - y0) // 2
    layers = (
        ("atmosphere", 1.0, (200, 230, 250)),
        ("crust", 0.88, (120, 80, 50)),
        ("mantle", 0.8, (230, 120, 40)),
        ("outer core", 0.5, (245, 180, 40)),
        ("inner core", 0.25, (250, 235, 120)),
    )
    parts: list[Part] = []
    base = rng.uniform(0, 2 * math.pi)
    for k, (name, frac, color) in enumerate(layers):
        rr = round(r * frac)
        box = (cx - rr, cy - rr, cx + rr + 1, cy + rr + 1)
        _ellipse(draw, box, fill=color, outline=(60, 40, 30), width=1)
        inner = layers[k + 1][1] if k + 1 < len(layers) else 0.0
        mid = (frac + inner) / 2 * r
        a = base + k * 2 * math.pi / len(layers)
        parts.append(
            {
                "name": name,
                "box": box,
                "anchor": (cx + round(math.cos(a) * mid), cy + round(math.sin(a) * mid)),
            }
        )
    return parts


DIAGRAMS: tuple[tuple[str, Callable[[ImageDraw.ImageDraw, Box, random.Random], list[Part]]], ...] = (
    ("Parts of an Animal Cell", lambda d, a, r: _diagram_cell(d, a, r, plant=False)),
    ("Parts of a Plant Cell", lambda d, a, r: _diagram_cell(d, a, r, plant=True)),
    ("Parts of a Flowering Plant", _diagram_plant),
    ("A Simple Electric Circuit", _diagram_circuit),
    ("Layers of the Earth", _diagram_earth),
)


def _render_diagram(rng: random.Random, template: int) -> tuple[Image.Image, Truth]:
    width, height = rng.randrange(680, 841, 2), rng.randrange(500, 621, 2)
    bg = rng.choice(((255, 255, 255), (250, 250, 245), (245, 248, 252)))
    img = Image.new("RGB", (width, height), bg)
    draw = ImageDraw.Draw(img)
    title, make = DIAGRAMS[template]
    title_font = font(rng.choice(("sans-bold", "serif")), rng.randrange(20, 27))
    title_box = _text(
        img, ((width - round(title_font.getlength(title))) // 2, 16), title, title_font, (20, 20, 20)
    )
    side = round(width * 0.22)
    area = (side, title_box[3] + 40, width - side, height - 36)
    every_part = make(draw, area, rng)
    names = "123456" if rng.random() < 0.5 else "PQRSTU"
    label_font = font("sans-bold", rng.randrange(20, 27))
    lc = (40, 40, 40)
    # A leader that passes over another part's dot, or crosses another leader, makes two labels point
    # at one part: such a choice of parts is drawn again (a few tries always find a clear one).
    for _ in range(_LAYOUT_TRIES):
        parts = rng.sample(every_part, min(len(every_part), rng.randint(4, 6)))
        _lay_out_labels(parts, rng.sample(names, len(parts)), area, height, label_font)
        if _leaders_are_clear(parts):
            break
    else:
        raise RuntimeError(f"diagram {title!r}: no clear label layout in {_LAYOUT_TRIES} tries")
    for p in parts:
        ax, ay = p["anchor"]
        draw.line(p["leader"], fill=lc, width=2)
        _ellipse(draw, (ax - 3, ay - 3, ax + 4, ay + 4), fill=lc)
    # Text last, so no leader line is ever drawn over a label.
    for p in parts:
        p["label_box"] = _text(img, p.pop("origin"), p["label"], label_font, lc)
    truth = {
        "kind": "diagram",
        "size": (width, height),
        "title": title,
        "title_box": title_box,
        "area": area,
        "background": bg,
        "line_color": lc,
        "parts": [{k: v for k, v in p.items() if k != "side"} for p in parts],
    }
    return img, truth


_LAYOUT_TRIES = 50
_DOT_CLEARANCE = 6.0  # px between a leader line and another part's dot


def _lay_out_labels(
    parts: list[Part], labels: Sequence[str], area: Box, height: int, label_font: Any
) -> None:
    """Labels in the left or right margin, on their anchor's side, spread to at least 40 px apart: sets
    each part's ``label``, ``origin`` (where its text goes) and ``leader`` (anchor -> margin)."""
    mid = (area[0] + area[2]) / 2
    for part, label in zip(parts, labels, strict=True):
        part["label"] = label
        part["side"] = "left" if part["anchor"][0] < mid else "right"
    for side_name in ("left", "right"):
        group = sorted((p for p in parts if p["side"] == side_name), key=lambda p: p["anchor"][1])
        lo, hi = area[1] + 10, height - 30
        ys: list[int] = []
        for p in group:
            want = min(max(p["anchor"][1], lo), hi)
            ys.append(max(want, ys[-1] + 40) if ys else want)
        overflow = ys[-1] - hi if ys else 0
        if overflow > 0:
            ys = [y - overflow for y in ys]
        for p, y in zip(group, ys, strict=True):
            ext = _ink_extent(p["label"], label_font)
            # The label's ink ends 8 px short of its leader line and is centred on it vertically.
            if side_name == "left":
                x, end = area[0] - 34 - ext[2], (area[0] - 26, y)
            else:
                x, end = area[2] + 34 - ext[0], (area[2] + 26, y)
            p["origin"] = (x, y - (ext[1] + ext[3]) // 2)
            p["leader"] = (*p["anchor"], *end)


def _distance_to_segment(point: tuple[float, float], segment: tuple[float, ...]) -> float:
    (px, py), (ax, ay, bx, by) = point, segment
    dx, dy = bx - ax, by - ay
    t = max(0.0, min(1.0, ((px - ax) * dx + (py - ay) * dy) / max(dx * dx + dy * dy, 1e-9)))
    return math.hypot(ax + t * dx - px, ay + t * dy - py)


def _segments_cross(p: tuple[float, ...], q: tuple[float, ...]) -> bool:
    (x1, y1, x2, y2), (x3, y3, x4, y4) = p, q
    d = (x2 - x1) * (y4 - y3) - (y2 - y1) * (x4 - x3)
    if d == 0:
        return False
    t = ((x3 - x1) * (y4 - y3) - (y3 - y1) * (x4 - x3)) / d
    u = ((x3 - x1) * (y2 - y1) - (y3 - y1) * (x2 - x1)) / d
    return 0 < t < 1 and 0 < u < 1


def _leaders_are_clear(parts: list[Part]) -> bool:
    """No leader passes within ``_DOT_CLEARANCE`` of another part's dot, and no two leaders cross."""
    for p in parts:
        for q in parts:
            if p is q:
                continue
            if _distance_to_segment(q["anchor"], p["leader"]) < _DOT_CLEARANCE:
                return False
            if _segments_cross(p["leader"], q["leader"]):
                return False
    return True


@register("science-diagram", "science")
def science_diagram(rng: random.Random, index: int) -> Sample:
    """Labelled science diagram (cell, plant, circuit, Earth) + 4-option question on what a label marks."""
    img, truth = _render_diagram(rng, index % len(DIAGRAMS))
    parts = truth["parts"]
    target = rng.choice(parts)
    others = rng.sample([p for p in parts if p is not target], 3)
    options = [target, *others]
    rng.shuffle(options)
    letter = "ABCD"[options.index(target)]
    if index % 2 == 0:
        stem = f"Which label points to the {target['name']}?"
        choices = [p["label"] for p in options]
    else:
        stem = f"What does the label {target['label']} point to?"
        choices = [p["name"] for p in options]
    lines = [stem] + [f"{'ABCD'[k]}. {c}" for k, c in enumerate(choices)]
    lines.append("Answer with the option's letter from the given choices directly.")
    truth.update(target=target["name"], options=choices, question_type="label" if index % 2 == 0 else "part")
    return _sample("science", img, "\n".join(lines), letter, truth)


# ----------------------------------------------------------------------------------------------------
# code-screenshot

CODE_VERBS = _pool(
    "compute, load, parse, merge, filter, count, find, build, update, scale, clean, sum, sort, split, check"
)
CODE_NOUNS = _pool(
    "items, scores, values, records, names, totals, rows, tokens, prices, events, users, files, points, "
    "words, orders"
)
CODE_ARGS = _pool(
    "data, items, limit, factor, key, values, offset, path, name, count, threshold, step, size, text, scale"
)
_PY_KEYWORDS = "def return for in if else elif while not and or is None True False pass break continue lambda"
_PY_BUILTINS = "range len print max min sum sorted int str float list dict set abs enumerate zip"
PY_KEYWORDS = frozenset(_PY_KEYWORDS.split())
PY_BUILTINS = frozenset(_PY_BUILTINS.split())
_TOKEN = re.compile(r"(#.*$)|(\"[^\"]*\"|'[^']*')|(\b\d+(?:\.\d+)?\b)|([A-Za-z_]\w*)|(\s+)|(.)")
CODE_THEMES: dict[str, dict[str, RGB]] = {
    "light": {
        "bg": (250, 250, 250),
        "fg": (30, 30, 30),
        "keyword": (170, 40, 170),
        "builtin": (30, 120, 150),
        "string": (165, 25, 25),
        "number": (10, 130, 80),
        "comment": (60, 130, 60),
        "function": (120, 90, 30),
        "gutter": (135, 135, 135),
        "bar": (225, 225, 228),
        "title": (80, 80, 86),
    },
    "dark": {
        "bg": (30, 30, 36),
        "fg": (215, 215, 215),
        "keyword": (200, 135, 195),
        "builtin": (80, 200, 175),
        "string": (210, 150, 120),
        "number": (180, 205, 165),
        "comment": (110, 160, 90),
        "function": (220, 220, 160),
        "gutter": (120, 120, 128),
        "bar": (50, 50, 58),
        "title": (180, 180, 188),
    },
}


def _python_function(rng: random.Random) -> list[str]:
    """A short, syntactically valid Python function (the test compiles it)."""
    args = rng.sample(CODE_ARGS, rng.randint(1, 3))
    acc = rng.choice(("total", "result", "count", "acc", "out"))
    lines = [f"def {rng.choice(CODE_VERBS)}_{rng.choice(CODE_NOUNS)}({', '.join(args)}):"]
    if rng.random() < 0.6:
        lines.append(f'    """{_sentence(rng, 3, 8)}"""')
    lines.append(f"    {acc} = {rng.choice(('0', '1', '0.0'))}")

    def arg() -> str:
        return rng.choice(args)

    templates: tuple[Callable[[], list[str]], ...] = (
        lambda: [f"    for i in range({rng.randint(2, 50)}):", f"        {acc} += i * {arg()}"],
        lambda: [
            f"    for item in {arg()}:",
            f"        if item > {rng.randint(0, 99)}:",
            f"            {acc} += item",
        ],
        lambda: [f"    if {arg()} is None:", f"        return {acc}"],
        lambda: ["    # " + " ".join(_words(rng, rng.randint(3, 7)))],
        lambda: [f"    {acc} = {acc} * {rng.randint(2, 9)} + len({arg()})"],
        lambda: [f"    while {acc} < {rng.randint(10, 999)}:", f"        {acc} += {rng.randint(1, 9)}"],
        lambda: [f'    print(f"{rng.choice(VOCAB)}: {{{acc}}}")'],
        lambda: [f'    label = "{rng.choice(VOCAB)}-{rng.randint(1, 99)}"'],
        lambda: [f"    {acc} = max({acc}, {arg()}) if {arg()} else {acc}"],
        lambda: [""],
    )
    for _ in range(rng.randint(2, 4)):
        lines.extend(rng.choice(templates)())
    lines.append(rng.choice((f"    return {acc}", f"    return {acc} / max(1, {rng.randint(2, 9)})")))
    # A blank line may not end the body or follow the def.
    return [line for k, line in enumerate(lines) if line or 1 < k < len(lines) - 1]


def _code_spans(line: str) -> list[tuple[int, str, str]]:
    """(column, text, colour role) runs of a code line; adjacent runs of one role are merged."""
    spans: list[tuple[int, str, str]] = []
    prev = ""
    for m in _TOKEN.finditer(line):
        text = m.group(0)
        if m.group(5):  # whitespace is not drawn
            continue
        if m.group(1):
            role = "comment"
        elif m.group(2):
            role = "string"
        elif m.group(3):
            role = "number"
        elif m.group(4):
            role = (
                "keyword"
                if text in PY_KEYWORDS
                else "builtin"
                if text in PY_BUILTINS
                else "function"
                if prev == "def"
                else "fg"
            )
        else:
            role = "fg"
        if m.group(4) or m.group(1):
            prev = text
        if spans and spans[-1][2] == role and spans[-1][0] + len(spans[-1][1]) == m.start():
            spans[-1] = (spans[-1][0], spans[-1][1] + text, role)
        else:
            spans.append((m.start(), text, role))
    return spans


def _render_code(rng: random.Random) -> tuple[Image.Image, Truth]:
    code = _python_function(rng)
    theme_name = rng.choice(("light", "dark"))
    theme = CODE_THEMES[theme_name]
    size = rng.randrange(14, 20)
    fnt = font("mono", size)
    adv = fnt.getlength("0")
    pitch = round(size * rng.uniform(1.4, 1.7))
    numbers = rng.random() < 0.6
    chrome = rng.random() < 0.5
    bar_h = 34 if chrome else 0
    gutter = round(adv * 3) + 24 if numbers else 0
    pad = rng.randint(16, 28)
    longest = max(len(line) for line in code)
    width = max(360, gutter + pad * 2 + math.ceil(longest * adv))
    height = bar_h + pad * 2 + pitch * len(code)
    img = Image.new("RGB", (width, height), theme["bg"])
    draw = ImageDraw.Draw(img)
    filename = f"{rng.choice(CODE_NOUNS)}.py"
    extras: list[Truth] = []
    if chrome:
        _rect(draw, (0, 0, width, bar_h), fill=theme["bar"])
        for k, color in enumerate(((240, 90, 80), (245, 190, 50), (90, 195, 80))):
            _ellipse(draw, (12 + k * 20, 11, 24 + k * 20, 23), fill=color)
        small = font("sans", 13)
        box = _text(
            img, ((width - round(small.getlength(filename))) // 2, 10), filename, small, theme["title"]
        )
        extras.append({"role": "filename", "text": filename, "box": box})
    lines: list[Truth] = []
    x0 = gutter + pad
    for k, line in enumerate(code):
        y = bar_h + pad + k * pitch
        if numbers:
            num = str(k + 1)
            nx = gutter - 14 - round(fnt.getlength(num))
            extras.append(
                {"role": "line-number", "text": num, "box": _text(img, (nx, y), num, fnt, theme["gutter"])}
            )
        boxes = [
            _text(img, (x0 + round(col * adv), y), text, fnt, theme[role])
            for col, text, role in _code_spans(line)
        ]
        lines.append({"text": line, "box": _union(boxes) if boxes else None, "origin": (x0, y)})
    truth = {
        "kind": "code",
        "size": (width, height),
        "theme": theme_name,
        "background": theme["bg"],
        "font": "mono",
        "font_size": size,
        "advance": adv,
        "lines": lines,
        "extras": extras,
        "filename": filename,
        "text": "\n".join(code),
    }
    return img, truth


@register("code-screenshot", "code")
def code_screenshot(rng: random.Random, index: int) -> Sample:
    """Editor screenshot of a short generated Python function (colouring, line numbers) -> the exact code."""
    img, truth = _render_code(rng)
    question = rng.choice(
        (
            "Transcribe the code in this screenshot exactly, without line numbers.",
            "Write out the Python code shown in the image.",
            "What code is shown in this screenshot? Reproduce it exactly.",
        )
    )
    return _sample("code", img, question, truth["text"], truth)


# ----------------------------------------------------------------------------------------------------
# Mobile UI screens and the Ferret-UI elementary tasks.

UI_CLASSES = ("button", "text field", "toggle", "checkbox", "icon", "label")
UI_ICONS = _pool(
    "search, home, settings, back, forward, plus, close, heart, star, menu, user, bell, trash, share, mail, "
    "camera, more, lock, calendar, edit"
)
UI_TITLES = _pool(
    "Settings, Profile, Account, Notifications, Privacy, Messages, Photos, Music, Wallet, Health, Weather, "
    "Reminders, Orders, Cart, Library, Explore, Activity"
)
UI_TOGGLES = _pool(
    "Wi-Fi, Bluetooth, Airplane Mode, Dark Mode, Location Services, Auto-Lock, Sync Contacts, Face ID, "
    "Do Not Disturb, Auto Updates, Cellular Data, Low Power Mode, Show Previews, Background Refresh, Haptics"
)
UI_CHECKS = _pool(
    "Remember me, I agree to the Terms, Subscribe to newsletter, Send me updates, Keep me signed in, "
    "Use as default, Include photos, Save card details, Share usage data"
)
UI_BUTTONS = _pool(
    "Sign In, Sign Up, Continue, Save, Cancel, Done, Next, Log Out, Submit, Try Again, Get Started, "
    "Add to Cart, Checkout, Send, Delete, Edit Profile, Apply, Learn More, Confirm, Skip"
)
UI_FIELDS = _pool(
    "Email, Password, Full name, Phone number, Search, Username, Address, City, Zip code, Message, "
    "Card number, Promo code"
)
UI_ROWS = (
    ("General", "settings"),
    ("Notifications", "bell"),
    ("Privacy", "lock"),
    ("Messages", "mail"),
    ("Camera", "camera"),
    ("Favorites", "heart"),
    ("Starred", "star"),
    ("Calendar", "calendar"),
    ("Account", "user"),
    ("Trash", "trash"),
    ("Sharing", "share"),
    ("Home Screen", "home"),
    ("Search", "search"),
    ("Edit Widgets", "edit"),
)
UI_ROW_VALUES = ("On", "Off", "English", "3", "12", "Never", "Always", "Daily", "Auto", "None")
UI_SECTIONS = _pool("ACCOUNT, PREFERENCES, GENERAL, PRIVACY, NOTIFICATIONS, SECURITY, ABOUT, DISPLAY")
UI_TABS = (
    ("Home", "home"),
    ("Search", "search"),
    ("Favorites", "heart"),
    ("Profile", "user"),
    ("Settings", "settings"),
    ("Inbox", "mail"),
    ("Alerts", "bell"),
    ("Starred", "star"),
)
UI_THEMES: dict[str, dict[str, RGB]] = {
    "light": {
        "bg": (255, 255, 255),
        "alt": (242, 242, 247),
        "fg": (10, 10, 10),
        "muted": (110, 110, 118),
        "separator": (222, 222, 228),
        "off": (175, 175, 182),
        "border": (165, 165, 172),
        "knob": (255, 255, 255),
    },
    "dark": {
        "bg": (0, 0, 0),
        "alt": (28, 28, 30),
        "fg": (245, 245, 245),
        "muted": (150, 150, 158),
        "separator": (44, 44, 48),
        "off": (105, 105, 112),
        "border": (120, 120, 128),
        "knob": (245, 245, 245),
    },
}
UI_ACCENTS: tuple[RGB, ...] = ((10, 110, 240), (40, 170, 80), (140, 70, 200), (230, 100, 20), (220, 50, 60))


def _draw_icon(draw: ImageDraw.ImageDraw, name: str, box: Box, color: RGB, bg: RGB) -> None:
    """A simple glyph for ``name`` inside the square ``box``, with a small inset so no stroke leaves it."""
    x0, y0 = box[0], box[1]
    s = box[2] - box[0]
    lw = max(2, round(s / 11))

    def p(fx: float, fy: float) -> tuple[float, float]:
        return (x0 + fx * s, y0 + fy * s)

    def r(fx0: float, fy0: float, fx1: float, fy1: float) -> tuple[float, float, float, float]:
        return (*p(fx0, fy0), *p(fx1, fy1))

    if name == "search":
        draw.ellipse(r(0.12, 0.12, 0.64, 0.64), outline=color, width=lw)
        draw.line((*p(0.57, 0.57), *p(0.86, 0.86)), fill=color, width=lw + 1)
    elif name == "home":
        draw.polygon([p(0.5, 0.1), p(0.9, 0.48), p(0.1, 0.48)], fill=color)
        draw.rectangle(r(0.22, 0.46, 0.78, 0.88), fill=color)
        draw.rectangle(r(0.42, 0.62, 0.58, 0.88), fill=bg)
    elif name == "settings":
        pts = []
        for k in range(16):
            a = k * math.pi / 8
            rad = 0.4 if k % 2 == 0 else 0.3
            pts.append(p(0.5 + rad * math.cos(a), 0.5 + rad * math.sin(a)))
        draw.polygon(pts, fill=color)
        draw.ellipse(r(0.37, 0.37, 0.63, 0.63), fill=bg)
    elif name in ("back", "forward"):
        xs = (0.64, 0.3) if name == "back" else (0.36, 0.7)
        draw.line([p(xs[0], 0.14), p(xs[1], 0.5), p(xs[0], 0.86)], fill=color, width=lw + 1, joint="curve")
    elif name == "plus":
        draw.line((*p(0.5, 0.12), *p(0.5, 0.88)), fill=color, width=lw + 1)
        draw.line((*p(0.12, 0.5), *p(0.88, 0.5)), fill=color, width=lw + 1)
    elif name == "close":
        draw.line((*p(0.18, 0.18), *p(0.82, 0.82)), fill=color, width=lw + 1)
        draw.line((*p(0.82, 0.18), *p(0.18, 0.82)), fill=color, width=lw + 1)
    elif name == "heart":
        draw.ellipse(r(0.12, 0.16, 0.52, 0.56), fill=color)
        draw.ellipse(r(0.48, 0.16, 0.88, 0.56), fill=color)
        draw.polygon([p(0.14, 0.44), p(0.86, 0.44), p(0.5, 0.86)], fill=color)
    elif name == "star":
        pts = []
        for k in range(10):
            a = -math.pi / 2 + k * math.pi / 5
            rad = 0.42 if k % 2 == 0 else 0.17
            pts.append(p(0.5 + rad * math.cos(a), 0.54 + rad * math.sin(a)))
        draw.polygon(pts, fill=color)
    elif name == "menu":
        for fy in (0.22, 0.46, 0.7):
            draw.rectangle(r(0.12, fy, 0.88, fy + 0.09), fill=color)
    elif name == "user":
        draw.ellipse(r(0.32, 0.12, 0.68, 0.48), fill=color)
        draw.chord(r(0.14, 0.56, 0.86, 1.2), 180, 360, fill=color)
    elif name == "bell":
        draw.polygon(
            [
                p(0.5, 0.12),
                p(0.72, 0.28),
                p(0.76, 0.66),
                p(0.88, 0.76),
                p(0.12, 0.76),
                p(0.24, 0.66),
                p(0.28, 0.28),
            ],
            fill=color,
        )
        draw.ellipse(r(0.42, 0.78, 0.58, 0.92), fill=color)
    elif name == "trash":
        draw.line((*p(0.14, 0.24), *p(0.86, 0.24)), fill=color, width=lw)
        draw.rectangle(r(0.38, 0.12, 0.62, 0.24), outline=color, width=max(1, lw - 1))
        draw.rectangle(r(0.24, 0.3, 0.76, 0.88), outline=color, width=lw)
    elif name == "share":
        draw.line((*p(0.5, 0.12), *p(0.5, 0.62)), fill=color, width=lw)
        draw.line([p(0.32, 0.3), p(0.5, 0.12), p(0.68, 0.3)], fill=color, width=lw)
        draw.line(
            [p(0.3, 0.44), p(0.16, 0.44), p(0.16, 0.88), p(0.84, 0.88), p(0.84, 0.44), p(0.7, 0.44)],
            fill=color,
            width=lw,
        )
    elif name == "mail":
        draw.rectangle(r(0.1, 0.24, 0.9, 0.78), outline=color, width=lw)
        draw.line([p(0.12, 0.27), p(0.5, 0.56), p(0.88, 0.27)], fill=color, width=lw)
    elif name == "camera":
        draw.rounded_rectangle(r(0.1, 0.3, 0.9, 0.82), radius=s * 0.1, outline=color, width=lw)
        draw.rectangle(r(0.34, 0.18, 0.62, 0.3), fill=color)
        draw.ellipse(r(0.35, 0.41, 0.65, 0.71), outline=color, width=lw)
    elif name == "more":
        for fx in (0.2, 0.5, 0.8):
            draw.ellipse(r(fx - 0.09, 0.41, fx + 0.09, 0.59), fill=color)
    elif name == "lock":
        draw.arc(r(0.3, 0.12, 0.7, 0.56), 180, 360, fill=color, width=lw)
        draw.line((*p(0.3 + lw / (2 * s), 0.34), *p(0.3 + lw / (2 * s), 0.46)), fill=color, width=lw)
        draw.line((*p(0.7 - lw / (2 * s), 0.34), *p(0.7 - lw / (2 * s), 0.46)), fill=color, width=lw)
        draw.rectangle(r(0.2, 0.45, 0.8, 0.88), fill=color)
    elif name == "calendar":
        draw.rectangle(r(0.12, 0.2, 0.88, 0.88), outline=color, width=lw)
        draw.rectangle(r(0.12, 0.2, 0.88, 0.36), fill=color)
        draw.line((*p(0.32, 0.1), *p(0.32, 0.26)), fill=color, width=lw)
        draw.line((*p(0.68, 0.1), *p(0.68, 0.26)), fill=color, width=lw)
        for fx in (0.3, 0.5, 0.7):
            for fy in (0.52, 0.7):
                draw.rectangle(r(fx - 0.05, fy - 0.05, fx + 0.05, fy + 0.05), fill=color)
    elif name == "edit":
        draw.polygon([p(0.68, 0.12), p(0.88, 0.32), p(0.36, 0.84), p(0.13, 0.87), p(0.16, 0.64)], fill=color)
    elif name == "signal":
        for k in range(4):
            draw.rectangle(r(0.1 + k * 0.21, 0.7 - k * 0.16, 0.26 + k * 0.21, 0.86), fill=color)
    elif name == "wifi":
        for rad in (0.66, 0.45, 0.24):
            draw.arc(r(0.5 - rad, 0.84 - rad, 0.5 + rad, 0.84 + rad), 225, 315, fill=color, width=lw)
        draw.ellipse(r(0.42, 0.74, 0.58, 0.9), fill=color)
    elif name == "battery":
        draw.rectangle(r(0.06, 0.3, 0.84, 0.7), outline=color, width=max(1, lw - 1))
        draw.rectangle(r(0.86, 0.42, 0.94, 0.58), fill=color)
        draw.rectangle(r(0.14, 0.38, 0.62, 0.62), fill=color)
    else:
        raise ValueError(f"no glyph for icon {name!r}")


class _Screen:
    """A screen canvas that records every widget it draws (class, text or name, exact box)."""

    def __init__(
        self, rng: random.Random, size: tuple[int, int], scale: float, theme: str, accent: RGB
    ) -> None:
        self.rng = rng
        self.scale = scale
        self.theme = UI_THEMES[theme]
        self.accent = accent
        self.img = Image.new("RGB", size, self.theme["bg"])
        self.draw = ImageDraw.Draw(self.img)
        self.elements: list[Truth] = []

    def u(self, v: float) -> int:
        """Logical points -> pixels."""
        return round(v * self.scale)

    def font(self, size: float, bold: bool = False) -> Font:
        return font("sans-bold" if bold else "sans", max(8, self.u(size)))

    def text_y(self, fnt: Font, top: int, height: int) -> int:
        """The origin y that centres ``fnt``'s line box in the band [top, top + height)."""
        return top + (height - _line_height(fnt)) // 2

    def label(self, x: int, y: int, text: str, fnt: Font, color: RGB | None = None) -> Truth:
        box = _text(self.img, (x, y), text, fnt, color or self.theme["fg"])
        element = {"class": "label", "text": text, "box": box}
        self.elements.append(element)
        return element

    def icon(
        self, name: str, x: int, y: int, size: int, color: RGB | None = None, bg: RGB | None = None
    ) -> Truth:
        box = (x, y, x + size, y + size)
        _draw_icon(self.draw, name, box, color or self.theme["fg"], bg or self.theme["bg"])
        element = {"class": "icon", "name": name, "box": box}
        self.elements.append(element)
        return element

    def button(self, x: int, y: int, w: int, h: int, text: str, filled: bool) -> Truth:
        box = (x, y, x + w, y + h)
        if filled:
            _rounded(self.draw, box, h // 4, fill=self.accent)
            color: RGB = (255, 255, 255)
        else:
            _rounded(self.draw, box, h // 4, outline=self.accent, width=max(2, self.u(2)))
            color = self.accent
        fnt = self.font(17, bold=True)
        ext = _ink_extent(text, fnt)
        tx = x + (w - (ext[2] - ext[0])) // 2 - ext[0]
        ty = y + (h - (ext[3] - ext[1])) // 2 - ext[1]
        text_box = _text(self.img, (tx, ty), text, fnt, color)
        element = {
            "class": "button",
            "text": text,
            "box": box,
            "text_box": text_box,
            "style": "filled" if filled else "outlined",
        }
        self.elements.append(element)
        return element

    def field(self, x: int, y: int, w: int, h: int, text: str, placeholder: bool) -> Truth:
        box = (x, y, x + w, y + h)
        _rounded(
            self.draw,
            box,
            self.u(10),
            fill=self.theme["bg"],
            outline=self.theme["border"],
            width=max(1, self.u(1.5)),
        )
        fnt = self.font(16)
        color = self.theme["muted"] if placeholder else self.theme["fg"]
        text_box = _text(self.img, (x + self.u(14), self.text_y(fnt, y, h)), text, fnt, color)
        element = {
            "class": "text field",
            "text": text,
            "box": box,
            "text_box": text_box,
            "placeholder": placeholder,
        }
        self.elements.append(element)
        return element

    def toggle(self, x: int, y: int, on: bool, label: str) -> Truth:
        w, h = self.u(51), self.u(31)
        box = (x, y, x + w, y + h)
        _rounded(self.draw, box, h // 2, fill=self.accent if on else self.theme["off"])
        k = h - 2 * self.u(2)
        kx = x + w - self.u(2) - k if on else x + self.u(2)
        _ellipse(self.draw, (kx, y + self.u(2), kx + k, y + self.u(2) + k), fill=self.theme["knob"])
        element = {"class": "toggle", "label": label, "state": "on" if on else "off", "box": box}
        self.elements.append(element)
        return element

    def checkbox(self, x: int, y: int, checked: bool, label: str) -> Truth:
        s = self.u(22)
        box = (x, y, x + s, y + s)
        if checked:
            _rounded(self.draw, box, self.u(5), fill=self.accent)
            pts = [(x + s * 0.24, y + s * 0.52), (x + s * 0.43, y + s * 0.72), (x + s * 0.78, y + s * 0.3)]
            self.draw.line(pts, fill=(255, 255, 255), width=max(2, self.u(2.5)))
        else:
            _rounded(self.draw, box, self.u(5), outline=self.theme["border"], width=max(2, self.u(2)))
        element = {
            "class": "checkbox",
            "label": label,
            "state": "checked" if checked else "unchecked",
            "box": box,
        }
        self.elements.append(element)
        return element

    def separator(self, x0: int, x1: int, y: int) -> None:
        self.draw.line((x0, y, x1, y), fill=self.theme["separator"], width=1)


def _ui_component(scr: _Screen, kind: str, x0: int, x1: int, y: int) -> int:
    """Draw one component of ``kind`` across [x0, x1) from ``y``; return its height in pixels."""
    rng, u, theme = scr.rng, scr.u, scr.theme
    w = x1 - x0
    if kind == "section":
        fnt = scr.font(13)
        scr.label(x0, y + u(8), rng.choice(UI_SECTIONS), fnt, theme["muted"])
        return u(32)
    if kind == "field":
        text = rng.choice(UI_FIELDS)
        placeholder = rng.random() < 0.7
        if not placeholder:
            text = f"{rng.choice(FIRST_NAMES).lower()}@example.com" if rng.random() < 0.5 else _person(rng)
        scr.field(x0, y, w, u(46), text, placeholder)
        return u(46)
    if kind == "toggle":
        h = u(52)
        fnt = scr.font(17)
        scr.label(x0, scr.text_y(fnt, y, h), rng.choice(UI_TOGGLES), fnt)
        label = scr.elements[-1]["text"]
        scr.toggle(x1 - u(51), y + (h - u(31)) // 2, rng.random() < 0.5, label)
        scr.separator(x0, x1, y + h - 1)
        return h
    if kind == "checkbox":
        h = u(44)
        fnt = scr.font(16)
        label = rng.choice(UI_CHECKS)
        scr.checkbox(x0, y + (h - u(22)) // 2, rng.random() < 0.5, label)
        scr.label(x0 + u(34), scr.text_y(fnt, y, h), label, fnt)
        return h
    if kind == "row":
        h = u(52)
        title, icon = rng.choice(UI_ROWS)
        size = u(24)
        scr.icon(icon, x0, y + (h - size) // 2, size, scr.accent)
        fnt = scr.font(17)
        scr.label(x0 + u(40), scr.text_y(fnt, y, h), title, fnt)
        chev = u(16)
        scr.icon("forward", x1 - chev, y + (h - chev) // 2, chev, theme["muted"])
        if rng.random() < 0.5:
            value = rng.choice(UI_ROW_VALUES)
            vf = scr.font(16)
            ext = _ink_extent(value, vf)
            scr.label(x1 - chev - u(10) - ext[2], scr.text_y(vf, y, h), value, vf, theme["muted"])
        scr.separator(x0 + u(40), x1, y + h - 1)
        return h
    if kind == "button":
        h = u(50)
        bw = w if rng.random() < 0.5 else max(u(140), w * 3 // 5)
        scr.button(x0 + (w - bw) // 2, y, bw, h, rng.choice(UI_BUTTONS), rng.random() < 0.7)
        return h
    if kind == "buttons":
        h = u(50)
        gap = u(12)
        bw = (w - gap) // 2
        first, second = rng.sample(UI_BUTTONS, 2)
        scr.button(x0, y, bw, h, first, False)
        scr.button(x0 + bw + gap, y, bw, h, second, True)
        return h
    if kind == "text":
        fnt = scr.font(15)
        lines = _wrap(_sentence(rng, 5, 14).split(), fnt, w)[:2]
        pitch = round(_line_height(fnt) * 1.3)
        for k, line in enumerate(lines):
            scr.label(x0, y + k * pitch, line, fnt, theme["muted"])
        return pitch * len(lines)
    raise ValueError(f"unknown UI component {kind!r}")


UI_COMPONENTS = ("section", "field", "toggle", "checkbox", "row", "button", "buttons", "text")
UI_WEIGHTS = (1, 2, 3, 2, 3, 2, 1, 1)


UI_HEIGHTS = {
    "section": 32,
    "field": 46,
    "toggle": 52,
    "checkbox": 44,
    "row": 52,
    "button": 50,
    "buttons": 50,
}


def _ui_stack(scr: _Screen, x0: int, x1: int, top: int, bottom: int) -> None:
    """Fill [top, bottom) with random components, 12 pt apart; stop at the first that does not fit."""
    y = top
    while True:
        kind = scr.rng.choices(UI_COMPONENTS, weights=UI_WEIGHTS)[0]
        # Paragraph text reserves two lines; every other component has a fixed height.
        need = scr.u(UI_HEIGHTS[kind]) if kind in UI_HEIGHTS else 2 * round(_line_height(scr.font(15)) * 1.3)
        if y + need > bottom:
            return
        y += _ui_component(scr, kind, x0, x1, y) + scr.u(12)


def _ui_status_bar(scr: _Screen, width: int, bg: RGB) -> int:
    u = scr.u
    h = u(44)
    fnt = scr.font(15, bold=True)
    scr.label(u(24), scr.text_y(fnt, 0, h), f"{scr.rng.randint(1, 12)}:{scr.rng.randint(0, 59):02d}", fnt)
    size = u(18)
    x = width - u(20) - size
    for name in ("battery", "wifi", "signal"):
        scr.icon(name, x, (h - size) // 2, size, bg=bg)
        x -= size + u(8)
    return h


def _render_screen(rng: random.Random, device: str) -> tuple[Image.Image, Truth]:
    theme = "dark" if rng.random() < 0.3 else "light"
    accent = rng.choice(UI_ACCENTS)
    if device == "phone":
        scale = rng.choice((1.0, 1.25, 1.5))
        size = (round(390 * scale), round(844 * scale))
    else:
        scale = rng.choice((0.75, 1.0))
        size = (round(1180 * scale), round(820 * scale))
    scr = _Screen(rng, size, scale, theme, accent)
    u, width, height = scr.u, size[0], size[1]
    bg = scr.theme["bg"]
    y = _ui_status_bar(scr, width, bg)
    title = rng.choice(UI_TITLES)
    if device == "phone":
        nav_h = u(52)
        if rng.random() < 0.6:
            scr.icon("back", u(12), y + (nav_h - u(24)) // 2, u(24), accent)
        tf = scr.font(17, bold=True)
        ext = _ink_extent(title, tf)
        scr.label((width - (ext[2] - ext[0])) // 2 - ext[0], scr.text_y(tf, y, nav_h), title, tf)
        right = rng.choice(("search", "settings", "plus", "share", "more", "menu", "edit"))
        scr.icon(right, width - u(12) - u(24), y + (nav_h - u(24)) // 2, u(24), accent)
        y += nav_h
        scr.separator(0, width, y)
        tabs = rng.random() < 0.7
        tab_h = u(78) if tabs else 0
        _ui_stack(scr, u(16), width - u(16), y + u(14), height - tab_h - u(12))
        if tabs:
            top = height - tab_h
            scr.separator(0, width, top)
            chosen = rng.sample(UI_TABS, rng.randint(3, 5))
            cell = width / len(chosen)
            selected = rng.randrange(len(chosen))
            lf = scr.font(10)
            for k, (name, glyph) in enumerate(chosen):
                cx = round(cell * (k + 0.5))
                color = accent if k == selected else scr.theme["muted"]
                scr.icon(glyph, cx - u(13), top + u(8), u(26), color)
                ext = _ink_extent(name, lf)
                scr.label(cx - (ext[0] + ext[2]) // 2, top + u(42) - ext[1], name, lf, color)
    else:
        side_w = u(300)
        alt = scr.theme["alt"]
        _rect(scr.draw, (0, y, side_w, height), fill=alt)
        scr.draw.line((side_w, y, side_w, height), fill=scr.theme["separator"])
        hf = scr.font(28, bold=True)
        scr.label(u(20), y + u(10), title, hf)
        ry = y + u(60)
        selected = rng.randrange(5)
        for k, (name, glyph) in enumerate(rng.sample(UI_ROWS, rng.randint(4, 7))):
            rh = u(48)
            if ry + rh > height - u(10):
                break
            color = scr.theme["fg"]
            fill = alt
            if k == selected:
                fill = accent
                _rounded(scr.draw, (u(10), ry, side_w - u(10), ry + rh), u(10), fill=accent)
                color = (255, 255, 255)
            scr.icon(glyph, u(24), ry + (rh - u(22)) // 2, u(22), color if k == selected else accent, bg=fill)
            fnt = scr.font(16)
            scr.label(u(58), scr.text_y(fnt, ry, rh), name, fnt, color)
            ry += rh + u(4)
        cx0 = side_w + u(40)
        cx1 = min(width - u(40), cx0 + u(620))
        tf = scr.font(22, bold=True)
        scr.label(cx0, y + u(12), rng.choice(UI_TITLES), tf)
        _ui_stack(scr, cx0, cx1, y + u(60), height - u(16))
    truth = {
        "kind": "ui",
        "device": device,
        "size": size,
        "scale": scale,
        "theme": theme,
        "background": bg,
        "accent": accent,
        "elements": scr.elements,
    }
    return scr.img, truth


def _describe(element: Truth) -> str:
    """How a widget is named in questions and listings."""
    cls = element["class"]
    if cls == "icon":
        return f"{element['name']} icon"
    if cls in ("toggle", "checkbox"):
        return f'{cls} for "{element["label"]}"'
    return f'{cls} "{element["text"]}"'


def _ui_screen(rng: random.Random, index: int) -> tuple[Image.Image, Truth]:
    # Two in three screens are phones; the rest are landscape tablets.
    return _render_screen(rng, "tablet" if index % 3 == 2 else "phone")


def _unique(elements: Sequence[Truth], key: Callable[[Truth], str | None]) -> list[Truth]:
    """Elements whose key is not None and occurs once on the screen (so a question has one answer)."""
    keys = [key(e) for e in elements]
    return [e for e, k in zip(elements, keys, strict=True) if k is not None and keys.count(k) == 1]


def _findable_texts(elements: Sequence[Truth]) -> list[Truth]:
    """Elements whose text names them alone: no other element's text holds it as whole words, in any
    case ("PRIVACY" beside a "Privacy" row, "Send" beside "Send me updates" had two answers)."""
    folded = [e["text"].casefold() if e.get("text") else None for e in elements]

    def named_elsewhere(i: int) -> bool:
        pattern = re.compile(rf"(?<!\w){re.escape(folded[i] or '')}(?!\w)")
        return any(j != i and text is not None and pattern.search(text) for j, text in enumerate(folded))

    return [e for i, e in enumerate(elements) if folded[i] and not named_elsewhere(i)]


GROUND_SUFFIX = " Answer in [x1, y1, x2, y2] format."


@register("ui-ocr", "ui")
def ui_ocr(rng: random.Random, index: int) -> Sample:
    """Mobile/tablet screen: what text is in <region0> (a label, button or text field's text box)."""
    img, truth = _ui_screen(rng, index)
    element = rng.choice([e for e in truth["elements"] if "text" in e])
    truth["target"] = truth["elements"].index(element)
    region = element.get("text_box", element["box"])
    question = rng.choice(("What is the text in <region0>?", "Read the text shown in <region0>."))
    return _sample("ui", img, question, element["text"], truth, regions=[region])


@register("ui-icon", "ui")
def ui_icon(rng: random.Random, index: int) -> Sample:
    """Mobile/tablet screen: which icon is at <region0> (search, home, settings, ...)."""
    img, truth = _ui_screen(rng, index)
    element = rng.choice([e for e in truth["elements"] if e["class"] == "icon"])
    truth["target"] = truth["elements"].index(element)
    question = "What is the icon in <region0>? Answer with its name."
    return _sample("ui", img, question, element["name"], truth, regions=[element["box"]])


@register("ui-widget", "ui")
def ui_widget(rng: random.Random, index: int) -> Sample:
    """Mobile/tablet screen: the class of the widget at <region0> (button, text field, toggle, ...)."""
    img, truth = _ui_screen(rng, index)
    # Pick a class first, so rare widgets are asked about as often as labels.
    present = sorted({e["class"] for e in truth["elements"]})
    cls = rng.choice(present)
    element = rng.choice([e for e in truth["elements"] if e["class"] == cls])
    truth["target"] = truth["elements"].index(element)
    question = f"What type of widget is in <region0>? Choose from: {', '.join(UI_CLASSES)}."
    return _sample("ui", img, question, cls, truth, regions=[element["box"]])


@register("ui-find-text", "ui")
def ui_find_text(rng: random.Random, index: int) -> Sample:
    """Mobile/tablet screen: where is the text "X" -> its box."""
    img, truth = _ui_screen(rng, index)
    while not (candidates := _findable_texts(truth["elements"])):  # rare: every text is named twice
        img, truth = _ui_screen(rng, index)
    element = rng.choice(candidates)
    truth["target"] = truth["elements"].index(element)
    question = f'Where is the text "{element["text"]}"?' + GROUND_SUFFIX
    return _sample("ui", img, question, "<region0>", truth, regions=[element.get("text_box", element["box"])])


@register("ui-find-icon", "ui")
def ui_find_icon(rng: random.Random, index: int) -> Sample:
    """Mobile/tablet screen: where is the <name> icon -> its box."""
    img, truth = _ui_screen(rng, index)
    candidates = _unique(truth["elements"], lambda e: e.get("name"))
    element = rng.choice(candidates)
    truth["target"] = truth["elements"].index(element)
    question = f"Where is the {element['name']} icon?" + GROUND_SUFFIX
    return _sample("ui", img, question, "<region0>", truth, regions=[element["box"]])


@register("ui-find-widget", "ui")
def ui_find_widget(rng: random.Random, index: int) -> Sample:
    """Mobile/tablet screen: where is the button "X" / toggle for "Y" / ... -> the widget's box."""
    img, truth = _ui_screen(rng, index)
    candidates = _unique(truth["elements"], _describe)
    classes = sorted({e["class"] for e in candidates})
    cls = rng.choice(classes)
    element = rng.choice([e for e in candidates if e["class"] == cls])
    truth["target"] = truth["elements"].index(element)
    question = f"Where is the {_describe(element)}?" + GROUND_SUFFIX
    return _sample("ui", img, question, "<region0>", truth, regions=[element["box"]])


@register("ui-list", "ui")
def ui_list(rng: random.Random, index: int) -> Sample:
    """Mobile/tablet screen: list every widget with its type, text or name, and box."""
    img, truth = _ui_screen(rng, index)
    elements = truth["elements"]
    lines = []
    for k, element in enumerate(elements):
        state = f" ({element['state']})" if "state" in element else ""
        lines.append(f"{_describe(element)}{state} <region{k}>")
    question = "List all the UI elements on this screen with their types and locations."
    return _sample("ui", img, question, "\n".join(lines), truth, regions=[e["box"] for e in elements])
