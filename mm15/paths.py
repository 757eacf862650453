"""Checks on the paths a user names, shared by every command: one wording for each problem.

``not_a_file_reason`` says why an input path cannot be read as a file; ``check_output_dir`` refuses an
output directory that exists as something else. Both run before any work, so a mistyped path costs a
second, not a training run.
"""

from __future__ import annotations

from pathlib import Path


def not_a_file_reason(path: Path) -> str | None:
    """Why ``path`` cannot be read as a file ("no such file", "is a directory", ...), or None if it can."""
    if path.is_file():
        return None
    if path.is_dir():
        return "is a directory, not a file"
    if path.exists():
        return "not a regular file"
    return "no such file"


def check_output_dir(path: Path, what: str) -> None:
    """``ValueError`` when ``path`` (named ``what`` in the message) exists but is not a directory."""
    if path.exists() and not path.is_dir():
        raise ValueError(f"{what} {path} exists and is not a directory")
