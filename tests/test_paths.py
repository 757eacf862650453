"""``mm15.paths.not_a_file_reason``: why a path cannot be read as a file, never an exception."""

from __future__ import annotations

import errno
import os
from pathlib import Path

import pytest
from typer.testing import CliRunner

from mm15.cli import app
from mm15.paths import NO_SUCH_FILE, not_a_file_reason

runner = CliRunner()


def test_each_kind_of_path_gets_its_reason(tmp_path: Path) -> None:
    (tmp_path / "a.txt").write_text("x")
    (tmp_path / "gone").symlink_to(tmp_path / "missing")
    os.mkfifo(tmp_path / "pipe")
    assert not_a_file_reason(tmp_path / "a.txt") is None
    assert not_a_file_reason(tmp_path) == "is a directory, not a file"
    assert not_a_file_reason(tmp_path / "pipe") == "not a regular file"
    assert not_a_file_reason(tmp_path / "missing") == NO_SUCH_FILE
    assert not_a_file_reason(tmp_path / "a.txt" / "under") == NO_SUCH_FILE  # a file on the way
    assert not_a_file_reason(tmp_path / "gone") == "is a symbolic link to a missing file"
    assert not_a_file_reason(tmp_path / "nul\0.png") == "not a valid path (embedded null byte)"


def test_a_path_the_os_refuses_to_look_at_gets_the_os_reason(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Path.is_file raises OSError on Python 3.11 for ENAMETOOLONG and EACCES instead of returning False."""
    assert not_a_file_reason(tmp_path / ("a" * 300 + ".png")) == "File name too long"
    assert not_a_file_reason(tmp_path / ("a" * 5000)) == "File name too long"

    # A folder on the way that cannot be searched (as root, chmod cannot show it: the error is made).
    def refused(self: Path, **kwargs: object) -> os.stat_result:
        raise PermissionError(errno.EACCES, os.strerror(errno.EACCES), str(self))

    monkeypatch.setattr(Path, "stat", refused)
    assert not_a_file_reason(tmp_path / "locked" / "a.png") == "Permission denied"


def test_plan_of_a_name_too_long_is_a_clear_error(tmp_path: Path) -> None:
    result = runner.invoke(app, ["plan", str(tmp_path / ("a" * 300 + ".png"))])
    assert result.exit_code == 2, result.output
    assert result.exception is None or isinstance(result.exception, SystemExit), result.exception
    assert "File name too long" in " ".join(result.output.split()), result.output
