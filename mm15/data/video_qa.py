"""Video question answering annotations -> ``Sample`` objects whose images are sampled video frames.

``VideoQAReader(paths, video_root=None, num_frames=24)`` reads a JSON array (``.json``) or JSON lines
(any other suffix) of records in one of three common shapes, decided per record:

* **Conversation** (LLaVA-Video / Video-ChatGPT / VideoChat2 instruction data)::

      {"id": "v1", "video": "clips/a.mp4",
       "conversations": [{"from": "human", "value": "<video>\\nWhat is the man doing?"},
                         {"from": "gpt", "value": "He is slicing bread."}, ...]}

  The frames go where ``<video>`` is; a single ``<image>`` is accepted in its place (LLaVA-Video
  writes the video's slot that way); with neither, the frames go before the first user turn's text.
  More than one video slot is an error (``image_count``): one record is one video.

* **Multiple choice** (MVBench / NExT-QA / EgoSchema style)::

      {"video": "a.mp4", "question": "What happens after ...?", "candidates": ["x", "y", "z"],
       "answer": "y"}

  ``answer`` is one of the candidates' text, or its 0-based index. The prompt lists the options as
  ``(A) x`` lines and asks for the letter; the target answer is the letter alone, as MM1.5 answers
  multiple-choice video benchmarks ("with the option letter directly", mm15-spec.md section 6).
  ``truth`` holds ``options``, ``answer_letter`` and ``answer_text``.

* **Open-ended** (ActivityNet-QA style)::

      {"video": "a.mp4", "question": "What color is the car?", "answer": "red"}

Optional fields in every shape: ``"id"``, ``"category"`` (default ``"video"``), ``"source"`` (default the
reader's ``source``, else the file's stem), ``"truth"`` (an object, merged into the sample's truth) and
``"start"`` / ``"end"`` (seconds, both or neither: MVBench's bounds; frames are sampled from that stretch
only, ``mm15.video.window_frame_indices``, and ``truth["window"]`` records it). ``"video"`` may name a
folder of frame images (MVBench's frame folders; ``mm15.video.read_frame_folder``).
A field whose value is ``null`` counts as absent (``"candidates": null`` is an open-ended record), and
``records()`` returns records without such fields.
Every sample has ``is_video=True``, one ``<image>`` per sampled frame, and ``truth`` with ``task``
(``"conversation"``, ``"multiple-choice"`` or ``"open-ended"``), ``video`` (the file as given in the record),
``frame_indices``, ``total_frames`` and ``fps``.

The reader is a ``mm15.data.sources`` JSON reader (it reuses that module's record reading and field
checks), so its records and errors behave like ``LlavaReader``'s, and so do its default ids: a record
without ``"id"`` is ``{file stem}-{index of the record in its file}``, the same whether it is read by
iterating, by ``sample_at`` or by ``sample``. Files that share a stem (``a/train.jsonl`` and
``b/train.jsonl``) are named by their path from their common folder instead (``a/train-0``), so
default ids are unique across the reader's files. Video paths are relative to
``video_root`` (default: the annotation file's folder). Frames are decoded while reading
(``mm15.video.read_video``: ``num_frames`` uniformly sampled frames, every frame of a shorter video).
Errors and skips follow ``mm15.data.sources``: a malformed record raises ``SourceError`` when ``strict``,
else it is skipped and counted in ``skipped`` under its reason, which is one of the reasons of
``mm15.data.sources`` (``bad_record``, ``bad_conversations``, ``unknown_role``, ``image_count``,
``bad_region`` (a ``<regionK>`` in the text: video records have no regions), ``bad_category``,
``bad_json``) or one of ``VIDEO_REASONS``: ``missing_video`` (no such file) and
``bad_video`` (empty, corrupt or undecodable: the ``VideoError`` message is kept).

Evaluation decodes one item at a time instead: ``records()`` lists the records without decoding any
video, and ``sample(...)`` turns one of them into a Sample, raising ``SourceError`` for a bad one.
Iteration, ``sample`` and ``sample_at`` go through the same steps, so a record is the same Sample (same
id, same checks: a string that is not valid Unicode is a ``bad_record`` on every path) whichever way
it is read.
"""

from __future__ import annotations

import os
import string
from collections import Counter
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from mm15.data.sample import CATEGORIES, IMAGE_PLACEHOLDER, ImageRef, Sample, Turn
from mm15.data.sources import (
    PathLike,
    Paths,
    SourceError,
    _category,
    _check_text,
    _check_unicode,
    _conversation_turns,
    _JsonReader,
    _Malformed,
    _record_id,
    _records,
    _string_field,
    _validated,
    _without_nulls,
)
from mm15.paths import IS_A_DIRECTORY, not_a_file_reason
from mm15.video import DEFAULT_NUM_FRAMES, VideoError, check_window, read_video

VIDEO_PLACEHOLDER = "<video>"
VIDEO_REASONS: tuple[str, ...] = ("missing_video", "bad_video")
MC_INSTRUCTION = "Answer with the option's letter from the given choices directly."


def format_options(options: list[str]) -> str:
    """Options as ``(A) text`` lines, the layout of MVBench-style prompts."""
    return "\n".join(f"({string.ascii_uppercase[k]}) {text}" for k, text in enumerate(options))


def multiple_choice_prompt(question: str, options: list[str]) -> str:
    """The user text of a multiple-choice video question (after the frames)."""
    return f"{question}\nOptions:\n{format_options(options)}\n{MC_INSTRUCTION}"


def _text(record: dict[str, Any], key: str) -> str:
    value = record.get(key)
    if not isinstance(value, str) or not value.strip():
        raise _Malformed("bad_record", f"{key!r} must be a non-empty string, got {value!r}")
    return value


def _window(record: dict[str, Any]) -> tuple[float, float] | None:
    """The record's ``start`` / ``end`` seconds (MVBench's bounds), or None when it has neither."""
    start, end = record.get("start"), record.get("end")
    if start is None and end is None:
        return None
    try:
        check_window((start, end))
    except ValueError:  # the same rule read_video applies, in the record's field names
        raise _Malformed(
            "bad_record", f"'start' and 'end' must be seconds with 0 <= start < end, got {start!r}, {end!r}"
        ) from None
    return float(start), float(end)


def _answer_index(answer: Any, options: list[str]) -> int:
    if isinstance(answer, int) and not isinstance(answer, bool):
        if not 0 <= answer < len(options):
            raise _Malformed("bad_record", f"'answer' index {answer} is not one of {len(options)} candidates")
        return answer
    if isinstance(answer, str) and answer in options:
        return options.index(answer)
    raise _Malformed("bad_record", f"'answer' {answer!r} is neither a candidate nor a candidate index")


def _not_a_record(path: Path, location: str, record: Any) -> SourceError | None:
    """The error for an entry of ``_records`` that is not a JSON object (bad JSON included), else None."""
    if isinstance(record, dict):
        return None
    if isinstance(record, _Malformed):
        return SourceError(path, location, record.reason, record.detail)
    return SourceError(path, location, "bad_record", f"expected a JSON object, got {type(record).__name__}")


def _id_prefixes(paths: list[Path]) -> dict[Path, str]:
    """The start of each file's default ids: its stem, as ``LlavaReader`` names records.

    Files sharing a stem are named by their path from their common folder instead, so their ids do not
    collide: ``a/train`` and ``b/train``, or ``x.json`` and ``x.jsonl`` when only the suffix differs.
    """
    stems = Counter(path.stem for path in paths)
    prefixes = {path: path.stem for path in paths}
    shared = [path for path in paths if stems[path.stem] > 1]
    if shared:
        full = [path.absolute() for path in shared]
        root = Path(os.path.commonpath([str(f.parent) for f in full]))
        relative = [f.relative_to(root) for f in full]
        names = Counter(r.with_suffix("").as_posix() for r in relative)
        for path, rel in zip(shared, relative, strict=True):
            short = rel.with_suffix("").as_posix()
            prefixes[path] = short if names[short] == 1 else rel.as_posix()
    return prefixes


def _place_frames(turns: list[Turn], frames: int) -> list[Turn]:
    """Turns with the video slot replaced by one ``<image>`` per frame (module docstring)."""
    slots = sum(t.content.count(VIDEO_PLACEHOLDER) for t in turns)
    images = sum(t.content.count(IMAGE_PLACEHOLDER) for t in turns)
    if slots + images > 1:
        raise _Malformed(
            "image_count",
            f"{slots} {VIDEO_PLACEHOLDER} and {images} {IMAGE_PLACEHOLDER} slots; a record holds one video",
        )
    marker = VIDEO_PLACEHOLDER if slots else IMAGE_PLACEHOLDER if images else None
    expanded = IMAGE_PLACEHOLDER * frames
    if marker is not None:
        return [Turn(t.role, t.content.replace(marker, expanded)) for t in turns]
    first_user = next((k for k, t in enumerate(turns) if t.role == "user"), None)
    if first_user is None:
        raise _Malformed("bad_conversations", "no user turn to put the video in")
    out = list(turns)
    out[first_user] = Turn("user", f"{expanded}\n{turns[first_user].content}")
    return out


class VideoQAReader(_JsonReader):
    """Video-QA records -> Samples of sampled frames (module docstring)."""

    def __init__(
        self,
        paths: Paths,
        video_root: PathLike | None = None,
        *,
        num_frames: int = DEFAULT_NUM_FRAMES,
        category: str = "video",
        source: str | None = None,
        strict: bool = True,
    ) -> None:
        super().__init__(paths, source=source, strict=strict)
        if category not in CATEGORIES:
            raise ValueError(f"unknown category {category!r} (one of {CATEGORIES})")
        if isinstance(num_frames, bool) or not isinstance(num_frames, int) or num_frames < 1:
            raise ValueError(f"num_frames must be a positive int, got {num_frames!r}")
        self.video_root = Path(video_root) if video_root is not None else None
        self.num_frames = num_frames
        self.category = category
        self._listing: list[tuple[Path, int, str, dict[str, Any]]] | None = None  # sample_at's records
        self._bad: dict[int, SourceError] = {}  # records sample_at found unusable, with their error
        self._prefixes = _id_prefixes(self.paths)
        self._positions: dict[tuple[Path, str], int] = {}  # (file, location) -> index in the file

    def __iter__(self) -> Iterator[Sample]:
        """Every usable record's Sample in file order, read as it goes (the same steps as ``sample``)."""
        self.skipped.clear()
        for path in self.paths:
            for index, location, record in _records(path):
                try:
                    if (error := _not_a_record(path, location, record)) is not None:
                        raise error
                    sample = self._sample(path, index, location, record)
                except SourceError as error:
                    if self.strict:
                        raise
                    self.skipped.add(error)
                    continue
                yield sample

    def _entries(self) -> list[tuple[Path, int, str, dict[str, Any]]]:
        """Every record as ``(file, index in the file, location, record)``; bad ones raise or are counted."""
        self.skipped.clear()
        out = []
        for path in self.paths:
            for index, location, record in _records(path):
                if (error := _not_a_record(path, location, record)) is None:
                    out.append((path, index, location, _without_nulls(record)))
                elif self.strict:
                    raise error
                else:
                    self.skipped.add(error)
        return out

    def records(self) -> list[tuple[Path, str, dict[str, Any]]]:
        """Every record as ``(file, location, record)``, reading JSON only (no video is decoded).

        For evaluation, which decodes one item at a time. A line that is not JSON or not an object
        raises ``SourceError`` (strict) or is counted in ``skipped``.
        """
        entries = self._entries()
        # sample() is given (file, location): note each record's index in its file for its default id.
        self._positions.update(((path, location), index) for path, index, location, _ in entries)
        return [(path, location, record) for path, _, location, record in entries]

    def sample(self, path: Path, location: str, record: dict[str, Any], index: int | None = None) -> Sample:
        """One record of ``records()`` -> a Sample with its frames; anything wrong raises SourceError.

        ``index`` is not used (callers pass the record's position in ``records()``): the default id
        comes from the record's index in its own file, as iteration and ``sample_at`` name it.
        """
        return self._sample(path, self._position(path, location), location, record)

    def _position(self, path: Path, location: str) -> int:
        """The index in ``path`` of the record at ``location`` (noted by ``records()``, else read)."""
        if (path, location) not in self._positions:
            self._positions.update(((path, where), index) for index, where, _ in _records(path))
        try:
            return self._positions[(path, location)]
        except KeyError:
            raise ValueError(f"{path}: no record at {location}") from None

    def _sample(self, path: Path, index: int, location: str, record: dict[str, Any]) -> Sample:
        """Record ``index`` of ``path`` -> a Sample; every way of reading a record comes through here."""
        sample_id: str | None = None
        record = _without_nulls(record)  # a null field is an absent one, as in mm15.data.sources
        try:
            sample_id = _record_id(record, f"{self._prefixes.get(path, path.stem)}-{index}")
            # A lone surrogate ("\ud83d", half an emoji) parses as JSON but fails the tokenizer later.
            _check_unicode(record, "the record")
            return _validated(self._parse(record, path, sample_id))
        except _Malformed as bad:
            # Name the record by its own id only: a made-up one would not be found in the file.
            own_id = sample_id if "id" in record else None
            raise SourceError(path, location, bad.reason, bad.detail, own_id) from None

    def listed(self) -> int:
        """How many records ``sample_at`` indexes, reading the annotation files (JSON only) once.

        Lines that are not records raise ``SourceError`` when ``strict``; otherwise they are counted in
        ``skipped`` and left out of the listing.
        """
        if self._listing is None:
            self._listing = self._entries()
        return len(self._listing)

    def sample_at(self, index: int) -> Sample:
        """Sample ``index`` of an endless pass over the records (index modulo their number), for training.

        Random access, so a stream decodes only the videos it uses: resuming, or taking every W-th
        sample on each of W ranks, costs no extra decoding, and no frame is cached. A record that cannot
        be used raises ``SourceError`` (strict or not: the training stream skips and counts it, as it
        does an image that does not decode); the reader remembers it, so a later pass raises the same
        error without decoding its video again.
        """
        count = self.listed()
        if not count:
            raise ValueError(f"{', '.join(map(str, self.paths))}: no video-QA records")
        k = index % count
        if k in self._bad:
            raise self._bad[k]
        path, position, location, record = self._listing[k]  # type: ignore[index]
        try:
            return self._sample(path, position, location, record)
        except SourceError as error:
            self._bad[k] = error
            raise

    def _turns(self, record: dict[str, Any]) -> tuple[list[Turn], dict[str, Any]]:
        """The record's turns (video slot not yet expanded) and its task truth."""
        if "conversations" in record:
            return _conversation_turns(record, "conversations", "from", "value"), {"task": "conversation"}
        question = _text(record, "question")
        if "answer" not in record:
            raise _Malformed("bad_record", "needs 'conversations', or 'question' and 'answer'")
        if "candidates" in record:
            options = record["candidates"]
            if (
                not isinstance(options, list)
                or not 2 <= len(options) <= 26
                or not all(isinstance(o, str) and o.strip() for o in options)
            ):
                raise _Malformed(
                    "bad_record", f"'candidates' must be 2-26 non-empty strings, got {options!r}"
                )
            right = _answer_index(record["answer"], options)
            letter = string.ascii_uppercase[right]
            truth = {
                "task": "multiple-choice",
                "question": question,
                "options": options,
                "answer_letter": letter,
                "answer_text": options[right],
                "answer": letter,
            }
            return [Turn("user", multiple_choice_prompt(question, options)), Turn("assistant", letter)], truth
        answer = record["answer"]
        if isinstance(answer, int | float) and not isinstance(answer, bool):
            answer = str(answer)  # numeric answers ("how many ...") are text to the model
        if not isinstance(answer, str) or not answer.strip():
            raise _Malformed("bad_record", f"'answer' must be a non-empty string, got {answer!r}")
        truth = {"task": "open-ended", "question": question, "answer": answer}
        return [Turn("user", question), Turn("assistant", answer)], truth

    def _parse(self, record: dict[str, Any], path: Path, sample_id: str) -> Sample:
        video = record.get("video")
        if not isinstance(video, str) or not video:
            raise _Malformed("bad_record", f"'video' must be a non-empty path string, got {video!r}")
        turns, truth = self._turns(record)
        extra = record.get("truth", {})
        if not isinstance(extra, dict):
            raise _Malformed("bad_record", f"'truth' must be an object, got {type(extra).__name__}")
        category = _category(record, self.category)
        source = _string_field(record, "source", self.source or path.stem)
        # Check the text before decoding anything: a bad slot (or a <regionK>: a video record has no
        # regions, so the chat renderer would fail on it) is the cheaper, clearer error.
        _check_text(_place_frames(turns, 1), 1, 0)
        window = _window(record)
        root = self.video_root if self.video_root is not None else path.parent
        file = root / video
        # A folder is a video of frame images (MVBench's episodic_reasoning clips); else it must be a file.
        if (problem := not_a_file_reason(file)) not in (None, IS_A_DIRECTORY):
            raise _Malformed("missing_video", f"video {video!r} under {root}: {problem}")
        try:
            clip = read_video(file, self.num_frames, window=window)
        except VideoError as err:
            raise _Malformed("bad_video", str(err)) from None
        frames: list[ImageRef] = list(clip.frames)
        return Sample(
            id=sample_id,
            turns=_place_frames(turns, len(frames)),
            category=category,
            source=source,
            images=frames,
            is_video=True,
            truth={
                **extra,
                **truth,
                "video": video,
                "frame_indices": clip.indices,
                "total_frames": clip.total_frames,
                "fps": clip.fps,
                **({"window": list(window)} if window is not None else {}),
            },
        )


# Answer-format sentences the video generator appends to its questions; a multiple-choice export drops
# them, since the options and the letter instruction replace them.
_ANSWER_FORMATS = (" Answer left, right, up or down.", " Answer with a short phrase.")


def synthetic_video_record(sample: Sample, video: str, *, multiple_choice: bool) -> dict[str, Any]:
    """An annotation record for a clip of the synthetic ``video`` generator written to ``video``.

    Open-ended: the question and answer as generated. Multiple choice: the answer among the clip's
    candidates (the four directions, or every object in the clip as "the <colour> <shape>").
    """
    if sample.source != "synth/video":
        raise ValueError(f"sample {sample.id}: not a sample of the synthetic video generator")
    question = sample.turns[0].content.replace(IMAGE_PLACEHOLDER, "").strip()
    record: dict[str, Any] = {"id": sample.id, "video": video, "question": question}
    answer = sample.truth["answer"]
    if not multiple_choice:
        return {**record, "answer": answer}
    for suffix in _ANSWER_FORMATS:
        question = question.removesuffix(suffix)
    if sample.truth["task"] == "direction":
        candidates = ["left", "right", "up", "down"]
    else:
        candidates = [f"the {o['color']} {o['shape']}" for o in sample.truth["objects"]]
    return {**record, "question": question, "candidates": candidates, "answer": answer}


def write_synthetic_video_qa(
    out_dir: PathLike,
    count: int,
    *,
    split: str = "eval",
    seed: int = 0,
    multiple_choice: bool = True,
    fps: int = 8,
) -> Path:
    """Encode ``count`` clips of the synthetic ``video`` generator as MP4 files plus ``annotations.jsonl``.

    The whole real-video path (decoding, sampling, ``VideoQAReader``, the ``video:`` source, the
    ``video-mc`` / ``video-qa`` tasks) can then run offline on real files. Returns the annotation file.
    """
    import json

    from mm15.data.synth import generate
    from mm15.video import write_video

    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    lines = []
    for index in range(count):
        sample = generate("video", index, split=split, seed=seed)  # type: ignore[arg-type]
        name = f"{split}-{seed}-{index:06d}.mp4"
        write_video(out / name, sample.images, fps=fps)  # type: ignore[arg-type]
        lines.append(json.dumps(synthetic_video_record(sample, name, multiple_choice=multiple_choice)))
    annotations = out / "annotations.jsonl"
    annotations.write_text("\n".join(lines) + "\n", encoding="utf-8")
    return annotations
