"""Scene generators: shapes on a background, rendered with PIL, for the non-document MM1.5 categories.

One shared renderer draws a background (plain, soft gradient or soft noise) and a few objects (circle,
square, triangle, star, diamond, hexagon) in named ``COLORS``, three size classes, at non-overlapping
positions. Every object is pasted through a binary (non-antialiased) mask, so its pixels are exactly
its colour and its box is the mask's exact extent: ``(x1, y1, x2, y2)`` in image pixels with x2/y2 the
far edges (``mm15.boxes``). Backgrounds are chosen far (in RGB) from every object colour drawn on them,
so a colour mask of the image recovers each object exactly; the tests rely on this.

Generators (``generate(name, ...)``), all with their ground truth in ``Sample.truth``:

- ``caption``: a scene and a one-paragraph caption (objects, colours, sizes, positions).
- ``interleaved``: a document of 2-3 scenes interleaved with paragraphs describing them.
- ``general-count`` / ``general-color`` / ``general-spatial``: short-answer VQA on one scene.
- ``refer-ground``: Ferret-style referring and grounding (phrase -> box, box -> description,
  point -> description); user turns carry boxes or points, assistant turns always boxes.
- ``multi-image``: 2-4 scenes: which image has more X, what changed, count across images.
- ``icl``: 1-3 demonstrations (image, question, answer) of a hidden rule, then a query image.
- ``text-only``: instruction following without images (word problems, sorting, strings, facts).
- ``video``: 8-24 frames of 1-2 objects moving linearly; direction, mover and order questions.

How pre-training samples use the turn schema: text that is learned is always in assistant turns, and
the image placeholders sit where the images are in the stream. A caption sample is a user turn holding
only ``<image>`` and an assistant turn holding the caption (the LLaVA pre-training pair). An interleaved
document has no prompt, so it is ONE assistant turn holding the whole document, text paragraphs and
``<image>`` placeholders in reading order. Concatenating the turn contents of either gives exactly the
MM1-style pre-training stream, and a chat renderer that puts the loss on assistant text puts it on every
text token of the document.

Image sizes are (height, width) throughout, as in the rest of the project.
"""

from __future__ import annotations

import functools
import math
import random
from collections.abc import Sequence
from dataclasses import dataclass, replace
from typing import Any

import numpy as np
from PIL import Image, ImageDraw, ImageFilter, ImageOps

from mm15.data.sample import IMAGE_PLACEHOLDER, Region, Sample, Turn
from mm15.data.synth import register
from mm15.data.synth.render import COLORS

RGB = tuple[int, int, int]
PixelBox = tuple[int, int, int, int]

SHAPES: tuple[str, ...] = ("circle", "square", "triangle", "star", "diamond", "hexagon")
# Side of an object's bounding square as a fraction of the image's shorter side (jittered +-10%).
SIZES: dict[str, float] = {"small": 0.09, "medium": 0.14, "large": 0.2}
# (height, width) of single-image scenes: small enough to render in a few milliseconds, with a few
# aspect ratios so box conversions are exercised on non-square images.
SCENE_SIZES: tuple[tuple[int, int], ...] = ((384, 384), (336, 448), (448, 336), (384, 512), (512, 384))
# Images of multi-image samples are smaller: there are up to four of them.
SMALL_SCENE_SIZES: tuple[tuple[int, int], ...] = ((320, 320), (288, 384), (384, 288))
VIDEO_FRAMES: tuple[int, int] = (8, 24)  # inclusive range of frames per clip
VIDEO_SIZE = 224  # square frames

BACKGROUND_COLORS: dict[str, RGB] = {
    "light beige": (236, 228, 212),
    "pale blue": (208, 222, 238),
    "pale green": (214, 232, 212),
    "light gray": (222, 222, 222),
    "dark slate": (44, 52, 64),
    "charcoal": (56, 54, 50),
    "sand": (200, 184, 150),
}
# Gradients only blend backgrounds of the same tone, so they stay "soft".
BACKGROUND_TONES: tuple[tuple[str, ...], ...] = (
    ("light beige", "pale blue", "pale green", "light gray", "sand"),
    ("dark slate", "charcoal"),
)
NOISE_AMPLITUDE = 10  # +- levels of the "noise" background
# An object colour is allowed on a background only if every background pixel is at least this far
# (RGB Euclidean, after the noise) from it, so a colour mask never picks up background.
MIN_COLOR_DISTANCE = 70.0
OBJECT_GAP = 6  # pixels between the bounding squares of two objects: blobs never touch
EDGE_MARGIN = 4  # pixels between a bounding square and the image border

NUMBER_WORDS = ("zero", "one", "two", "three", "four", "five", "six", "seven", "eight", "nine", "ten")


# --------------------------------------------------------------------------------------------------
# Scene specification and rendering
# --------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Background:
    """A background: ``kind`` plain / gradient / noise between ``start`` and ``end`` colour names."""

    kind: str
    start: str
    end: str
    direction: str = "horizontal"  # gradient direction: horizontal, vertical or diagonal
    noise_seed: int = 0

    def phrase(self) -> str:
        if self.kind == "gradient":
            return f"a soft gradient from {self.start} to {self.end}"
        if self.kind == "noise":
            return f"a lightly textured {self.start} background"
        return f"a plain {self.start} background"

    def truth(self) -> dict[str, Any]:
        return {"kind": self.kind, "start": self.start, "end": self.end, "direction": self.direction}


@dataclass(frozen=True)
class ObjectSpec:
    """An object to draw: its bounding square (top-left ``x``, ``y`` and ``side``) and its looks."""

    shape: str
    color: str
    size: str
    side: int
    x: int
    y: int

    @property
    def square(self) -> PixelBox:
        return (self.x, self.y, self.x + self.side, self.y + self.side)


@dataclass(frozen=True)
class SceneSpec:
    height: int
    width: int
    background: Background
    objects: tuple[ObjectSpec, ...]


@dataclass(frozen=True)
class SceneObject:
    """A drawn object: exact pixel box (far edges exclusive), mask centroid and pixel count."""

    shape: str
    color: str
    size: str
    box: PixelBox
    center: tuple[float, float]
    area: int

    @property
    def phrase(self) -> str:
        """Colour and shape: unique within a scene (``random_scene`` never repeats a pair)."""
        return f"{self.color} {self.shape}"

    def position(self, height: int, width: int) -> str:
        """Coarse position by thirds of the image: "top left", "center", "bottom", "right", ..."""
        cx = (self.box[0] + self.box[2]) / 2
        cy = (self.box[1] + self.box[3]) / 2
        col = "left" if cx < width / 3 else "right" if cx > 2 * width / 3 else "center"
        row = "top" if cy < height / 3 else "bottom" if cy > 2 * height / 3 else "middle"
        if row == "middle":
            return col
        return row if col == "center" else f"{row} {col}"

    def truth(self, height: int, width: int) -> dict[str, Any]:
        return {
            "shape": self.shape,
            "color": self.color,
            "size": self.size,
            "box": list(self.box),
            "center": [round(self.center[0], 3), round(self.center[1], 3)],
            "area": self.area,
            "position": self.position(height, width),
        }


@dataclass
class Scene:
    spec: SceneSpec
    image: Image.Image
    objects: list[SceneObject]

    def truth(self) -> dict[str, Any]:
        h, w = self.spec.height, self.spec.width
        return {
            "height": h,
            "width": w,
            "background": self.spec.background.truth(),
            "objects": [obj.truth(h, w) for obj in self.objects],
        }


@dataclass(frozen=True)
class ShapeMask:
    mask: Image.Image  # "L", 0 or 255, side x side; shared through the cache: never modify it
    bbox: PixelBox  # exact extent inside the square
    centroid: tuple[float, float]  # mean of pixel centres (x + 0.5, y + 0.5)
    area: int
    interior: tuple[tuple[int, int], ...]  # pixels at least 2 px from the edge (for point prompts)


def _shape_polygon(shape: str, side: int) -> list[tuple[float, float]]:
    s = side - 1
    c = s / 2
    if shape == "triangle":
        return [(c, 0), (s, s), (0, s)]
    if shape == "diamond":
        return [(c, 0), (s, c), (c, s), (0, c)]
    if shape == "star":
        points = []
        for k in range(10):
            radius = c if k % 2 == 0 else c * 0.45
            angle = math.radians(-90 + 36 * k)
            points.append((c + radius * math.cos(angle), c + radius * math.sin(angle)))
        return points
    if shape == "hexagon":
        return [
            (c + c * math.cos(math.radians(60 * k)), c + c * math.sin(math.radians(60 * k))) for k in range(6)
        ]
    raise ValueError(f"unknown shape {shape!r}; choose one of {SHAPES}")


@functools.lru_cache(maxsize=2048)
def shape_mask(shape: str, side: int) -> ShapeMask:
    """The binary mask of ``shape`` in a ``side`` x ``side`` square, with its exact extent (cached)."""
    if side < 8:
        raise ValueError(f"shape side must be >= 8 pixels, got {side}")
    mask = Image.new("L", (side, side), 0)
    draw = ImageDraw.Draw(mask)
    if shape == "circle":
        draw.ellipse((0, 0, side - 1, side - 1), fill=255)
    elif shape == "square":
        inset = round(side * 0.08)  # a square filling its bounding square would look larger than the rest
        draw.rectangle((inset, inset, side - 1 - inset, side - 1 - inset), fill=255)
    else:
        draw.polygon(_shape_polygon(shape, side), fill=255)
    arr = np.asarray(mask) > 0
    ys, xs = np.nonzero(arr)
    bbox = mask.getbbox()
    assert bbox is not None
    # Eroded on a mask padded with 2 empty pixels: PIL's filter repeats the border pixels outward, so a
    # circle's outer columns or a triangle's base row counted as 2 px inside the shape.
    padded = ImageOps.expand(mask, border=2, fill=0)
    eroded = np.asarray(padded.filter(ImageFilter.MinFilter(5)))[2:-2, 2:-2] > 0
    iy, ix = np.nonzero(eroded)
    if len(ix) == 0:  # a thin small star: fall back to any mask pixel
        iy, ix = ys, xs
    return ShapeMask(
        mask=mask,
        bbox=bbox,
        centroid=(float(xs.mean()) + 0.5, float(ys.mean()) + 0.5),
        area=int(arr.sum()),
        interior=tuple(zip(ix.tolist(), iy.tolist(), strict=True)),
    )


def _color_distance(a: Sequence[float], b: Sequence[float]) -> float:
    return math.dist(a, b)


@functools.lru_cache(maxsize=256)
def allowed_colors(background: tuple[str, str, str]) -> tuple[str, ...]:
    """Object colours far enough from every pixel of a background (kind, start, end)."""
    kind, start, end = background
    a, b = np.array(BACKGROUND_COLORS[start], float), np.array(BACKGROUND_COLORS[end], float)
    # Every background pixel is a blend of start and end (bilinear upsampling stays in the convex hull)
    # plus at most NOISE_AMPLITUDE per channel of grey noise.
    blends = [a + (b - a) * t for t in np.linspace(0.0, 1.0, 11)]
    slack = NOISE_AMPLITUDE * math.sqrt(3) if kind == "noise" else 0.0
    return tuple(
        name
        for name, rgb in COLORS.items()
        if min(_color_distance(rgb, blend) for blend in blends) - slack >= MIN_COLOR_DISTANCE
    )


def random_background(rng: random.Random) -> Background:
    kind = rng.choice(("plain", "plain", "gradient", "noise"))
    tone = rng.choice(BACKGROUND_TONES)
    start = rng.choice(tone)
    end = rng.choice([name for name in tone if name != start]) if kind == "gradient" else start
    direction = rng.choice(("horizontal", "vertical", "diagonal"))
    return Background(kind, start, end, direction, noise_seed=rng.getrandbits(32))


def render_background(background: Background, height: int, width: int) -> Image.Image:
    """The background image; gradients and noise are computed on a 1/16 grid and upsampled (soft, fast)."""
    if background.kind == "plain":
        return Image.new("RGB", (width, height), BACKGROUND_COLORS[background.start])
    gh, gw = max(2, height // 16), max(2, width // 16)
    a = np.array(BACKGROUND_COLORS[background.start], np.float32)
    b = np.array(BACKGROUND_COLORS[background.end], np.float32)
    ty = np.linspace(0.0, 1.0, gh, dtype=np.float32)[:, None]
    tx = np.linspace(0.0, 1.0, gw, dtype=np.float32)[None, :]
    t = {"horizontal": tx + 0 * ty, "vertical": ty + 0 * tx, "diagonal": (tx + ty) / 2}[background.direction]
    grid = a + (b - a) * t[..., None]
    if background.kind == "noise":
        noise_rng = np.random.default_rng(background.noise_seed)
        grid = grid + noise_rng.uniform(-NOISE_AMPLITUDE, NOISE_AMPLITUDE, (gh, gw, 1)).astype(np.float32)
    small = Image.fromarray(np.clip(np.rint(grid), 0, 255).astype(np.uint8), "RGB")
    return small.resize((width, height), Image.Resampling.BILINEAR)


def render_scene(spec: SceneSpec, background: Image.Image | None = None) -> Scene:
    """Draw ``spec``: each object is pasted through its binary mask, so its pixels are exactly its colour.

    ``background``, if given, is ``spec.background`` already rendered (a video renders it once for all
    its frames); it is copied, not drawn on.
    """
    if background is None:
        image = render_background(spec.background, spec.height, spec.width)
    else:
        if background.size != (spec.width, spec.height):
            raise ValueError(f"background is {background.size}, the scene {(spec.width, spec.height)}")
        image = background.copy()
    objects = []
    for obj in spec.objects:
        m = shape_mask(obj.shape, obj.side)
        image.paste(COLORS[obj.color], obj.square, m.mask)
        objects.append(
            SceneObject(
                shape=obj.shape,
                color=obj.color,
                size=obj.size,
                box=(obj.x + m.bbox[0], obj.y + m.bbox[1], obj.x + m.bbox[2], obj.y + m.bbox[3]),
                center=(obj.x + m.centroid[0], obj.y + m.centroid[1]),
                area=m.area,
            )
        )
    return Scene(spec, image, objects)


def _apart(a: PixelBox, b: PixelBox, gap: int) -> bool:
    return a[2] + gap <= b[0] or b[2] + gap <= a[0] or a[3] + gap <= b[1] or b[3] + gap <= a[1]


def object_side(rng: random.Random, size: str, height: int, width: int) -> int:
    return max(12, round(SIZES[size] * min(height, width) * rng.uniform(0.9, 1.1)))


def place(
    rng: random.Random, side: int, height: int, width: int, taken: Sequence[PixelBox], tries: int = 80
) -> tuple[int, int] | None:
    """A top-left corner for a ``side`` square at least OBJECT_GAP from every ``taken`` box, or None."""
    hi_x, hi_y = width - EDGE_MARGIN - side, height - EDGE_MARGIN - side
    if hi_x < EDGE_MARGIN or hi_y < EDGE_MARGIN:
        return None
    for _ in range(tries):
        x, y = rng.randint(EDGE_MARGIN, hi_x), rng.randint(EDGE_MARGIN, hi_y)
        if all(_apart((x, y, x + side, y + side), box, OBJECT_GAP) for box in taken):
            return x, y
    return None


def random_scene_spec(
    rng: random.Random,
    n_objects: int,
    height: int,
    width: int,
    background: Background | None = None,
    n_colors: int | None = None,
    sizes: Sequence[str] = tuple(SIZES),
) -> SceneSpec:
    """Up to ``n_objects`` objects (fewer if they do not fit), no two sharing both colour and shape.

    Colours come from a palette of ``n_colors`` colours allowed on the background, so several objects
    share a colour (which makes counting questions non-trivial).
    """
    background = background or random_background(rng)
    colors = allowed_colors((background.kind, background.start, background.end))
    palette = rng.sample(colors, min(len(colors), n_colors or rng.randint(2, 4)))
    used: list[tuple[str, str]] = []
    objects: list[ObjectSpec] = []
    for _ in range(n_objects):
        pairs = [(c, s) for c in palette for s in SHAPES if (c, s) not in used]
        if not pairs:
            break
        color, shape = rng.choice(pairs)
        size = rng.choice(sizes)
        side = object_side(rng, size, height, width)
        spot = place(rng, side, height, width, [o.square for o in objects])
        if spot is None:
            continue
        used.append((color, shape))
        objects.append(ObjectSpec(shape, color, size, side, spot[0], spot[1]))
    return SceneSpec(height, width, background, tuple(objects))


def random_scene(
    rng: random.Random,
    n_objects: int,
    sizes: Sequence[tuple[int, int]] = SCENE_SIZES,
    n_colors: int | None = None,
) -> Scene:
    height, width = rng.choice(sizes)
    return render_scene(random_scene_spec(rng, n_objects, height, width, n_colors=n_colors))


# --------------------------------------------------------------------------------------------------
# Language helpers
# --------------------------------------------------------------------------------------------------


def number_word(n: int) -> str:
    return NUMBER_WORDS[n] if 0 <= n < len(NUMBER_WORDS) else str(n)


def plural(noun: str, n: int) -> str:
    return noun if n == 1 else noun + "s"


def position_phrase(position: str) -> str:
    """ "top left" -> "in the top left", "left" -> "on the left", "top" -> "at the top", ..."""
    if position == "center":
        return "in the center"
    if position in ("left", "right"):
        return f"on the {position}"
    if position in ("top", "bottom"):
        return f"at the {position}"
    return f"in the {position}"


def _article(word: str) -> str:
    return "an" if word[0] in "aeiou" else "a"


def _object_sentence(rng: random.Random, obj: SceneObject, height: int, width: int) -> str:
    where = position_phrase(obj.position(height, width))
    noun = f"{obj.size} {obj.color} {obj.shape}"
    template = rng.choice(
        (
            "{A} {noun} sits {where}.",
            "There is {a} {noun} {where}.",
            "{Where}, there is {a} {noun}.",
            "{A} {noun} can be seen {where}.",
        )
    )
    a = _article(noun)
    return template.format(A=a.capitalize(), a=a, noun=noun, where=where, Where=where.capitalize())


def describe_scene(rng: random.Random, scene: Scene) -> str:
    """One paragraph: how many objects on which background, then one sentence per object."""
    h, w = scene.spec.height, scene.spec.width
    n = len(scene.objects)
    noun = rng.choice(("object", "shape"))
    opening = rng.choice(
        (
            "The image shows {n} {nouns} on {bg}.",
            "{N} {nouns} are arranged on {bg}.",
            "This picture contains {n} {nouns} against {bg}.",
        )
    ).format(
        n=number_word(n),
        N=number_word(n).capitalize(),
        nouns=plural(noun, n),
        bg=scene.spec.background.phrase(),
    )
    if n == 1:
        opening = opening.replace(" are arranged", " is arranged")
    # Reading order (top to bottom, then left to right) most of the time, so captions read naturally.
    objects = list(scene.objects)
    if rng.random() < 0.7:
        objects.sort(key=lambda o: (o.box[1] * 3 // h, o.box[0]))
    else:
        rng.shuffle(objects)
    sentences = [opening] + [_object_sentence(rng, obj, h, w) for obj in objects]
    colors = [o.color for o in scene.objects]
    top = max(dict.fromkeys(colors), key=colors.count) if colors else None
    if top is not None and colors.count(top) >= 2 and rng.random() < 0.6:
        sentences.append(f"{number_word(colors.count(top)).capitalize()} of the {noun}s are {top}.")
    return " ".join(sentences)


def _sample(
    category: str,
    turns: list[Turn],
    images: list[Image.Image],
    truth: dict[str, Any],
    regions: list[Region] | None = None,
    is_video: bool = False,
) -> Sample:
    # id and source are set by mm15.data.synth.generate.
    return Sample(
        id="",
        turns=turns,
        category=category,
        source="",
        images=list(images),
        regions=regions or [],
        is_video=is_video,
        truth=truth,
    )


# --------------------------------------------------------------------------------------------------
# Pre-training: caption and interleaved
# --------------------------------------------------------------------------------------------------


@register("caption", "caption")
def caption(rng: random.Random, index: int) -> Sample:
    """A scene of 1-6 shapes with a one-paragraph caption of their colours, sizes and positions."""
    scene = random_scene(rng, rng.randint(1, 6))
    text = describe_scene(rng, scene)
    turns = [Turn("user", IMAGE_PLACEHOLDER), Turn("assistant", text)]
    return _sample("caption", turns, [scene.image], {"scene": scene.truth(), "caption": text})


@register("interleaved", "interleaved")
def interleaved(rng: random.Random, index: int) -> Sample:
    """A document of 2-3 scenes interleaved with paragraphs describing them, as one assistant turn."""
    n_scenes = rng.randint(2, 3)
    scenes = [random_scene(rng, rng.randint(1, 5), SMALL_SCENE_SIZES) for _ in range(n_scenes)]
    title = rng.choice(
        (
            "A short tour of {n} arrangements of shapes.",
            "Notes on {n} pictures from a shape-sorting game.",
            "Here are {n} small scenes, one after another.",
        )
    ).format(n=number_word(n_scenes))
    parts = [title]
    paragraphs = []
    for k, scene in enumerate(scenes):
        paragraph = describe_scene(rng, scene)
        if k > 0:
            prev, cur = len(scenes[k - 1].objects), len(scene.objects)
            relation = "more" if cur > prev else "fewer" if cur < prev else "the same number of"
            paragraph = f"Compared with the previous picture, this one has {relation} objects. " + paragraph
        paragraphs.append(paragraph)
        # Text before or after its image, as in web documents.
        parts.extend((IMAGE_PLACEHOLDER, paragraph) if rng.random() < 0.5 else (paragraph, IMAGE_PLACEHOLDER))
    document = "\n\n".join(parts)
    truth = {"scenes": [s.truth() for s in scenes], "paragraphs": paragraphs, "format": "document"}
    return _sample("interleaved", [Turn("assistant", document)], [s.image for s in scenes], truth)


# --------------------------------------------------------------------------------------------------
# General VQA
# --------------------------------------------------------------------------------------------------


def _short_answer_suffix(rng: random.Random, kind: str) -> str:
    options = {
        "number": ("", " Answer with a number.", " Answer with a single number."),
        "word": ("", " Answer with one word.", " Answer with a single word."),
        "yesno": ("", " Answer yes or no."),
        "phrase": ("", " Answer with a short phrase."),
    }[kind]
    return rng.choice(options)


@register("general-count", "general")
def general_count(rng: random.Random, index: int) -> Sample:
    """How many objects of a colour / of a shape / in total are in a scene of 2-8 shapes."""
    scene = random_scene(rng, rng.randint(2, 8), n_colors=rng.randint(2, 3))
    objs = scene.objects
    kind = rng.choice(("color", "color", "shape", "all"))
    if kind == "color":
        present = sorted({o.color for o in objs})
        background = scene.spec.background
        # Sometimes an absent (but drawable) colour, so "0" is a possible answer.
        pool = (
            present
            if rng.random() < 0.85
            else list(allowed_colors((background.kind, background.start, background.end)))
        )
        color = rng.choice(pool)
        count = sum(o.color == color for o in objs)
        question = rng.choice(
            (
                "How many {c} objects are there?",
                "How many {c} shapes are in the image?",
                "Count the {c} shapes.",
            )
        ).format(c=color)
        target: dict[str, str] = {"color": color}
    elif kind == "shape":
        shape = rng.choice(SHAPES)
        count = sum(o.shape == shape for o in objs)
        question = rng.choice(
            ("How many {s}s are there?", "How many {s}s are in the image?", "Count the {s}s.")
        ).format(s=shape)
        target = {"shape": shape}
    else:
        count = len(objs)
        question = rng.choice(("How many shapes are there in total?", "How many objects are in the image?"))
        target = {}
    question += _short_answer_suffix(rng, "number")
    turns = [Turn("user", f"{IMAGE_PLACEHOLDER}\n{question}"), Turn("assistant", str(count))]
    truth = {"scene": scene.truth(), "question_type": "count", "target": target, "answer": str(count)}
    return _sample("general", turns, [scene.image], truth)


def _unique_descriptions(objects: Sequence[SceneObject]) -> list[tuple[int, str]]:
    """(object index, phrase) for objects named uniquely by shape alone or by size and shape."""
    out = []
    for i, obj in enumerate(objects):
        if sum(o.shape == obj.shape for o in objects) == 1:
            out.append((i, obj.shape))
        elif sum(o.shape == obj.shape and o.size == obj.size for o in objects) == 1:
            out.append((i, f"{obj.size} {obj.shape}"))
    return out


@register("general-color", "general")
def general_color(rng: random.Random, index: int) -> Sample:
    """What colour is the <shape> (named uniquely by shape, or by size and shape) in a scene."""
    while True:  # almost always one pass: a scene of 2-6 objects nearly always has a uniquely named one
        scene = random_scene(rng, rng.randint(2, 6))
        candidates = _unique_descriptions(scene.objects)
        if candidates:
            break
    target, phrase = rng.choice(candidates)
    color = scene.objects[target].color
    question = rng.choice(
        ("What colour is the {p}?", "What color is the {p}?", "Which colour does the {p} have?")
    ).format(p=phrase) + _short_answer_suffix(rng, "word")
    turns = [Turn("user", f"{IMAGE_PLACEHOLDER}\n{question}"), Turn("assistant", color)]
    truth = {
        "scene": scene.truth(),
        "question_type": "color",
        "target": target,
        "phrase": phrase,
        "answer": color,
    }
    return _sample("general", turns, [scene.image], truth)


def _separated(a: SceneObject, b: SceneObject, axis: str) -> bool:
    """Boxes do not overlap along ``axis`` ("x" or "y"), so left/right (above/below) is unambiguous."""
    lo, hi = (0, 2) if axis == "x" else (1, 3)
    return a.box[hi] <= b.box[lo] or b.box[hi] <= a.box[lo]


@register("general-spatial", "general")
def general_spatial(rng: random.Random, index: int) -> Sample:
    """Is A left of / right of / above / below B, or which of A and B is further left / higher."""
    while True:
        scene = random_scene(rng, rng.randint(2, 6))
        objs = scene.objects
        pairs = [
            (i, j, axis)
            for i in range(len(objs))
            for j in range(len(objs))
            if i != j
            for axis in ("x", "y")
            if _separated(objs[i], objs[j], axis)
        ]
        if pairs:
            break
    i, j, axis = rng.choice(pairs)
    a, b = objs[i], objs[j]
    relation = rng.choice(("left", "right") if axis == "x" else ("above", "below"))
    lo, hi = (0, 2) if axis == "x" else (1, 3)
    a_first = a.box[hi] <= b.box[lo]  # a is left of / above b
    holds = a_first if relation in ("left", "above") else not a_first
    if rng.random() < 0.7:
        words = {"left": "to the left of", "right": "to the right of", "above": "above", "below": "below"}
        question = f"Is the {a.phrase} {words[relation]} the {b.phrase}?" + _short_answer_suffix(rng, "yesno")
        answer = "yes" if holds else "no"
        question_type = "relation"
    else:
        word = {"left": "further left", "right": "further right", "above": "higher up", "below": "lower down"}
        question = f"Which is {word[relation]}, the {a.phrase} or the {b.phrase}?" + _short_answer_suffix(
            rng, "phrase"
        )
        answer = f"the {a.phrase}" if holds else f"the {b.phrase}"
        question_type = "which"
    turns = [Turn("user", f"{IMAGE_PLACEHOLDER}\n{question}"), Turn("assistant", answer)]
    truth = {
        "scene": scene.truth(),
        "question_type": question_type,
        "a": i,
        "b": j,
        "relation": relation,
        "holds": holds,
        "answer": answer,
    }
    return _sample("general", turns, [scene.image], truth)


# --------------------------------------------------------------------------------------------------
# Referring and grounding
# --------------------------------------------------------------------------------------------------


@register("refer-ground", "refer-ground")
def refer_ground(rng: random.Random, index: int) -> Sample:
    """1-3 Ferret-style turns: phrase -> box(es), box -> description, point -> description.

    Each turn is about objects no earlier turn asked about or answered with (its answer would be in the
    conversation already); when none is left, the conversation ends there."""
    scene = random_scene(rng, rng.randint(3, 7))
    objs = scene.objects
    regions: list[Region] = []
    box_region: dict[int, int] = {}  # object -> its box region, so a box is written once per sample

    def box_of(k: int) -> int:
        if k not in box_region:
            box_region[k] = len(regions)
            x1, y1, x2, y2 = objs[k].box
            regions.append(Region(0, box=(float(x1), float(y1), float(x2), float(y2))))
        return box_region[k]

    def point_in(k: int) -> int:
        # A pixel at least 2 px inside the shape, so the point still falls on the object after the
        # text round trip (which moves it by at most half a text unit).
        spec = scene.spec.objects[k]
        px, py = rng.choice(shape_mask(spec.shape, spec.side).interior)
        regions.append(Region(0, point=(spec.x + px + 0.5, spec.y + py + 0.5)))
        return len(regions) - 1

    turns: list[Turn] = []
    qa: list[dict[str, Any]] = []
    used: set[int] = set()  # objects an earlier turn asked about or answered with
    for t in range(rng.randint(1, 3)):
        # A later turn asks about an object the conversation has not named or boxed yet (else its
        # answer is already in the context); no such object left, no more turns.
        fresh = [k for k in range(len(objs)) if k not in used]
        if not fresh:
            break
        prefix = f"{IMAGE_PLACEHOLDER}\n" if t == 0 else ""
        task = rng.choice(("ground", "ground", "ground-multi", "refer-box", "refer-point"))
        if task == "ground-multi":
            # Colours with two or more objects, none of them used yet.
            colors = sorted(
                {o.color for o in objs if sum(p.color == o.color for p in objs) >= 2}
                - {objs[k].color for k in used}
            )
            if not colors:
                task = "ground"
        if task == "ground":
            k = rng.choice(fresh)  # the same draw as rng.randrange(len(objs)) on the first turn
            question = rng.choice(
                (
                    "Where is the {p}?",
                    "Find the {p}.",
                    "Locate the {p} in the image.",
                    "Give the bounding box of the {p}.",
                )
            ).format(p=objs[k].phrase) + rng.choice(("", "", " Answer in [x1, y1, x2, y2] format."))
            r = box_of(k)
            answer = rng.choice(
                ("The {p} is at <region{r}>.", "<region{r}>", "Here is the {p}: <region{r}>.")
            ).format(p=objs[k].phrase, r=r)
            targets, user_regions, answer_regions = [k], [], [r]
        elif task == "ground-multi":
            color = rng.choice(colors)
            # Listed in reading order (top to bottom, then left to right), which the image shows: the
            # order they were placed in is invisible, and the held-out task scores the first box.
            targets = sorted(
                (k for k, o in enumerate(objs) if o.color == color),
                key=lambda k: (objs[k].box[1] + objs[k].box[3], objs[k].box[0]),  # centre row, then left edge
            )
            question = rng.choice(("Find all the {c} objects.", "Where are the {c} shapes?")).format(c=color)
            answer_regions = [box_of(k) for k in targets]
            items = [
                f"the {objs[k].phrase} <region{r}>" for k, r in zip(targets, answer_regions, strict=True)
            ]
            listed = ", ".join(items[:-1]) + f" and {items[-1]}"
            answer = f"There are {number_word(len(targets))} {color} objects: {listed}."
            user_regions = []
        elif task == "refer-box":
            k = rng.choice(fresh)
            r = box_of(k)
            question = rng.choice(
                (
                    "What is the object in <region{r}>?",
                    "Describe the region <region{r}>.",
                    "What shape is at <region{r}>?",
                )
            ).format(r=r)
            obj = objs[k]
            answer = f"It is {_article(obj.size)} {obj.size} {obj.phrase} <region{r}>."
            targets, user_regions, answer_regions = [k], [r], [r]
        else:  # refer-point
            k = rng.choice(fresh)
            p = point_in(k)
            question = rng.choice(
                ("What is at <region{p}>?", "What object is at the point <region{p}>?")
            ).format(p=p)
            r = box_of(k)
            obj = objs[k]
            answer = f"{_article(obj.size).capitalize()} {obj.size} {obj.phrase} <region{r}>."
            targets, user_regions, answer_regions = [k], [p], [r]
        used.update(targets)
        turns += [Turn("user", prefix + question), Turn("assistant", answer)]
        qa.append(
            {"task": task, "targets": targets, "user_regions": user_regions, "answer_regions": answer_regions}
        )
    truth = {"scene": scene.truth(), "qa": qa}
    return _sample("refer-ground", turns, [scene.image], truth, regions)


# --------------------------------------------------------------------------------------------------
# Multi-image
# --------------------------------------------------------------------------------------------------


def _image_list(n: int) -> str:
    return "\n".join(f"Image {k + 1}: {IMAGE_PLACEHOLDER}" for k in range(n))


def _count(objs: Sequence[SceneObject], target: dict[str, str]) -> int:
    return sum(all(getattr(o, key) == value for key, value in target.items()) for o in objs)


def _target_phrase(target: dict[str, str]) -> str:
    if "color" in target:
        return f"{target['color']} objects"
    if "shape" in target:
        return f"{target['shape']}s"
    return "objects"


def _difference(rng: random.Random) -> tuple[list[Scene], str, dict[str, Any]]:
    """Two scenes identical but for one change: recolour, removal, addition or move of one object."""
    while True:
        height, width = rng.choice(SMALL_SCENE_SIZES)
        spec = random_scene_spec(rng, rng.randint(2, 5), height, width)
        objs = list(spec.objects)
        if not objs:
            continue
        change = rng.choice(("recolor", "remove", "add", "move"))
        k = rng.randrange(len(objs))
        obj = objs[k]
        bg = spec.background
        before_phrase = f"{obj.color} {obj.shape}"
        if change == "recolor":
            used = [(o.color, o.shape) for o in objs]
            options = [c for c in allowed_colors((bg.kind, bg.start, bg.end)) if (c, obj.shape) not in used]
            if not options:
                continue
            new_color = rng.choice(options)
            objs[k] = replace(obj, color=new_color)
            answer = f"The {before_phrase} turned {new_color}."
            detail = {"object": k, "from": obj.color, "to": new_color}
        elif change == "remove":
            del objs[k]
            answer = f"The {before_phrase} was removed."
            detail = {"object": k}
        elif change == "add":
            used = [(o.color, o.shape) for o in objs]
            options = [
                (c, s)
                for c in allowed_colors((bg.kind, bg.start, bg.end))
                for s in SHAPES
                if (c, s) not in used
            ]
            color, shape = rng.choice(options)
            size = rng.choice(tuple(SIZES))
            side = object_side(rng, size, height, width)
            spot = place(rng, side, height, width, [o.square for o in objs])
            if spot is None:
                continue
            objs.append(ObjectSpec(shape, color, size, side, spot[0], spot[1]))
            k = len(objs) - 1
            detail = {"object": k}
        else:  # move: to a place whose coarse position word differs, so the answer can name both
            others = [o.square for i, o in enumerate(objs) if i != k]
            spot = place(rng, obj.side, height, width, others)
            if spot is None:
                continue
            objs[k] = replace(obj, x=spot[0], y=spot[1])
            detail = {"object": k}
        before = render_scene(spec)
        after = render_scene(replace(spec, objects=tuple(objs)))
        if change == "add":
            new = after.objects[k]
            answer = (
                f"{_article(new.size).capitalize()} {new.size} {new.phrase} was added "
                + position_phrase(new.position(height, width))
                + "."
            )
        elif change == "move":
            p0 = before.objects[k].position(height, width)
            p1 = after.objects[k].position(height, width)
            if p0 == p1:
                continue
            answer = f"The {before_phrase} moved from the {p0} to the {p1}."
            detail.update({"from": p0, "to": p1})
        return [before, after], answer, {"change": change, **detail}


@register("multi-image", "multi-image")
def multi_image(rng: random.Random, index: int) -> Sample:
    """2-4 scenes: which image has the most X, what changed between two images, or X counted across all."""
    task = rng.choice(("compare", "difference", "count-across"))
    truth: dict[str, Any] = {"task": task}
    if task == "difference":
        scenes, answer, detail = _difference(rng)
        question = rng.choice(
            ("What changed between the two images?", "What is the difference between Image 1 and Image 2?")
        )
        truth.update(detail)
    else:
        n = rng.randint(2, 4)
        while True:
            scenes = [random_scene(rng, rng.randint(1, 6), SMALL_SCENE_SIZES, n_colors=2) for _ in range(n)]
            pool = sorted({o.color for s in scenes for o in s.objects})
            target = {"color": rng.choice(pool)} if rng.random() < 0.6 else {"shape": rng.choice(SHAPES)}
            counts = [_count(s.objects, target) for s in scenes]
            if task == "count-across" or counts.count(max(counts)) == 1:
                break
        what = _target_phrase(target)
        if task == "compare":
            question = f"Which image has the most {what}?" + rng.choice(
                ("", " Answer with the image number.")
            )
            answer = f"Image {counts.index(max(counts)) + 1}"
        else:
            question = f"How many {what} are there in all the images together?" + _short_answer_suffix(
                rng, "number"
            )
            answer = str(sum(counts))
        truth.update({"target": target, "counts": counts})
    truth["scenes"] = [s.truth() for s in scenes]
    truth["answer"] = answer
    turns = [Turn("user", f"{_image_list(len(scenes))}\n{question}"), Turn("assistant", answer)]
    return _sample("multi-image", turns, [s.image for s in scenes], truth)


# --------------------------------------------------------------------------------------------------
# In-context learning
# --------------------------------------------------------------------------------------------------

NONCE_WORDS = ("dax", "blicket", "wug", "toma", "fep", "zorp", "kiki", "mep")
ICL_RULES = ("largest-color", "count", "leftmost-shape", "topmost-color")


def icl_answer(rule: str, objects: Sequence[SceneObject]) -> str | None:
    """The rule's answer on a scene, or None when the scene does not decide it clearly."""
    if not objects:
        return None
    if rule == "count":
        return str(len(objects))
    if rule == "largest-color":
        ranked = sorted(objects, key=lambda o: o.area, reverse=True)
        if len(ranked) > 1 and ranked[0].area < 1.3 * ranked[1].area:
            return None  # no clearly largest object
        return ranked[0].color
    axis = 0 if rule == "leftmost-shape" else 1
    ranked = sorted(objects, key=lambda o: o.box[axis])
    # The winner's far edge must come before every other object's near edge: no judgement call.
    if len(ranked) > 1 and ranked[0].box[axis + 2] > min(o.box[axis] for o in ranked[1:]):
        return None
    return ranked[0].shape if rule == "leftmost-shape" else ranked[0].color


def icl_ambiguous(rule: str, scenes: Sequence[Sequence[SceneObject]]) -> bool:
    """Whether another rule of ``ICL_RULES`` gives every demonstration (all scenes but the last) the
    answer ``rule`` gives it, yet decides the query (the last scene) differently: two defensible answers.
    (Only the colour rules share answers: largest-color and topmost-color.)"""
    demos, query = scenes[:-1], scenes[-1]
    shown = [icl_answer(rule, objects) for objects in demos]
    expected = icl_answer(rule, query)
    for other in ICL_RULES:
        if other == rule or [icl_answer(other, objects) for objects in demos] != shown:
            continue
        answer = icl_answer(other, query)
        if answer is not None and answer != expected:
            return True
    return False


@register("icl", "icl")
def icl(rng: random.Random, index: int) -> Sample:
    """1-3 (image, question, answer) demonstrations of a hidden rule, then a query image: one sample."""
    rule = rng.choice(ICL_RULES)
    word = rng.choice(NONCE_WORDS)
    k = rng.randint(1, 3)
    sizes = ("small", "medium", "large") if rule != "largest-color" else ("small", "small", "medium", "large")
    while True:  # an episode another rule explains as well but answers differently is drawn again
        scenes: list[Scene] = []
        answers: list[str] = []
        while len(scenes) < k + 1:
            height, width = rng.choice(SMALL_SCENE_SIZES)
            scene = render_scene(random_scene_spec(rng, rng.randint(2, 5), height, width, sizes=sizes))
            answer = icl_answer(rule, scene.objects)
            if answer is not None:
                scenes.append(scene)
                answers.append(answer)
        if not icl_ambiguous(rule, [drawn.objects for drawn in scenes]):
            break
    question = f"What is the {word} of this image?"
    blocks = [f"Image: {IMAGE_PLACEHOLDER}\nQuestion: {question}\nAnswer: {a}" for a in answers[:-1]]
    blocks.append(f"Image: {IMAGE_PLACEHOLDER}\nQuestion: {question}\nAnswer:")
    intro = "Learn the pattern from the examples, then answer the last question.\n\n"
    turns = [Turn("user", intro + "\n\n".join(blocks)), Turn("assistant", answers[-1])]
    truth = {
        "rule": rule,
        "word": word,
        "shots": k,
        "answers": answers,
        "answer": answers[-1],
        "scenes": [s.truth() for s in scenes],
    }
    return _sample("icl", turns, [s.image for s in scenes], truth)


# --------------------------------------------------------------------------------------------------
# Text-only instruction following
# --------------------------------------------------------------------------------------------------

# fmt: off
NAMES = (
    "Ana", "Ben", "Chen", "Dara", "Eli", "Fatima", "Gus", "Hana", "Ivan",
    "Jae", "Kofi", "Lena", "Mateo", "Nia",
)
ITEMS = ("apples", "pencils", "marbles", "stickers", "cookies", "books", "coins", "cards", "shells", "stamps")
WORDS = (
    "river", "candle", "maple", "orbit", "lantern", "pepper", "violin", "harbor", "meadow", "quartz",
    "tunnel", "basket", "falcon", "glacier", "jungle", "kettle", "lemon", "mirror", "nectar", "oyster",
    "pillow", "rocket", "saddle", "timber", "umbrella", "velvet", "walnut", "yogurt", "zipper", "anchor",
)
SYLLABLES = (
    "ka", "lo", "mi", "ren", "tu", "sa", "vo", "pel", "dri", "no", "ba", "zet", "qui", "fa", "gor", "hi",
)
# fmt: on
# A fixed table of uncontroversial facts with exact short answers.
FACTS: tuple[tuple[str, str], ...] = (
    ("What is the capital of France?", "Paris"),
    ("What is the capital of Japan?", "Tokyo"),
    ("What is the capital of Italy?", "Rome"),
    ("What is the capital of Canada?", "Ottawa"),
    ("What is the capital of Australia?", "Canberra"),
    ("What is the capital of Egypt?", "Cairo"),
    ("What is the capital of Kenya?", "Nairobi"),
    ("What is the capital of Spain?", "Madrid"),
    ("What is the capital of Germany?", "Berlin"),
    ("What is the capital of Norway?", "Oslo"),
    ("What is the capital of Peru?", "Lima"),
    ("How many days are in a week?", "7"),
    ("How many months are in a year?", "12"),
    ("How many hours are in a day?", "24"),
    ("How many minutes are in an hour?", "60"),
    ("How many sides does a hexagon have?", "6"),
    ("How many sides does a triangle have?", "3"),
    ("How many sides does an octagon have?", "8"),
    ("How many sides does a pentagon have?", "5"),
    ("How many legs does a spider have?", "8"),
    ("How many legs does an insect have?", "6"),
    ("What is the chemical symbol for gold?", "Au"),
    ("What is the chemical symbol for silver?", "Ag"),
    ("What is the chemical symbol for iron?", "Fe"),
    ("What is the chemical symbol for sodium?", "Na"),
    ("At how many degrees Celsius does water freeze at sea level?", "0"),
    ("At how many degrees Celsius does water boil at sea level?", "100"),
    ("Which planet is closest to the Sun?", "Mercury"),
    ("Which planet is known as the Red Planet?", "Mars"),
    ("What is the largest planet in the Solar System?", "Jupiter"),
    ("How many planets are in the Solar System?", "8"),
    ("How many centimetres are in a metre?", "100"),
    ("How many grams are in a kilogram?", "1000"),
    ("What is the largest ocean on Earth?", "Pacific"),
    ("Who wrote 'Romeo and Juliet'?", "William Shakespeare"),
    ("What is the square root of 81?", "9"),
    ("How many letters are in the English alphabet?", "26"),
    ("What gas do plants absorb from the air for photosynthesis?", "carbon dioxide"),
    ("What is the freezing point of water in degrees Fahrenheit?", "32"),
    ("How many seconds are in a minute?", "60"),
)


def _word_problem(rng: random.Random) -> dict[str, Any]:
    name, other = rng.sample(NAMES, 2)
    item = rng.choice(ITEMS)
    form = rng.choice(("add", "sub", "mul", "div", "two-step"))
    if form == "add":
        a, b = rng.randint(2, 500), rng.randint(2, 500)
        text = f"{name} has {a} {item} and gets {b} more. How many {item} does {name} have now?"
        expression, answer = f"{a} + {b}", a + b
    elif form == "sub":
        a = rng.randint(10, 900)
        b = rng.randint(1, a - 1)
        text = (
            f"{name} had {a} {item} and gave {b} of them to {other}. How many {item} does {name} have left?"
        )
        expression, answer = f"{a} - {b}", a - b
    elif form == "mul":
        a, b = rng.randint(2, 40), rng.randint(2, 40)
        text = f"There are {a} boxes with {b} {item} in each box. How many {item} are there in total?"
        expression, answer = f"{a} * {b}", a * b
    elif form == "div":
        a, b = rng.randint(2, 30), rng.randint(2, 12)
        text = (
            f"{name} shares {a * b} {item} equally among {b} friends. How many {item} does each friend get?"
        )
        expression, answer = f"{a * b} // {b}", a
    else:
        a, b = rng.randint(2, 20), rng.randint(2, 20)
        c = rng.randint(1, a * b - 1)
        text = f"{name} buys {a} packs of {b} {item} and gives {c} to {other}. How many {item} are left?"
        expression, answer = f"{a} * {b} - {c}", a * b - c
    prompt = text + rng.choice(("", " Answer with just the number.", " Give only the final number."))
    return {
        "task": "arithmetic",
        "expression": expression,
        "prompt": prompt,
        "answer": str(answer),
        # The train/eval split is decided on the problem without its answer-format suffix: the same
        # problem with another suffix is the same problem (mm15.data.synth.text_split_of).
        "split_text": f"user: {text}\nassistant: {answer}",
    }


def _sorting(rng: random.Random) -> dict[str, Any]:
    if rng.random() < 0.5:
        items = [str(v) for v in rng.sample(range(1, 1000), rng.randint(5, 9))]
        descending = rng.random() < 0.5
        result = sorted(items, key=int, reverse=descending)
        order = "descending" if descending else "ascending"
        prompt = f"Sort these numbers in {order} order: {', '.join(items)}."
        kind = "numbers"
    else:
        items = rng.sample(WORDS, rng.randint(5, 8))
        result = sorted(items)
        order = "alphabetical"
        prompt = f"Sort these words alphabetically: {', '.join(items)}."
        kind = "words"
    prompt += " Reply with the sorted list, separated by commas."
    return {
        "task": "sort",
        "kind": kind,
        "items": items,
        "order": order,
        "prompt": prompt,
        "answer": ", ".join(result),
    }


def _nonce_word(rng: random.Random) -> str:
    return "".join(rng.choice(SYLLABLES) for _ in range(rng.randint(2, 4)))


def _string_op(rng: random.Random) -> dict[str, Any]:
    op = rng.choice(("reverse", "upper", "count-letter", "length", "initials", "repeat"))
    if op == "initials":
        text = " ".join(rng.sample(WORDS, rng.randint(3, 6)))
        prompt = f"Write the first letter of each word in '{text}', with no spaces."
        answer = "".join(w[0] for w in text.split())
    elif op == "repeat":
        text = _nonce_word(rng)
        n = rng.randint(2, 5)
        prompt = f"Write the word '{text}' {number_word(n)} times, separated by single spaces."
        answer = " ".join([text] * n)
    else:
        text = _nonce_word(rng) if rng.random() < 0.5 else rng.choice(WORDS) + _nonce_word(rng)
        if op == "reverse":
            prompt, answer = f"Reverse the letters of '{text}'.", text[::-1]
        elif op == "upper":
            prompt, answer = f"Write '{text}' in capital letters.", text.upper()
        elif op == "length":
            prompt, answer = f"How many letters are in '{text}'?", str(len(text))
        else:
            letter = rng.choice(sorted(set(text)))
            prompt, answer = (
                f"How many times does the letter '{letter}' appear in '{text}'?",
                str(text.count(letter)),
            )
    return {"task": "string", "op": op, "text": text, "prompt": prompt, "answer": answer}


def _facts(rng: random.Random) -> dict[str, Any]:
    # Three or four facts per sample: a single fact would repeat across train and eval.
    chosen = rng.sample(range(len(FACTS)), rng.randint(3, 4))
    questions = "\n".join(f"{i + 1}. {FACTS[k][0]}" for i, k in enumerate(chosen))
    prompt = f"Answer each question briefly, one numbered line per question.\n{questions}"
    answer = "\n".join(f"{i + 1}. {FACTS[k][1]}" for i, k in enumerate(chosen))
    return {"task": "facts", "facts": chosen, "prompt": prompt, "answer": answer}


@register("text-only", "text-only", text_split=True)
def text_only(rng: random.Random, index: int) -> Sample:
    """No image: a word problem, a sorting task, a string operation or fact questions; exact answers."""
    task = rng.choice((_word_problem, _sorting, _string_op, _facts))(rng)
    turns = [Turn("user", task["prompt"]), Turn("assistant", task["answer"])]
    return _sample("text-only", turns, [], task)


# --------------------------------------------------------------------------------------------------
# Video
# --------------------------------------------------------------------------------------------------

DIRECTIONS: dict[str, tuple[int, int]] = {"left": (-1, 0), "right": (1, 0), "up": (0, -1), "down": (0, 1)}


@dataclass(frozen=True)
class Track:
    """An object on a linear path from (x0, y0) to (x1, y1), visible from frame ``appear`` on."""

    spec: ObjectSpec  # its x, y are the start
    x1: int
    y1: int
    appear: int
    direction: str | None  # None: static

    def at(self, frame: int, num_frames: int) -> ObjectSpec:
        t = frame / (num_frames - 1)
        return replace(
            self.spec,
            x=round(self.spec.x + (self.x1 - self.spec.x) * t),
            y=round(self.spec.y + (self.y1 - self.spec.y) * t),
        )

    @property
    def swept(self) -> PixelBox:
        s = self.spec
        return (min(s.x, self.x1), min(s.y, self.y1), max(s.x, self.x1) + s.side, max(s.y, self.y1) + s.side)


def _track(
    rng: random.Random,
    color: str,
    shape: str,
    size_pool: Sequence[str],
    direction: str | None,
    appear: int,
    size: int,
    taken: Sequence[PixelBox],
) -> Track | None:
    """A track whose whole swept area is clear of ``taken``, so objects never overlap in any frame."""
    obj_size = rng.choice(size_pool)
    side = object_side(rng, obj_size, size, size)
    for _ in range(40):
        if direction is None:
            dx = dy = 0
        else:
            span = rng.randint(size // 4, size - 2 * EDGE_MARGIN - side)
            dx, dy = (v * span for v in DIRECTIONS[direction])
        w, h = side + abs(dx), side + abs(dy)
        if w > size - 2 * EDGE_MARGIN or h > size - 2 * EDGE_MARGIN:
            continue
        sx, sy = (
            rng.randint(EDGE_MARGIN, size - EDGE_MARGIN - w),
            rng.randint(EDGE_MARGIN, size - EDGE_MARGIN - h),
        )
        if all(_apart((sx, sy, sx + w, sy + h), box, OBJECT_GAP) for box in taken):
            x0, y0 = (sx + w - side, sy) if dx < 0 else (sx, sy)
            y0 = sy + h - side if dy < 0 else y0
            return Track(
                ObjectSpec(shape, color, obj_size, side, x0, y0), x0 + dx, y0 + dy, appear, direction
            )
    return None


def make_video_sample(rng: random.Random, num_frames: int, size: int = VIDEO_SIZE) -> Sample:
    """A clip of ``num_frames`` ``size`` x ``size`` frames and one question on its motion."""
    if num_frames < 4:
        raise ValueError(f"a clip needs at least 4 frames, got {num_frames}")
    if size < 96:  # below this, two small objects with visible motion no longer fit
        raise ValueError(f"video frames must be at least 96 px, got {size}")
    task = rng.choice(("direction", "which-moves", "order"))
    background = random_background(rng)
    colors = allowed_colors((background.kind, background.start, background.end))
    while True:
        n_objects = (
            rng.randint(1, 2) if task == "direction" else rng.randint(2, 3) if task == "which-moves" else 2
        )
        pairs = rng.sample([(c, s) for c in colors for s in SHAPES], n_objects)
        movers = (
            rng.randint(1, 2) if task == "direction" else 1 if task == "which-moves" else rng.randint(0, 2)
        )
        appears = [0] * n_objects
        if task == "order":
            appears = sorted(rng.sample(range(num_frames // 2 + 1), 2))
        tracks: list[Track] = []
        for i, (color, shape) in enumerate(pairs):
            direction = rng.choice(tuple(DIRECTIONS)) if i < movers else None
            track = _track(
                rng, color, shape, ("small", "medium"), direction, appears[i], size, [t.swept for t in tracks]
            )
            if track is None:
                break
            tracks.append(track)
        if len(tracks) == n_objects:
            break
    # Shuffle so the mover is not always the first object named in the truth.
    order = list(range(n_objects))
    rng.shuffle(order)
    tracks = [tracks[i] for i in order]
    frames: list[Image.Image] = []
    per_object: list[list[dict[str, Any] | None]] = [[] for _ in tracks]
    backdrop = render_background(background, size, size)  # the camera is static: one background
    for f in range(num_frames):
        visible = [(i, t.at(f, num_frames)) for i, t in enumerate(tracks) if f >= t.appear]
        spec = SceneSpec(size, size, background, tuple(o for _, o in visible))
        scene = render_scene(spec, backdrop)
        frames.append(scene.image)
        drawn = dict(zip([i for i, _ in visible], scene.objects, strict=True))
        for i in range(len(tracks)):
            obj = drawn.get(i)
            per_object[i].append(
                None
                if obj is None
                else {
                    "box": list(obj.box),
                    "center": [round(obj.center[0], 3), round(obj.center[1], 3)],
                    "area": obj.area,
                }
            )
    phrases = [f"{t.spec.color} {t.spec.shape}" for t in tracks]
    if task == "direction":
        k = rng.choice([i for i, t in enumerate(tracks) if t.direction is not None])
        question = (
            rng.choice(("In which direction does the {p} move?", "Which way is the {p} moving?")).format(
                p=phrases[k]
            )
            + " Answer left, right, up or down."
        )
        answer = tracks[k].direction
        detail: dict[str, Any] = {"object": k}
    elif task == "which-moves":
        k = next(i for i, t in enumerate(tracks) if t.direction is not None)
        question = "Which object is moving?" + _short_answer_suffix(rng, "phrase")
        answer = f"the {phrases[k]}"
        detail = {"object": k}
    else:
        a, b = rng.sample(range(2), 2)
        question = f"Which appears first, the {phrases[a]} or the {phrases[b]}?"
        k = min(range(2), key=lambda i: tracks[i].appear)
        answer = f"the {phrases[k]}"
        detail = {"object": k, "asked": [a, b]}
    assert answer is not None
    truth = {
        "task": task,
        "num_frames": num_frames,
        "height": size,
        "width": size,
        "background": background.truth(),
        "objects": [
            {
                "shape": t.spec.shape,
                "color": t.spec.color,
                "size": t.spec.size,
                "moving": t.direction is not None,
                "direction": t.direction,
                "appear": t.appear,
                "frames": per_object[i],
            }
            for i, t in enumerate(tracks)
        ],
        "answer": answer,
        **detail,
    }
    user = f"{IMAGE_PLACEHOLDER * num_frames}\n{question}"
    return _sample("video", [Turn("user", user), Turn("assistant", answer)], frames, truth, is_video=True)


@register("video", "video")
def video(rng: random.Random, index: int) -> Sample:
    """A clip of 8-24 224 px frames with 1-3 objects (0-2 moving linearly, by question) and a question."""
    return make_video_sample(rng, rng.randint(*VIDEO_FRAMES), VIDEO_SIZE)
