"""Checks on the paths a user names, shared by every command: one wording for each problem.

``not_a_file_reason`` says why an input path cannot be read as a file; ``check_output_dir`` refuses an
output directory that cannot be made or written (it exists as something else, or a folder on its way
is a file or read-only). Both run before any work, so a mistyped path costs a second, not a training
run. ``shown`` makes a path (or any text a user typed) safe to put into Rich markup.
"""

from __future__ import annotations

import os
from pathlib import Path

from rich.markup import escape


def not_a_file_reason(path: Path) -> str | None:
    """Why ``path`` cannot be read as a file ("no such file", "is a directory", ...), or None if it can."""
    if path.is_file():
        return None
    if path.is_dir():
        return "is a directory, not a file"
    if path.exists():
        return "not a regular file"
    return "no such file"


def not_a_dir_reason(path: Path) -> str | None:
    """Why a directory cannot be made (or written into) at ``path``, or None if it can.

    ``path`` need not exist: ``mkdir(parents=True)`` will make it under its nearest existing ancestor,
    so that ancestor must be a directory this process can write into. A file on the way (``a.png/out``)
    or a read-only folder is found here rather than by the ``mkdir`` after the work.
    """
    existing = path
    # lexists, not exists: a dangling symbolic link is something mkdir cannot replace either.
    while not os.path.lexists(existing) and existing.parent != existing:
        existing = existing.parent
    if not os.path.isdir(existing):
        if existing == path:
            return "exists and is not a directory"
        return f"cannot be created: {existing} is not a directory"
    if not os.access(existing, os.W_OK | os.X_OK):
        return "is not writable" if existing == path else f"cannot be created: {existing} is not writable"
    return None


def check_output_dir(path: Path, what: str) -> None:
    """``ValueError`` when ``path`` (named ``what`` in the message) cannot be a directory to write into."""
    reason = not_a_dir_reason(path)
    if reason is not None:
        raise ValueError(f"{what} {path} {reason}")


def shown(text: object) -> str:
    """``text`` (a path, a message naming one, anything a user typed) for an f-string Rich prints.

    Rich reads ``[...]`` as markup: ``IMG [edited].png`` would print as ``IMG .png`` and ``IMG[/i].png``
    raise ``MarkupError``. Every user-supplied piece interpolated into printed markup goes through here.
    """
    return escape(str(text))
