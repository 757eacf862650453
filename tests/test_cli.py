"""The ``mm15`` command line: plan output, JSON, drawing, help and clear errors."""

from __future__ import annotations

import json
import os
import shutil
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
        # The option, not the plan's image_index (which no option sets): "image_index must be in [0, 0)".
        (["--images-in-sample", "0"], "--images-in-sample must be >= 1"),
        (
            ["--images-in-sample", "-2"],
            "--images-in-sample must be >= 1 (this image and its sample's others), got -2",
        ),
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


ROOT = Path(__file__).resolve().parents[1]


def flat(output: str) -> str:
    """Rich and Click wrap long messages at the terminal width: join the lines back up."""
    return " ".join(output.replace("│", " ").split())


@pytest.mark.parametrize("command", ["synth", "demo", "eval", "train"])
def test_an_output_folder_under_a_file_is_refused_before_any_work(tmp_path: Path, command: str) -> None:
    """``--out a.png/x`` once passed the check (``a.png/x`` does not exist) and failed in ``mkdir``
    with a traceback, for eval after generating every answer."""
    taken = tmp_path / "a.png"
    taken.write_text("notes")
    out = taken / "x"
    args = {
        "synth": ["data", "synth", "--category", "general", "--n", "1", "--out", str(out)],
        "demo": ["demo", "--out", str(out), "--recipe", str(ROOT / "recipes" / "tiny.yaml")],
        # No model at all: the output folder is refused before the model would be loaded.
        "eval": [
            "eval",
            "--model",
            str(tmp_path / "model"),
            "--tasks",
            "synth-general-color",
            "--out",
            str(out),
        ],
        "train": ["train", str(ROOT / "recipes" / "tiny.yaml"), "--max-steps", "1", "--out", str(out)],
    }[command]
    result = runner.invoke(app, args)
    assert result.exit_code == 2, result.output
    assert f"error: {out}" not in flat(result.output)  # named by its option or role, then the path
    assert f"{out} cannot be created: {taken} is not a directory" in flat(result.output), result.output
    assert taken.read_text() == "notes"


def test_a_read_only_folder_is_refused_up_front(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """As root every folder is writable, so the read-only one is simulated where the check asks."""
    read_only = tmp_path / "ro"
    read_only.mkdir()
    access = os.access

    def no_writing_in_read_only(path: str | os.PathLike[str], mode: int) -> bool:
        return access(path, mode) and not (Path(path) == read_only and mode & os.W_OK)

    monkeypatch.setattr(os, "access", no_writing_in_read_only)
    synth = runner.invoke(
        app, ["data", "synth", "--category", "general", "--n", "1", "--out", str(read_only)]
    )
    assert synth.exit_code == 2 and f"--out {read_only} is not writable" in flat(synth.output), synth.output
    drawing = read_only / "sub" / "plan.png"
    plan = runner.invoke(app, ["plan", str(SCREENSHOT), "--draw", str(drawing)])
    assert plan.exit_code == 2
    assert f"its folder {drawing.parent} cannot be created: {read_only} is not writable" in flat(plan.output)


def test_a_drawing_under_a_file_is_refused_before_the_plan(tmp_path: Path) -> None:
    taken = tmp_path / "a.png"
    taken.write_text("notes")
    for drawing, why in [
        (taken / "plan.png", f"its folder {taken} exists and is not a directory"),
        (
            taken / "sub" / "plan.png",
            f"its folder {taken / 'sub'} cannot be created: {taken} is not a directory",
        ),
    ]:
        result = runner.invoke(app, ["plan", str(SCREENSHOT), "--draw", str(drawing)])
        assert result.exit_code == 2, result.output
        assert f"error: --draw {drawing}: {why}" in flat(result.output)
        assert "grid" not in result.output  # refused before the plan was made and printed
    os.mkfifo(tmp_path / "pipe.png")  # saving to it would block until something read it
    fifo = runner.invoke(app, ["plan", str(SCREENSHOT), "--draw", str(tmp_path / "pipe.png")])
    assert fifo.exit_code == 2 and "exists and is not a regular file" in flat(fifo.output)


def test_a_drawing_that_cannot_be_saved_is_a_clear_error(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    def full_disk(self: Image.Image, *args: object, **kwargs: object) -> None:
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(Image.Image, "save", full_disk)
    drawing = tmp_path / "plan.png"
    result = runner.invoke(app, ["plan", str(SCREENSHOT), "--draw", str(drawing)])
    assert result.exit_code == 2, result.output
    assert f"error: cannot write --draw {drawing}: No space left on device" in flat(result.output)


def test_paths_are_printed_as_typed_not_read_as_markup(tmp_path: Path) -> None:
    """Rich reads "[...]" as markup: "IMG [edited].png" printed as "IMG .png", and "[/i]" raised."""
    edited = tmp_path / "IMG [edited].png"
    shutil.copy(SCREENSHOT, edited)
    drawing = tmp_path / "plan [v2].png"
    result = runner.invoke(app, ["plan", str(edited), "--draw", str(drawing)])
    assert result.exit_code == 0, result.output
    assert f"{edited}: 1640x2360" in flat(result.output)
    assert f"drew the plan to {drawing}" in flat(result.output) and drawing.is_file()
    missing = tmp_path / "IMG[" / "i].png"  # the path "IMG[/i].png"
    for args in (["plan", str(missing)], ["demo", "--image", str(missing)], ["train", str(missing)]):
        result = runner.invoke(app, args)
        assert result.exit_code == 2, result.output
        assert f"{missing}" in flat(result.output) and "no such file" in flat(result.output)
    shards = tmp_path / "shards [v1]"
    synth = ["data", "synth", "--category", "general", "--n", "1", "--out", str(shards)]
    made = runner.invoke(app, synth)
    assert made.exit_code == 0 and f"to {shards}" in flat(made.output), made.output
    again = runner.invoke(app, synth)  # an earlier run's shards: the error names the folder
    assert again.exit_code == 2 and f"error: {shards} already holds 1 shard(s)" in flat(again.output)
    stats = runner.invoke(app, ["data", "stats", str(shards)])
    assert stats.exit_code == 0 and f"1 samples in {shards}" in flat(stats.output), stats.output


def test_shown_escapes_markup_only() -> None:
    from rich.console import Console

    from mm15.paths import shown

    console = Console(record=True, width=200)
    for text in ("IMG [edited].png", "IMG[/i].png", "a\\[b]", "trailing\\", "[bold]x[/bold]", "plain"):
        console.print(f"[red]{shown(text)}[/red]")
    assert console.export_text().splitlines() == [
        "IMG [edited].png",
        "IMG[/i].png",
        "a\\[b]",
        "trailing\\",
        "[bold]x[/bold]",
        "plain",
    ]


def test_the_title_of_a_tall_images_plan_is_not_cut_off(tmp_path: Path) -> None:
    """A tall image scales to a narrow sheet; the sheet is as wide as its title at least."""
    tall = tmp_path / "tall.png"
    Image.new("RGB", (60, 20000), (90, 160, 90)).save(tall)
    drawing = tmp_path / "plan.png"
    result = runner.invoke(app, ["plan", str(tall), "--draw", str(drawing)])
    assert result.exit_code == 0, result.output
    with Image.open(drawing) as picture:
        header = picture.convert("L").crop((0, 0, picture.width, 40))
    dark = [x for x in range(header.width) if min(header.getpixel((x, y)) for y in range(40)) < 128]
    assert dark and dark[-1] < header.width - 4, (dark[-1], header.width)  # white margin after the title
