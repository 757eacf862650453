"""``mm15.viz.check_picture_path``: a picture path is refused with a reason before any work, never raised."""

from __future__ import annotations

from pathlib import Path

import pytest
from PIL import Image
from typer.testing import CliRunner

from mm15.cli import app
from mm15.viz import check_picture_path

runner = CliRunner()


def test_a_picture_name_too_long_for_the_os_is_refused_with_its_reason(tmp_path: Path) -> None:
    """Path.is_dir raised OSError (ENAMETOOLONG) on Python 3.11: a traceback from mm15 plan --draw."""
    long_path = tmp_path / ("a" * 300 + ".png")
    with pytest.raises(ValueError, match=r"^--draw .*a\.png: File name too long$"):
        check_picture_path(long_path, "--draw")
    image = tmp_path / "img.png"
    Image.new("RGB", (64, 48), (10, 200, 10)).save(image)
    result = runner.invoke(app, ["plan", str(image), "--draw", str(long_path)])
    assert result.exit_code == 2, result.output
    assert result.exception is None or isinstance(result.exception, SystemExit), result.exception
    assert "File name too long" in " ".join(result.output.split()), result.output


def test_the_existing_refusals_still_hold(tmp_path: Path) -> None:
    (tmp_path / "taken.png").write_text("x")
    (tmp_path / "folder.png").mkdir()
    check_picture_path(tmp_path / "new" / "sheet.png", "--out")  # a folder still to be made is fine
    check_picture_path(tmp_path / "taken.png", "--out")  # an existing file is overwritten
    with pytest.raises(ValueError, match="is a directory; give a file name"):
        check_picture_path(tmp_path / "folder.png", "--out")
    with pytest.raises(ValueError, match=r"its folder .*taken\.png exists and is not a directory"):
        check_picture_path(tmp_path / "taken.png" / "sheet.png", "--out")
    with pytest.raises(ValueError, match="is not a valid path"):
        check_picture_path(tmp_path / "nul\0.png", "--out")
