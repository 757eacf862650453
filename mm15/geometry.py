"""The image plan: MM1.5's dynamic image splitting as one pure function.

``plan_image(height, width, cfg)`` decides, from the image size alone, how an image becomes encoder
inputs and image tokens: the tile grid, the size the image is resized to, the padding, every tile's
place on the padded canvas, the overview image, the text marker before each tile and the number of
image tokens. The processor, the model's feature placement, the packer's length estimate and the
server all read this plan, so they cannot disagree about geometry. Sizes are always (height, width).

Grid selection follows MM1.5's Eq. 1 (mm15-spec.md section 2.1). The candidates are the grids
(rows, cols) with ``n_min <= rows * cols <= n_max``. For each grid the image is resized, keeping its
aspect ratio, so that it just fits the canvas of ``rows * tile`` by ``cols * tile`` pixels.

* Case A: if some grids hold the image without downscaling it (scale >= 1), pick the one with the
  least padding (canvas area minus resized image area).
* Case B: otherwise pick the grid with the least resolution loss, i.e. the largest resized area.

The paper leaves ties open; ours are broken in this order, each rule applied only when all the
earlier ones tie: (1) least padding (case B only), (2) fewer tiles, (3) the grid whose aspect ratio is
closest to the image's, (4) fewer rows. Rule (2) is the spec's suggestion: a square image fits 2x2
and 3x3 with no padding, and MM1.5 reports only +7.8% tiles over static 2x2 splitting.

Pixel sizes are integers: the resized side along which the canvas binds is exactly the canvas side,
and the other is ``side * scale`` rounded half up, at least 1 and at most the canvas side. Padding and area
are measured on these integers, i.e. on the pixels that are actually produced.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from dataclasses import asdict, dataclass, field
from fractions import Fraction
from itertools import groupby
from typing import Literal

from mm15.checks import is_int

OverviewPosition = Literal["after", "before", "none"]
Indicator = Literal["none", "index", "separators"]
OverviewFit = Literal["pad", "squash"]

# Text placed before a tile in "separators" mode (MM1.5's alternative to index markers): a colon
# before the overview, a comma between columns and a newline between rows.
OVERVIEW_SEPARATOR = ":"
COLUMN_SEPARATOR = ","
MAX_GRID_TILES = 1024
ROW_SEPARATOR = "\n"


@dataclass(frozen=True)
class ImagePlanConfig:
    """Settings of dynamic image splitting; the defaults are MM1.5's final recipe."""

    tile_size: int = 672
    n_min: int = 4
    n_max: int = 9
    overview: OverviewPosition = "after"
    overview_fit: OverviewFit = "pad"
    indicator: Indicator = "index"
    tokens_per_tile: int = 144
    split: bool = True
    # MM1.5 splits only samples with fewer than 3 images; larger samples get one tile per image.
    max_images_to_split: int = 2

    def __post_init__(self) -> None:
        # Types first: a float tile size would plan float pixel sizes, and split="false" is truthy.
        for name in ("tile_size", "n_min", "n_max", "tokens_per_tile", "max_images_to_split"):
            value = getattr(self, name)
            if not is_int(value):
                raise ValueError(f"ImagePlanConfig.{name} must be an integer, got {value!r}")
        if not isinstance(self.split, bool):
            raise ValueError(f"ImagePlanConfig.split must be true or false, got {self.split!r}")
        if self.tile_size < 1:
            raise ValueError(f"ImagePlanConfig.tile_size must be >= 1, got {self.tile_size}")
        if self.n_min < 1:
            raise ValueError(f"ImagePlanConfig.n_min must be >= 1, got {self.n_min}")
        if self.n_max < self.n_min:
            raise ValueError(f"ImagePlanConfig.n_max ({self.n_max}) must be >= n_min ({self.n_min})")
        if self.n_max > MAX_GRID_TILES:
            # A sanity bound against a typo (n_max=10000 would plan for seconds and cost millions of
            # image tokens); MM1.5 uses 9, and the largest grids in peers' recipes have a few dozen.
            raise ValueError(f"ImagePlanConfig.n_max must be <= {MAX_GRID_TILES}, got {self.n_max}")
        if self.tokens_per_tile < 1:
            raise ValueError(f"ImagePlanConfig.tokens_per_tile must be >= 1, got {self.tokens_per_tile}")
        if not 0 <= self.max_images_to_split <= MAX_GRID_TILES:
            # Bounded as n_max is: the token costs are found by trying every image count up to it.
            raise ValueError(
                f"ImagePlanConfig.max_images_to_split must be in [0, {MAX_GRID_TILES}], "
                f"got {self.max_images_to_split}"
            )
        for name, value, allowed in (
            ("overview", self.overview, ("after", "before", "none")),
            ("overview_fit", self.overview_fit, ("pad", "squash")),
            ("indicator", self.indicator, ("none", "index", "separators")),
        ):
            if value not in allowed:
                raise ValueError(f"ImagePlanConfig.{name} must be one of {allowed}, got {value!r}")

    def min_image_tokens_per_sample(self) -> int:
        """The fewest image tokens a sample with images can cost: one image on the smallest grid, or,
        if fewer, the ``max_images_to_split + 1`` unsplit images past which splitting stops."""
        if not self.split:
            return self.tokens_per_tile
        return min(self.encoder_inputs(self.n_min), self.max_images_to_split + 1) * self.tokens_per_tile

    def min_image_span_tokens(self, marker_tokens: Callable[[str], int] | None = None) -> int:
        """The fewest tokens the image spans of a sample with images can cost: its image tokens and the
        tile markers before them (``expand_image_text``), for the same two cheapest samples as
        ``min_image_tokens_per_sample`` (one image on a grid of ``n_min`` cells, or the
        ``max_images_to_split + 1`` unsplit images past which splitting stops).

        ``marker_tokens(marker)`` is what one marker costs; where the tokenizer is known, pass its count
        (markers are tokenized one by one, ``mm15.model.mm15.image_span_ids``). Without it, each marker
        costs ``marker_token_floor``, a lower bound for the tokenizers mm15 uses, so the result is a lower
        bound too: 7 tokens per "(k, i, j)" marker where the byte and SmolLM2 tokenizers take 9.
        """
        count = marker_tokens or marker_token_floor

        def cost(markers: Iterable[str]) -> int:
            return sum(self.tokens_per_tile + count(m) for m in markers)

        # Past max_images_to_split images no image is split; with split off, a single image is the least.
        unsplit_images = self.max_images_to_split + 1 if self.split else 1
        least = cost(_marker(self, k, 0, 0) for k in range(unsplit_images))
        if self.split and self.max_images_to_split >= 1:
            # A single image is split on a grid of at least n_min cells; any grid of exactly n_min cells
            # may be the one chosen, and their markers differ (a separator per row or column).
            for rows in range(1, self.n_min + 1):
                if self.n_min % rows:
                    continue
                cols = self.n_min // rows
                markers = [_marker(self, 0, i, j) for i in range(1, rows + 1) for j in range(1, cols + 1)]
                if self.encoder_inputs(self.n_min) > self.n_min:
                    markers.append(_marker(self, 0, 0, 0))
                least = min(least, cost(markers))
        return least

    def max_tokens_per_image(self) -> int:
        """Upper bound of image tokens one image can cost (1440 for MM1.5's defaults)."""
        return (self.encoder_inputs(self.n_max) if self.split else 1) * self.tokens_per_tile

    def encoder_inputs(self, cells: int) -> int:
        """Encoder inputs of a split image whose grid has ``cells`` cells: the cells and the overview,
        which a 1x1 grid omits (its one cell already shows the whole image)."""
        return cells + (1 if self.overview != "none" and cells > 1 else 0)


@dataclass(frozen=True)
class Tile:
    """One encoder input of an image: a grid cell of the padded canvas, or the overview image.

    ``row`` and ``col`` are 1-based grid positions; the overview is (0, 0). ``top`` and ``left`` are
    the cell's offset on the padded canvas in pixels (0 for the overview). ``marker`` is the text that
    precedes the tile's image tokens in the prompt.
    """

    row: int
    col: int
    top: int
    left: int
    marker: str

    @property
    def is_overview(self) -> bool:
        return self.row == 0


@dataclass(frozen=True)
class TilePlan:
    """How one image becomes encoder inputs and image tokens.

    ``tiles`` lists the encoder inputs in prompt order (the overview before or after the grid cells,
    as configured); the processor's output rows and the image-token spans follow the same order.
    ``resized`` is the image's size on the padded canvas of the grid cells and ``overview_resized``
    its size inside the overview tile (None when there is no overview). An unsplit image is a plan
    whose only tile is the overview, on a 1x1 grid with ``resized == overview_resized``.
    """

    height: int
    width: int
    tile_size: int
    grid: tuple[int, int]
    resized: tuple[int, int]
    overview_resized: tuple[int, int] | None
    tokens_per_tile: int
    split: bool
    tiles: tuple[Tile, ...] = field(default_factory=tuple)

    @property
    def canvas(self) -> tuple[int, int]:
        """(height, width) of the padded canvas the grid cells are cut from."""
        return self.grid[0] * self.tile_size, self.grid[1] * self.tile_size

    @property
    def padding(self) -> tuple[int, int]:
        """(bottom, right) padding in pixels; the image sits at the canvas's top-left corner."""
        return self.canvas[0] - self.resized[0], self.canvas[1] - self.resized[1]

    @property
    def scale(self) -> float:
        """Resize factor from the original image to the canvas (exact along the binding side).

        Taken from the canvas, not from ``resized``: the free side of ``resized`` is rounded to whole
        pixels, and rounded down it would undercut the binding side's exact factor.
        """
        return min(self.canvas[0] / self.height, self.canvas[1] / self.width)

    @property
    def num_tiles(self) -> int:
        """Encoder inputs for this image, overview included."""
        return len(self.tiles)

    @property
    def num_image_tokens(self) -> int:
        return self.num_tiles * self.tokens_per_tile

    def to_dict(self) -> dict:
        """A JSON-ready description (derived fields included) for ``mm15 plan --json``."""
        out = asdict(self)
        out["grid"] = list(self.grid)
        out["resized"] = list(self.resized)
        out["overview_resized"] = list(self.overview_resized) if self.overview_resized else None
        out["canvas"] = list(self.canvas)
        out["padding"] = list(self.padding)
        out["num_tiles"] = self.num_tiles
        out["num_image_tokens"] = self.num_image_tokens
        return out


def candidate_grids(n_min: int, n_max: int) -> list[tuple[int, int]]:
    """All (rows, cols) with ``n_min <= rows * cols <= n_max``, in row-major order."""
    # Only the columns that fit each row count: O(n_max log n_max) grids, not an n_max^2 scan.
    return [
        (rows, cols)
        for rows in range(1, n_max + 1)
        for cols in range(max(1, -(-n_min // rows)), n_max // rows + 1)
    ]


def fit_size(height: int, width: int, box_h: int, box_w: int) -> tuple[int, int]:
    """Integer (height, width) of an image resized, aspect kept, to just fit a box_h x box_w box."""
    if height < 1 or width < 1:
        raise ValueError(f"image size must be positive, got height={height}, width={width}")
    if box_h * width <= box_w * height:  # the height binds
        return box_h, min(box_w, max(1, _round_ratio(width * box_h, height)))
    return min(box_h, max(1, _round_ratio(height * box_w, width))), box_w


def _round_ratio(numerator: int, denominator: int) -> int:
    """numerator / denominator rounded half up, in exact integer arithmetic (no float ties)."""
    return (2 * numerator + denominator) // (2 * denominator)


def _aspect_distance(grid: tuple[int, int], height: int, width: int) -> Fraction:
    """How far the grid's aspect is from the image's, as a ratio >= 1 (exact, so ties are ties)."""
    ratio = Fraction(grid[0] * width, grid[1] * height)
    return max(ratio, 1 / ratio)


def select_grid(height: int, width: int, cfg: ImagePlanConfig) -> tuple[int, int]:
    """MM1.5's Eq. 1 grid choice with the tie-breaks documented in the module docstring."""
    r = cfg.tile_size
    covering, downscaling = [], []
    for grid in candidate_grids(cfg.n_min, cfg.n_max):
        rows, cols = grid
        hg, wg = fit_size(height, width, rows * r, cols * r)
        padding = rows * cols * r * r - hg * wg
        tail = (rows * cols, _aspect_distance(grid, height, width), rows)
        # The grid covers the image without downscaling when neither resized side shrank.
        if hg >= height and wg >= width:
            covering.append(((padding, *tail), grid))
        else:
            downscaling.append(((-(hg * wg), padding, *tail), grid))
    if covering:
        return min(covering)[1]
    return min(downscaling)[1]


def marker_token_floor(marker: str) -> int:
    """A lower bound of the tokens one tile marker costs, for a check that has no tokenizer at hand.

    A marker is tokenized on its own, so a non-empty one is at least one token. Beyond that it counts
    one token per run of digits and one per run of other characters holding a non-space: the
    tokenizers mm15 uses never put a digit and another character in one token (the byte tokenizer, and
    byte-level BPEs whose pre-tokenizer splits numbers off: SmolLM2, GPT-2, Llama 3, Qwen; SentencePiece
    splits numbers by default), except that a space may lead a number (GPT-2's " 0"), hence runs of
    spaces alone are not counted. "(0, 0, 0)" is 7 by this count; the byte and SmolLM2 tokenizers take
    9, GPT-2 exactly 7. Separators (":", ",", a newline) are 1.
    """
    if not marker:
        return 0
    runs = 0
    for is_digit, group in groupby(marker, key=str.isdigit):
        if is_digit or not "".join(group).isspace():
            runs += 1
    return max(1, runs)


def _marker(cfg: ImagePlanConfig, image_index: int, row: int, col: int) -> str:
    if cfg.indicator == "index":
        return f"({image_index}, {row}, {col})"
    if cfg.indicator == "separators":
        if row == 0:
            return OVERVIEW_SEPARATOR
        if col > 1:
            return COLUMN_SEPARATOR
        return ROW_SEPARATOR if row > 1 else ""
    return ""


def plan_image(
    height: int,
    width: int,
    cfg: ImagePlanConfig | None = None,
    *,
    image_index: int = 0,
    images_in_sample: int = 1,
) -> TilePlan:
    """Plan how an image of ``height`` x ``width`` pixels is split, resized, padded and tokenised.

    ``image_index`` is the image's 0-based position in its sample (the k of the "(k, i, j)" markers)
    and ``images_in_sample`` decides whether splitting applies at all: a sample with more than
    ``cfg.max_images_to_split`` images gets one overview-like tile per image, as does every image
    when ``cfg.split`` is off. An unsplit image is resized like the overview and marked (k, 0, 0).
    """
    cfg = cfg or ImagePlanConfig()
    if not (is_int(height) and is_int(width)) or height < 1 or width < 1:
        raise ValueError(f"image size must be positive integers, got height={height!r}, width={width!r}")
    if not (is_int(image_index) and is_int(images_in_sample)):
        raise ValueError(
            f"image_index and images_in_sample must be integers, got image_index={image_index!r}, "
            f"images_in_sample={images_in_sample!r}"
        )
    if image_index < 0 or images_in_sample < 1 or image_index >= images_in_sample:
        raise ValueError(
            f"image_index must be in [0, images_in_sample), got image_index={image_index}, "
            f"images_in_sample={images_in_sample}"
        )
    r = cfg.tile_size
    overview_resized = (r, r) if cfg.overview_fit == "squash" else fit_size(height, width, r, r)
    overview = Tile(0, 0, 0, 0, _marker(cfg, image_index, 0, 0))

    if not cfg.split or images_in_sample > cfg.max_images_to_split:
        return TilePlan(
            height=height,
            width=width,
            tile_size=r,
            grid=(1, 1),
            resized=overview_resized,
            overview_resized=overview_resized,
            tokens_per_tile=cfg.tokens_per_tile,
            split=False,
            tiles=(overview,),
        )

    rows, cols = select_grid(height, width, cfg)
    cells = tuple(
        Tile(i, j, (i - 1) * r, (j - 1) * r, _marker(cfg, image_index, i, j))
        for i in range(1, rows + 1)
        for j in range(1, cols + 1)
    )
    # A 1x1 grid's one cell is the whole image fitted into a tile, which is what the overview would
    # repeat, so it has none (mm15-spec.md section 2.2); only n_min = 1 can choose that grid.
    with_overview = cfg.overview != "none" and len(cells) > 1
    if with_overview and cfg.overview == "after":
        tiles = (*cells, overview)
    elif with_overview and cfg.overview == "before":
        tiles = (overview, *cells)
    else:
        tiles = cells
    return TilePlan(
        height=height,
        width=width,
        tile_size=r,
        grid=(rows, cols),
        resized=fit_size(height, width, rows * r, cols * r),
        overview_resized=overview_resized if with_overview else None,
        tokens_per_tile=cfg.tokens_per_tile,
        split=True,
        tiles=tiles,
    )


def expand_image_text(plan: TilePlan, image_token: str) -> str:
    """The text an image placeholder becomes: each tile's marker, then its run of image tokens.

    This is the one definition of an image's span in a prompt; the tokenizer-level expansion in the
    model and the packer's length estimate follow it, so ``plan.num_image_tokens`` image tokens appear.
    """
    run = image_token * plan.tokens_per_tile
    return "".join(tile.marker + run for tile in plan.tiles)
