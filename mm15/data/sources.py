"""Readers and writers that turn data on disk into ``Sample`` objects (``mm15.data.sample``).

Four formats:

* **LLaVA JSON / JSONL** (``LlavaReader``, ``write_llava``). A ``.json`` file is one array of records, any
  other suffix (``.jsonl``) is one record per line (blank lines are not records; a leading UTF-8 BOM
  is skipped, as ``json.loads`` skips one in a ``.json`` file). A record is::

      {"id": "x1", "image": "rel/a.jpg" | ["a.jpg", "b.jpg"],
       "conversations": [{"from": "human" | "gpt" | "system", "value": "<image>\\nWhat is <region0>?"}, ...]}

  Roles map human -> user, gpt -> assistant (``user``, ``assistant`` and ``system`` are accepted as they
  are). Image paths are relative to ``image_root`` (default: the file's folder); ``"images"`` is accepted
  as a synonym of ``"image"``; a record with neither has no images. Extension fields, all optional:
  ``"category"`` (one of ``CATEGORIES``; default: the reader's ``category``), ``"source"`` (default: the
  reader's ``source``, else the file's stem), ``"is_video"`` (bool), ``"truth"`` (object) and
  ``"regions"``::

      "regions": [{"image": 0, "box": [x1, y1, x2, y2]}, {"image": 1, "point": [x, y]}]

  in pixels of the original image, referenced from the text as ``<region0>``, ``<region1>``, ... in
  list order. Coordinates must be finite and >= 0 and boxes need x1 <= x2 and y1 <= y2 (the image size is
  unknown here; when the text is rendered, coordinates past the image's edge are clamped to it, and
  ``check_images=True`` refuses them instead, from the image's header, as well as a region whose
  coordinates all lie in [0, 1] with at least one not a whole number on an image more than 4 pixels
  wide and high: normalised coordinates, not pixels). Text is kept verbatim: the ``<image>``
  placeholders must already be in it, one per image.

  A field whose value is ``null`` counts as absent, in a record and in a region (columnar exports write
  every field of their schema, null where a record has none): an optional field then takes its default
  and a required one is missing.

* **WebDataset tar shards** (``write_shards``, ``ShardReader``). Shard ``{prefix}-{i:06d}.tar`` holds, per
  sample, a contiguous group of members sharing a key (WebDataset's convention: the key is the member
  name up to the first dot of its basename)::

      000000042.json     {"id", "turns": [{"role", "content"}], "category", "source", "is_video",
                          "truth", "regions": [as above], "images": ["000000042.0.png", ...]}
      000000042.0.png    the image's bytes
      000000042.1.jpg

  Images given as a path or bytes are stored with their original encoded bytes (the extension is
  sniffed from the bytes: png, jpg, gif, webp, bmp, tif, else bin); PIL images are encoded as PNG (a mode
  PNG cannot store is first converted with ``mm15.image.to_rgb``, the conversion ``load_image`` applies
  anyway, so the model sees the same pixels). ``truth`` goes through JSON, so tuples come back as lists.
  The reader streams (tar mode ``"r|"``) and holds one sample's members at a time; images come back as
  bytes, decoded later by ``load_image`` (a corrupt image is the loader's concern, not the reader's).

* **Interleaved documents** (``InterleavedReader``), OBELICS-like JSONL: ``{"texts": [str | null, ...],
  "images": [path | null, ...]}``, aligned lists with exactly one non-null entry per position. Each
  document becomes ``Sample(category="interleaved")`` with one assistant turn: the texts and an
  ``<image>`` per image in reading order, joined by ``separator`` (a newline by default).

* **Text-only data** (``TextReader``): JSONL with ``{"messages": [{"role", "content"}, ...]}``,
  ``{"prompt", "response"}`` (optional ``"system"``) or ``{"text"}`` (one assistant turn, for
  pre-training text). The category is the reader's ``category`` (``"text-only"`` for SFT, ``"text"``
  for pre-training) unless the record names one.

Error and skip policy. Every reader takes ``strict``. A malformed record raises ``SourceError`` (naming
the file, the line / record / member and the record's id, and carrying a ``reason`` key) when ``strict``
is true, and otherwise is skipped and counted in the reader's ``skipped`` (a ``SkipCounter``, reset at the
start of each pass; in a DataLoader worker the counter lives in that worker's process). Reason keys:

* ``bad_json``: a JSONL line or shard ``.json`` member that is not JSON;
* ``bad_record``: not an object, or a field of the wrong type / missing / inconsistent (including a
  parsed sample that fails ``Sample.validate``, a last check no reader's own checks should leave to);
* ``bad_conversations``: conversations (or messages) not a non-empty list of ``{from, value}`` strings,
  or without an assistant turn;
* ``unknown_role``: a role that is not one of the accepted ones;
* ``image_count``: ``<image>`` placeholders do not match the number of images;
* ``missing_image``: an image file does not exist;
* ``bad_image``: with ``check_images=True``, an image file whose header does not read as an image of at
  most ``mm15.image.DEFAULT_MAX_PIXELS`` pixels (``mm15.image.image_size``: not an image, a corrupt
  header, no pixels, too large). Without the check such a file is found when training decodes it, and
  counted there as ``corrupt``;
* ``bad_region``: a region that is not a valid box / point, names a missing image, or a ``<region{k}>``
  reference with no region k; with ``check_images=True`` (LLaVA records) also a region beyond its
  image's width or height, or in normalised (0-1) coordinates;
* ``bad_category``: a category not in ``CATEGORIES``;
* ``bad_member``: a shard sample group without its ``.json``, missing an image it lists, or with members
  it does not list;
* ``bad_shard``: a truncated or corrupt tar stream, including one that stops without tar's end-of-archive
  block (tarfile itself would end such a stream quietly, losing whatever was cut off), and one with
  anything but zero bytes after that block: a zero-filled block inside a shard (what a crash or an
  interrupted preallocated download leaves) reads to tarfile as the end of the archive, and a second
  archive appended to the first would be skipped the same way. The rest of that shard cannot be read
  (a stream has no index to resume from), so the sample being read and any after the damage are lost,
  and counted as this one skip; samples before it were already yielded.

Problems with a whole input always raise, in either mode, because they are configuration mistakes rather
than bad records: a missing file, a ``.json`` file that is not JSON or not an array, no shards found.
"""

from __future__ import annotations

import abc
import codecs
import contextlib
import glob
import io
import json
import math
import os
import random
import re
import tarfile
import warnings
from collections import Counter
from collections.abc import Iterable, Iterator, Sequence
from pathlib import Path
from typing import Any

from PIL import ExifTags, Image, ImageOps
from torch.utils.data import IterableDataset, get_worker_info

from mm15.data.sample import CATEGORIES, IMAGE_PLACEHOLDER, REGION_PATTERN, ImageRef, Region, Sample, Turn
from mm15.image import ImageError, image_size, to_rgb
from mm15.paths import NO_SUCH_FILE, check_output_dir, not_a_file_reason

PathLike = str | os.PathLike
Paths = PathLike | Sequence[PathLike]

REASONS: tuple[str, ...] = (
    "bad_json",
    "bad_record",
    "bad_conversations",
    "unknown_role",
    "image_count",
    "missing_image",
    "bad_image",
    "bad_region",
    "bad_category",
    "bad_member",
    "bad_shard",
)

# LLaVA's speaker names and the schema's own role names, both accepted on input.
LLAVA_ROLES: dict[str, str] = {
    "human": "user",
    "gpt": "assistant",
    "system": "system",
    "user": "user",
    "assistant": "assistant",
}
_TO_LLAVA = {"user": "human", "assistant": "gpt", "system": "system"}

# Signatures of the image formats we name shards' members after; anything else is stored as ".bin"
# (the bytes are kept; load_image sniffs the content, not the extension).
_MAGIC: tuple[tuple[bytes, str], ...] = (
    (b"\x89PNG\r\n\x1a\n", "png"),
    (b"\xff\xd8\xff", "jpg"),
    (b"GIF87a", "gif"),
    (b"GIF89a", "gif"),
    (b"BM", "bmp"),
    (b"II*\x00", "tif"),
    (b"MM\x00*", "tif"),
)


class SourceError(ValueError):
    """A malformed record (strict mode) or unusable input; ``reason`` is one of ``REASONS``."""

    def __init__(
        self, path: PathLike, location: str, reason: str, detail: str, record_id: str | None = None
    ) -> None:
        where = f"{os.fspath(path)}: {location}"
        if record_id is not None:
            where += f" (id {record_id!r})"
        super().__init__(f"{where}: {reason}: {detail}")
        self.path = Path(path)
        self.location = location
        self.reason = reason
        self.detail = detail
        self.record_id = record_id

    def __reduce__(self) -> tuple[Any, ...]:
        # Rebuilt from its fields (and notes), so it crosses processes (the data worker) as itself.
        return type(self), (self.path, self.location, self.reason, self.detail, self.record_id), self.__dict__


class SkipCounter:
    """Counts of skipped records per reason, plus the first few messages of each for diagnosis."""

    max_examples = 5

    def __init__(self) -> None:
        self.counts: Counter[str] = Counter()
        self.examples: dict[str, list[str]] = {}

    def add(self, error: SourceError) -> None:
        self.counts[error.reason] += 1
        examples = self.examples.setdefault(error.reason, [])
        if len(examples) < self.max_examples:
            examples.append(str(error))

    def clear(self) -> None:
        self.counts.clear()
        self.examples.clear()

    def __getitem__(self, reason: str) -> int:
        return self.counts[reason]

    @property
    def total(self) -> int:
        return sum(self.counts.values())

    def as_dict(self) -> dict[str, int]:
        return dict(self.counts)

    def __repr__(self) -> str:
        return f"SkipCounter({dict(self.counts)})"


class _Malformed(Exception):
    """Raised inside parsers; the reader turns it into a SourceError or a counted skip."""

    def __init__(self, reason: str, detail: str) -> None:
        super().__init__(detail)
        self.reason = reason
        self.detail = detail


# ---------------------------------------------------------------------------------------------------------
# Field checks shared by the readers


def _as_paths(paths: Paths) -> list[Path]:
    if isinstance(paths, str | os.PathLike):
        return [Path(paths)]
    return [Path(p) for p in paths]


def _without_nulls(record: dict[str, Any]) -> dict[str, Any]:
    """``record`` without its null-valued keys: a ``null`` field is an absent one.

    Columnar exports (Parquet / Arrow written out as JSON) write every field of their schema and null
    where a record has none; read as a value, that null would be refused as the wrong type (or clash
    with a synonym, as ``"image"`` and ``"images": null`` did). Only the top level is affected: nulls
    inside a value (an interleaved document's ``texts``, a ``truth`` object) keep their meaning.
    """
    if any(value is None for value in record.values()):
        return {key: value for key, value in record.items() if value is not None}
    return record


def _is_number(value: Any) -> bool:
    # JSON true/false parse as bool, which Python counts as int; a coordinate is never a bool.
    return isinstance(value, int | float) and not isinstance(value, bool)


def _coords(value: Any, n: int, what: str) -> tuple[float, ...]:
    if not isinstance(value, list | tuple) or len(value) != n or not all(_is_number(v) for v in value):
        raise _Malformed("bad_region", f"{what} must be a list of {n} numbers, got {value!r}")
    coords = tuple(float(v) for v in value)
    if not all(math.isfinite(v) for v in coords):
        raise _Malformed("bad_region", f"{what} has a non-finite coordinate: {value!r}")
    if min(coords) < 0:
        raise _Malformed("bad_region", f"{what} has a negative coordinate: {value!r}")
    return coords


def _parse_region(value: Any, index: int, num_images: int) -> Region:
    what = f"region {index}"
    if not isinstance(value, dict):
        raise _Malformed("bad_region", f"{what} must be an object, got {value!r}")
    value = _without_nulls(value)
    image = value.get("image", 0)
    if not isinstance(image, int) or isinstance(image, bool) or not 0 <= image < num_images:
        raise _Malformed("bad_region", f"{what} names image {image!r} but the sample has {num_images}")
    has_box, has_point = "box" in value, "point" in value
    if has_box == has_point:
        raise _Malformed("bad_region", f"{what} needs exactly one of 'box' and 'point'")
    if has_box:
        x1, y1, x2, y2 = _coords(value["box"], 4, f"{what} box")
        if x1 > x2 or y1 > y2:
            raise _Malformed(
                "bad_region", f"{what} box has negative size (x1 > x2 or y1 > y2): {value['box']}"
            )
        return Region(image=image, box=(x1, y1, x2, y2))
    x, y = _coords(value["point"], 2, f"{what} point")
    return Region(image=image, point=(x, y))


def _parse_regions(value: Any, num_images: int) -> list[Region]:
    if value is None:
        return []
    if not isinstance(value, list):
        raise _Malformed("bad_region", f"'regions' must be a list, got {type(value).__name__}")
    return [_parse_region(v, i, num_images) for i, v in enumerate(value)]


def _check_text(turns: list[Turn], num_images: int, num_regions: int) -> None:
    placeholders = sum(turn.content.count(IMAGE_PLACEHOLDER) for turn in turns)
    if placeholders != num_images:
        raise _Malformed(
            "image_count", f"{placeholders} {IMAGE_PLACEHOLDER} placeholders but {num_images} images"
        )
    for turn in turns:
        for ref in REGION_PATTERN.findall(turn.content):
            if int(ref) >= num_regions:
                raise _Malformed(
                    "bad_region", f"text refers to <region{ref}> but there are {num_regions} regions"
                )


def _record_id(record: Any, default: str) -> str:
    if not isinstance(record, dict) or record.get("id") is None:
        return default
    value = record["id"]
    if isinstance(value, bool) or not isinstance(value, str | int):
        raise _Malformed("bad_record", f"'id' must be a string or integer, got {value!r}")
    return str(value)  # LLaVA data sets often use integer ids; the schema's id is a string


def _category(record: dict[str, Any], default: str) -> str:
    category = record.get("category", default)
    if category not in CATEGORIES:
        raise _Malformed("bad_category", f"unknown category {category!r} (one of {CATEGORIES})")
    return category


def _string_field(record: dict[str, Any], key: str, default: str) -> str:
    value = record.get(key, default)
    if not isinstance(value, str):
        raise _Malformed("bad_record", f"{key!r} must be a string, got {value!r}")
    return value


def _extras(record: dict[str, Any]) -> tuple[bool, dict[str, Any]]:
    is_video = record.get("is_video", False)
    if not isinstance(is_video, bool):
        raise _Malformed("bad_record", f"'is_video' must be a boolean, got {is_video!r}")
    truth = record.get("truth", {})
    if not isinstance(truth, dict):
        raise _Malformed("bad_record", f"'truth' must be an object, got {type(truth).__name__}")
    return is_video, truth


def _role(name: Any) -> str:
    if not isinstance(name, str) or name not in LLAVA_ROLES:
        raise _Malformed("unknown_role", f"unknown role {name!r} (one of {sorted(LLAVA_ROLES)})")
    return LLAVA_ROLES[name]


def _conversation_turns(record: dict[str, Any], key: str, role_key: str, text_key: str) -> list[Turn]:
    """``record[key]`` as turns: a non-empty list of ``{role_key: role, text_key: text}`` objects.

    LLaVA writes ``conversations`` of ``{from, value}``, chat data ``messages`` of ``{role, content}``.
    """
    messages = record.get(key)
    if not isinstance(messages, list) or not messages:
        raise _Malformed("bad_conversations", f"'{key}' must be a non-empty list")
    turns = []
    for j, message in enumerate(messages):
        if not isinstance(message, dict) or not isinstance(message.get(text_key), str):
            raise _Malformed(
                "bad_conversations", f"{key} item {j} must be an object with a string '{text_key}'"
            )
        turns.append(Turn(_role(message.get(role_key)), message[text_key]))  # type: ignore[arg-type]
    # Only assistant turns are supervised: without one the record teaches nothing, and a step of
    # such records would have no loss at all.
    if not any(turn.role == "assistant" for turn in turns):
        raise _Malformed("bad_conversations", f"'{key}' has no assistant turn (nothing to learn from)")
    return turns


def _resolve_image(value: Any, root: Path) -> Path:
    if not isinstance(value, str) or not value:
        raise _Malformed("bad_record", f"an image entry must be a non-empty path string, got {value!r}")
    path = root / value
    if (problem := not_a_file_reason(path)) is not None:
        raise _Malformed("missing_image", f"image {value!r} under {root}: {problem}")
    return path


def _checked_size(path: Path) -> tuple[int, int]:
    """(width, height) from the image's header (``check_images``), or a ``bad_image`` record."""
    try:
        return image_size(path)
    except ImageError as err:
        raise _Malformed("bad_image", str(err)) from None


# Above this many pixels on each side, a region with every coordinate in [0, 1] (one of them fractional)
# is taken to be normalised: in pixels it would be within one pixel of the image's top-left corner.
NORMALISED_MIN_SIDE = 4


def _check_regions_inside(regions: list[Region], sizes: list[tuple[int, int]]) -> None:
    # Coordinates are pixels of the original image, so one past its size is the most a box edge can be.
    # Beyond that the annotation uses another frame (0-1000 units, a resized copy), which the text format
    # would silently clamp to the image's edge. 0-1 floats stay inside any image, so they are told by
    # their values instead (module docstring). 0-1000 units on an image of 1000 pixels or more cannot be
    # told from pixels at all.
    for index, region in enumerate(regions):
        width, height = sizes[region.image]
        coords: tuple[float, ...] = region.box if region.box is not None else region.point  # type: ignore[assignment]
        kind = "box" if region.box is not None else "point"
        where = f"region {index} {kind} {list(coords)}"
        normalised = max(coords) <= 1 and not all(v.is_integer() for v in coords)
        if normalised and width > NORMALISED_MIN_SIDE and height > NORMALISED_MIN_SIDE:
            raise _Malformed(
                "bad_region",
                f"{where} on image {region.image} ({width}x{height} pixels): normalised coordinates? "
                "regions are in pixels of the original image",
            )
        if max(coords[0::2]) > width or max(coords[1::2]) > height:
            raise _Malformed(
                "bad_region", f"{where} lies outside its image {region.image} ({width}x{height} pixels)"
            )


_JSON_CHUNK = 1 << 20  # bytes read at a time from a .json array
_JSON_SPACE = re.compile(r"[ \t\n\r]*")
_JSON_NUMBER_TAIL = re.compile(r"[0-9eE.+\-]*")
_JSON_KINDS = {"{": "an object", '"': "a string", "t": "a boolean", "f": "a boolean", "n": "null"}


def _json_array(path: Path) -> Iterator[Any]:
    """The elements of the JSON array in ``path``, parsed one at a time.

    A LLaVA ``.json`` file can hold a million records (LLaVA-1.5's mixture is about 1 GB), and
    ``json.loads`` of the whole file would hold it all as Python objects (several times its size); this
    holds one chunk of text and one record. It accepts exactly what ``json.loads`` accepts for an array
    (a leading UTF-8 BOM too) and raises ``SourceError`` on the first syntax error, naming the record and
    character offset; the records before it have been yielded by then, which is what a strict reader
    does with a bad record anyway.
    """
    decoder = json.JSONDecoder()
    index: int | None = None  # the record being read, once inside the array

    def fail(reason: str, detail: str) -> SourceError:
        # Before the array opens the file is unusable; inside it, one record is broken.
        if index is None:
            return SourceError(
                path, "file", reason, f"not a JSON file ({detail})" if reason == "bad_json" else detail
            )
        return SourceError(path, f"record {index}", reason, f"invalid JSON ({detail})")

    with path.open("rb") as f:
        text, pos, dropped, eof = "", 0, 0, False
        pending = b""  # bytes of a character the last read cut in two
        first_read = True
        invalid: str | None = None  # invalid UTF-8 after the text held: raised when the parser gets there

        def more(size: int = _JSON_CHUNK) -> bool:
            """Append about ``size`` more bytes' worth of text; False at the end of the file.

            Bytes are decoded here, not by a text-mode file, so that invalid UTF-8 costs only what
            follows it: the text before it is parsed (its records are yielded) and the error is
            raised for the record it falls in.
            """
            nonlocal text, pos, dropped, eof, pending, first_read, invalid
            if invalid is not None:
                raise fail("bad_json", invalid)
            if eof:
                return False
            read = f.read(max(size, _JSON_CHUNK))
            data = pending + read
            if first_read and data.startswith(codecs.BOM_UTF8):  # json.loads accepts a BOM: so do we
                data = data[len(codecs.BOM_UTF8) :]
            first_read = False
            if not data:
                eof = True
                return False
            try:
                chunk, pending = data.decode("utf-8"), b""
            except UnicodeDecodeError as err:
                chunk = data[: err.start].decode("utf-8")
                # A character the read cut in two (not the file's end): the next read completes it.
                cut = read and err.end == len(data) and err.reason == "unexpected end of data"
                if cut:
                    pending = data[err.start :]
                else:
                    where = dropped + len(text) + len(chunk)
                    invalid = f"not UTF-8 at character {where} (byte {data[err.start]:#04x})"
            dropped += pos
            text, pos = text[pos:] + chunk, 0
            return True

        def peek() -> str:
            """The next non-space character ('' at the end of the file), not consumed."""
            nonlocal pos
            while True:
                pos = _JSON_SPACE.match(text, pos).end()  # type: ignore[union-attr]
                if pos < len(text) or not more():
                    return text[pos : pos + 1]

        def syntax(expected: str) -> SourceError:
            found = repr(text[pos : pos + 20]) if pos < len(text) else "the end of the file"
            return fail(
                "bad_json",
                f"expected {expected} at character {dropped + pos}, found {found}",
            )

        first = peek()
        if first != "[":
            if first == "":
                raise syntax("a JSON array")
            kind = _JSON_KINDS.get(first, "a number" if first in "-0123456789" else None)
            if kind is None:
                raise syntax("a JSON array")
            raise fail("bad_record", f"expected a JSON array, got {kind}")
        pos, index = pos + 1, 0
        if peek() == "]":
            pos += 1
        else:
            while True:
                peek()
                while True:
                    try:
                        record, end = decoder.raw_decode(text, pos)
                    except json.JSONDecodeError as err:
                        # Incomplete or wrong: only the end of the file tells. Reading as much again
                        # as is held keeps a record larger than a chunk linear to parse.
                        if more(len(text) - pos):
                            continue
                        raise fail("bad_json", f"{err.msg} at character {dropped + err.pos}") from None
                    except (ValueError, RecursionError) as err:
                        # Nesting past the parser's depth, or an integer past Python's digit limit:
                        # the text read so far already shows it, so more of the file cannot help.
                        raise fail(
                            "bad_json", f"the record at character {dropped + pos}: {_json_limit(err)}"
                        ) from None
                    # A number cut by the chunk's end parses as a shorter one ("0." as 0, "1e" as 1):
                    # while nothing but number characters follows the value, it may go on.
                    if _JSON_NUMBER_TAIL.fullmatch(text, end) and more():
                        continue
                    break
                pos = end
                yield record
                index += 1
                separator = peek()
                pos += 1
                if separator == "]":
                    break
                if separator != ",":
                    pos -= 1
                    raise syntax("',' or ']' after the record")
        if peek() != "":
            raise syntax("the end of the file after the array")


def _json_limit(err: ValueError | RecursionError) -> str:
    """What a JSON text that is well-formed but past one of Python's limits ran into, for a message.

    ``json`` raises ``RecursionError`` for arrays or objects nested too deep to parse, and ``ValueError``
    for an integer of more digits than ``sys.get_int_max_str_digits()``; neither is a JSONDecodeError.
    """
    if isinstance(err, RecursionError):
        return "nested too deeply to parse"
    return str(err).split(";")[0]  # drop the advice to raise the limit: the data is what is wrong


def _records(path: Path) -> Iterator[tuple[int, str, Any]]:
    """(record index, location, record) of a JSON array file or a JSONL file.

    A JSONL line that is not JSON yields a ``_Malformed`` as its record, so the caller can count it and
    go on. In a ``.json`` array a syntax error yields one ``_Malformed`` and ends the file (the records
    before it are yielded); a ``.json`` file that is not an array at all is one unusable input and raises.
    """
    if (problem := not_a_file_reason(path)) is not None:
        raise FileNotFoundError(f"{path}: {problem}")
    if path.suffix.lower() == ".json":
        count = 0
        try:
            for record in _json_array(path):
                yield count, f"record {count}", record
                count += 1
        except SourceError as err:
            if err.location == "file":  # not an array at all: one unusable input
                raise
            # Damage inside the array (a cut download, an edit gone wrong): the records before it are
            # read; nothing after it can be trusted to start a record, so the rest is one bad record,
            # raised by a strict reader and counted by a lenient one.
            detail = f"{err.detail}; the rest of the file is not read"
            yield count, err.location, _Malformed(err.reason, detail)
        return
    index = 0
    with path.open("rb") as f:  # bytes, so one bad line is one bad record rather than a failed file
        for lineno, line in enumerate(f, 1):
            if lineno == 1 and line.startswith(codecs.BOM_UTF8):  # as json.loads accepts it on one line
                line = line[len(codecs.BOM_UTF8) :]
            if not line.strip():
                continue
            try:
                record: Any = json.loads(line)
            except (UnicodeDecodeError, json.JSONDecodeError) as err:
                record = _Malformed("bad_json", f"not JSON ({err})")
            except (ValueError, RecursionError) as err:  # valid JSON that Python will not parse
                record = _Malformed("bad_json", f"not readable JSON ({_json_limit(err)})")
            yield index, f"line {lineno}", record
            index += 1


def _check_unicode(value: Any, where: str) -> None:
    """Refuse a string that is not valid Unicode anywhere in a record.

    JSON's escapes can write half of a surrogate pair (``"\\ud83d"``: an emoji cut in two by a
    scraper); ``json.loads`` accepts it, but it cannot be encoded, so the shard writer and the
    tokenizer would fail on the record long after it was read.
    """
    if isinstance(value, str):
        try:
            value.encode("utf-8")
        except UnicodeEncodeError as err:
            raise _Malformed(
                "bad_record", f"{where} is not valid Unicode (a lone surrogate at character {err.start})"
            ) from None
    elif isinstance(value, dict):
        for key, item in value.items():
            _check_unicode(key, f"a key of {where}")
            _check_unicode(item, f"{where}[{key!r}]")
    elif isinstance(value, list):
        for position, item in enumerate(value):
            _check_unicode(item, f"{where}[{position}]")


def _validated(sample: Sample) -> Sample:
    """``sample``, or a ``bad_record`` if it fails ``Sample.validate``.

    Every reader passes its samples through here: its own checks should already refuse whatever
    ``validate`` would (with a more precise reason), and this makes sure none yields a sample that
    training would only find to be broken when it encodes it.
    """
    try:
        sample.validate()
    except ValueError as err:
        raise _Malformed("bad_record", f"inconsistent sample ({err})") from None
    return sample


class _JsonReader(abc.ABC):
    """Shared loop of the JSON / JSONL readers: parse each record, then raise or count what is wrong."""

    def __init__(self, paths: Paths, *, source: str | None, strict: bool) -> None:
        self.paths = _as_paths(paths)
        if not self.paths:
            raise ValueError("no input files given")
        for path in self.paths:
            # The reason, not just "no such file": a folder given where a file goes exists.
            if (problem := not_a_file_reason(path)) is not None:
                raise FileNotFoundError(f"{path}: {problem}")
        self.source = source
        self.strict = strict
        self.skipped = SkipCounter()

    @abc.abstractmethod
    def _parse(self, record: dict[str, Any], path: Path, sample_id: str) -> Sample:
        """One record -> a Sample, or raise _Malformed naming the reason."""

    def __iter__(self) -> Iterator[Sample]:
        self.skipped.clear()
        for path in self.paths:
            for index, location, record in _records(path):
                sample_id: str | None = None
                try:
                    if isinstance(record, _Malformed):
                        raise record
                    if not isinstance(record, dict):
                        raise _Malformed("bad_record", f"expected a JSON object, got {type(record).__name__}")
                    record = _without_nulls(record)
                    sample_id = _record_id(record, f"{path.stem}-{index}")
                    _check_unicode(record, "the record")
                    sample = _validated(self._parse(record, path, sample_id))
                except _Malformed as bad:
                    # Name the record by its own id only: a made-up one would not be found in the file.
                    own_id = sample_id if isinstance(record, dict) and "id" in record else None
                    error = SourceError(path, location, bad.reason, bad.detail, own_id)
                    if self.strict:
                        raise error from None
                    self.skipped.add(error)
                    continue
                yield sample


class LlavaReader(_JsonReader):
    """LLaVA-style JSON / JSONL records -> Samples; images stay paths (see the module docstring)."""

    def __init__(
        self,
        paths: Paths,
        image_root: PathLike | None = None,
        *,
        category: str = "general",
        source: str | None = None,
        strict: bool = True,
        check_images: bool = False,
    ) -> None:
        super().__init__(paths, source=source, strict=strict)
        self.check_images = check_images
        if category not in CATEGORIES:
            raise ValueError(f"unknown category {category!r} (one of {CATEGORIES})")
        self.image_root = Path(image_root) if image_root is not None else None
        self.category = category

    def _parse(self, record: dict[str, Any], path: Path, sample_id: str) -> Sample:
        turns = _conversation_turns(record, "conversations", "from", "value")
        if "image" in record and "images" in record:
            raise _Malformed("bad_record", "both 'image' and 'images' given")
        refs = record.get("image", record.get("images"))
        if refs is None:
            refs = []
        elif isinstance(refs, str):
            refs = [refs]
        elif not isinstance(refs, list):
            raise _Malformed("bad_record", f"'image' must be a path or a list of paths, got {refs!r}")
        root = self.image_root if self.image_root is not None else path.parent
        # Count placeholders before touching the file system: a mismatch is the cheaper, clearer error.
        regions = _parse_regions(record.get("regions"), len(refs))
        _check_text(turns, len(refs), len(regions))
        paths = [_resolve_image(ref, root) for ref in refs]
        if self.check_images:
            _check_regions_inside(regions, [_checked_size(path) for path in paths])
        images: list[ImageRef] = list(paths)
        is_video, truth = _extras(record)
        return Sample(
            id=sample_id,
            turns=turns,
            category=_category(record, self.category),
            source=_string_field(record, "source", self.source or path.stem),
            images=images,
            regions=regions,
            is_video=is_video,
            truth=truth,
        )


class InterleavedReader(_JsonReader):
    """OBELICS-like interleaved documents -> ``Sample(category="interleaved")`` (module docstring)."""

    def __init__(
        self,
        paths: Paths,
        image_root: PathLike | None = None,
        *,
        separator: str = "\n",
        source: str | None = None,
        strict: bool = True,
        check_images: bool = False,
    ) -> None:
        super().__init__(paths, source=source, strict=strict)
        self.check_images = check_images
        self.image_root = Path(image_root) if image_root is not None else None
        self.separator = separator

    def _parse(self, record: dict[str, Any], path: Path, sample_id: str) -> Sample:
        texts, refs = record.get("texts"), record.get("images")
        if not isinstance(texts, list) or not isinstance(refs, list):
            raise _Malformed("bad_record", "'texts' and 'images' must both be lists")
        if len(texts) != len(refs):
            raise _Malformed("bad_record", f"'texts' has {len(texts)} entries but 'images' has {len(refs)}")
        if not texts:
            raise _Malformed("bad_record", "empty document")
        root = self.image_root if self.image_root is not None else path.parent
        pieces: list[str] = []
        images: list[ImageRef] = []
        for position, (text, ref) in enumerate(zip(texts, refs, strict=True)):
            if (text is None) == (ref is None):
                raise _Malformed(
                    "bad_record", f"position {position} needs exactly one of a text and an image"
                )
            if text is not None:
                if not isinstance(text, str):
                    raise _Malformed("bad_record", f"text at position {position} is not a string: {text!r}")
                pieces.append(text)
            else:
                image = _resolve_image(ref, root)
                if self.check_images:
                    _checked_size(image)
                images.append(image)
                pieces.append(IMAGE_PLACEHOLDER)
        turns = [Turn("assistant", self.separator.join(pieces))]
        _check_text(turns, len(images), 0)  # a literal "<image>" inside a text would desync the images
        _, truth = _extras(record)
        return Sample(
            id=sample_id,
            turns=turns,
            category="interleaved",
            source=_string_field(record, "source", self.source or path.stem),
            images=images,
            truth=truth,
        )


class TextReader(_JsonReader):
    """Text-only conversations or plain text -> image-free Samples (module docstring)."""

    def __init__(
        self,
        paths: Paths,
        *,
        category: str = "text-only",
        source: str | None = None,
        strict: bool = True,
    ) -> None:
        super().__init__(paths, source=source, strict=strict)
        if category not in CATEGORIES:
            raise ValueError(f"unknown category {category!r} (one of {CATEGORIES})")
        self.category = category

    def _parse(self, record: dict[str, Any], path: Path, sample_id: str) -> Sample:
        # One form per record: taking the first would silently drop the others' text (as the LLaVA
        # reader refuses both 'image' and 'images').
        forms = [
            form
            for form, keys in (
                ("'messages'", ("messages",)),
                ("'prompt'/'response'", ("prompt", "response")),
                ("'text'", ("text",)),
            )
            if any(key in record for key in keys)
        ]
        if len(forms) > 1:
            raise _Malformed("bad_record", f"more than one form given ({', '.join(forms)}): one per record")
        if "messages" in record:
            turns = _conversation_turns(record, "messages", "role", "content")
        elif "prompt" in record or "response" in record:
            prompt, response = record.get("prompt"), record.get("response")
            if not isinstance(prompt, str) or not isinstance(response, str):
                raise _Malformed("bad_record", "'prompt' and 'response' must both be strings")
            turns = [Turn("user", prompt), Turn("assistant", response)]
            if "system" in record:
                turns.insert(0, Turn("system", _string_field(record, "system", "")))
        elif "text" in record:
            turns = [Turn("assistant", _string_field(record, "text", ""))]
        else:
            raise _Malformed("bad_record", "expected 'messages', 'prompt' and 'response', or 'text'")
        _check_text(turns, 0, 0)
        _, truth = _extras(record)
        return Sample(
            id=sample_id,
            turns=turns,
            category=_category(record, self.category),
            source=_string_field(record, "source", self.source or path.stem),
            truth=truth,
        )


# ---------------------------------------------------------------------------------------------------------
# Writing: image bytes, atomic files


def _sniff(data: bytes) -> str | None:
    for magic, ext in _MAGIC:
        if data.startswith(magic):
            return ext
    if data[:4] == b"RIFF" and data[8:12] == b"WEBP":
        return "webp"
    return None


def _encode_image(ref: ImageRef, sample_id: str, index: int) -> tuple[bytes, str]:
    """(encoded bytes, extension) of one image: original bytes for paths and bytes, PNG for PIL images.

    A PIL image is written upright: PNG keeps no EXIF orientation, which ``load_image`` would apply.
    """
    if isinstance(ref, Image.Image):
        with contextlib.suppress(OSError, SyntaxError, ValueError, KeyError):  # damaged EXIF: as stored
            # Only when rotated: exif_transpose copies even an upright image, and synth writes many.
            if ref.getexif().get(ExifTags.Base.Orientation, 1) != 1:
                ref = ImageOps.exif_transpose(ref)
        buffer = io.BytesIO()
        try:
            ref.save(buffer, format="PNG")
        except (OSError, KeyError, ValueError):
            buffer = io.BytesIO()
            to_rgb(ref).save(buffer, format="PNG")
        return buffer.getvalue(), "png"
    if isinstance(ref, bytes):
        data = ref
    else:
        try:
            data = Path(ref).read_bytes()
        except OSError as err:
            raise ValueError(f"sample {sample_id}: cannot read image {index} ({err})") from None
    return data, _sniff(data) or "bin"


def _region_json(region: Region) -> dict[str, Any]:
    if region.box is not None:
        return {"image": region.image, "box": list(region.box)}
    assert region.point is not None
    return {"image": region.image, "point": list(region.point)}


def _check_for_writing(sample: Sample) -> None:
    sample.validate()
    try:  # the readers' region rules, so whatever is written can be read back
        for i, region in enumerate(sample.regions):
            _parse_region(_region_json(region), i, len(sample.images))
    except _Malformed as bad:
        raise ValueError(f"sample {sample.id}: {bad.detail}") from None


def _json_bytes(value: Any, sample_id: str) -> bytes:
    try:
        return json.dumps(value, ensure_ascii=False).encode("utf-8")
    except (TypeError, ValueError) as err:
        raise ValueError(f"sample {sample_id}: not JSON-serialisable ({err})") from None


def _fsync_dir(directory: Path) -> None:
    # Makes the rename itself durable; not every file system lets a directory be opened, which is fine.
    try:
        fd = os.open(directory, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


class _AtomicFile:
    """A file written under a hidden temporary name and renamed into place only when complete."""

    def __init__(self, final: Path) -> None:
        self.final = final
        self.temp = final.with_name(f".{final.name}.partial-{os.getpid()}")
        self.file = self.temp.open("wb")

    def commit(self, name: Path | None = None) -> Path:
        """Close and rename to ``final`` (or to ``name``, a staging name); the path it now has."""
        self.file.flush()
        os.fsync(self.file.fileno())
        self.file.close()
        target = name or self.final
        os.replace(self.temp, target)
        _fsync_dir(target.parent)
        return target

    def abort(self) -> None:
        self.file.close()
        self.temp.unlink(missing_ok=True)


class _ShardWriter:
    def __init__(self, final: Path) -> None:
        self.out = _AtomicFile(final)
        # Open across many add() calls and closed by commit() / abort(), so no with-block.
        self.tar = tarfile.open(fileobj=self.out.file, mode="w", format=tarfile.PAX_FORMAT)  # noqa: SIM115
        self.count = 0

    def _add(self, name: str, data: bytes) -> None:
        info = tarfile.TarInfo(name)
        info.size = len(data)
        info.mode = 0o644
        info.mtime = 0  # identical input gives identical shards
        self.tar.addfile(info, io.BytesIO(data))

    def add(self, key: str, sample: Sample) -> None:
        _check_for_writing(sample)
        encoded = [_encode_image(ref, sample.id, i) for i, ref in enumerate(sample.images)]
        names = [f"{key}.{i}.{ext}" for i, (_, ext) in enumerate(encoded)]
        meta = {
            "id": sample.id,
            "turns": [{"role": turn.role, "content": turn.content} for turn in sample.turns],
            "category": sample.category,
            "source": sample.source,
            "is_video": sample.is_video,
            "truth": sample.truth,
            "regions": [_region_json(region) for region in sample.regions],
            "images": names,
        }
        self._add(f"{key}.json", _json_bytes(meta, sample.id))  # first, so readers meet it first
        for name, (data, _) in zip(names, encoded, strict=True):
            self._add(name, data)
        self.count += 1

    def commit(self, name: Path | None = None) -> Path:
        self.tar.close()
        return self.out.commit(name)

    def abort(self) -> None:
        # The temp file is deleted next, so a failure to finish the tar does not matter.
        with contextlib.suppress(Exception):
            self.tar.close()
        self.out.abort()


def check_shard_folder(out: Path, prefix: str, overwrite: bool, what: str = "the shard folder") -> list[Path]:
    """Refuse a shard folder ``write_shards`` could not write: not a folder (``ValueError``, naming it
    as ``what``), or holding shards of an earlier run without ``overwrite`` (``FileExistsError``).
    Returns the earlier run's shards (there to be replaced). Nothing is created: a dry run checks its
    output folder with this."""
    check_output_dir(out, what)
    earlier = sorted(out.glob(f"{glob.escape(prefix)}-[0-9][0-9][0-9][0-9][0-9][0-9].tar"))
    if earlier and not overwrite:
        raise FileExistsError(
            f"{out} already holds {len(earlier)} shard(s) named {prefix}-NNNNNN.tar from an earlier run"
        )
    return earlier


def write_shards(
    samples: Iterable[Sample],
    out_dir: PathLike,
    samples_per_shard: int = 1000,
    prefix: str = "shard",
    overwrite: bool = False,
) -> list[Path]:
    """Write ``samples`` as WebDataset tar shards ``{prefix}-{i:06d}.tar`` in ``out_dir``; return their paths.

    All or nothing: each shard is written to a hidden temporary file and, when complete, staged under
    another hidden name (``.{name}.staged-{pid}``, which no ``*.tar`` glob matches); only once every
    shard is written are they all renamed to their real names. An exception mid-write deletes the
    staged shards, so ``out_dir`` holds no shard of this run (and no empty folder: one this call made
    is removed again): a partial set of shards would read as a complete data set, and would make a
    rerun stop at "already holds". A kill leaves only hidden files, which no reader takes for shards.
    Samples are validated first (``ValueError`` names a bad one).

    Shards of the same prefix already in ``out_dir`` (an earlier run's) raise ``FileExistsError``
    before anything is written: replacing some of them would lose data, and keeping the ones past this
    run's count would mix two runs in one folder. With ``overwrite=True`` the staged shards replace the
    earlier run's (its extra shards are deleted then), so a failure part-way leaves the earlier run
    whole. No samples at all raise ``ValueError`` and leave ``out_dir`` as it was (not created, earlier
    shards kept).
    """
    if samples_per_shard < 1:
        raise ValueError(f"samples_per_shard must be >= 1, got {samples_per_shard}")
    if not prefix or "/" in prefix or os.sep in prefix:
        raise ValueError(f"prefix must be a non-empty file name part, got {prefix!r}")
    out = Path(out_dir)
    earlier = check_shard_folder(out, prefix, overwrite)
    written: list[Path] = []  # the shards' real names
    staged: list[Path] = []  # their hidden names until every one is written
    writer: _ShardWriter | None = None
    count = 0
    created = not out.exists()  # a folder this call makes and that stays empty is removed on failure

    def commit(shard: _ShardWriter) -> None:
        final = shard.out.final
        staged.append(shard.commit(final.with_name(f".{final.name}.staged-{os.getpid()}")))
        written.append(final)

    try:
        for sample in samples:
            if writer is None:
                out.mkdir(parents=True, exist_ok=True)  # only once there is something to write
                writer = _ShardWriter(out / f"{prefix}-{len(written):06d}.tar")
            writer.add(f"{count:09d}", sample)  # keys have no dots, as WebDataset grouping needs
            count += 1
            if writer.count == samples_per_shard:
                commit(writer)
                writer = None
        if writer is not None:
            commit(writer)
            writer = None
    except BaseException:
        for path in staged:
            path.unlink(missing_ok=True)
        if writer is not None:
            writer.abort()
            writer = None
        if created and out.is_dir() and not any(out.iterdir()):
            out.rmdir()
        raise
    finally:
        if writer is not None:
            writer.abort()
    if not written:
        # Nothing replaces the earlier run's shards, so they stay: an empty pass must not erase data.
        raise ValueError(
            f"no samples to write to {out}" + ("; its earlier shards are kept" if earlier else "")
        )
    # Every shard is written: now they take their names (replacing the earlier run's, if any).
    for path, final in zip(staged, written, strict=True):
        os.replace(path, final)
    _fsync_dir(out)
    for stale in set(earlier) - set(written):
        stale.unlink()
    return written


def write_llava(samples: Iterable[Sample], path: PathLike, image_root: PathLike | None = None) -> Path:
    """Write ``samples`` as a LLaVA JSON (``.json``) or JSONL (other suffixes) file, the reader's format.

    Images are written to ``image_root`` (default: the file's folder) as ``{stem}-{n:09d}.{i}.{ext}``
    with their original bytes (PIL images as PNG) and referenced by those relative names. The data file
    itself is written atomically; the extension fields carry category, source, regions, is_video, truth.
    """
    path = Path(path)
    root = Path(image_root) if image_root is not None else path.parent
    root.mkdir(parents=True, exist_ok=True)
    path.parent.mkdir(parents=True, exist_ok=True)
    as_array = path.suffix.lower() == ".json"
    out = _AtomicFile(path)
    try:
        if as_array:
            out.file.write(b"[\n")
        for n, sample in enumerate(samples):
            _check_for_writing(sample)
            names = []
            for i, ref in enumerate(sample.images):
                data, ext = _encode_image(ref, sample.id, i)
                name = f"{path.stem}-{n:09d}.{i}.{ext}"
                (root / name).write_bytes(data)
                names.append(name)
            record: dict[str, Any] = {
                "id": sample.id,
                "conversations": [{"from": _TO_LLAVA[t.role], "value": t.content} for t in sample.turns],
                "category": sample.category,
                "source": sample.source,
            }
            if names:
                record["image"] = names[0] if len(names) == 1 else names
            if sample.regions:
                record["regions"] = [_region_json(region) for region in sample.regions]
            if sample.is_video:
                record["is_video"] = True
            if sample.truth:
                record["truth"] = sample.truth
            line = _json_bytes(record, sample.id)
            if as_array:
                out.file.write((b",\n" if n else b"") + line)
            else:
                out.file.write(line + b"\n")
        if as_array:
            out.file.write(b"\n]\n")
    except BaseException:
        out.abort()
        raise
    return out.commit()


# ---------------------------------------------------------------------------------------------------------
# Reading shards


def _split_name(name: str) -> tuple[str, str]:
    """WebDataset's grouping: key = folder + basename up to its first dot, extension = the rest."""
    folder, _, base = name.rpartition("/")
    stem, _, ext = base.partition(".")
    return (f"{folder}/{stem}" if folder else stem), ext


_TAIL_CHUNK = 1 << 20  # bytes read at a time when checking what follows the end-of-archive block


def _check_end_marker(shard: Path, offset: int) -> None:
    """Raise ``tarfile.ReadError`` unless the last member is followed by zero bytes only, at least a block.

    tarfile ends a stream at a missing or cut header (a shard cut at a member boundary) and at the first
    zero block, wherever it is: a zero-filled block inside the shard (what a crash or an interrupted
    preallocated download leaves) or the end of one archive with a second appended. A real end is a
    zero block followed by nothing but zeros (a second block and the padding to tar's record size,
    10240 bytes by default), so everything from ``offset`` to the end of the file is read, a chunk at
    a time, and must be zero.
    """
    seen = 0
    with shard.open("rb") as f:
        f.seek(offset)
        while chunk := f.read(_TAIL_CHUNK):
            rest = chunk.lstrip(b"\0")
            if rest:
                at = offset + seen + len(chunk) - len(rest)
                raise tarfile.ReadError(
                    f"a zero block at byte {offset} ends the archive, but data follows at byte {at}: "
                    "a zero-filled block inside the shard (a crash or an interrupted download) or a "
                    "second archive appended to it; the members after it are lost"
                )
            seen += len(chunk)
    if seen < tarfile.BLOCKSIZE:
        raise tarfile.ReadError(f"no end-of-archive block at byte {offset}: the shard is truncated")


class ShardReader(IterableDataset):
    """Streams Samples (images as bytes) from WebDataset tar shards written by ``write_shards``.

    ``paths_or_dir`` is a folder (every ``*.tar`` in it, sorted by name), one shard or a list of shards.
    Shard ``i`` of the (optionally shuffled) list goes to global worker ``i % (world_size * num_workers)``,
    where global worker = ``rank * num_workers + worker``, so all (rank, worker) pairs together read every
    shard exactly once. ``worker`` / ``num_workers`` left as None are taken from the DataLoader worker this
    runs in (``torch.utils.data.get_worker_info``; worker 0 of 1 outside a DataLoader). Fixed values
    inside a DataLoader with several workers raise ``ValueError``, since every worker would then read
    the same shards.

    Fewer shards than global workers would leave some workers without data, which in distributed
    training means ranks that run out first and stall the others at the next collective. That raises a
    ``ValueError`` when iteration starts unless ``allow_idle_workers`` is true, in which case a
    ``RuntimeWarning`` is issued and idle workers yield nothing.

    ``shuffle_seed`` shuffles the shard order (the same permutation on every rank, changing with
    ``set_epoch``); samples within a shard keep their order, so mix further with a shuffle buffer.
    """

    def __init__(
        self,
        paths_or_dir: Paths,
        rank: int = 0,
        world_size: int = 1,
        worker: int | None = 0,
        num_workers: int | None = 1,
        shuffle_seed: int | None = None,
        *,
        strict: bool = True,
        allow_idle_workers: bool = False,
    ) -> None:
        super().__init__()
        # os.path.isdir, not Path.is_dir: it is False, not an OSError, for a name over the length limit.
        if isinstance(paths_or_dir, str | os.PathLike) and os.path.isdir(paths_or_dir):
            shards = sorted(Path(paths_or_dir).glob("*.tar"))
        else:
            shards = _as_paths(paths_or_dir)
        if not shards:
            raise ValueError(f"no shards found in {paths_or_dir}")
        for shard in shards:
            if (problem := not_a_file_reason(shard)) is not None:
                # A shard source names a folder or a shard; the message must not suggest only the latter.
                if problem == NO_SUCH_FILE:
                    what = "no such shard or shard folder"
                elif os.path.lexists(shard):  # a folder named *.tar, a dangling link, a FIFO
                    what = f"not a shard file ({problem})"
                else:  # the OS refused to look (a name over the length limit)
                    what = f"cannot be read as a shard or shard folder ({problem})"
                raise FileNotFoundError(f"{shard}: {what}")
        if world_size < 1 or not 0 <= rank < world_size:
            raise ValueError(f"need 0 <= rank < world_size, got rank={rank}, world_size={world_size}")
        if (worker is None) != (num_workers is None):
            raise ValueError(
                "give both worker and num_workers, or neither (to take them from the DataLoader)"
            )
        if num_workers is not None and (num_workers < 1 or worker is None or not 0 <= worker < num_workers):
            raise ValueError(
                f"need 0 <= worker < num_workers, got worker={worker}, num_workers={num_workers}"
            )
        self.shards = shards
        self.rank = rank
        self.world_size = world_size
        self.worker = worker
        self.num_workers = num_workers
        self.shuffle_seed = shuffle_seed
        self.strict = strict
        self.allow_idle_workers = allow_idle_workers
        self.epoch = 0
        self.skipped = SkipCounter()

    def set_epoch(self, epoch: int) -> None:
        """Use the shard order of ``epoch`` (only matters with ``shuffle_seed``)."""
        self.epoch = epoch

    def _worker(self) -> tuple[int, int]:
        info = get_worker_info()
        if self.worker is not None and self.num_workers is not None:
            if info is not None and info.num_workers > 1:
                # Every worker holds a copy of this object with the same fixed worker index, so each
                # would read the same shards: duplicated data that nothing downstream would notice.
                raise ValueError(
                    f"ShardReader(worker={self.worker}, num_workers={self.num_workers}) runs in a DataLoader "
                    f"with {info.num_workers} workers; pass worker=None, num_workers=None to split by them"
                )
            return self.worker, self.num_workers
        return (info.id, info.num_workers) if info is not None else (0, 1)

    def assigned_shards(self) -> list[Path]:
        """The shards this (rank, worker) reads this epoch, in reading order."""
        worker, num_workers = self._worker()
        total = self.world_size * num_workers
        if len(self.shards) < total:
            message = (
                f"{len(self.shards)} shards for {total} workers ({self.world_size} ranks x {num_workers} "
                f"DataLoader workers): {total - len(self.shards)} workers would get no data; write more, "
                "smaller shards or use fewer workers"
            )
            if not self.allow_idle_workers:
                raise ValueError(message)
            warnings.warn(message, RuntimeWarning, stacklevel=2)
        order = list(self.shards)
        if self.shuffle_seed is not None:
            # Seeded identically on every rank, so the partition below stays disjoint and complete.
            random.Random(f"{self.shuffle_seed}:{self.epoch}").shuffle(order)
        me = self.rank * num_workers + worker
        return [shard for i, shard in enumerate(order) if i % total == me]

    def _reject(self, error: SourceError) -> None:
        if self.strict:
            raise error
        self.skipped.add(error)

    def __iter__(self) -> Iterator[Sample]:
        self.skipped.clear()
        for shard in self.assigned_shards():
            yield from self._read_shard(shard)

    def _read_shard(self, shard: Path) -> Iterator[Sample]:
        key: str | None = None  # the group being collected, finished when the next key appears
        members: dict[str, bytes] = {}
        duplicates: list[str] = []
        last = "the start"
        damage: SourceError | None = None
        try:
            with tarfile.open(shard, mode="r|") as tar:
                for member in tar:
                    if not member.isfile():
                        continue  # folders and links carry no sample data
                    member_key, ext = _split_name(member.name)
                    if member_key != key:
                        if key is not None:
                            yield from self._finish(shard, key, members, duplicates)
                        key, members, duplicates = member_key, {}, []
                    data = tar.extractfile(member)
                    assert data is not None  # a regular file always has data
                    if ext in members:
                        duplicates.append(member.name)
                    members[ext] = data.read()
                    last = member.name
                # tarfile ends a stream quietly at a missing or cut header, which is what a shard cut
                # at (or just after) a member boundary looks like, and at any zero block, which is what
                # a zero-filled hole looks like; the end-of-archive block and what follows it tell.
                _check_end_marker(shard, tar.offset)
        except (tarfile.TarError, OSError, EOFError) as err:
            damage = SourceError(shard, f"after member {last}", "bad_shard", f"corrupt tar stream ({err})")
        if key is not None:
            # After damage the last group may have lost members; it is kept only if it is complete (its
            # .json lists every member), otherwise it is part of what the bad_shard count stands for.
            yield from self._finish(shard, key, members, duplicates, salvage=damage is not None)
        if damage is not None:
            self._reject(damage)

    def _finish(
        self, shard: Path, key: str, members: dict[str, bytes], duplicates: list[str], salvage: bool = False
    ) -> Iterator[Sample]:
        """Yield the sample of one member group, or raise / count why it is unusable (unless salvaging)."""
        location = f"member {key}.json"
        sample_id: str | None = None
        try:
            if duplicates:
                raise _Malformed("bad_member", f"members appear twice: {duplicates}")
            if "json" not in members:
                raise _Malformed("bad_member", f"group {key} has no .json member (has {sorted(members)})")
            try:
                meta = json.loads(members["json"])
            except (UnicodeDecodeError, json.JSONDecodeError) as err:
                raise _Malformed("bad_json", f"not JSON ({err})") from None
            if not isinstance(meta, dict):
                raise _Malformed("bad_record", f"expected a JSON object, got {type(meta).__name__}")
            meta = _without_nulls(meta)
            sample_id = _record_id(meta, key)
            # Shards from other tools can hold what the JSON readers refuse (json.dumps escapes a lone
            # surrogate): the same check, so the tokenizer never meets it.
            _check_unicode(meta, "the record")
            sample = _validated(self._parse(meta, key, members, sample_id))
        except _Malformed as bad:
            if not salvage:
                self._reject(SourceError(shard, location, bad.reason, bad.detail, sample_id))
            return
        yield sample

    @staticmethod
    def _parse(meta: dict[str, Any], key: str, members: dict[str, bytes], sample_id: str) -> Sample:
        names = meta.get("images", [])
        if not isinstance(names, list) or not all(isinstance(n, str) for n in names):
            raise _Malformed("bad_record", f"'images' must be a list of member names, got {names!r}")
        exts = []
        for name in names:
            name_key, ext = _split_name(name)
            if name_key != key or ext not in members or ext == "json":
                raise _Malformed("bad_member", f"image member {name!r} is missing from the shard")
            exts.append(ext)
        extra = sorted(set(members) - {"json", *exts})
        if extra:
            raise _Malformed(
                "bad_member", f"members not listed in the .json: {[f'{key}.{e}' for e in extra]}"
            )
        turns = _conversation_turns(meta, "turns", "role", "content")
        regions = _parse_regions(meta.get("regions"), len(names))
        _check_text(turns, len(names), len(regions))
        is_video, truth = _extras(meta)
        if not isinstance(meta.get("source"), str):
            raise _Malformed("bad_record", f"'source' must be a string, got {meta.get('source')!r}")
        return Sample(
            id=sample_id,
            turns=turns,
            category=_category(meta, ""),
            source=meta["source"],
            images=[members[ext] for ext in exts],
            regions=regions,
            is_video=is_video,
            truth=truth,
        )
