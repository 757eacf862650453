"""Loaders for benchmark annotation files in the formats their authors distribute.

Every loader reads local files only (no network, no pickle) and returns an ``EvalSet``: a list-like set
of ``EvalItem`` records plus the counts of records skipped on purpose. An item is

* ``id`` - the benchmark's own question / record id, as a string;
* ``question`` - the question, instruction or referring expression, as given;
* ``answers`` - the ground-truth answer strings (empty for the grounding sets and for unlabelled
  test splits);
* ``image`` - the image path *relative to an image root* the user supplies (``None`` when the
  annotation file names no image);
* ``meta`` - everything else a metric needs; the keys each loader fills are listed in its docstring.

Boxes in ``meta["box"]`` are pixel ``(x1, y1, x2, y2)`` floats of the original image, converted from
the files' ``[x, y, w, h]``; score them with ``mm15.eval.metrics`` (``grounding_hit``,
``screenspot_hit``) after formatting predictions with ``mm15.boxes``.

==================  ======================================  ===================================
loader              file format                             metric (``mm15.eval.metrics``)
==================  ======================================  ===================================
``load_textvqa``    TextVQA ``{"data": [...]}``             ``vqa_accuracy``
``load_docvqa``     DocVQA / InfoVQA / RRC ``{"data"}``     ``anls``
``load_infovqa``    (same as ``load_docvqa``)               ``anls``
``load_rrc_submission``  ``[{"questionId", "answer"}]``     -
``load_chartqa``    ``[{"imgname", "query", "label"}]``     ``relaxed_accuracy``
``load_ocrbench``   ``OCRBench.json``                       ``ocrbench_correct`` / ``_aggregate``
``load_pope``       JSON lines (question_id/image/text/label)  ``pope_metrics``
``load_vqav2``      questions + annotations JSON pair       ``vqa_accuracy``
``load_refcoco``    refs JSON + COCO instances JSON         ``grounding_hit`` / ``_accuracy``
``load_screenspot`` ``[{"img_filename", "bbox", ...}]``     ``screenspot_hit``
``load_multiple_choice``  MMMU / AI2D / ScienceQA / SEED   ``choice_correct``
==================  ======================================  ===================================

Malformed input (unreadable JSON, a missing field, a value of the wrong type, an unknown label)
raises ``LoaderError`` (a ``ValueError``) naming the file and the record (index and id when known).
Records are skipped only where a loader's docstring says so, and then counted in
``EvalSet.skipped`` by reason.
"""

from __future__ import annotations

import ast
import json
import math
import re
from collections import Counter
from collections.abc import Collection, Iterator, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from mm15.eval.metrics import OCRBENCH_TYPES

__all__ = [
    "EvalItem",
    "EvalSet",
    "LoaderError",
    "load_chartqa",
    "load_docvqa",
    "load_infovqa",
    "load_multiple_choice",
    "load_ocrbench",
    "load_pope",
    "load_refcoco",
    "load_rrc_submission",
    "load_screenspot",
    "load_textvqa",
    "load_vqav2",
    "record_splits",
]

PathLike = str | Path
PixelBox = tuple[float, float, float, float]

_PICKLE_SUFFIXES = (".p", ".pkl", ".pickle")
_LETTERS = "ABCDEFGHIJKLMNOPQRSTUVWXYZ"


class LoaderError(ValueError):
    """Malformed annotation input; the message names the file and, where known, the record."""


@dataclass
class EvalItem:
    """One evaluation question (see the module docstring for the fields)."""

    id: str
    question: str
    answers: list[str]
    image: str | None
    meta: dict[str, Any] = field(default_factory=dict)


@dataclass
class EvalSet:
    """The items of one annotation file (or file pair), in file order, and what was skipped.

    Behaves as a read-only sequence of ``EvalItem``. ``skipped`` maps a reason (e.g. ``"split"``,
    ``"no_image"``, ``"open"``) to the number of records left out for it.
    """

    items: list[EvalItem]
    source: str
    skipped: Counter[str] = field(default_factory=Counter)

    def __len__(self) -> int:
        return len(self.items)

    def __iter__(self) -> Iterator[EvalItem]:
        return iter(self.items)

    def __getitem__(self, index: int) -> EvalItem:
        return self.items[index]


# --------------------------------------------------------------------------------------------------
# Reading and validation helpers
# --------------------------------------------------------------------------------------------------


def _refuse_pickle(path: Path) -> None:
    if path.suffix.lower() in _PICKLE_SUFFIXES:
        raise LoaderError(
            f"{path}: pickle files are not loaded (unpickling can run arbitrary code). Convert it to JSON "
            "once in a trusted environment, e.g. `json.dump(pickle.load(open(p, 'rb')), open(out, 'w'))` "
            "(RefCOCO refs(*).p become a JSON list of ref dicts), and pass the .json file."
        )


def _read_text(path: PathLike) -> tuple[Path, str]:
    p = Path(path)
    _refuse_pickle(p)
    if not p.is_file():
        raise FileNotFoundError(f"{p}: annotation file not found")
    try:
        return p, p.read_text(encoding="utf-8")
    except UnicodeDecodeError as exc:
        raise LoaderError(f"{p}: not UTF-8 text ({exc})") from exc


def _read_json(path: PathLike) -> tuple[Path, Any]:
    p, text = _read_text(path)
    try:
        return p, json.loads(text)
    except json.JSONDecodeError as exc:
        raise LoaderError(f"{p}: invalid JSON at line {exc.lineno}, column {exc.colno}: {exc.msg}") from exc


def _read_json_lines(path: PathLike) -> tuple[Path, Any, list[int] | None]:
    """JSON Lines (blank lines ignored): the records and the file line of each, so that errors name
    the line to fix. A file holding one JSON array is accepted too (its records have no line: None)."""
    p, text = _read_text(path)
    if text.lstrip().startswith("["):
        try:
            data = json.loads(text)
        except json.JSONDecodeError as exc:
            raise LoaderError(f"{p}: invalid JSON at line {exc.lineno}: {exc.msg}") from exc
        return p, data, None
    records, lines = [], []
    for number, line in enumerate(text.splitlines(), start=1):
        if not line.strip():
            continue
        try:
            records.append(json.loads(line))
        except json.JSONDecodeError as exc:
            raise LoaderError(f"{p}: line {number} is not valid JSON: {exc.msg}") from exc
        lines.append(number)
    return p, records, lines


def _where(
    path: Path,
    index: int | str,
    record: object = None,
    id_keys: tuple[str, ...] = (),
    line: int | None = None,
) -> str:
    label = f"{path}: line {line}" if line is not None else f"{path}: record {index}"
    if isinstance(record, Mapping):
        for key in id_keys:
            if key in record:
                return f"{label} ({key}={record[key]!r})"
    return label


class _Record:
    """Typed field access on one JSON object, with errors that name file and record."""

    def __init__(
        self,
        record: object,
        path: Path,
        index: int | str,
        id_keys: tuple[str, ...] = (),
        line: int | None = None,
    ) -> None:
        self.where = _where(path, index, record, id_keys, line)
        if not isinstance(record, Mapping):
            raise LoaderError(f"{self.where}: expected a JSON object, got {type(record).__name__}")
        self.data: Mapping[str, Any] = record

    def error(self, message: str) -> LoaderError:
        return LoaderError(f"{self.where}: {message}")

    def has(self, key: str) -> bool:
        return key in self.data and self.data[key] is not None

    def get(self, key: str) -> Any:
        if key not in self.data:
            raise self.error(f"missing field {key!r}")
        return self.data[key]

    def text(self, key: str) -> str:
        value = self.get(key)
        if not isinstance(value, str):
            raise self.error(f"field {key!r} must be a string, got {type(value).__name__} {value!r}")
        return value

    def integer(self, key: str) -> int:
        value = self.get(key)
        if isinstance(value, bool) or not isinstance(value, int):
            raise self.error(f"field {key!r} must be an integer, got {type(value).__name__} {value!r}")
        return value

    def id(self, key: str) -> str:
        value = self.get(key)
        if isinstance(value, bool) or not isinstance(value, (str, int)):
            raise self.error(f"field {key!r} must be a string or integer id, got {value!r}")
        return str(value)

    def str_list(self, key: str, *, allow_single: bool = False, allow_empty: bool = False) -> list[str]:
        value = self.get(key)
        if allow_single and isinstance(value, str):
            return [value]
        if not isinstance(value, list) or not all(isinstance(v, str) for v in value):
            raise self.error(f"field {key!r} must be a list of strings, got {value!r}")
        if not value and not allow_empty:
            raise self.error(f"field {key!r} is empty")
        return list(value)

    def xywh_box(self, key: str) -> PixelBox:
        value = self.get(key)
        if (
            not isinstance(value, list)
            or len(value) != 4
            or not all(isinstance(v, (int, float)) and not isinstance(v, bool) for v in value)
            or not all(math.isfinite(v) for v in value)
        ):
            raise self.error(f"field {key!r} must be 4 finite numbers [x, y, w, h], got {value!r}")
        x, y, w, h = (float(v) for v in value)
        if w < 0 or h < 0:
            raise self.error(f"field {key!r} has a negative width or height: {value!r}")
        return x, y, x + w, y + h


# Annotation tools round pixel boxes (COCO's are floats of a few decimals): a box may pass the image's
# edge by this many pixels and still count as inside.
BOX_EDGE_TOLERANCE = 1.0


def box_outside_image(box: PixelBox, width: int, height: int) -> str | None:
    """Why a pixel (x1, y1, x2, y2) box does not lie in a ``width`` x ``height`` image, or None.

    A box past the edge cannot be drawn in the model's [0, 1000) text units (it would be clamped), so
    no answer could match it: such a box means the annotation or the image is not the one expected.
    """
    x1, y1, x2, y2 = box
    tol = BOX_EDGE_TOLERANCE
    if x1 < -tol or y1 < -tol or x2 > width + tol or y2 > height + tol:
        return f"box {[round(v, 2) for v in box]} (x1, y1, x2, y2) lies outside the {width}x{height} image"
    return None


def _list_of_records(path: Path, data: Any, what: str) -> list[Any]:
    if not isinstance(data, list):
        raise LoaderError(f"{path}: expected a JSON list of {what}, got {type(data).__name__}")
    return data


def _data_list(path: Path, data: Any) -> list[Any]:
    if not isinstance(data, Mapping) or "data" not in data:
        raise LoaderError(f'{path}: expected a JSON object with a "data" list')
    return _list_of_records(path, data["data"], 'records under "data"')


def _check_unique(path: Path, items: list[EvalItem]) -> None:
    seen: set[str] = set()
    for item in items:
        if item.id in seen:
            raise LoaderError(f"{path}: duplicate id {item.id!r}")
        seen.add(item.id)


# --------------------------------------------------------------------------------------------------
# Open-ended VQA: TextVQA, DocVQA / InfoVQA, ChartQA, OCRBench, VQAv2
# --------------------------------------------------------------------------------------------------


def load_textvqa(path: PathLike, *, require_answers: bool = True) -> EvalSet:
    """TextVQA ``TextVQA_0.5.1_{train,val,test}.json``: ``{"data": [{"question_id", "question",
    "image_id", "answers" (10 strings), "image_width", "image_height", "set_name", ...}]}``.

    ``image`` is ``"{image_id}.jpg"`` (the ``train_images/`` folder holds train and val).
    ``require_answers=False`` accepts the unlabelled test split (``answers == []``).
    meta: ``image_id``, ``set_name``, ``width``, ``height`` (when present).
    """
    p, data = _read_json(path)
    items = []
    for index, raw in enumerate(_data_list(p, data)):
        rec = _Record(raw, p, index, ("question_id",))
        answers = (
            rec.str_list("answers", allow_empty=not require_answers)
            if require_answers or rec.has("answers")
            else []
        )
        image_id = rec.text("image_id")
        meta: dict[str, Any] = {"image_id": image_id}
        for src, dst in (("set_name", "set_name"), ("image_width", "width"), ("image_height", "height")):
            if rec.has(src):
                meta[dst] = rec.get(src)
        items.append(EvalItem(rec.id("question_id"), rec.text("question"), answers, f"{image_id}.jpg", meta))
    _check_unique(p, items)
    return EvalSet(items, str(p))


def load_docvqa(path: PathLike, *, require_answers: bool = True) -> EvalSet:
    """DocVQA / InfoVQA (RRC) ``{"data": [{"questionId", "question", "answers", ...}]}``.

    The image is ``"image"`` (DocVQA, e.g. ``"documents/xxx.png"``), else ``"image_local_name"``
    (InfoVQA / RRC), else ``None``. ``require_answers=False`` accepts the unlabelled test split.
    meta: ``doc_id`` (``docId``), ``question_types``, ``answer_type``, ``split`` (``data_split``)
    when present.
    """
    p, data = _read_json(path)
    items = []
    for index, raw in enumerate(_data_list(p, data)):
        rec = _Record(raw, p, index, ("questionId",))
        answers = (
            rec.str_list("answers", allow_empty=not require_answers)
            if require_answers or rec.has("answers")
            else []
        )
        image = None
        for key in ("image", "image_local_name"):
            if rec.has(key):
                image = rec.text(key)
                break
        meta = {
            dst: rec.get(src)
            for src, dst in (
                ("docId", "doc_id"),
                ("question_types", "question_types"),
                ("answer_type", "answer_type"),
                ("data_split", "split"),
            )
            if rec.has(src)
        }
        items.append(EvalItem(rec.id("questionId"), rec.text("question"), answers, image, meta))
    _check_unique(p, items)
    return EvalSet(items, str(p))


def load_infovqa(path: PathLike, *, require_answers: bool = True) -> EvalSet:
    """InfoVQA ``infographicsVQA_*.json``: the same format as DocVQA (see ``load_docvqa``)."""
    return load_docvqa(path, require_answers=require_answers)


def load_rrc_submission(path: PathLike) -> dict[str, str]:
    """A DocVQA / InfoVQA submission ``[{"questionId", "answer"}]`` -> ``{questionId (str): answer}``."""
    p, data = _read_json(path)
    answers: dict[str, str] = {}
    for index, raw in enumerate(_list_of_records(p, data, "answers")):
        rec = _Record(raw, p, index, ("questionId",))
        qid = rec.id("questionId")
        if qid in answers:
            raise rec.error(f"duplicate questionId {qid!r}")
        answers[qid] = rec.text("answer")
    return answers


def load_chartqa(path: PathLike) -> EvalSet:
    """ChartQA ``test_human.json`` / ``test_augmented.json``: ``[{"imgname", "query", "label"}]``.

    ChartQA has no question ids: ``id`` is ``"{file stem}:{index}"``. ``image`` is ``imgname`` (under
    ``png/``). ``label`` must be a string. meta: ``subset`` = ``"human"`` / ``"augmented"`` when the file
    name says so.
    """
    p, data = _read_json(path)
    subset = next((s for s in ("human", "augmented") if s in p.stem.lower()), None)
    items = []
    for index, raw in enumerate(_list_of_records(p, data, "ChartQA records")):
        rec = _Record(raw, p, index, ("imgname",))
        meta = {"subset": subset} if subset else {}
        items.append(
            EvalItem(f"{p.stem}:{index}", rec.text("query"), [rec.text("label")], rec.text("imgname"), meta)
        )
    return EvalSet(items, str(p))


def load_ocrbench(path: PathLike) -> EvalSet:
    """OCRBench v1 ``OCRBench.json``: ``[{"dataset_name", "id", "image_path", "question", "answers"
    (string or list), "type"}]``.

    ``type`` must be one of the ten OCRBench types. meta: ``dataset_name`` and ``type`` (the two
    arguments ``ocrbench_correct`` / ``ocrbench_aggregate`` need). Ids repeat across source datasets,
    so ``id`` is ``"{dataset_name}/{id}"`` when needed to be unique, and the raw id is ``meta["raw_id"]``.
    """
    p, data = _read_json(path)
    items = []
    for index, raw in enumerate(_list_of_records(p, data, "OCRBench items")):
        rec = _Record(raw, p, index, ("id",))
        item_type = rec.text("type")
        if item_type not in OCRBENCH_TYPES:
            raise rec.error(f"unknown OCRBench type {item_type!r}")
        dataset_name = rec.text("dataset_name")
        raw_id = rec.id("id")
        items.append(
            EvalItem(
                str(index),
                rec.text("question"),
                rec.str_list("answers", allow_single=True),
                rec.text("image_path"),
                {"dataset_name": dataset_name, "type": item_type, "raw_id": raw_id},
            )
        )
    # OCRBench's own ids are unique only within a source dataset; use "{dataset_name}/{id}" when that
    # is unique across the file, else the position.
    keys = [f"{item.meta['dataset_name']}/{item.meta['raw_id']}" for item in items]
    if len(set(keys)) == len(keys):
        for item, key in zip(items, keys, strict=True):
            item.id = key
    return EvalSet(items, str(p))


def load_pope(path: PathLike, *, category: str | None = None) -> EvalSet:
    """POPE ``coco_pope_{random,popular,adversarial}.json``: JSON lines
    ``{"question_id", "image", "text", "label"}`` (a file with one JSON array is accepted too).

    ``label`` must be yes / no (any case, surrounding space ignored); ``answers == [label]`` in lower
    case. meta: ``category`` = the argument, else ``random`` / ``popular`` / ``adversarial`` read
    from the file name, else absent.
    """
    p, records, lines = _read_json_lines(path)
    if category is None:
        category = next((c for c in ("random", "popular", "adversarial") if c in p.stem.lower()), None)
    items = []
    for index, raw in enumerate(_list_of_records(p, records, "POPE records")):
        rec = _Record(raw, p, index, ("question_id",), lines[index] if lines else None)
        label = rec.text("label").strip().lower()
        if label not in ("yes", "no"):
            raise rec.error(f"label must be 'yes' or 'no', got {rec.get('label')!r}")
        meta = {"category": category} if category else {}
        items.append(EvalItem(rec.id("question_id"), rec.text("text"), [label], rec.text("image"), meta))
    _check_unique(p, items)
    return EvalSet(items, str(p))


def _coco_file_name(subtype: str | None, image_id: int) -> str | None:
    if not subtype:
        return None
    folder = "test2015" if subtype.startswith("test") else subtype
    return f"COCO_{folder}_{image_id:012d}.jpg"


def load_vqav2(questions_path: PathLike, annotations_path: PathLike | None = None) -> EvalSet:
    """VQAv2 ``v2_OpenEnded_mscoco_<subtype>_questions.json`` (+ ``v2_mscoco_<subtype>_annotations.json``).

    Questions and annotations are paired by ``question_id``; every question needs exactly one
    annotation and every annotation a question (else ``LoaderError``). Without an annotations file
    (test / test-dev) ``answers == []``. ``answers`` are the (usually 10) human ``answer`` strings.
    ``image`` is ``COCO_<subtype>_<image_id:012d>.jpg`` from the questions file's ``data_subtype``
    (test-dev images live in ``test2015``), ``None`` if the file names no subtype.
    meta: ``image_id``, and with annotations ``multiple_choice_answer``, ``answer_type``,
    ``question_type``, ``answer_confidence`` (list, aligned with ``answers``).
    """
    qp, qdata = _read_json(questions_path)
    if not isinstance(qdata, Mapping) or "questions" not in qdata:
        raise LoaderError(f'{qp}: expected a VQAv2 questions object with a "questions" list')
    subtype = qdata.get("data_subtype")
    if subtype is not None and not isinstance(subtype, str):
        raise LoaderError(f"{qp}: data_subtype must be a string, got {subtype!r}")
    annotations: dict[str, tuple[_Record, list[str], list[Any]]] = {}
    ap: Path | None = None
    if annotations_path is not None:
        ap, adata = _read_json(annotations_path)
        if not isinstance(adata, Mapping) or "annotations" not in adata:
            raise LoaderError(f'{ap}: expected a VQAv2 annotations object with an "annotations" list')
        for index, raw in enumerate(_list_of_records(ap, adata["annotations"], "annotations")):
            rec = _Record(raw, ap, index, ("question_id",))
            qid = rec.id("question_id")
            answer_list = rec.get("answers")
            if not isinstance(answer_list, list) or not answer_list:
                raise rec.error(f"field 'answers' must be a non-empty list, got {answer_list!r}")
            texts, confidence = [], []
            for j, answer in enumerate(answer_list):
                sub = _Record(answer, ap, f"{index}.answers[{j}]", ("answer_id",))
                texts.append(sub.text("answer"))
                confidence.append(sub.data.get("answer_confidence"))
            if qid in annotations:
                raise rec.error(f"duplicate annotation for question_id {qid}")
            annotations[qid] = (rec, texts, confidence)
    items = []
    seen: set[str] = set()
    for index, raw in enumerate(_list_of_records(qp, qdata["questions"], "questions")):
        rec = _Record(raw, qp, index, ("question_id",))
        qid = rec.id("question_id")
        # Checked before the annotation lookup: a repeated question finds its annotation already
        # taken, which would be reported as a missing annotation instead of what it is.
        if qid in seen:
            raise rec.error(f"duplicate question_id {qid}")
        seen.add(qid)
        image_id = rec.integer("image_id")
        meta: dict[str, Any] = {"image_id": image_id}
        answers: list[str] = []
        if ap is not None:
            if qid not in annotations:
                raise rec.error(f"question_id {qid} has no annotation in {ap}")
            arec, answers, confidence = annotations.pop(qid)
            if arec.has("image_id") and arec.get("image_id") != image_id:
                raise arec.error(f"image_id {arec.get('image_id')} differs from the question's {image_id}")
            meta.update(
                {
                    key: arec.data[key]
                    for key in ("multiple_choice_answer", "answer_type", "question_type")
                    if key in arec.data
                }
            )
            meta["answer_confidence"] = confidence
        items.append(EvalItem(qid, rec.text("question"), answers, _coco_file_name(subtype, image_id), meta))
    if annotations:
        extra = sorted(annotations)[:5]
        raise LoaderError(f"{ap}: {len(annotations)} annotation(s) without a question in {qp}, e.g. {extra}")
    return EvalSet(items, str(qp))


# --------------------------------------------------------------------------------------------------
# Grounding: RefCOCO / RefCOCO+ / RefCOCOg, ScreenSpot
# --------------------------------------------------------------------------------------------------


def _split_filter(split: str | Collection[str] | None) -> set[str] | None:
    if split is None:
        return None
    return {split} if isinstance(split, str) else set(split)


def load_refcoco(
    refs_path: PathLike,
    instances_path: PathLike,
    *,
    split: str | Collection[str] | None = None,
    expression: str = "sent",
) -> EvalSet:
    """RefCOCO / RefCOCO+ / RefCOCOg from the ``refer`` toolkit's files: ``refs(<splitBy>).p`` converted
    to JSON (a list of refs ``{"ref_id", "ann_id", "image_id", "split", "sentences": [{"sent_id",
    "sent", "raw"}], "category_id"}``) and the COCO ``instances.json`` (``images`` with width / height /
    file_name, ``annotations`` with ``bbox`` = [x, y, w, h] pixels). Pickles are refused.

    Each sentence is its own item (id ``"{ref_id}:{sent_id}"``, ``question`` = the sentence's
    ``expression`` field, ``"sent"`` (tokenised, lower case) or ``"raw"``), ``answers == []``.
    ``split`` keeps refs of that split (or splits); the others are counted in ``skipped["split"]``, and a
    split that matches no ref raises ``LoaderError`` naming the splits present.
    ``image`` is the COCO ``file_name`` of the image.
    meta: ``box`` (pixel x1, y1, x2, y2), ``width``, ``height``, ``split``, ``ref_id``, ``ann_id``,
    ``sent_id``, ``image_id``, ``category_id``, ``raw`` (the untokenised sentence, when present).
    """
    if expression not in ("sent", "raw"):
        raise ValueError(f"expression must be 'sent' or 'raw', got {expression!r}")
    keep = _split_filter(split)
    ip, inst = _read_json(instances_path)
    if not isinstance(inst, Mapping) or "images" not in inst or "annotations" not in inst:
        raise LoaderError(f'{ip}: expected a COCO instances object with "images" and "annotations"')
    images: dict[int, tuple[int, int, str]] = {}
    for index, raw in enumerate(_list_of_records(ip, inst["images"], "images")):
        rec = _Record(raw, ip, f"images[{index}]", ("id",))
        width, height = rec.integer("width"), rec.integer("height")
        if width < 1 or height < 1:
            raise rec.error(f"image size must be positive, got {width}x{height}")
        images[rec.integer("id")] = (width, height, rec.text("file_name"))
    boxes: dict[int, tuple[int, PixelBox]] = {}
    for index, raw in enumerate(_list_of_records(ip, inst["annotations"], "annotations")):
        rec = _Record(raw, ip, f"annotations[{index}]", ("id",))
        boxes[rec.integer("id")] = (rec.integer("image_id"), rec.xywh_box("bbox"))

    rp, refs = _read_json(refs_path)
    items = []
    skipped: Counter[str] = Counter()
    present: set[str] = set()
    for index, raw in enumerate(_list_of_records(rp, refs, "refs")):
        rec = _Record(raw, rp, index, ("ref_id",))
        ref_split = rec.text("split")
        present.add(ref_split)
        if keep is not None and ref_split not in keep:
            skipped["split"] += 1
            continue
        ref_id, ann_id, image_id = rec.integer("ref_id"), rec.integer("ann_id"), rec.integer("image_id")
        if ann_id not in boxes:
            raise rec.error(f"ann_id {ann_id} is not in {ip}")
        ann_image, box = boxes[ann_id]
        if ann_image != image_id:
            raise rec.error(f"ann_id {ann_id} belongs to image {ann_image} in {ip}, not {image_id}")
        if image_id not in images:
            raise rec.error(f"image_id {image_id} is not in {ip}")
        width, height, file_name = images[image_id]
        if (outside := box_outside_image(box, width, height)) is not None:
            raise rec.error(f"ann_id {ann_id} in {ip}: {outside}")
        sentences = rec.get("sentences")
        if not isinstance(sentences, list) or not sentences:
            raise rec.error(f"field 'sentences' must be a non-empty list, got {sentences!r}")
        for j, sentence in enumerate(sentences):
            srec = _Record(sentence, rp, f"{index}.sentences[{j}]", ("sent_id",))
            sent_id = srec.id("sent_id")
            meta = {
                "box": box,
                "width": width,
                "height": height,
                "split": ref_split,
                "ref_id": ref_id,
                "ann_id": ann_id,
                "sent_id": sent_id,
                "image_id": image_id,
                "category_id": rec.data.get("category_id"),
            }
            if srec.has("raw"):
                meta["raw"] = srec.text("raw")
            items.append(EvalItem(f"{ref_id}:{sent_id}", srec.text(expression), [], file_name, meta))
    if keep is not None and not keep & present:
        raise LoaderError(f"{rp}: no ref in split(s) {sorted(keep)}; the file has {sorted(present)}")
    _check_unique(rp, items)
    return EvalSet(items, str(rp), skipped)


def load_screenspot(path: PathLike, *, platform: str | None = None) -> EvalSet:
    """ScreenSpot ``screenspot_{mobile,desktop,web}.json``: ``[{"img_filename", "bbox" ([x, y, w, h]
    pixels), "instruction", "data_type" ("text" / "icon"), "data_source"}]``. (VLMEvalKit's copy names
    the instruction ``"question"``; that is accepted when ``"instruction"`` is absent.)

    ``id`` is ``"{file stem}:{index}"``, ``answers == []``, ``image`` = ``img_filename``.
    meta: ``box`` (pixel x1, y1, x2, y2, as ``screenspot_hit`` takes it), ``data_type``,
    ``data_source``, ``platform`` (the argument, else mobile / desktop / web from the file name).
    Image sizes are not in the file; read them from the images.
    """
    p, data = _read_json(path)
    if platform is None:
        platform = next((s for s in ("mobile", "desktop", "web") if s in p.stem.lower()), None)
    items = []
    for index, raw in enumerate(_list_of_records(p, data, "ScreenSpot records")):
        rec = _Record(raw, p, index, ("img_filename",))
        text_key = "instruction" if rec.has("instruction") or not rec.has("question") else "question"
        instruction = rec.text(text_key)
        data_type = rec.text("data_type")
        if data_type not in ("text", "icon"):
            raise rec.error(f"data_type must be 'text' or 'icon', got {data_type!r}")
        meta = {"box": rec.xywh_box("bbox"), "data_type": data_type, "data_source": rec.text("data_source")}
        if platform:
            meta["platform"] = platform
        items.append(EvalItem(f"{p.stem}:{index}", instruction, [], rec.text("img_filename"), meta))
    return EvalSet(items, str(p))


# --------------------------------------------------------------------------------------------------
# Multiple choice: MMMU / AI2D / ScienceQA style
# --------------------------------------------------------------------------------------------------

_ID_KEYS = ("id", "question_id", "questionId", "pid")
# Record fields copied to meta when present (SEED-Bench's question_type_id is its dimension).
_MC_META_KEYS = ("split", "subject", "subfield", "category", "hint", "topic_difficulty", "question_type_id")


def _options(rec: _Record) -> list[str]:
    if not rec.has("options") and not rec.has("choices") and rec.has("choice_a"):
        # SEED-Bench (the official SEED-Bench.json and lmms-lab's copy) spells the options out as
        # choice_a, choice_b, ...: read them in letter order up to the first one missing.
        keys = [f"choice_{letter}" for letter in _LETTERS.lower()]
        present = [key for key in keys if rec.has(key)]
        count = next((k for k, key in enumerate(keys) if not rec.has(key)), len(keys))
        if present != keys[:count]:
            raise rec.error(f"choice fields must run from choice_a without a gap, got {present}")
        if count < 2:
            raise rec.error(f"needs at least choice_a and choice_b, got {present}")
        return [rec.text(key) for key in keys[:count]]
    key = "options" if rec.has("options") or not rec.has("choices") else "choices"
    value = rec.get(key)
    if isinstance(value, str):
        # MMMU stores the options as the repr of a Python list of strings; literal_eval evaluates literals
        # only (no code).
        try:
            value = ast.literal_eval(value)
        except (ValueError, SyntaxError) as exc:
            raise rec.error(f"field {key!r} is a string but not a list literal: {value[:80]!r}") from exc
    if not isinstance(value, list) or not all(isinstance(v, str) for v in value):
        raise rec.error(f"field {key!r} must be a list of strings, got {value!r}")
    if not 2 <= len(value) <= len(_LETTERS):
        raise rec.error(f"field {key!r} must hold 2-26 options, got {len(value)}")
    return list(value)


def _answer_letter(rec: _Record, n_options: int, zero_based: bool) -> str:
    value = rec.get("answer")
    base = 0 if zero_based else 1
    if isinstance(value, bool):
        index = None
    elif isinstance(value, int):
        index = value - base
    elif isinstance(value, str) and re.fullmatch(r"\s*\d+\s*", value):
        index = int(value) - base
    elif isinstance(value, str) and re.fullmatch(r"\s*\(?[A-Za-z]\)?\.?\s*", value):
        index = _LETTERS.index(value.strip(" ().").upper())
    else:
        index = None
    if index is None or not 0 <= index < n_options:
        raise rec.error(f"answer {value!r} is not an option letter or index for {n_options} options")
    return _LETTERS[index]


def _choice_entries(path: PathLike) -> tuple[Path, list[tuple[str | None, Any, int | None]]]:
    """The ``(mapping key or None, record, JSON Lines line or None)`` of a multiple-choice file, in
    file order."""
    p = Path(path)
    if p.suffix.lower() == ".jsonl":
        p, records, lines = _read_json_lines(p)
        records = _list_of_records(p, records, "records")
        return p, [(None, r, lines[i] if lines else None) for i, r in enumerate(records)]
    p, data = _read_json(p)
    if isinstance(data, list):
        return p, [(None, r, None) for r in data]
    if isinstance(data, Mapping) and isinstance(data.get("data"), list):
        return p, [(None, r, None) for r in data["data"]]
    if isinstance(data, Mapping) and isinstance(data.get("questions"), list):
        # SEED-Bench.json: {"question_type": {name: id}, "questions": [...]}.
        return p, [(None, r, None) for r in data["questions"]]
    if isinstance(data, Mapping) and data and all(isinstance(v, Mapping) for v in data.values()):
        return p, [(str(k), v, None) for k, v in data.items()]
    raise LoaderError(
        f"{p}: expected a list of records, a 'data' or 'questions' list, or an id -> record object"
    )


def record_splits(path: PathLike) -> list[str]:
    """The sorted ``split`` values of a file's records: a multiple-choice file (any layout
    ``load_multiple_choice`` reads) or a RefCOCO refs JSON. Records without a string ``split`` are
    ignored. For error messages that tell the user which ``split=`` to choose."""
    _, entries = _choice_entries(path)
    return sorted(
        {r["split"] for _, r, _ in entries if isinstance(r, Mapping) and isinstance(r.get("split"), str)}
    )


def load_multiple_choice(
    path: PathLike,
    *,
    split: str | Collection[str] | None = None,
    require_image: bool = False,
    skip_open: bool = False,
    zero_based: bool = True,
) -> EvalSet:
    """Multiple-choice sets in the MMMU / AI2D / ScienceQA / SEED-Bench style.

    The file is a JSON list, an object with a ``"data"`` list, an object with a ``"questions"`` list
    (SEED-Bench.json), an object mapping id -> record (ScienceQA ``problems.json``), or JSON lines. A
    record has ``question``, ``options`` (or ``choices``, or SEED-Bench's ``choice_a``, ``choice_b``,
    ...; a list of strings, or MMMU's string repr of one) and ``answer``: an option letter (``"B"``,
    ``"(B)"``), or an index as int or digit string (AI2D / ScienceQA; 0-based unless
    ``zero_based=False``). The id is ``id`` / ``question_id`` / ``questionId`` / ``pid``, else the
    mapping key, else the index. ``image`` is ``image`` (or ``image_path``, or MMMU's ``image_1``) when
    it is a string, else SEED-Bench's ``data_id`` (the file name in ``SEED-Bench-image/``), else
    ``None``; in an id -> record file (ScienceQA) it is ``"{split}/{id}/{image}"``, as the images are
    stored (``images/<split>/<pid>/image.png``; ``"{id}/{image}"`` for a record without ``split``).

    ``answers == [letter]`` for ``choice_correct``; MMMU open questions (``question_type == "open"``)
    keep ``answers == [answer text]`` and ``options == []`` (for ``mmmu_open_correct``), or are
    skipped with ``skip_open=True``. Skips, counted in ``skipped``: ``"split"`` (records whose
    ``split`` is not in ``split``; a record without ``split`` is an error then, and a split that
    matches no record raises ``LoaderError`` naming the splits present), ``"video"`` (SEED-Bench
    records with ``data_type == "video"``; ``data_type`` must be ``"image"`` or ``"video"``),
    ``"no_image"`` (no image with ``require_image=True``, e.g. ScienceQA-IMG), ``"open"``.
    meta: ``options`` (list), ``answer_index`` (0-based), ``question_type``, and ``split``,
    ``subject`` / ``subfield`` / ``category`` / ``hint`` / ``question_type_id`` when present.
    """
    p, entries = _choice_entries(path)
    keep = _split_filter(split)
    items = []
    skipped: Counter[str] = Counter()
    present: set[str] = set()
    for index, (key, raw, line) in enumerate(entries):
        rec = _Record(raw, p, key if key is not None else index, _ID_KEYS, line)
        if keep is not None:
            record_split = rec.text("split")
            present.add(record_split)
            if record_split not in keep:
                skipped["split"] += 1
                continue
        data_type = rec.text("data_type") if rec.has("data_type") else None
        if data_type not in (None, "image", "video"):
            raise rec.error(f"data_type must be 'image' or 'video', got {data_type!r}")
        if data_type == "video":
            # SEED-Bench's video dimensions (10-12) need the clips; this loader is for image questions.
            skipped["video"] += 1
            continue
        image = None
        for image_key in ("image", "image_path", "image_1"):
            if rec.has(image_key):
                value = rec.get(image_key)
                if not isinstance(value, str):
                    kind = type(value).__name__
                    raise rec.error(f"field {image_key!r} must be a file name string, got {kind}")
                image = value
                break
        if image is None and data_type == "image" and rec.has("data_id"):
            image = rec.text("data_id")  # SEED-Bench: the file name in SEED-Bench-image/
        if image and key is not None:
            # ScienceQA problems.json: the images of each split are in their own folder,
            # images/<split>/<pid>/image.png.
            image = f"{rec.text('split')}/{key}/{image}" if rec.has("split") else f"{key}/{image}"
        if require_image and not image:
            skipped["no_image"] += 1
            continue
        item_id = next((rec.id(k) for k in _ID_KEYS if rec.has(k)), key if key is not None else str(index))
        question_type = rec.data.get("question_type", "multiple-choice")
        meta: dict[str, Any] = {"question_type": question_type}
        for extra in _MC_META_KEYS:
            if rec.has(extra):
                meta[extra] = rec.get(extra)
        if question_type == "open":
            if skip_open:
                skipped["open"] += 1
                continue
            answers = rec.str_list("answer", allow_single=True)
            meta.update({"options": []})
        else:
            options = _options(rec)
            letter = _answer_letter(rec, len(options), zero_based)
            answers = [letter]
            meta.update({"options": options, "answer_index": _LETTERS.index(letter)})
        items.append(EvalItem(item_id, rec.text("question"), answers, image, meta))
    if keep is not None and not keep & present:
        raise LoaderError(f"{p}: no record in split(s) {sorted(keep)}; the file has {sorted(present)}")
    _check_unique(p, items)
    return EvalSet(items, str(p), skipped)
