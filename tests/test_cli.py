"""The ``mm15`` command line: plan output, JSON, drawing, help and clear errors."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from PIL import Image
from typer.testing import CliRunner

from mm15.cli import app

FIXTURES = Path(__file__).parent / "fixtures"
SCREENSHOT = FIXTURES / "seeclick_calendar.png"
runner = CliRunner()


def test_plan_json_matches_the_real_screenshot() -> None:
    result = runner.invoke(app, ["plan", str(SCREENSHOT), "--json"])
    assert result.exit_code == 0, result.output
    data = json.loads(result.output)
    assert (data["height"], data["width"]) == (1640, 2360)
    assert data["grid"] == [3, 3] and data["resized"] == [1401, 2016]
    assert data["num_image_tokens"] == 1440
    assert [t["marker"] for t in data["tiles"]][-1] == "(0, 0, 0)"


def test_plan_options_change_the_plan(tmp_path: Path) -> None:
    drawing = tmp_path / "sub" / "plan.png"
    args = [
        "plan",
        str(SCREENSHOT),
        "--json",
        "--tile",
        "336",
        "--nmin",
        "1",
        "--nmax",
        "4",
        "--overview",
        "before",
        "--tokens-per-tile",
        "64",
        "--draw",
        str(drawing),
    ]
    result = runner.invoke(app, args)
    assert result.exit_code == 0, result.output
    data = json.loads(result.output)
    assert data["tile_size"] == 336 and data["grid"] == [2, 2]  # 2x2 keeps the most of 1640x2360
    assert data["tiles"][0]["marker"] == "(0, 0, 0)"  # overview first
    assert data["num_image_tokens"] == 5 * 64
    with Image.open(drawing) as picture:
        assert picture.width >= 2 * 336  # the canvas and the overview side by side


def test_plan_table_output_and_help() -> None:
    result = runner.invoke(app, ["plan", str(SCREENSHOT)])
    assert result.exit_code == 0
    assert "grid 3x3" in result.output and "1440 image tokens" in result.output
    for command in ([], ["plan"], ["demo"]):
        helped = runner.invoke(app, [*command, "--help"])
        assert helped.exit_code == 0 and "Usage" in helped.output


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["--nmin", "5", "--nmax", "4"], "n_max"),
        (["--overview", "middle"], "overview"),
        (["--images-in-sample", "0"], "images_in_sample"),
        (["--draw", "plan.txt"], "--draw must end in .png, .jpg or .jpeg, got 'plan.txt'"),
    ],
)
def test_plan_bad_options_are_clear_errors(args: list[str], message: str) -> None:
    result = runner.invoke(app, ["plan", str(SCREENSHOT), *args])
    assert result.exit_code == 2
    assert message in result.output


def test_plan_bad_image_is_a_clear_error(tmp_path: Path) -> None:
    fake = tmp_path / "notes.png"
    fake.write_text("not an image")
    result = runner.invoke(app, ["plan", str(fake)])
    assert result.exit_code == 2
    assert "not a recognised image format" in result.output and "notes.png" in result.output
