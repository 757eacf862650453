"""The box and point text format: round trips, exact values, parsing and bad input."""

from __future__ import annotations

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from mm15.boxes import (
    box_from_text_units,
    box_to_text_units,
    format_box,
    format_point,
    parse_boxes,
    parse_points,
    point_from_text_units,
    point_to_text_units,
)

sizes = st.integers(min_value=1, max_value=10000)


@settings(max_examples=500, deadline=None)
@given(h=sizes, w=sizes, data=st.data())
def test_box_round_trip_within_one_text_unit(h: int, w: int, data: st.DataObject) -> None:
    xs = sorted(data.draw(st.lists(st.floats(0, w), min_size=2, max_size=2)))
    ys = sorted(data.draw(st.lists(st.floats(0, h), min_size=2, max_size=2)))
    box = (xs[0], ys[0], xs[1], ys[1])
    units = box_to_text_units(box, h, w)
    assert all(0 <= u < 1000 for u in units)
    back = box_from_text_units(units, h, w)
    for value, decoded, extent in zip(box, back, (w, h, w, h), strict=True):
        assert abs(value - decoded) <= extent / 1000  # one text unit, in pixels
    assert box_to_text_units(back, h, w) == units  # text -> image -> text is exact
    assert parse_boxes(f"the cat {format_box(box, h, w)} sleeps", h, w) == [back]


@settings(max_examples=300, deadline=None)
@given(h=sizes, w=sizes, data=st.data())
def test_point_round_trip_within_one_text_unit(h: int, w: int, data: st.DataObject) -> None:
    point = (data.draw(st.floats(0, w)), data.draw(st.floats(0, h)))
    units = point_to_text_units(point, h, w)
    back = point_from_text_units(units, h, w)
    assert abs(back[0] - point[0]) <= w / 1000 and abs(back[1] - point[1]) <= h / 1000
    assert parse_points(format_point(point, h, w), h, w) == [back]


def test_exact_values_follow_the_ferret_convention() -> None:
    # x_norm = int(x * 1000 / W), clamped to 999 at the far edge.
    assert box_to_text_units((0, 0, 640, 480), 480, 640) == (0, 0, 999, 999)
    assert box_to_text_units((64, 48, 320, 240), 480, 640) == (100, 100, 500, 500)
    assert format_box((10.0, 20.0, 30.0, 40.0), 200, 100) == "[100, 100, 300, 200]"
    assert format_point((50, 50), 100, 200) == "[250, 500]"
    assert box_from_text_units((0, 0, 999, 999), 1000, 2000) == (1.0, 0.5, 1999.0, 999.5)


def test_parsing_keeps_boxes_and_points_apart() -> None:
    text = "A [100, 200, 300, 400], a point [10, 20], junk [1, 2, 3], [5,6] and [1000, 0, 0, 0]."
    assert parse_boxes(text, 1000, 1000) == [(100.5, 200.5, 300.5, 400.5)]
    assert parse_points(text, 1000, 1000) == [(10.5, 20.5)]
    assert parse_boxes("[300, 0, 100, 10]", 10, 10) == []  # x1 > x2 is not a box


@pytest.mark.parametrize(
    ("call", "message"),
    [
        (lambda: box_to_text_units((5, 0, 1, 1), 10, 10), "x1 <= x2"),
        (lambda: box_to_text_units((0, 0, 1, 1), 0, 10), "positive"),
        (lambda: box_to_text_units((0, 0, float("nan"), 1), 10, 10), "finite"),
        (lambda: box_from_text_units((0, 0, 1000, 1), 10, 10), r"\[0, 1000\)"),
        (lambda: point_from_text_units((-1, 0), 10, 10), r"\[0, 1000\)"),
    ],
)
def test_bad_input_is_a_clear_error(call, message: str) -> None:
    with pytest.raises(ValueError, match=message):
        call()


def test_only_ascii_digits_are_coordinates() -> None:
    """Python's \\d matches any script's digits; the format (and the web page's JavaScript) is ASCII."""
    arabic_indic = "box [١٠٠, ١٠٠, ٥٠٠, ٥٠٠] and point [٢٥٠, ٧٥٠]"
    assert parse_boxes(arabic_indic, 100, 100) == [] and parse_points(arabic_indic, 100, 100) == []
    fullwidth = "[１００, ２００]"
    assert parse_points(fullwidth, 100, 100) == []
    assert parse_boxes("[100, 100, 500, 500]", 1000, 1000) == [(100.5, 100.5, 500.5, 500.5)]
