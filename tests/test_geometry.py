"""The image plan: Eq. 1 grid choice checked by brute force, tile layout, markers, token counts."""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Callable
from fractions import Fraction

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from mm15.geometry import (
    ImagePlanConfig,
    TilePlan,
    candidate_grids,
    expand_image_text,
    fit_size,
    marker_token_floor,
    plan_image,
    select_grid,
)


def reference_resize(h: int, w: int, box_h: int, box_w: int) -> tuple[int, int]:
    """Aspect-kept fit in exact rationals, the non-binding side rounded half up."""
    scale = min(Fraction(box_h, h), Fraction(box_w, w))
    rh = min(box_h, max(1, math.floor(h * scale + Fraction(1, 2))))
    rw = min(box_w, max(1, math.floor(w * scale + Fraction(1, 2))))
    return rh, rw


def reference_grid(h: int, w: int, r: int, nmin: int, nmax: int) -> tuple[int, int]:
    """Eq. 1 and the documented tie-breaks, written out by brute force over every grid."""
    grids = [(a, b) for a in range(1, 50) for b in range(1, 50) if nmin <= a * b <= nmax]
    rows = []
    for a, b in grids:
        rh, rw = reference_resize(h, w, a * r, b * r)
        covers = min(Fraction(a * r, h), Fraction(b * r, w)) >= 1
        pad = a * b * r * r - rh * rw
        aspect = max(Fraction(a * w, b * h), Fraction(b * h, a * w))  # exact, so ties stay ties
        rows.append((covers, pad, rh * rw, a * b, aspect, a, (a, b)))
    covering = [row for row in rows if row[0]]
    if covering:
        return min(covering, key=lambda t: (t[1], t[3], t[4], t[5]))[-1]
    return min(rows, key=lambda t: (-t[2], t[1], t[3], t[4], t[5]))[-1]


sizes = st.integers(min_value=1, max_value=9000)
configs = st.builds(
    lambda tile, nmin, extra, overview, indicator, tokens: ImagePlanConfig(
        tile_size=tile,
        n_min=nmin,
        n_max=nmin + extra,
        overview=overview,
        indicator=indicator,
        tokens_per_tile=tokens,
    ),
    tile=st.sampled_from([14, 56, 224, 378, 672]),
    nmin=st.integers(1, 6),
    extra=st.integers(0, 10),
    overview=st.sampled_from(["after", "before", "none"]),
    indicator=st.sampled_from(["none", "index", "separators"]),
    tokens=st.sampled_from([1, 64, 144]),
)


@settings(max_examples=400, deadline=None)
@given(h=sizes, w=sizes, cfg=configs)
def test_grid_is_valid_and_optimal_by_brute_force(h: int, w: int, cfg: ImagePlanConfig) -> None:
    plan = plan_image(h, w, cfg)
    rows, cols = plan.grid
    assert cfg.n_min <= rows * cols <= cfg.n_max
    assert plan.grid == reference_grid(h, w, cfg.tile_size, cfg.n_min, cfg.n_max)
    assert plan.resized == reference_resize(h, w, rows * cfg.tile_size, cols * cfg.tile_size)
    # The resized image keeps the aspect ratio to within the rounding of one side.
    rh, rw = plan.resized
    assert abs(rh / rw - h / w) <= (h / w) * (1 / min(rh, rw) + 1e-9) + 1e-12 or min(rh, rw) == 1
    # It fits the canvas and touches it along at least one side.
    assert rh <= plan.canvas[0] and rw <= plan.canvas[1]
    assert rh == plan.canvas[0] or rw == plan.canvas[1]


@settings(max_examples=300, deadline=None)
@given(h=sizes, w=sizes, cfg=configs, n_images=st.integers(1, 5))
def test_token_counts_and_tile_layout(h: int, w: int, cfg: ImagePlanConfig, n_images: int) -> None:
    plans = [plan_image(h, w, cfg, image_index=k, images_in_sample=n_images) for k in range(n_images)]
    for k, plan in enumerate(plans):
        split = n_images <= cfg.max_images_to_split
        assert plan.split == split
        cells = [t for t in plan.tiles if not t.is_overview]
        overviews = [t for t in plan.tiles if t.is_overview]
        if split:
            assert len(cells) == plan.grid[0] * plan.grid[1]
            one_cell = plan.grid == (1, 1)
            assert len(overviews) == (0 if cfg.overview == "none" or one_cell else 1)
            assert (plan.overview_resized is None) == (not overviews)
            if overviews:
                assert plan.tiles.index(overviews[0]) == (0 if cfg.overview == "before" else len(cells))
            # Cells are row-major and cover the canvas exactly once.
            expected = [(i, j) for i in range(1, plan.grid[0] + 1) for j in range(1, plan.grid[1] + 1)]
            assert [(t.row, t.col) for t in cells] == expected
            assert {(t.top, t.left) for t in cells} == {
                ((i - 1) * cfg.tile_size, (j - 1) * cfg.tile_size) for i, j in expected
            }
        else:
            assert plan.grid == (1, 1) and len(plan.tiles) == 1 and overviews
            assert plan.resized == plan.overview_resized
        # Token positions: the expanded text holds exactly the plan's image tokens.
        text = expand_image_text(plan, "\x00")
        assert text.count("\x00") == plan.num_image_tokens == plan.num_tiles * cfg.tokens_per_tile
        if cfg.indicator == "index":
            assert [t.marker for t in plan.tiles] == [f"({k}, {t.row}, {t.col})" for t in plan.tiles]
        if cfg.indicator == "none":
            assert text == "\x00" * plan.num_image_tokens


@pytest.mark.parametrize(
    ("h", "w", "grid"),
    [
        (1, 1, (2, 2)),  # tiny square: 2x2 and 3x3 both pad-free, fewer tiles wins
        (100, 100, (2, 2)),
        (1344, 1344, (2, 2)),
        (2016, 2016, (3, 3)),  # exactly 3x3 tiles: no downscaling only with 3x3
        (4000, 4000, (3, 3)),  # case B: the largest canvas keeps most resolution
        (100, 6000, (1, 9)),  # a 1x9 strip: only 1x9 holds it without downscaling
        (6000, 100, (9, 1)),
        (100, 60000, (1, 9)),  # far too long for any grid: least resolution loss
        (500, 1, (4, 1)),  # 1-pixel-wide: least padding among the pad-heavy tall grids
        (1, 500, (1, 4)),
        (1640, 2360, (3, 3)),  # the SeeClick tablet screenshot
        (600, 512, (2, 2)),  # matplotlib's grace_hopper.jpg
    ],
)
def test_golden_grids(h: int, w: int, grid: tuple[int, int]) -> None:
    assert plan_image(h, w).grid == grid


@settings(max_examples=200, deadline=None)
@given(n_min=st.integers(1, 80), extra=st.integers(0, 80))
def test_candidate_grids_are_every_grid_in_the_range_in_row_major_order(n_min: int, extra: int) -> None:
    n_max = n_min + extra
    every = [(r, c) for r in range(1, n_max + 1) for c in range(1, n_max + 1) if n_min <= r * c <= n_max]
    assert candidate_grids(n_min, n_max) == every


def test_mm15_defaults_cost_at_most_1440_tokens() -> None:
    cfg = ImagePlanConfig()
    assert len(candidate_grids(4, 9)) == 18
    assert cfg.max_tokens_per_image() == 1440
    assert plan_image(1640, 2360).num_image_tokens == 1440  # 3x3 + overview
    assert plan_image(1000, 1000).num_image_tokens == 720  # 2x2 + overview
    assert plan_image(1000, 1000, images_in_sample=3).num_image_tokens == 144  # no splitting at 3 images


@settings(max_examples=200, deadline=None)
@given(cfg=configs)
def test_token_bounds_are_the_extreme_grids(cfg: ImagePlanConfig) -> None:
    # Brute force over the sizes that pick each grid's extremes: a square image takes the fewest cells
    # that fit it, a 1 x (n_max * tile) strip the most; the bounds must be reached, never exceeded.
    r = cfg.tile_size
    fewest = plan_image(r, r * cfg.n_min, cfg) if cfg.n_min > 1 else plan_image(r, r, cfg)
    most = plan_image(r, r * cfg.n_max, cfg)
    assert most.num_image_tokens == cfg.max_tokens_per_image()
    assert fewest.num_image_tokens == cfg.min_image_tokens_per_sample() or cfg.max_images_to_split + 1 < (
        fewest.num_tiles
    )


def test_single_cell_grid_has_no_overview() -> None:
    # mm15-spec.md 2.2: the overview of a 1x1 grid would repeat its one cell, so it is left out.
    cfg = ImagePlanConfig(tile_size=32, n_min=1, n_max=4)
    plan = plan_image(20, 30, cfg)
    assert plan.grid == (1, 1)
    assert [t.marker for t in plan.tiles] == ["(0, 1, 1)"]
    assert plan.overview_resized is None and plan.num_image_tokens == 144
    assert cfg.min_image_tokens_per_sample() == 144
    assert ImagePlanConfig(tile_size=32, n_min=1, n_max=1).max_tokens_per_image() == 144
    # Larger grids of the same config keep theirs.
    assert len(plan_image(32, 128, cfg).tiles) == 5


def test_one_pixel_wide_plan_is_consistent() -> None:
    plan = plan_image(500, 1)
    assert plan.resized == (2688, 5)  # 500 * 2688/500 and 1 * 5.376 rounded
    assert plan.padding == (0, 672 - 5)
    assert plan.overview_resized == (672, 1)


def test_markers_in_each_mode() -> None:
    index = plan_image(1000, 1500, image_index=1, images_in_sample=2)
    assert index.grid == (2, 3)
    assert [t.marker for t in index.tiles] == [
        "(1, 1, 1)",
        "(1, 1, 2)",
        "(1, 1, 3)",
        "(1, 2, 1)",
        "(1, 2, 2)",
        "(1, 2, 3)",
        "(1, 0, 0)",
    ]
    seps = plan_image(1000, 1500, ImagePlanConfig(indicator="separators", overview="before"))
    assert [t.marker for t in seps.tiles] == [":", "", ",", ",", "\n", ",", ","]


def test_tie_break_prefers_the_image_aspect_then_fewer_rows() -> None:
    # A 1x1 image fits 1x4 and 4x1 with equal padding when nmin = nmax = 4 but 2x2 wins on aspect.
    assert select_grid(7, 7, ImagePlanConfig(n_min=4, n_max=4)) == (2, 2)
    # 2x3 vs 3x2 for a square image: same padding and tiles and aspect distance -> fewer rows.
    assert select_grid(5, 5, ImagePlanConfig(n_min=6, n_max=6)) == (2, 3)


def test_fit_size_rounds_half_up_exactly() -> None:
    assert fit_size(2, 3, 10, 100) == (10, 15)
    assert fit_size(4, 1, 10, 10) == (10, 3)  # 2.5 rounds up
    assert fit_size(1, 1000, 10, 10) == (1, 10)  # never below one pixel


@pytest.mark.parametrize(
    ("kwargs", "field"),
    [
        ({"tile_size": 0}, "tile_size"),
        ({"n_min": 0}, "n_min"),
        ({"n_min": 5, "n_max": 4}, "n_max"),
        ({"n_max": 1025}, "n_max must be <= 1024"),
        ({"tokens_per_tile": 0}, "tokens_per_tile"),
        ({"overview": "middle"}, "overview"),
        ({"indicator": "roman"}, "indicator"),
        ({"overview_fit": "crop"}, "overview_fit"),
        ({"max_images_to_split": -1}, "max_images_to_split"),
        # Types, as config.json's image section is read as it stands.
        ({"tile_size": 672.0}, "tile_size must be an integer"),
        ({"tile_size": "672"}, "tile_size must be an integer"),
        ({"n_max": True}, "n_max must be an integer"),
        ({"split": "false"}, "split must be true or false"),
    ],
)
def test_bad_config_names_the_field(kwargs: dict, field: str) -> None:
    with pytest.raises(ValueError, match=field):
        ImagePlanConfig(**kwargs)


@pytest.mark.parametrize(
    ("args", "kwargs"),
    [
        ((0, 10), {}),
        ((10, -1), {}),
        ((10.5, 10), {}),
        ((True, True), {}),
        ((10, 10), {"image_index": 2, "images_in_sample": 2}),
        ((10, 10), {"image_index": 0.5, "images_in_sample": 2}),
        ((10, 10), {"images_in_sample": 2.0}),
    ],
)
def test_bad_plan_arguments(args: tuple, kwargs: dict) -> None:
    with pytest.raises(ValueError):
        plan_image(*args, **kwargs)


def test_scale_is_exact_along_the_binding_side() -> None:
    # 1000 x 3 on a 4 x 1 grid: the height binds (2688 / 1000); the width rounds 8.064 down to 8,
    # so the ratio of the resized width (8 / 3) would understate it.
    plan = plan_image(1000, 3)
    assert plan.grid == (4, 1) and plan.resized == (2688, 8)
    assert plan.scale == 2688 / 1000
    assert plan_image(1640, 2360).scale == 2016 / 2360  # the width binds


def test_to_dict_is_json_ready() -> None:
    import json

    data = json.loads(json.dumps(plan_image(1640, 2360).to_dict()))
    assert data["grid"] == [3, 3] and data["num_image_tokens"] == 1440
    assert data["tiles"][-1]["marker"] == "(0, 0, 0)" and data["padding"] == [2016 - 1401, 0]


def _byte_count(marker: str) -> int:
    # The tiny decoder's tokenizer: one token per UTF-8 byte, no merges.
    return len(marker.encode("utf-8"))


def _span_cost(plans: list[TilePlan], count: Callable[[str], int]) -> int:
    return sum(p.num_image_tokens + sum(count(t.marker) for t in p.tiles) for p in plans)


def test_marker_token_floor_counts_numbers_and_punctuation() -> None:
    # Digits never share a token with punctuation in the tokenizers mm15 uses; a space may join a number.
    assert marker_token_floor("(0, 0, 0)") == 7  # GPT-2: ( 0 , " 0" , " 0" ); byte and SmolLM2: 9
    assert marker_token_floor("(12, 10, 3)") == 7
    assert [marker_token_floor(m) for m in (":", ",", "\n", "")] == [1, 1, 1, 0]
    assert all(marker_token_floor(m) <= _byte_count(m) for m in ("(0, 0, 0)", "(2, 3, 1)", ":", "\n"))


def test_min_image_span_tokens_counts_the_markers() -> None:
    """Three unsplit 16-token images with their "(k, 0, 0)" markers: 75 byte tokens, not 48."""
    cfg = ImagePlanConfig(tile_size=64, n_min=4, n_max=9, tokens_per_tile=16)
    assert cfg.min_image_tokens_per_sample() == 48
    assert cfg.min_image_span_tokens(_byte_count) == 3 * (16 + 9) == 75
    assert cfg.min_image_span_tokens() == 3 * (16 + 7)  # the tokenizer-free lower bound
    # Separators: ":" before each unsplit image; a 2x2 grid has "", ",", "\n", "," and ":" for the overview.
    separators = ImagePlanConfig(tile_size=64, n_min=4, n_max=9, tokens_per_tile=16, indicator="separators")
    assert separators.min_image_span_tokens(_byte_count) == 3 * (16 + 1)
    none = ImagePlanConfig(tile_size=64, n_min=4, n_max=9, tokens_per_tile=16, indicator="none")
    assert none.min_image_span_tokens(_byte_count) == 48
    single = ImagePlanConfig(tile_size=64, split=False, tokens_per_tile=16)
    assert single.min_image_span_tokens(_byte_count) == 16 + 9


@settings(max_examples=150, deadline=None)
@given(
    cfg=configs,
    split=st.booleans(),
    max_split=st.integers(0, 3),
    count=st.sampled_from([_byte_count, marker_token_floor]),
)
def test_min_image_span_tokens_is_reached_and_never_undercut(
    cfg: ImagePlanConfig, split: bool, max_split: int, count: Callable[[str], int]
) -> None:
    """The cheapest samples (one image on each grid of n_min cells, or 1 to max_images_to_split + 2
    images) cost at least the bound, and one of them exactly that."""
    cfg = dataclasses.replace(cfg, split=split, max_images_to_split=max_split)
    r = cfg.tile_size
    samples = [
        [plan_image(rows * r, (cfg.n_min // rows) * r, cfg)]
        for rows in range(1, cfg.n_min + 1)
        if cfg.n_min % rows == 0
    ]
    samples += [
        [plan_image(r, r, cfg, image_index=k, images_in_sample=m) for k in range(m)]
        for m in range(1, max_split + 3)
    ]
    costs = [_span_cost(plans, count) for plans in samples]
    least = cfg.min_image_span_tokens(count)
    assert min(costs) == least, (costs, least)
