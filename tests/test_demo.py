"""``mm15 demo`` end to end on a reduced budget: every stage evaluated, the report and its images written."""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest
import yaml
from rich.console import Console

from mm15.demo import DEMO_CATEGORIES, LIVE_EXAMPLES, run_demo

ROOT = Path(__file__).resolve().parents[1]


def test_demo_on_a_reduced_budget_writes_the_report(tmp_path: Path) -> None:
    recipe = yaml.safe_load((ROOT / "recipes" / "tiny.yaml").read_text())
    for stage in recipe["stages"]:  # 2 steps per stage: the wiring, not the learning
        stage.update(max_steps=2, save_every=2, schedule={"warmup_steps": 1, "min_lr_ratio": 0.1})
    path = tmp_path / "tiny.yaml"
    path.write_text(yaml.safe_dump(recipe))
    out = tmp_path / "demo"
    console = Console(record=True, width=160)
    run_demo(out, console, [ROOT / "tests" / "fixtures" / "seeclick_calendar.png"], path, limit=1)

    report = (out / "report.md").read_text()
    rows = [
        line for line in report.splitlines() if line.startswith("| untrained") or line.startswith("| after")
    ]
    assert [r.split(" | ")[0] for r in rows] == [
        "| untrained",
        "| after pretrain",
        "| after ocr",
        "| after sft",
    ]
    for row in rows:  # a score per category and MMBase, each in [0, 100]
        cells = row.strip("| ").split(" | ")[1:]
        assert len(cells) == len(DEMO_CATEGORIES) + 1 and all(0 <= float(c) <= 100 for c in cells)
    for name in (
        "categories.png",
        "grounding.png",
        "plan_0.png",
        *(f"live_{g}.png" for g, _, _ in LIVE_EXAMPLES),
    ):
        assert (out / name).stat().st_size > 500, name
    for stage in ("pretrain", "ocr", "sft"):
        assert f"tiny/{stage}/loss.png" in report and (out / "tiny" / stage / "loss.png").is_file()
        assert (out / "eval" / f"after {stage}" / "results.json").is_file()
    # The context-use probes of the final model, one item each (limit=1): shares in [0, 100]%.
    probe_rows = report.split("## Does the final model read its prompt?")[1].strip().splitlines()[3:]
    assert [r.split(" | ")[0] for r in probe_rows[2:5]] == [
        "| grounding: the asked object's name likelier than another object's",
        "| sorting: the answers' vocabulary words that are words of the question",
        "| sorting: exact answers",
    ]
    grounding = probe_rows[2].split(" | ")[2]
    assert grounding in ("0%", "100%")  # one item: preferred or not
    assert "demo finished in" in console.export_text()

    # Run again after a stop in SFT (its checkpoint kept, no final model): finished stages are kept and
    # SFT resumes from its checkpoint, rather than refusing to train over it.
    shutil.rmtree(out / "tiny" / "sft" / "final")
    again = Console(record=True, width=160)
    run_demo(out, again, [ROOT / "tests" / "fixtures" / "seeclick_calendar.png"], path, limit=1)
    text = " ".join(again.export_text().split())
    assert "pretrain: done already" in text and "ocr: done already" in text
    assert "sft: resumed from" in text and "demo finished in" in text, text


def test_bad_demo_arguments_stop_before_anything_runs(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A bad image, recipe or output path is a one-line error (exit 2) before the image plans."""
    from typer.testing import CliRunner

    from mm15.cli import app

    notes = tmp_path / "notes.png"
    notes.write_text("not an image")
    out = tmp_path / "demo"
    cases = [
        (["--image", str(notes)], "notes.png: not a recognised image format"),
        (["--recipe", str(tmp_path / "gone.yaml")], "gone.yaml: no such file"),
        (["--out", str(notes)], "exists and is not a directory"),
    ]
    for args, message in cases:
        result = CliRunner().invoke(app, ["demo", "--out", str(out), *args])
        assert result.exit_code == 2, result.output
        assert message in " ".join(result.output.split()), result.output
        assert not out.exists()  # nothing ran
    monkeypatch.chdir(tmp_path)  # the default recipe is relative to the checkout
    result = CliRunner().invoke(app, ["demo", "--out", str(out)])
    assert result.exit_code == 2
    assert "run from the mm15 checkout, or give --recipe" in " ".join(result.output.split())


def test_an_image_cut_after_its_header_stops_the_demo_before_anything_runs(tmp_path: Path) -> None:
    """Its header is sound, so reading the size alone passed it; stage 1 then stopped with a traceback
    and left an empty --out. The images are decoded in the checks now."""
    from PIL import Image
    from typer.testing import CliRunner

    from mm15.cli import app

    whole = tmp_path / "whole.png"
    Image.effect_noise((64, 64), 40).convert("RGB").save(whole)
    cut = tmp_path / "cut [draft].png"  # and a name Rich would read as markup
    cut.write_bytes(whole.read_bytes()[:300])
    out = tmp_path / "demo"
    recipe = ROOT / "recipes" / "tiny.yaml"
    result = CliRunner().invoke(
        app, ["demo", "--out", str(out), "--image", str(cut), "--recipe", str(recipe)]
    )
    assert result.exit_code == 2, result.output
    assert "cut [draft].png: corrupt or truncated image data" in " ".join(result.output.split())
    assert "image plan" not in result.output and not out.exists()  # nothing ran, nothing was made


def test_a_drawn_box_goes_around_its_target_not_over_it() -> None:
    """PIL draws an outline inward: the report's 7-pixel-high word was 88% painted over."""
    import numpy as np
    from PIL import Image

    from mm15.boxes import format_box
    from mm15.demo import _draw_boxes

    image = Image.new("RGB", (200, 100), "white")
    box = (60.0, 40.0, 103.0, 47.0)  # pixels 60..102 x 40..46
    drawn = np.asarray(_draw_boxes(image, format_box(box, 100, 200), ""))
    inside = drawn[40:47, 60:103]
    assert (inside == 255).all(), "the outline covers the target"
    assert (drawn[38, 60:103] == [0, 190, 0]).all() and (drawn[40:47, 104] == [0, 190, 0]).all()


def test_a_live_example_with_several_images_shows_them_all(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The report showed the first image only: for an in-context question that is a demonstration, not
    the image asked about."""
    from PIL import Image

    import mm15.demo as demo

    images = [
        Image.new("RGB", (80, 40), "red"),
        Image.new("RGB", (40, 40), "green"),
        Image.new("RGB", (40, 40), "blue"),
    ]
    monkeypatch.setattr(demo, "LIVE_EXAMPLES", (("icl", 1, "in-context"),))
    monkeypatch.setattr(demo, "answer_live", lambda model, name, index: ("q", "a", "t", images))
    (row,) = demo.live_answers(None, tmp_path, Console(quiet=True))
    with Image.open(tmp_path / row["image"]) as saved:
        assert saved.size == (320 + 160 + 160 + 2 * 4, 160)  # each scaled to 160 high, 4 pixels apart
        assert saved.getpixel((320 + 160 + 160 + 2 * 4 - 1, 80)) == (0, 0, 255)  # the last: the question's
