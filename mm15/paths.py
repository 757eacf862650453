"""Checks on the paths a user names, shared by every command: one wording for each problem.

``not_a_file_reason`` says why an input path cannot be read as a file; ``check_output_dir`` refuses an
output directory that cannot be made or written (it exists as something else, or a folder on its way
is a file or read-only). Both run before any work, so a mistyped path costs a second, not a training
run. ``model_name_of`` names a model directory for ids and default folders. ``shown`` makes a path (or
any text a user typed) safe to put into Rich markup. ``write_text_atomic`` writes a small file so that
an interrupted process leaves the old one or the new one, never half of either.
"""

from __future__ import annotations

import os
import stat
from pathlib import Path

from rich.markup import escape

# The reason for a path that is not there at all: callers that word that case their own way test for it.
NO_SUCH_FILE = "no such file"
# The reason for a directory: readers that take a folder too (a video of frame images) test for it.
IS_A_DIRECTORY = "is a directory, not a file"


def not_a_file_reason(path: Path) -> str | None:
    """Why ``path`` cannot be read as a file ("no such file", "is a directory", ...), or None if it can.

    Never raises: a path the OS refuses to look at (a name over the length limit, a folder on the way
    that cannot be searched) gives the OS's reason ("File name too long", "Permission denied"), so a
    lenient reader counts the record and a command prints one line instead of a traceback.
    """
    try:
        # One stat rather than is_file / is_dir: those raise on Python 3.11 for any errno but a few.
        mode = path.stat().st_mode
    except (FileNotFoundError, NotADirectoryError):
        # A dangling link is listed by ls; "no such file" alone would send the user looking for a typo.
        return "is a symbolic link to a missing file" if os.path.islink(path) else NO_SUCH_FILE
    except OSError as err:
        return err.strerror or str(err)
    except ValueError as err:  # an embedded NUL: no file can have that name
        return f"not a valid path ({err})"
    if stat.S_ISREG(mode):
        return None
    if stat.S_ISDIR(mode):
        return IS_A_DIRECTORY
    return "not a regular file"


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


def model_name_of(model_dir: Path) -> str:
    """A model directory's name; for ``mm15 train``'s ``<run>/<stage>/final``, ``<run>-<stage>``.

    The served model's id and ``mm15 eval``'s default results folder, so that the stages of one run
    get names of their own rather than all being called "final".
    """
    path = model_dir.resolve()
    if path.name == "final" and path.parent.parent.name:
        return f"{path.parent.parent.name}-{path.parent.name}"
    return path.name


def write_text_atomic(path: Path, text: str) -> None:
    """Write ``text`` to a temporary file beside ``path``, then rename it over ``path``."""
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    try:
        tmp.write_text(text, encoding="utf-8")
        tmp.replace(path)
    finally:
        tmp.unlink(missing_ok=True)
