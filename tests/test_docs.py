"""The docs name only commands, options, scripts and recipes that exist.

Every ``mm15 <subcommand> ... --option`` in README.md and docs/*.md must be an option of that subcommand,
every ``benchmarks/<script>.py ... --option`` an option the script defines, and every ``recipes/*.yaml``
a file of the checkout: a renamed option or file otherwise leaves the docs telling users to run
something that fails.
"""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any

import pytest
import typer.main

from mm15.cli import app

ROOT = Path(__file__).resolve().parents[1]
DOCS = [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]
# "mm15 data pack FILE --out DIR": the words after mm15, then the rest of the line up to the end of the
# code span or table cell.
MM15_COMMAND = re.compile(r"(?:^|[`\s(])(?:\.venv/bin/)?mm15 ((?:[a-z]+ ?)+)(?=[\s`]|$)([^`\n|]*)")
SCRIPT_COMMAND = re.compile(r"(benchmarks/[a-z_]+\.py)([^`\n|]*)")
RECIPE = re.compile(r"recipes/[\w/.-]+\.yaml")
OPTION = re.compile(r"(?<![\w-])--[a-z][a-z0-9-]*")


def _subcommand(words: list[str]) -> tuple[Any, list[str]]:
    """The deepest (click) subcommand the leading ``words`` name, and those words. Groups are found by
    their ``commands``: typer ships its own copy of click, so ``click.Group`` is not their class."""
    command: Any = typer.main.get_command(app)
    used: list[str] = []
    for word in words:
        if word not in getattr(command, "commands", {}):
            break
        command = command.commands[word]
        used.append(word)
    return command, used


def doc_problems(text: str, name: str, root: Path = ROOT) -> list[str]:
    """Every option, script or recipe in ``text`` that does not exist, as ``name:line: what``."""
    problems = []
    for lineno, line in enumerate(text.splitlines(), 1):
        where = f"{name}:{lineno}"
        for match in MM15_COMMAND.finditer(line):
            command, used = _subcommand(match.group(1).split())
            if not used:  # prose such as "mm15 is ..."
                continue
            known = {opt for param in command.params for opt in (*param.opts, *param.secondary_opts)}
            for option in OPTION.findall(match.group(1) + " " + match.group(2)):
                if option not in known:
                    problems.append(f"{where}: mm15 {' '.join(used)} has no {option}")
        for match in SCRIPT_COMMAND.finditer(line):
            script = root / match.group(1)
            if not script.is_file():
                problems.append(f"{where}: no {match.group(1)}")
                continue
            source = script.read_text(encoding="utf-8")
            for option in OPTION.findall(match.group(2)):
                if option != "--help" and f'"{option}"' not in source:
                    problems.append(f"{where}: {match.group(1)} has no {option}")
        for recipe in RECIPE.findall(line):
            if not (root / recipe).is_file():
                problems.append(f"{where}: no {recipe}")
    return problems


@pytest.mark.parametrize("doc", DOCS, ids=lambda path: path.name)
def test_the_docs_name_only_what_exists(doc: Path) -> None:
    assert doc_problems(doc.read_text(encoding="utf-8"), doc.name) == []


def test_the_check_finds_what_does_not_exist() -> None:
    text = "\n".join(
        [
            "Run `mm15 train recipes/tiny.yaml --resume --bogus` then",
            "`mm15 data pack a.json --out d --images i --format llava --sideways`;",
            "mm15 is a package, and `mm15 plan x.png --json` works; mm15 train's runs take --model-name.",
            "```bash",
            ".venv/bin/python benchmarks/preprocess.py --rounds 5 --turbo",
            "python benchmarks/nope.py",
            "mm15 train recipes/absent.yaml",
            "```",
        ]
    )
    assert doc_problems(text, "x.md") == [
        "x.md:1: mm15 train has no --bogus",
        "x.md:2: mm15 data pack has no --sideways",
        "x.md:5: benchmarks/preprocess.py has no --turbo",
        "x.md:6: no benchmarks/nope.py",
        "x.md:7: no recipes/absent.yaml",
    ]
