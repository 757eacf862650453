"""Benchmark metrics, written from the rules in the shared ``eval-metrics.md`` (no reference code copied).

Every metric has one *canonical* rule, the one eval-metrics.md recommends, and named *compatibility
modes* that reproduce a reference evaluator where the references disagree. Report the mode with every
number. An unknown mode, or input of the wrong type or shape, raises ``ValueError``.

Per-item functions return a score in [0, 1] (or a bool); datasets are averaged by the caller and
reported x100 unless stated otherwise.

========================  =================================================  ==========================
metric                    functions                                          canonical mode
========================  =================================================  ==========================
VQA accuracy              ``normalize_vqa_answer``, ``vqa_accuracy``         ``"evalai"``
ANLS                      ``anls``, ``anls_similarity``, ``levenshtein``     ``"rrc"``
ChartQA relaxed accuracy  ``relaxed_correctness``, ``relaxed_accuracy``,     ``"pix2struct"``
                          ``exact_match``
OCRBench                  ``ocrbench_correct``, ``ocrbench_aggregate``       ``"official"``
multiple choice           ``extract_choice``, ``choice_correct``,            ``"canonical"``
                          ``mmmu_open_correct``, ``mvbench_correct``,
                          ``mvbench_accuracy``
POPE                      ``pope_parse``, ``pope_metrics``                   ``"official"``
grounding (Acc@0.5)       ``parse_box``, ``grounding_iou``,                  ``"canonical"`` (declared
                          ``grounding_hit``, ``grounding_accuracy``,         ``coords``, default our
                          ``decode_ferret_boxes``, ``flickr_phrase_hit``,    ``"mm15"`` text units)
                          ``box_iou``, ``center_in_box``, ``xywh_to_xyxy``
ScreenSpot click          ``screenspot_hit``                                 ``"canonical"``
CIDEr-D                   ``coco_tokenize``, ``cider_d``                     ``"coco"``
video judge (ActivityNet) ``parse_judge_reply``, ``judge_aggregate``         (single rule)
========================  =================================================  ==========================

Reference commits are the ones listed in eval-metrics.md. Where the code that could be read here differs
from a rule or vector in that note, the function docstring says so.
"""

from __future__ import annotations

import ast
import math
import numbers
import random
import re
import string
from collections import Counter
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass

from mm15.boxes import TEXT_UNITS, Box

__all__ = [
    "CiderResult",
    "anls",
    "anls_similarity",
    "box_iou",
    "center_in_box",
    "choice_correct",
    "cider_d",
    "coco_tokenize",
    "decode_ferret_boxes",
    "exact_match",
    "extract_choice",
    "flickr_phrase_hit",
    "grounding_accuracy",
    "grounding_hit",
    "grounding_iou",
    "judge_aggregate",
    "levenshtein",
    "mmmu_open_correct",
    "mvbench_accuracy",
    "mvbench_correct",
    "normalize_vqa_answer",
    "ocrbench_aggregate",
    "ocrbench_correct",
    "parse_box",
    "parse_judge_reply",
    "pope_metrics",
    "pope_parse",
    "relaxed_accuracy",
    "relaxed_correctness",
    "screenspot_hit",
    "vqa_accuracy",
    "xywh_to_xyxy",
]


# --------------------------------------------------------------------------------------------------
# Shared input checks
# --------------------------------------------------------------------------------------------------


def _check_mode(mode: str, allowed: Iterable[str], metric: str) -> None:
    allowed = tuple(allowed)
    if mode not in allowed:
        raise ValueError(f"unknown {metric} mode {mode!r}; expected one of {', '.join(map(repr, allowed))}")


def _check_str(value: object, name: str) -> str:
    if not isinstance(value, str):
        raise ValueError(f"{name} must be a str, got {type(value).__name__}")
    return value


def _check_str_list(values: object, name: str, *, allow_single: bool = False) -> list[str]:
    """A non-empty sequence of strings (a bare str is accepted only when ``allow_single``)."""
    if isinstance(values, str):
        if allow_single:
            return [values]
        raise ValueError(f"{name} must be a sequence of str, not a single str")
    if not isinstance(values, Sequence) or len(values) == 0:
        raise ValueError(f"{name} must be a non-empty sequence of str")
    for value in values:
        _check_str(value, f"every item of {name}")
    return list(values)


def _check_size(width: int, height: int) -> None:
    for name, value in (("width", width), ("height", height)):
        if isinstance(value, bool) or not isinstance(value, numbers.Integral) or value < 1:
            raise ValueError(f"{name} must be a positive int, got {value!r}")


def _four_numbers(box: object, name: str) -> tuple[float, float, float, float]:
    """Four finite real numbers from a list, tuple or 1-D array (numpy scalars accepted)."""
    values: list[object] | None = None
    if not isinstance(box, str | bytes):
        try:
            values = list(box)  # type: ignore[call-overload]
        except TypeError:
            values = None
    if values is None or len(values) != 4:
        raise ValueError(f"{name} must be 4 numbers, got {box!r}")
    if not all(isinstance(v, numbers.Real) and not isinstance(v, bool) and math.isfinite(v) for v in values):
        raise ValueError(f"{name} must hold finite numbers, got {box!r}")
    a, b, c, d = (float(v) for v in values)
    return a, b, c, d


def _check_box(box: Sequence[float], name: str) -> Box:
    x1, y1, x2, y2 = _four_numbers(box, name)
    if x2 < x1 or y2 < y1:
        raise ValueError(f"{name} must have x1 <= x2 and y1 <= y2, got {box!r}")
    return x1, y1, x2, y2


def _check_threshold(threshold: float, name: str = "threshold") -> float:
    if isinstance(threshold, bool) or not isinstance(threshold, int | float) or not 0 < threshold <= 1:
        raise ValueError(f"{name} must be a number in (0, 1], got {threshold!r}")
    return float(threshold)


# --------------------------------------------------------------------------------------------------
# 1.1 VQA accuracy
# --------------------------------------------------------------------------------------------------

# The reference punctuation list (vqaEval.py processPunctuation); ':' and "'" are not in it.
# fmt: off
_VQA_PUNCT = (";", "/", "[", "]", '"', "{", "}", "(", ")", "=", "+", "\\", "_", "-", ">", "<", "@", "`", ",",
              "?", "!")
# fmt: on
_COMMA_OFFICIAL = re.compile(r"(\d)(,)(\d)")
_COMMA_EVALAI = re.compile(r"(?<=\d)(,)+(?=\d)")
# The references write "(?!<=\d)(\.)(?!\d)": the first group is a negative *lookahead* for the text
# "<=" + digit, which a "." can never start, so every "." not followed by a digit is removed.
_PERIOD_REFERENCE = re.compile(r"\.(?!\d)")
_PERIOD_VLMEVALKIT = re.compile(r"(?<!\d)\.(?!\d)")
# ``re.sub(pattern, "", text, re.UNICODE)`` passes re.UNICODE (= 32) as the count argument.
_PERIOD_MAX_REMOVED = 32

# fmt: off
_NUMBER_WORDS = {"none": "0", "zero": "0", "one": "1", "two": "2", "three": "3", "four": "4", "five": "5",
                 "six": "6", "seven": "7", "eight": "8", "nine": "9", "ten": "10"}
_ARTICLES = frozenset({"a", "an", "the"})
# fmt: on

# The VQA contractions table (vqaEval.py), kept entry for entry because scores depend on it: keys with
# capitals never match (tokens are lower-cased first) and "somebody'd" maps the "wrong" way round.
# fmt: off
_CONTRACTIONS = {
    "aint": "ain't", "arent": "aren't", "cant": "can't", "couldve": "could've", "couldnt": "couldn't",
    "couldn'tve": "couldn't've", "couldnt've": "couldn't've", "didnt": "didn't", "doesnt": "doesn't",
    "dont": "don't", "hadnt": "hadn't", "hadnt've": "hadn't've", "hadn'tve": "hadn't've", "hasnt": "hasn't",
    "havent": "haven't", "hed": "he'd", "hed've": "he'd've", "he'dve": "he'd've", "hes": "he's",
    "howd": "how'd", "howll": "how'll", "hows": "how's", "Id've": "I'd've", "I'dve": "I'd've", "Im": "I'm",
    "Ive": "I've", "isnt": "isn't", "itd": "it'd", "itd've": "it'd've", "it'dve": "it'd've", "itll": "it'll",
    "let's": "let's", "maam": "ma'am", "mightnt": "mightn't", "mightnt've": "mightn't've",
    "mightn'tve": "mightn't've", "mightve": "might've", "mustnt": "mustn't", "mustve": "must've",
    "neednt": "needn't", "notve": "not've", "oclock": "o'clock", "oughtnt": "oughtn't",
    "ow's'at": "'ow's'at", "'ows'at": "'ow's'at", "'ow'sat": "'ow's'at", "shant": "shan't",
    "shed've": "she'd've", "she'dve": "she'd've", "she's": "she's", "shouldve": "should've",
    "shouldnt": "shouldn't", "shouldnt've": "shouldn't've", "shouldn'tve": "shouldn't've",
    "somebody'd": "somebodyd", "somebodyd've": "somebody'd've", "somebody'dve": "somebody'd've",
    "somebodyll": "somebody'll", "somebodys": "somebody's", "someoned": "someone'd",
    "someoned've": "someone'd've", "someone'dve": "someone'd've", "someonell": "someone'll",
    "someones": "someone's", "somethingd": "something'd", "somethingd've": "something'd've",
    "something'dve": "something'd've", "somethingll": "something'll", "thats": "that's",
    "thered": "there'd", "thered've": "there'd've", "there'dve": "there'd've", "therere": "there're",
    "theres": "there's", "theyd": "they'd", "theyd've": "they'd've", "they'dve": "they'd've",
    "theyll": "they'll", "theyre": "they're", "theyve": "they've", "twas": "'twas", "wasnt": "wasn't",
    "wed've": "we'd've", "we'dve": "we'd've", "weve": "we've", "werent": "weren't", "whatll": "what'll",
    "whatre": "what're", "whats": "what's", "whatve": "what've", "whens": "when's", "whered": "where'd",
    "wheres": "where's", "whereve": "where've", "whod": "who'd", "whod've": "who'd've",
    "who'dve": "who'd've", "wholl": "who'll", "whos": "who's", "whove": "who've", "whyll": "why'll",
    "whyre": "why're", "whys": "why's", "wont": "won't", "wouldve": "would've", "wouldnt": "wouldn't",
    "wouldnt've": "wouldn't've", "wouldn'tve": "wouldn't've", "yall": "y'all", "yall'll": "y'all'll",
    "y'allll": "y'all'll", "yall'd've": "y'all'd've", "y'alld've": "y'all'd've", "y'all'dve": "y'all'd've",
    "youd": "you'd", "youd've": "you'd've", "you'dve": "you'd've", "youll": "you'll", "youre": "you're",
    "youve": "you've",
}
# fmt: on

VQA_MODES = ("evalai", "lmms-eval-textvqa", "mmf", "lmms-eval-vqav2", "vlmevalkit", "official-vqav2")
_VQA_NORMALIZE_MODES = ("evalai", "vqav2", "vlmevalkit")


def _process_punctuation(text: str, comma: re.Pattern[str], period: re.Pattern[str]) -> str:
    """Delete or blank the punctuation marks; the tests look at the *original* text, not the output."""
    delete_all = comma.search(text) is not None
    out = text
    for p in _VQA_PUNCT:
        out = out.replace(p, "" if delete_all or p + " " in text or " " + p in text else " ")
    return period.sub("", out, count=_PERIOD_MAX_REMOVED)


def _process_digit_article(text: str) -> str:
    words = [_NUMBER_WORDS.get(w, w) for w in text.lower().split()]
    return " ".join(_CONTRACTIONS.get(w, w) for w in words if w not in _ARTICLES)


def _clean_whitespace(text: str) -> str:
    return text.replace("\n", " ").replace("\t", " ").strip()


def _evalai_word_tokenize(text: str) -> str:
    return text.lower().replace(",", "").replace("?", "").replace("'s", " 's").strip()


def normalize_vqa_answer(text: str, *, mode: str = "evalai") -> str:
    """Normalise a VQA answer (prediction or human answer).

    Modes:

    * ``"evalai"`` (canonical): mmf ``EvalAIAnswerProcessor``, as in lmms-eval TextVQA and the EvalAI
      servers: lower-case, drop ``,`` and ``?``, split ``'s`` off, then the punctuation and the
      number-word / article / contraction steps of vqaEval.py.
    * ``"vqav2"``: vqaEval.py ``processPunctuation`` + ``processDigitArticle`` (no word_tokenize step).
    * ``"vlmevalkit"``: VLMEvalKit ``process_answer``; its period rule is the *fixed* regex, so "5."
      keeps its period.

    In every mode at most 32 periods are removed (the references pass ``re.UNICODE`` as ``count``).
    """
    _check_str(text, "text")
    _check_mode(mode, _VQA_NORMALIZE_MODES, "normalize_vqa_answer")
    if mode == "evalai":
        text = _clean_whitespace(_evalai_word_tokenize(text))
        return _process_digit_article(_process_punctuation(text, _COMMA_EVALAI, _PERIOD_REFERENCE))
    period = _PERIOD_REFERENCE if mode == "vqav2" else _PERIOD_VLMEVALKIT
    text = _clean_whitespace(text)
    return _process_digit_article(_process_punctuation(text, _COMMA_OFFICIAL, period))


def _leave_one_out_accuracy(prediction: str, answers: Sequence[str]) -> float:
    """Mean over the annotators of min(1, #other annotators agreeing with the prediction / 3)."""
    matches = sum(a == prediction for a in answers)
    total = sum(min(1.0, (matches - (a == prediction)) / 3) for a in answers)
    return total / len(answers)


def vqa_accuracy(prediction: str, answers: Sequence[str], *, mode: str = "evalai") -> float:
    """VQA accuracy of one prediction against the human answers (usually 10), in [0, 1].

    Score = mean over i of min(1, #{j != i : answer_j == prediction} / 3): with 10 annotators, k
    agreeing answers give 0, 0.3, 0.6, 0.9, 1.0 for k = 0, 1, 2, 3, >= 4. A single answer always
    scores 0 (its only subset is empty), exactly as in the references.

    Modes:

    * ``"evalai"`` (canonical; aliases ``"lmms-eval-textvqa"`` and ``"mmf"``): EvalAI normalisation
      of the prediction and of every answer, always.
    * ``"lmms-eval-vqav2"``: lmms-eval ``vqav2_process_results`` as read in the code (commits 0393078
      and 7993835): the prediction always goes through the full EvalAI processor; the answers are
      whitespace-cleaned, and only when the annotators disagree are answers and prediction passed
      through punctuation + digit/article. eval-metrics.md words this as "no word_tokenize, always
      applied"; both readings give the same value on every vector in the note.
    * ``"vlmevalkit"``: VLMEvalKit ``process_answer`` on both sides, always.
    * ``"official-vqav2"``: GT-Vision-Lab vqaEval.py (strict parity mode): answers and prediction are
      only normalised when ``len(set(answers)) > 1``; otherwise raw, case-sensitive comparison.
    """
    _check_str(prediction, "prediction")
    answers = _check_str_list(answers, "answers")
    _check_mode(mode, VQA_MODES, "vqa_accuracy")
    if mode in ("evalai", "lmms-eval-textvqa", "mmf"):
        pred = normalize_vqa_answer(prediction, mode="evalai")
        gts = [normalize_vqa_answer(a, mode="evalai") for a in answers]
    elif mode == "vlmevalkit":
        pred = normalize_vqa_answer(prediction, mode="vlmevalkit")
        gts = [normalize_vqa_answer(a, mode="vlmevalkit") for a in answers]
    elif mode == "lmms-eval-vqav2":
        pred = normalize_vqa_answer(prediction, mode="evalai")
        gts = [_clean_whitespace(a) for a in answers]
        if len(set(gts)) > 1:
            gts = [
                _process_digit_article(_process_punctuation(a, _COMMA_EVALAI, _PERIOD_REFERENCE)) for a in gts
            ]
            pred = _process_digit_article(_process_punctuation(pred, _COMMA_EVALAI, _PERIOD_REFERENCE))
    else:  # official-vqav2
        pred = _clean_whitespace(prediction)
        gts = [_clean_whitespace(a) for a in answers]
        if len(set(gts)) > 1:
            gts = [normalize_vqa_answer(a, mode="vqav2") for a in gts]
            pred = normalize_vqa_answer(pred, mode="vqav2")
    return _leave_one_out_accuracy(pred, gts)


# --------------------------------------------------------------------------------------------------
# 1.2 ANLS
# --------------------------------------------------------------------------------------------------

ANLS_MODES = ("rrc", "anls-pkg", "lmms-eval", "vlmevalkit", "mmf", "pix2struct")


def levenshtein(a: str, b: str) -> int:
    """Edit distance (insertions, deletions, substitutions; each costs 1) between two strings."""
    _check_str(a, "a")
    _check_str(b, "b")
    if len(a) < len(b):
        a, b = b, a
    previous = list(range(len(b) + 1))
    for i, ca in enumerate(a, start=1):
        current = [i]
        for j, cb in enumerate(b, start=1):
            current.append(min(previous[j] + 1, current[j - 1] + 1, previous[j - 1] + (ca != cb)))
        previous = current
    return previous[-1]


def _collapse(text: str) -> str:
    return " ".join(text.strip().lower().split())


def _normalized_distance(a: str, b: str, length: int) -> float:
    return 0.0 if length == 0 else levenshtein(a, b) / length


def anls_similarity(prediction: str, answer: str) -> float:
    """1 - normalised Levenshtein distance after the RRC normalisation, before any threshold."""
    _check_str(prediction, "prediction")
    _check_str(answer, "answer")
    p, a = _collapse(prediction), _collapse(answer)
    return 1.0 - _normalized_distance(p, a, max(len(p), len(a)))


def anls(prediction: str, answers: Sequence[str], *, threshold: float = 0.5, mode: str = "rrc") -> float:
    """ANLS of one prediction: the best thresholded similarity over the ground-truth answers.

    ``NL = lev(a, p) / max(len)``; an answer scores ``1 - NL`` or 0 by the threshold rule of the mode.
    Two empty strings have distance 0 and score 1 in every mode (mmf and pix2struct would divide by
    zero there).

    Modes:

    * ``"rrc"`` (canonical; alias ``"anls-pkg"``): shunk031/ANLS = PyPI ``anls`` 0.0.2, the RRC
      definition: both strings lower-cased, stripped, whitespace collapsed; lengths of the normalised
      strings; an answer counts only if ``NL < threshold``.
    * ``"lmms-eval"`` and ``"vlmevalkit"``: same normalisation for the distance, but the length is
      ``max(len(answer.upper()), len(prediction.upper()))`` of the *raw* strings; the score
      ``1 - min NL`` is kept when ``>= threshold`` (so NL = 0.5 gives 0.5). Some VLMEvalKit snapshots
      use the normalised lengths instead (e.g. 0a04a1d); eval-metrics.md's commit uses raw lengths.
    * ``"mmf"``: ``STVQAANLSEvaluator``: lower + strip only (no collapsing), normalised lengths, kept
      when ``1 - NL >= threshold``.
    * ``"pix2struct"``: lower-case only, lengths as is, kept when ``NL < threshold`` as in
      eval-metrics.md. The stored pix2struct snapshots bd70460 and 5b086ef write ``<=`` instead,
      which keeps NL = 0.5; the note's pinned commit (945f27e) could not be read here.
    """
    _check_str(prediction, "prediction")
    answers = _check_str_list(answers, "answers")
    threshold = _check_threshold(threshold)
    _check_mode(mode, ANLS_MODES, "anls")
    if mode in ("rrc", "anls-pkg"):
        p = _collapse(prediction)
        best = 0.0
        for answer in answers:
            a = _collapse(answer)
            nl = _normalized_distance(p, a, max(len(p), len(a)))
            best = max(best, 1.0 - nl if nl < threshold else 0.0)
        return best
    if mode in ("lmms-eval", "vlmevalkit"):
        p = _collapse(prediction)
        nls = [
            _normalized_distance(_collapse(a), p, max(len(a.upper()), len(prediction.upper())))
            for a in answers
        ]
        score = 1.0 - min(nls)
        return 0.0 if score < threshold else score
    if mode == "mmf":
        p = prediction.lower().strip()
        best = 0.0
        for answer in answers:
            a = answer.lower().strip()
            sim = 1.0 - _normalized_distance(a, p, max(len(a), len(p)))
            best = max(best, sim if sim >= threshold else 0.0)
        return best
    p = prediction.lower()  # pix2struct
    best = 0.0
    for answer in answers:
        a = answer.lower()
        nl = _normalized_distance(a, p, max(len(a), len(p)))
        best = max(best, 1.0 - nl if nl < threshold else 0.0)
    return best


# --------------------------------------------------------------------------------------------------
# 1.3 ChartQA relaxed accuracy (and pix2struct exact match)
# --------------------------------------------------------------------------------------------------

CHARTQA_MODES = ("pix2struct", "lmms-eval", "vlmevalkit")


def _chartqa_float(text: str) -> float | None:
    """Python ``float`` semantics, as in the references: surrounding whitespace, "_" separators, "nan",
    "inf" and non-ASCII decimal digits all parse; "1,000" does not. A trailing "%" divides by 100."""
    try:
        if text.endswith("%"):
            return float(text[:-1]) / 100.0  # one "%" only, as the reference's t[:-1]
        return float(text)
    except ValueError:
        return None


def relaxed_correctness(
    prediction: str, target: str, *, max_relative_change: float = 0.05, mode: str = "pix2struct"
) -> bool:
    """ChartQA relaxed correctness of one prediction against one target.

    If both parse as numbers and the target is non-zero: correct iff
    ``|p - t| / |t| <= max_relative_change``. Otherwise (a non-number, or a zero target, which is
    falsy) the strings must be equal ignoring case, with no stripping.

    Modes: ``"pix2struct"`` (canonical; identical code in lmms-eval, alias ``"lmms-eval"``) and
    ``"vlmevalkit"``, which strips the prediction first (``"Yes\\n"`` then equals ``"yes"``).
    (VLMEvalKit snapshot e5266a1 calls the function with prediction and target swapped, which divides
    by the prediction; that variant is not reproduced.)
    """
    _check_str(prediction, "prediction")
    _check_str(target, "target")
    _check_mode(mode, CHARTQA_MODES, "relaxed_correctness")
    if (
        isinstance(max_relative_change, bool)
        or not isinstance(max_relative_change, int | float)
        or not (math.isfinite(max_relative_change) and max_relative_change >= 0)
    ):
        raise ValueError(f"max_relative_change must be a finite number >= 0, got {max_relative_change!r}")
    if mode == "vlmevalkit":
        prediction = prediction.strip()
    p, t = _chartqa_float(prediction), _chartqa_float(target)
    if p is not None and t:
        return abs(p - t) / abs(t) <= max_relative_change
    return prediction.lower() == target.lower()


def relaxed_accuracy(prediction: str, targets: Sequence[str], *, mode: str = "pix2struct") -> float:
    """1.0 if the prediction is relaxed-correct for any target (ChartQA has one), else 0.0."""
    targets = _check_str_list(targets, "targets", allow_single=True)
    return float(any(relaxed_correctness(prediction, t, mode=mode) for t in targets))


def exact_match(prediction: str, targets: Sequence[str]) -> float:
    """pix2struct ``exact_match``: 1.0 if the prediction equals a target character for character."""
    _check_str(prediction, "prediction")
    targets = _check_str_list(targets, "targets", allow_single=True)
    return float(prediction in targets)


# --------------------------------------------------------------------------------------------------
# 1.4 OCRBench
# --------------------------------------------------------------------------------------------------

OCRBENCH_MODES = ("official", "vlmevalkit", "lmms-eval")
OCRBENCH_RECOGNITION_TYPES = (
    "Regular Text Recognition",
    "Irregular Text Recognition",
    "Artistic Text Recognition",
    "Handwriting Recognition",
    "Digit String Recognition",
    "Non-Semantic Text Recognition",
)
OCRBENCH_TYPES = (
    *OCRBENCH_RECOGNITION_TYPES,
    "Scene Text-centric VQA",
    "Doc-oriented VQA",
    "Key Information Extraction",
    "Handwritten Mathematical Expression Recognition",
)
_FULLWIDTH = {cp: cp - 0xFEE0 for cp in range(0xFF01, 0xFF5F)} | {0x3000: 0x20}


def ocrbench_correct(
    prediction: str, answers: str | Sequence[str], dataset_name: str, *, mode: str = "official"
) -> bool:
    """OCRBench v1 per-item rule: some ground-truth answer is a *substring* of the prediction.

    * ``dataset_name == "HME100k"`` (handwritten maths): both sides stripped, newlines made spaces,
      then every space removed; the comparison is case-sensitive.
    * any other dataset: both sides lower-cased and stripped, newlines made spaces (so "a\\nb" does
      not contain "ab").

    Modes: ``"official"`` (canonical; MultimodalOCR example.py, same rule as ``"vlmevalkit"``) and
    ``"lmms-eval"``, which also folds full-width ASCII (U+FF01-FF5E) and U+3000 on non-HME items
    and nothing else (not circled digits, superscripts, Roman numerals or unit symbols). Note: an older
    lmms-eval snapshot (46a88d8) lower-cases the prediction before the HME branch too; the note's
    commit is taken to keep HME case-sensitive, as its HME vector says.
    """
    _check_str(prediction, "prediction")
    answer_list = _check_str_list(answers, "answers", allow_single=True)
    _check_str(dataset_name, "dataset_name")
    _check_mode(mode, OCRBENCH_MODES, "ocrbench_correct")
    if dataset_name == "HME100k":
        p = prediction.strip().replace("\n", " ").replace(" ", "")
        return any(a.strip().replace("\n", " ").replace(" ", "") in p for a in answer_list)
    if mode == "lmms-eval":
        prediction = prediction.translate(_FULLWIDTH)
        answer_list = [a.translate(_FULLWIDTH) for a in answer_list]
    p = prediction.lower().strip().replace("\n", " ")
    return any(a.lower().strip().replace("\n", " ") in p for a in answer_list)


def ocrbench_aggregate(types: Sequence[str], correct: Sequence[bool]) -> dict[str, float]:
    """Sum correct items per OCRBench type; "Text Recognition" is the six recognition types together.

    Returns every type's count, ``"Text Recognition"``, ``"Final Score"`` (out of 1000 on the full
    benchmark) and ``"Final Score Norm"`` = Final / 10, the percentage MM1.5 reports. (lmms-eval's
    returned value is Final / 1000.)
    """
    types = _check_str_list(types, "types")
    if isinstance(correct, str) or not isinstance(correct, Sequence) or len(correct) != len(types):
        raise ValueError("correct must be a sequence of bools as long as types")
    scores = dict.fromkeys(OCRBENCH_TYPES, 0.0)
    for item_type, ok in zip(types, correct, strict=True):
        if item_type not in scores:
            raise ValueError(f"unknown OCRBench type {item_type!r}")
        scores[item_type] += float(bool(ok))
    recognition = sum(scores[t] for t in OCRBENCH_RECOGNITION_TYPES)
    final = sum(scores.values())
    return {**scores, "Text Recognition": recognition, "Final Score": final, "Final Score Norm": final / 10}


# --------------------------------------------------------------------------------------------------
# 1.5 Multiple choice
# --------------------------------------------------------------------------------------------------

EXTRACT_MODES = ("canonical", "mmmu", "lmms-eval-mmmu", "vlmevalkit", "lmms-eval-mcq", "lmms-eval-blink")
CHOICE_MODES = (
    *EXTRACT_MODES,
    "lmms-eval-ai2d",
    "lmms-eval-muirbench",
    "lmms-eval-scienceqa",
    "llava-scienceqa",
    "lmms-eval-seedbench",
)
MVBENCH_MODES = ("official", "lmms-eval")
_MMMU_SEED = 42


def _option_map(options: Sequence[str] | Mapping[str, str] | None, *, required: bool) -> dict[str, str]:
    """Letter -> option text. A sequence of texts gets the letters A, B, C, ... in order."""
    if options is None:
        if required:
            raise ValueError("options are required in this mode")
        return {}
    if isinstance(options, Mapping):
        mapping = dict(options)
    elif isinstance(options, Sequence) and not isinstance(options, str):
        if len(options) > 26:
            raise ValueError("at most 26 options are supported")
        mapping = {string.ascii_uppercase[i]: text for i, text in enumerate(options)}
    else:
        raise ValueError("options must be a sequence of option texts or a mapping letter -> text")
    if not mapping:
        raise ValueError("options must not be empty")
    for letter, text in mapping.items():
        if not (isinstance(letter, str) and len(letter) == 1 and letter in string.ascii_uppercase):
            raise ValueError(f"option letters must be single upper-case ASCII letters, got {letter!r}")
        _check_str(text, f"option {letter}")
    return mapping


def _mmmu_parse(response: str, index2ans: dict[str, str], rng: random.Random, *, lmms_eval: bool) -> str:
    """MMMU ``parse_multi_choice_response`` (official) and lmms-eval's variant (``lmms_eval=True``)."""
    for ch in (",", ".", "!", "?", ";", ":", "'"):
        response = response.strip(ch)
    response = f" {response} "
    letters = list(index2ans)
    candidates: list[str] = []
    by_index, bracketed = True, False
    for c in letters:
        if f"({c})" in response:
            candidates.append(c)
            bracketed = True
    if not candidates:
        candidates = [c for c in letters if (f"{c} " if lmms_eval else f" {c} ") in response]
    if not candidates and lmms_eval:
        candidates = [c for c in letters if f"{c}." in response]
    if not candidates and len(response.split()) > 5:
        candidates = [c for c, text in index2ans.items() if text.lower() in response.lower()]
        by_index = not candidates
    if not candidates:
        return rng.choice(letters)
    if len(candidates) == 1:
        return candidates[0]
    if not by_index:
        positions = [response.lower().rfind(index2ans[c].lower()) for c in candidates]
    elif bracketed:
        positions = [response.rfind(f"({c})") for c in candidates]
    else:
        positions = [response.rfind(f" {c} ") for c in candidates]
    return candidates[positions.index(max(positions))]  # first maximum, like np.argmax


def _vlmevalkit_can_infer(answer: str, index2ans: dict[str, str]) -> str:
    """VLMEvalKit ``can_infer``: option letter, then option text; "" where it returns False."""
    masked = answer
    for ch in ".()[],:;!*#{}":
        masked = masked.replace(ch, " ")
    words = masked.split()
    present = [c for c in index2ans if c in words]
    if len(present) == 1:
        if words.index(present[0]) > len(words) - 5:
            return present[0]
    elif not present and "Z" in words:
        return "Z"
    match = re.search(r"(?:correct\s+)?answer\s+is\s+\**([ABCD])\**", answer)
    if match and match.group(1) in index2ans:
        return match.group(1)
    lowered = answer.lower()
    if len(lowered) > 2 * sum(len(text) for text in index2ans.values()):
        return ""
    found = [c for c, text in index2ans.items() if text.lower() in lowered]
    return found[0] if len(found) == 1 else ""


# fmt: off
_LMMS_ANSWER_PHRASES = (
    "the answer is", "answer is", "the correct answer is", "correct answer is", "the best answer is",
    "best answer is", "the correct option is", "correct option is", "the best option is", "best option is",
    "the choice is", "choice is", "the correct choice is", "correct choice is", "i choose", "i select",
    "i pick", "my answer is", "my choice is",
    "옵션", "정답은", "답은", "답:", "答案是", "答案为", "选", "答えは",
)
# fmt: on


def _lmms_eval_mcq_extract(response: str, letters: Sequence[str]) -> str:
    """lmms-eval ``extract_mcq_answer`` (commit c228e27): format priority, last position within one."""
    if not response.strip():
        return ""
    text = response.strip()
    for ch in (",", ".", "!", "?", ";", ":", "'", '"'):
        text = text.strip(ch)
    text = f" {text} "
    found: list[tuple[int, int, str]] = []  # (priority, position, letter), in the reference's order
    for priority, pattern in ((6, "({})"), (5, "{}."), (4, "{}:"), (3, "{})"), (2, "{} ")):
        for c in letters:
            needle = pattern.format(c)
            if needle in text:
                found.append((priority, text.rfind(needle), c))
    lowered = text.lower()
    for phrase in _LMMS_ANSWER_PHRASES:
        at = lowered.find(phrase)
        if at != -1:
            for c in letters:
                pos = text.find(c, at + len(phrase))
                if pos != -1:
                    found.append((7, pos, c))
    core = text.strip()
    for c in letters:
        if core.startswith(c) and (len(core) == 1 or not core[1].isalpha()):
            found.append((10, 0, c))
    for c in letters:
        if core.endswith(c) and (len(core) == 1 or not core[-2].isalpha()):
            found.append((9, len(text) - 1, c))
    if not found:
        found = [(0, text.rfind(c), c) for c in letters if c in text]
    if not found:
        return ""
    return max(found, key=lambda item: (item[0], item[1]))[2]


_BLINK_LETTER = re.compile(r"[\(\s]*([A-Z])[\)\.\s]*", re.IGNORECASE)
_CANON_ANSWER = re.compile(r"(?i:\banswer\b)\s*(?:(?i:is)\s*)?[:：]?\s*[\(\[]?\s*([A-Z])(?![A-Za-z0-9])")
# A label or a bracketed letter is an option in either case ("(b)", "b)"); a bare letter only as a
# capital ("a" is an article), and so is the letter after "answer is" ("the answer is a dog").
_CANON_LEADING = re.compile(r"^[\(\[]?\s*([A-Z])\s*(?:[.):\]]|$)", re.IGNORECASE)
_CANON_PAREN = re.compile(r"\(\s*([A-Z])\s*\)", re.IGNORECASE)
_CANON_LETTER = re.compile(r"(?<![A-Za-z0-9'])([A-Z])(?![A-Za-z0-9'])")


def _canonical_choice(response: str, index2ans: dict[str, str]) -> str:
    """Our extractor: explicit forms, then one standalone letter, then one option text; else ""."""
    text = re.sub(r"[*_`]+", "", response).strip()
    if len(text) == 1 and text.upper() in index2ans:
        return text.upper()
    # The whole answer is one option's text: that option, although a shorter option's text is inside it
    # ("red and blue" with options "red" and "red and blue") or it starts with a capital "A".
    whole = text.rstrip(".").strip().casefold()
    exact = [c for c, option in index2ans.items() if option.strip() and option.strip().casefold() == whole]
    if len(exact) == 1:
        return exact[0]
    explicit = [m.group(1) for m in _CANON_ANSWER.finditer(text) if m.group(1) in index2ans]
    if explicit:
        return explicit[-1]
    leading = _CANON_LEADING.match(text)
    label = leading.group(1).upper() if leading else None
    bracketed = {m.group(1).upper() for m in _CANON_PAREN.finditer(text)} & set(index2ans)
    if label in index2ans:
        # Another bracketed letter besides the label ("B. Because (A) is a cat", "(A) or (B)") leaves the
        # answer ambiguous: no letter, never the one after the label.
        return label if bracketed <= {label} else ""
    for pattern in (_CANON_PAREN, _CANON_LETTER):
        letters = {m.group(1).upper() for m in pattern.finditer(text)} & set(index2ans)
        if len(letters) == 1:
            return letters.pop()
        if letters:
            return ""
    lowered = text.casefold()
    contained = [
        c
        for c, option in index2ans.items()
        if option.strip() and re.search(rf"(?<!\w){re.escape(option.strip().casefold())}(?!\w)", lowered)
    ]
    return contained[0] if len(contained) == 1 else ""


def extract_choice(
    response: str,
    options: Sequence[str] | Mapping[str, str] | None = None,
    *,
    mode: str = "canonical",
    seed: int = _MMMU_SEED,
    rng: random.Random | None = None,
) -> str:
    """The option letter a free-form answer selects, or ``""`` when none can be read.

    ``options`` are the option texts in order (letters A, B, ...) or a mapping letter -> text.

    Modes:

    * ``"canonical"``: deterministic, unmatched = ``""`` (scored wrong). In order: a whole response
      that is one option letter (any case); the last ``answer [is|:] X`` / ``answer: (X)`` (capital
      ``X``); a leading label ``X.``, ``X)``, ``X:``, ``(X)``, ``[X]`` in either case (unless another
      option also appears as ``(Y)``); one distinct ``(X)`` in either case; one distinct standalone
      capital option letter; one option text contained as a phrase (case-insensitive). Emphasis
      markers ``* _ ` `` are ignored. Two different letters at the same step give ``""``.
    * ``"mmmu"``: MMMU official ``parse_multi_choice_response``: ``(X)`` candidates, else ``" X "``,
      else (more than 5 words) option texts; the last mention wins; with no candidate it picks at
      random. The pick is deterministic: ``rng`` if given (share one across a dataset to mimic the
      reference's single global generator), else a fresh ``random.Random(seed)`` (seed 42 is the
      reference's ``random.seed(42)``, so it equals a fresh run's first random pick).
    * ``"lmms-eval-mmmu"``: lmms-eval's variant: ``"X "`` without the leading space, and an extra
      ``"X."`` step before the text match; the same seeded random fallback.
    * ``"vlmevalkit"``: ``can_infer``: one option letter among the words (punctuation ``.()[],:;!*#{}``
      made spaces) and among the last five words; ``"Z"`` if no letter but a ``Z`` word; else the
      ``answer is X`` regex; else one option text in a response at most twice the options' total
      length; else ``""`` (VLMEvalKit's ``False``, i.e. "ask the judge"). Its refusal phrases (-> ``Z``)
      and API-failure text are not handled.
    * ``"lmms-eval-mcq"``: lmms-eval ``extract_mcq_answer`` (the version whose priority is start >
      end > answer phrase > ``(X)`` > ``X.`` > ``X:`` > ``X)`` > ``"X "`` > any occurrence, the last
      position winning within a format); ``options`` may be omitted (letters A-H).
    * ``"lmms-eval-blink"``: BLINK ``_extract_answer_letter``: the first letter after optional ``(``
      and spaces, upper-cased; it need not be an option (``"The answer is (A)"`` gives ``"T"``).
    """
    _check_str(response, "response")
    _check_mode(mode, EXTRACT_MODES, "extract_choice")
    if isinstance(seed, bool) or not isinstance(seed, int):
        raise ValueError(f"seed must be an int, got {seed!r}")
    if rng is not None and not isinstance(rng, random.Random):
        raise ValueError("rng must be a random.Random")
    if mode == "lmms-eval-blink":
        match = _BLINK_LETTER.match(response.strip())
        return match.group(1).upper() if match else ""
    if mode == "lmms-eval-mcq":
        letters = list(_option_map(options, required=False)) or list("ABCDEFGH")
        return _lmms_eval_mcq_extract(response, letters)
    index2ans = _option_map(options, required=True)
    if mode == "canonical":
        return _canonical_choice(response, index2ans)
    if mode == "vlmevalkit":
        return _vlmevalkit_can_infer(response, index2ans)
    generator = rng if rng is not None else random.Random(seed)
    return _mmmu_parse(response, index2ans, generator, lmms_eval=mode == "lmms-eval-mmmu")


_AI2D_FILTER = re.compile(r"^\s*([A-Z])\.")
_NO_PUNCTUATION = str.maketrans("", "", string.punctuation)
_LLAVA_SQA_OPTIONS = ("A", "B", "C", "D", "E")


def choice_correct(
    response: str,
    answer: str,
    options: Sequence[str] | Mapping[str, str] | None = None,
    *,
    mode: str = "canonical",
    seed: int = _MMMU_SEED,
    rng: random.Random | None = None,
) -> bool:
    """Whether a response answers a multiple-choice question whose right option letter is ``answer``.

    Modes: every ``extract_choice`` mode (correct iff the extracted letter equals ``answer``), plus the
    per-task lmms-eval / LLaVA rules, which compare strings rather than extracted letters:

    * ``"lmms-eval-ai2d"``: if the response matches ``^\\s*([A-Z])\\.`` take that letter, else keep the
      raw response; then exact match ignoring case and ``string.punctuation``, with no strip
      (``"(A)"`` is right, ``" A"`` and ``"A\\n"`` are wrong).
    * ``"lmms-eval-muirbench"``: the same filter, then ``lower().strip()`` equality, no punctuation
      removal.
    * ``"lmms-eval-scienceqa"``: ``strip()``; right if it equals the answer ignoring case, or if it
      starts with a capital and a period (``"B. dog"``) and that capital is the answer.
    * ``"llava-scienceqa"``: LLaVA ``eval_science_qa.py``: the response is one of A-E, or
      ``"X. ..."`` (``pred[1:3] == ". "``), or contains exactly one ``The answer is X.``; otherwise
      ``FAILED`` (wrong).
    * ``"lmms-eval-seedbench"``: ``strip()``, the first character only, compared ignoring case.
    """
    _check_str(response, "response")
    _check_str(answer, "answer")
    _check_mode(mode, CHOICE_MODES, "choice_correct")
    if mode in EXTRACT_MODES:
        if mode == "lmms-eval-blink":
            answer = answer.strip("()")
        return extract_choice(response, options, mode=mode, seed=seed, rng=rng) == answer.upper()
    if mode in ("lmms-eval-ai2d", "lmms-eval-muirbench"):
        match = _AI2D_FILTER.match(response)
        pred = match.group(1) if match else response
        if mode == "lmms-eval-muirbench":
            return pred.lower().strip() == answer.lower().strip()
        return pred.lower().translate(_NO_PUNCTUATION) == answer.lower().translate(_NO_PUNCTUATION)
    if mode == "lmms-eval-scienceqa":
        pred = response.strip()
        if pred.lower() == answer.strip().lower():
            return True
        return len(pred) >= 2 and pred[0].isupper() and pred[1] == "." and pred[0] == answer.strip().upper()
    if mode == "llava-scienceqa":
        if response in _LLAVA_SQA_OPTIONS:
            picked = response
        elif len(response) >= 3 and response[0] in _LLAVA_SQA_OPTIONS and response[1:3] == ". ":
            picked = response[0]
        else:
            found = re.findall(r"The answer is ([A-Z]).", response)
            picked = found[0] if len(found) == 1 else "FAILED"
        return picked == answer
    pred = response.strip()  # lmms-eval-seedbench
    if len(pred) > 1:
        pred = pred[0]
    return pred.lower() == answer.strip().lower()


# MMMU open questions (parse_open_response + eval_open) ---------------------------------------------

_MMMU_NUM_COMMAS = re.compile(r"-?\b\d{1,3}(?:,\d{3})+\b")
_MMMU_NUM_SCIENTIFIC = re.compile(r"-?\d+(?:\.\d+)?[eE][+-]?\d+")
_MMMU_NUM_SIMPLE = re.compile(r"-?(?:\d+\.\d+|\.\d+|\d+\b)(?![eE][+-]?\d+)(?![,\d])")
_MMMU_INDICATORS = ("could be ", "so ", "is ", "thus ", "therefore ", "final ", "answer ", "result ")
_MMMU_TRIVIAL = frozenset({":", ",", ".", "!", "?", ";", "'"})


def _mmmu_is_number(text: str) -> bool:
    try:
        float(text.replace(",", ""))
    except ValueError:
        return False
    return True


def _mmmu_normalize(text: str) -> list[float | str]:
    text = text.strip()
    if _mmmu_is_number(text):
        return [round(float(text.replace(",", "")), 2)]
    text = text.lower()
    return [" " + text, text + " "] if len(text) == 1 else [text]


def _mmmu_key_responses(response: str) -> list[str]:
    response = response.strip().strip(".").lower()
    # The split looks for ". " before a capital, but the text is already lower-cased: only "\n" splits.
    parts = re.split(r"\.\s(?=[A-Z])|\n", response)
    keys = []
    for index, part in enumerate(parts):
        indicators = (*_MMMU_INDICATORS, "=") if index == len(parts) - 1 else _MMMU_INDICATORS
        shortest: str | None = None
        for indicator in indicators:
            if indicator in part:
                tail = part.split(indicator)[-1].strip()
                if not shortest or len(tail) < len(shortest):
                    shortest = tail
        if shortest and shortest.strip() not in _MMMU_TRIVIAL:
            keys.append(shortest)
    return keys or [response]


def mmmu_open_correct(response: str, gold: str | Sequence[str]) -> bool:
    """MMMU official open-question scoring (``parse_open_response`` + ``eval_open``).

    The text after the last answer indicator (``could be``, ``so``, ``is``, ``thus``, ``therefore``,
    ``final``, ``answer``, ``result``; ``=`` in the last sentence) is kept, the shortest per sentence;
    numbers are extracted (with commas, scientific, plain) and numbers become ``round(float, 2)``,
    strings lower-case (a single character padded with a space). Correct if a gold number is among
    the predicted numbers, or a gold string is a substring of a predicted string.
    """
    _check_str(response, "response")
    golds = _check_str_list(gold, "gold", allow_single=True)
    keys = _mmmu_key_responses(response)
    raw: list[str] = list(keys)
    for key in keys:
        raw += (
            _MMMU_NUM_COMMAS.findall(key) + _MMMU_NUM_SCIENTIFIC.findall(key) + _MMMU_NUM_SIMPLE.findall(key)
        )
    predictions = {value for item in raw for value in _mmmu_normalize(item)}
    norm_golds = [value for g in golds for value in _mmmu_normalize(g)]
    for pred in predictions:
        if isinstance(pred, str):
            if any(isinstance(g, str) and g in pred for g in norm_golds):
                return True
        elif pred in norm_golds:
            return True
    return False


# MVBench ---------------------------------------------------------------------------------------------


def _mvbench_lmms_process(text: str) -> str:
    match = re.match(r"^([A-E])\.\s*(.+)$", text.strip(), re.IGNORECASE)
    if match:
        return match.group(1).upper()
    text = _process_punctuation(_clean_whitespace(text), _COMMA_OFFICIAL, _PERIOD_REFERENCE)
    text = text.strip("'").strip('"').strip(")").strip("(").strip().lower()
    letter = re.search(r"\b([A-E])\b", text, re.IGNORECASE)
    return letter.group(1).upper() if letter else text


def mvbench_correct(prediction: str, answer: str, *, mode: str = "official") -> bool:
    """MVBench per-item check; ``answer`` is the ground-truth option as written, e.g. ``"(B) a man."``.

    Modes:

    * ``"official"`` (canonical; Ask-Anything ``check_ans``, also in VLMEvalKit): compare the first
      space-separated tokens, lower-cased: right if the prediction's (periods removed) is inside the
      answer's or the answer's is inside the prediction's. An empty prediction is right (``'' in
      '(b)'``), and the letter must be in the first token.
    * ``"lmms-eval"``: ``mcq_acc``: ``^([A-E])\\.\\s*(.+)$`` gives the letter; otherwise VQA punctuation
      processing, quotes and parentheses stripped, lower-case, and the first standalone letter A-E
      (the article "a" counts as A). The answer goes through the same processing (a bare letter works).
    """
    _check_str(prediction, "prediction")
    _check_str(answer, "answer")
    _check_mode(mode, MVBENCH_MODES, "mvbench_correct")
    if mode == "lmms-eval":
        return _mvbench_lmms_process(prediction) == _mvbench_lmms_process(answer)
    pred_option = prediction.lower().strip().split(" ")[0]
    gt_option = answer.lower().strip().split(" ")[0]
    return pred_option.replace(".", "") in gt_option or gt_option in pred_option


def mvbench_accuracy(predictions: Sequence[str], answers: Sequence[str], *, mode: str = "official") -> float:
    """MVBench accuracy x100. lmms-eval leaves empty predictions (``""``) out of the denominator."""
    predictions = _check_str_list(predictions, "predictions")
    answers = _check_str_list(answers, "answers")
    if len(predictions) != len(answers):
        raise ValueError("predictions and answers must have the same length")
    pairs = list(zip(predictions, answers, strict=True))
    if mode == "lmms-eval":
        pairs = [(p, a) for p, a in pairs if p != ""]
    correct = [mvbench_correct(p, a, mode=mode) for p, a in pairs]
    return 100.0 * sum(correct) / len(correct) if correct else 0.0


# --------------------------------------------------------------------------------------------------
# 1.6 POPE
# --------------------------------------------------------------------------------------------------

POPE_MODES = ("official", "lmms-eval", "vlmevalkit")


def pope_parse(response: str, *, mode: str = "official") -> str:
    """Read a yes/no answer.

    * ``"official"`` (canonical; RUCAIBox/POPE ``evaluate.py``, same in LLaVA and Ferret): keep the
      text before the first ``.``, drop commas, split on single spaces; ``"no"`` if a word is exactly
      ``No``, ``no`` or ``not``, else ``"yes"`` (so ``Nope``, ``NO``, ``Not really`` are yes).
    * ``"vlmevalkit"``: ``YOrN_Extraction``: lower-case, VQA punctuation processing, split; ``"yes"``
      if "yes" is a word and "no" is not, ``"no"`` for the opposite, else ``"unknown"`` (VLMEvalKit's
      ``Yes`` / ``No`` / ``Unknown``, lower-cased here).
    * ``"lmms-eval"``: no parsing: ``response.lower().strip()`` (``"yes."`` is neither yes nor no).
    """
    _check_str(response, "response")
    _check_mode(mode, POPE_MODES, "pope_parse")
    if mode == "lmms-eval":
        return response.lower().strip()
    if mode == "vlmevalkit":
        words = _process_punctuation(response.lower(), _COMMA_OFFICIAL, _PERIOD_VLMEVALKIT).split()
        if "yes" in words and "no" not in words:
            return "yes"
        if "no" in words and "yes" not in words:
            return "no"
        return "unknown"
    text = response.split(".")[0] if "." in response else response
    words = text.replace(",", "").split(" ")
    return "no" if ("No" in words or "not" in words or "no" in words) else "yes"


def pope_metrics(
    predictions: Sequence[str], labels: Sequence[str], *, mode: str = "official"
) -> dict[str, float]:
    """POPE accuracy, precision, recall, F1 (positive = "yes") and yes-ratio over one split.

    ``predictions`` are raw model responses, parsed with ``pope_parse(mode=mode)``; ``labels`` are
    "yes"/"no" (any case, surrounding space ignored). An undefined ratio (0/0) is reported as 0.0.

    * ``"official"``: every response is yes or no; yes_ratio = predicted yes / N.
    * ``"lmms-eval"``: a response that is not exactly yes/no is wrong and counts as neither a positive
      nor a negative prediction in precision / recall; ``yes_ratio`` is the share of *ground-truth*
      yes (``pope_yes_ratio``).
    * ``"vlmevalkit"``: ``unknown`` is wrong and counts as a non-positive prediction (a false negative
      when the label is yes); yes_ratio = predicted yes / N. (eval-metrics.md only says "a miss"; the
      false-negative reading follows VLMEvalKit's ``y_pred = 1 if Yes else 0`` and is not re-verified.)
    """
    predictions = _check_str_list(predictions, "predictions")
    labels = _check_str_list(labels, "labels")
    _check_mode(mode, POPE_MODES, "pope_metrics")
    if len(predictions) != len(labels):
        raise ValueError("predictions and labels must have the same length")
    gts = [label.strip().lower() for label in labels]
    if any(g not in ("yes", "no") for g in gts):
        raise ValueError("labels must be 'yes' or 'no'")
    preds = [pope_parse(p, mode=mode) for p in predictions]
    pairs = list(zip(preds, gts, strict=True))
    tp = sum(p == "yes" and g == "yes" for p, g in pairs)
    fp = sum(p == "yes" and g == "no" for p, g in pairs)
    tn = sum(p == "no" and g == "no" for p, g in pairs)
    fn = (
        sum(p == "no" and g == "yes" for p, g in pairs)
        if mode == "lmms-eval"
        else sum(p != "yes" and g == "yes" for p, g in pairs)
    )
    n = len(pairs)
    precision = tp / (tp + fp) if tp + fp else 0.0
    recall = tp / (tp + fn) if tp + fn else 0.0
    f1 = 2 * precision * recall / (precision + recall) if precision + recall else 0.0
    yes_ratio = gts.count("yes") / n if mode == "lmms-eval" else preds.count("yes") / n
    return {
        "accuracy": sum(p == g for p, g in pairs) / n,
        "precision": precision,
        "recall": recall,
        "f1": f1,
        "yes_ratio": yes_ratio,
        "tp": float(tp),
        "fp": float(fp),
        "tn": float(tn),
        "fn": float(fn),
    }


# --------------------------------------------------------------------------------------------------
# 1.7-1.8 Grounding: RefCOCO family and Flickr30k Entities
# --------------------------------------------------------------------------------------------------

GROUNDING_MODES = ("canonical", "lmms-eval", "lmms-eval-screenspot", "vlmevalkit", "ferret")
COORDS = ("mm15", "grid1000", "norm", "pixel")

_NUM = r"[-+]?(?:\d+(?:\.\d*)?|\.\d+)"
_SEP = r"(?:\s*,\s*|\s+)"
_TOLERANT_BOX = re.compile(rf"[\[\(]\s*({_NUM}){_SEP}({_NUM}){_SEP}({_NUM}){_SEP}({_NUM})\s*[\]\)]")
_TOLERANT_GROUP = re.compile(rf"[\[\(]\s*{_NUM}(?:{_SEP}{_NUM}){{1,3}}\s*[\]\)]")
_LMMS_NUM = r"(-?\d+(?:\.\d+)?)"
_LMMS_BOX = re.compile(rf"\[\s*{_LMMS_NUM},\s*{_LMMS_NUM},\s*{_LMMS_NUM},\s*{_LMMS_NUM}\s*\]")
_LMMS_SCREENSPOT_BOX = re.compile(
    rf"[\[\(]\s*{_LMMS_NUM},\s*{_LMMS_NUM},\s*{_LMMS_NUM},\s*{_LMMS_NUM}\s*[\]\)]"
)
# VLMEvalKit's number, ``[-+]?\d*\.?\d+``, written so that a run of digits is one number in one way only:
# its own form splits a run in quadratically many ways per number, and a failed box search on "[0.111..."
# (an answer cut inside a long decimal) took seconds at 40 digits. The separators are optional as in
# VLMEvalKit ("[1234]" is the box 1, 2, 3, 4 there too), so the box is only tried inside brackets of at
# most _VLM_MAX_WINDOW characters.
_VLM_NUM = r"([-+]?(?:\d+(?:\.\d+)?|\.\d+)(?:[eE][-+]?\d+)?)"
_VLM_BOX = re.compile(rf"\[\s*{_VLM_NUM}\s*,?\s*{_VLM_NUM}\s*,?\s*{_VLM_NUM}\s*,?\s*{_VLM_NUM}\s*\]")
_VLM_MAX_WINDOW = 64
_VLM_WINDOW = re.compile(rf"\[[-+\d.eE,\s]{{0,{_VLM_MAX_WINDOW}}}\]")  # what a box can hold
_VLM_ANY_NUM = re.compile(r"[-+]?\d*\.?\d+(?:[eE][-+]?\d+)?")


def xywh_to_xyxy(box: Sequence[float]) -> Box:
    """COCO ``[x, y, w, h]`` (pixels) -> ``(x1, y1, x2, y2)`` = ``(x, y, x + w, y + h)``."""
    x, y, w, h = _four_numbers(box, "box (x, y, w, h)")
    return _check_box((x, y, x + w, y + h), "box")


def box_iou(a: Sequence[float], b: Sequence[float]) -> float:
    """IoU of two (x1, y1, x2, y2) boxes, continuous coordinates with no +1.

    The intersection sides are clamped at 0 and the areas taken as written, as in every reference;
    an empty or non-positive union gives 0.0 (where lmms-eval / Ferret would divide by zero).
    """
    a = _four_numbers(a, "box a")
    b = _four_numbers(b, "box b")
    inter = max(0.0, min(a[2], b[2]) - max(a[0], b[0])) * max(0.0, min(a[3], b[3]) - max(a[1], b[1]))
    union = (a[2] - a[0]) * (a[3] - a[1]) + (b[2] - b[0]) * (b[3] - b[1]) - inter
    return inter / union if union > 0 else 0.0


def center_in_box(pred_box: Sequence[float], gt_box: Sequence[float]) -> bool:
    """lmms-eval ``Center_ACC``: the centre of ``pred_box`` lies in ``gt_box``, borders included."""
    pred_box = _four_numbers(pred_box, "pred_box")
    gt_box = _four_numbers(gt_box, "gt_box")
    cx, cy = (pred_box[0] + pred_box[2]) / 2, (pred_box[1] + pred_box[3]) / 2
    return gt_box[0] <= cx <= gt_box[2] and gt_box[1] <= cy <= gt_box[3]


def _scale(values: Sequence[float], width: int, height: int, coords: str) -> list[float]:
    extents = (width, height, width, height)[: len(values)]
    if coords == "mm15":  # our text units: the centre of bin v, as mm15.boxes decodes it
        return [(v + 0.5) * e / TEXT_UNITS for v, e in zip(values, extents, strict=True)]
    if coords == "grid1000":
        return [v * e / TEXT_UNITS for v, e in zip(values, extents, strict=True)]
    if coords == "norm":
        return [v * e for v, e in zip(values, extents, strict=True)]
    return [float(v) for v in values]


def _clip_and_order(box: Sequence[float], width: int, height: int) -> Box:
    x1, x2 = sorted((min(max(box[0], 0.0), width), min(max(box[2], 0.0), width)))
    y1, y2 = sorted((min(max(box[1], 0.0), height), min(max(box[3], 0.0), height)))
    return x1, y1, x2, y2


def decode_ferret_boxes(text: str, width: int, height: int) -> list[tuple[str, Box]]:
    """Ferret ``decode_bbox_from_caption``: ``phrase [x1, y1, x2, y2]`` pairs, integers on a 1000 grid.

    The text before each ``[`` is the entity; the inside of ``[...]`` must be comma-separated
    integers, each becoming ``int(v * (extent / 1000))`` (truncated). Any non-integer number makes
    the whole text yield no boxes (the reference's ValueError). After a ``]`` the scanner skips past
    the next ``.,;!?``, even one inside the following box, which blanks the next entity name:
    ``"a man [120, 50, 400, 900] and a dog [500, 500, 700, 700]."`` gives entities ``"a man"``
    and ``""``. A bracket without four numbers also yields no boxes (the reference would crash).
    """
    _check_str(text, "text")
    _check_size(width, height)
    ratio_w, ratio_h = width * 1.0 / TEXT_UNITS, height * 1.0 / TEXT_UNITS
    found: list[tuple[str, Box]] = []
    start, entity = 0, ""
    for i, char in enumerate(text):
        if char == "[":
            entity = text[start:i].strip()
            start = i + 1
        elif char == "]":
            inside = text[start:i].strip()
            start = i + 1
            try:
                values = [int(v) for v in inside.split(",")]
            except ValueError:
                return []
            if len(values) < 4:
                return []
            x1, y1, x2, y2 = values[:4]
            try:
                box = (int(x1 * ratio_w), int(y1 * ratio_h), int(x2 * ratio_w), int(y2 * ratio_h))
            except OverflowError:  # an integer too long for a float: no box, as an unparsable one
                return []
            found.append((entity, box))
            while start < len(text) and text[start] not in ".,;!?":
                start += 1
            start += 1
    return found


def parse_box(
    text: str, width: int, height: int, *, mode: str = "canonical", coords: str = "mm15"
) -> Box | None:
    """The first box in a model's text, in pixels of the original ``width`` x ``height`` image.

    Returns ``None`` when the mode finds no box (the references then score a ``[0, 0, 0, 0]`` box,
    i.e. IoU 0).

    Modes:

    * ``"canonical"``: one tolerant parser with a *declared* scale: square or round brackets, commas
      or spaces, integers or floats (``.5`` too). ``coords`` says what the numbers are: ``"mm15"``
      (default; our text units, integers in [0, 1000) over the full image, decoded to bin centres
      exactly as ``mm15.boxes``), ``"grid1000"`` (``v * extent / 1000``), ``"norm"`` (floats in
      [0, 1]) or ``"pixel"``. Corners are reordered and the box clipped to the image.
    * ``"lmms-eval"``: ``refcoco_bbox_rec``: the first ``[a, b, c, d]`` with commas and digits before
      any period; values are taken as normalised and used raw (scaled by width/height, never clipped
      or reordered).
    * ``"lmms-eval-screenspot"``: also ``(a, b, c, d)``; if the largest value is > 1 all four are
      divided by 1000.
    * ``"vlmevalkit"``: the first ``[a b c d]`` / ``[a, b, c, d]``, else the first four numbers
      anywhere; ``max |v| <= 1.5`` means normalised, ``<= 1000`` means thousandths, else pixels; then
      clipped and reordered.
    * ``"ferret"``: the first box of ``decode_ferret_boxes`` (1000-grid integers, truncated pixels).

    ``coords`` applies to ``"canonical"`` only.
    """
    _check_str(text, "text")
    _check_size(width, height)
    _check_mode(mode, GROUNDING_MODES, "parse_box")
    _check_mode(coords, COORDS, "coords")
    if mode == "canonical":
        match = _TOLERANT_BOX.search(text)
        if not match:
            return None
        return _clip_and_order(
            _scale([float(g) for g in match.groups()], width, height, coords), width, height
        )
    if mode in ("lmms-eval", "lmms-eval-screenspot"):
        match = (_LMMS_BOX if mode == "lmms-eval" else _LMMS_SCREENSPOT_BOX).search(text)
        if not match:
            return None
        values = [float(g) for g in match.groups()]
        if not all(map(math.isfinite, values)):  # a number too long for a float: the model's miss
            return None
        if mode == "lmms-eval-screenspot" and max(values) > 1:
            values = [v / TEXT_UNITS for v in values]
        return values[0] * width, values[1] * height, values[2] * width, values[3] * height
    if mode == "vlmevalkit":
        # The leftmost bracket pair that holds a box: _VLM_BOX.search's match, one window at a time.
        windows = (_VLM_BOX.fullmatch(window.group()) for window in _VLM_WINDOW.finditer(text))
        match = next((m for m in windows if m), None)
        if match:
            values = [float(g) for g in match.groups()]
        else:
            numbers = _VLM_ANY_NUM.findall(text)
            if len(numbers) < 4:
                return None
            values = [float(v) for v in numbers[:4]]
        if not all(map(math.isfinite, values)):  # a number too long for a float: the model's miss
            return None
        largest = max(abs(v) for v in values)
        if largest <= 1.5:
            values = _scale(values, width, height, "norm")
        elif largest <= TEXT_UNITS:
            values = _scale(values, width, height, "grid1000")
        return _clip_and_order(values, width, height)
    decoded = decode_ferret_boxes(text, width, height)
    if not decoded:
        return None
    x1, y1, x2, y2 = decoded[0][1]
    return float(x1), float(y1), float(x2), float(y2)


def grounding_iou(
    text: str,
    gt_box: Sequence[float],
    width: int,
    height: int,
    *,
    mode: str = "canonical",
    coords: str = "mm15",
) -> float:
    """IoU, in original-image pixels, between the first box parsed from ``text`` and the ground truth
    ``gt_box`` (pixels, x1 y1 x2 y2; use ``xywh_to_xyxy`` for COCO boxes). No box -> 0.0."""
    gt = _check_box(gt_box, "gt_box")
    box = parse_box(text, width, height, mode=mode, coords=coords)
    return 0.0 if box is None else box_iou(box, gt)


def grounding_hit(
    text: str,
    gt_box: Sequence[float],
    width: int,
    height: int,
    *,
    mode: str = "canonical",
    coords: str = "mm15",
    threshold: float = 0.5,
) -> bool:
    """Acc@IoU (Ferret / VLMEvalKit "Precision@1"): ``grounding_iou(...) >= threshold``."""
    threshold = _check_threshold(threshold)
    return grounding_iou(text, gt_box, width, height, mode=mode, coords=coords) >= threshold


def grounding_accuracy(
    texts: Sequence[str],
    gt_boxes: Sequence[Sequence[float]],
    sizes: Sequence[tuple[int, int]],
    *,
    mode: str = "canonical",
    coords: str = "mm15",
    threshold: float = 0.5,
) -> float:
    """Acc@IoU over referring expressions (each one its own item), x100. ``sizes`` are (width, height)."""
    texts = _check_str_list(texts, "texts")
    if not (len(texts) == len(gt_boxes) == len(sizes)):
        raise ValueError("texts, gt_boxes and sizes must have the same length")
    hits = [
        grounding_hit(t, b, w, h, mode=mode, coords=coords, threshold=threshold)
        for t, b, (w, h) in zip(texts, gt_boxes, sizes, strict=True)
    ]
    return 100.0 * sum(hits) / len(hits)


def _phrases_similar(a: str, b: str) -> bool:
    """Ferret ``are_phrases_similar``: lower-case, punctuation spacing, punctuation removed, spaces."""

    def norm(s: str) -> str:
        s = re.sub(r"\s*(['\",.;!?|:])\s*", r"\1 ", s.lower()).strip()
        return " ".join(re.sub(r"[^\w\s]", "", s).split())

    return norm(a) == norm(b)


def flickr_phrase_hit(
    text: str,
    phrase: str,
    gt_boxes: Sequence[Sequence[float]],
    width: int,
    height: int,
    *,
    k: int = 1,
    threshold: float = 0.5,
) -> bool:
    """Flickr30k Entities, Ferret protocol with ``merge_boxes=True``: Recall@k of one ground-truth phrase.

    The phrase's ground-truth boxes (pixels) are merged into their smallest enclosing box. Predicted
    boxes come from ``decode_ferret_boxes``; only those whose entity text matches ``phrase`` after
    Ferret's ``are_phrases_similar`` are kept (none kept -> a zero box, a miss). Hit if one of the first
    ``k`` kept boxes (``k = -1``: any, the "upper bound") has IoU >= threshold with the merged box.
    """
    _check_str(phrase, "phrase")
    threshold = _check_threshold(threshold)
    if isinstance(k, bool) or not isinstance(k, int) or (k < 1 and k != -1):
        raise ValueError(f"k must be a positive int or -1, got {k!r}")
    if isinstance(gt_boxes, str) or not isinstance(gt_boxes, Sequence) or not gt_boxes:
        raise ValueError("gt_boxes must be a non-empty sequence of boxes")
    boxes = [_check_box(b, "gt_boxes item") for b in gt_boxes]
    merged = (
        min(b[0] for b in boxes),
        min(b[1] for b in boxes),
        max(b[2] for b in boxes),
        max(b[3] for b in boxes),
    )
    kept = [
        box for entity, box in decode_ferret_boxes(text, width, height) if _phrases_similar(entity, phrase)
    ]
    candidates = kept if k == -1 else kept[:k]
    return any(box_iou(box, merged) >= threshold for box in candidates)


# --------------------------------------------------------------------------------------------------
# 1.9 ScreenSpot (click inside the target element)
# --------------------------------------------------------------------------------------------------

SCREENSPOT_MODES = ("canonical", "seeclick", "vlmevalkit", "lmms-eval")
_SEECLICK_FLOATS = re.compile(r"-?\d+\.?\d*")
_QWEN_BOX = re.compile(r"<box>\((\d+,\d+)\),\((\d+,\d+)\)</box>")
_PYAUTOGUI_XY = re.compile(r"x\s*=\s*([-+]?\d*\.?\d+)\s*,\s*y\s*=\s*([-+]?\d*\.?\d+)")


def _first_click(text: str, width: int, height: int, coords: str) -> tuple[float, float] | None:
    for match in _TOLERANT_GROUP.finditer(text):
        values = [float(v) for v in re.findall(_NUM, match.group(0))]
        if len(values) == 2:
            x, y = _scale(values, width, height, coords)
            return x, y
        if len(values) == 4:
            x1, y1, x2, y2 = _clip_and_order(_scale(values, width, height, coords), width, height)
            return (x1 + x2) / 2, (y1 + y2) / 2
    return None


def screenspot_hit(
    prediction: str,
    target_box: Sequence[float],
    width: int,
    height: int,
    *,
    mode: str = "canonical",
    coords: str = "mm15",
) -> bool:
    """ScreenSpot: the predicted click (a point, or a box's centre) lies in the target element.

    ``target_box`` is the element in pixels (x1, y1, x2, y2); ScreenSpot's ``[x, y, w, h]`` goes through
    ``xywh_to_xyxy`` first. Borders count as inside. A response that cannot be read is a miss.

    Modes:

    * ``"canonical"``: the first bracketed ``[x, y]`` point or ``[x1, y1, x2, y2]`` box (tolerant syntax
      as in ``parse_box``) in the declared ``coords`` (default our ``"mm15"`` text units); compared in
      pixels.
    * ``"seeclick"``: SeeClick ``screenspot_test.py``: a Qwen ``<box>(x1,y1),(x2,y2)</box>`` on the
      1000 grid gives its centre / 1000; otherwise every number in the text, which must be exactly 2
      (a point in [0, 1]) or 4 (a box, its centre); compared with the target normalised by the image.
    * ``"vlmevalkit"``: ``evaluate_point``: ``x=..., y=...``; if either is > 1 both are divided by the
      image size; the target's far edges are ``x1 + w - 1`` and ``y1 + h - 1``.
    * ``"lmms-eval"``: ``screenspot_rec`` Center_ACC: the box parser of ``parse_box(mode=
      "lmms-eval-screenspot")``; an unreadable answer is the box [0, 0, 0, 0], whose centre is the
      image origin (a hit if the target touches it, as in the reference).
    """
    _check_str(prediction, "prediction")
    x1, y1, x2, y2 = _check_box(target_box, "target_box")
    _check_size(width, height)
    _check_mode(mode, SCREENSPOT_MODES, "screenspot_hit")
    _check_mode(coords, COORDS, "coords")
    if mode == "canonical":
        point = _first_click(prediction, width, height, coords)
        return point is not None and x1 <= point[0] <= x2 and y1 <= point[1] <= y2
    if mode == "seeclick":
        target = (x1 / width, y1 / height, x2 / width, y2 / height)
        if "box" in prediction:
            pairs = [
                tuple(int(v) for v in pair.split(",")) for m in _QWEN_BOX.findall(prediction) for pair in m
            ]
            if len(pairs) < 2:
                return False
            px, py = (pairs[0][0] + pairs[1][0]) / 2 / 1000, (pairs[0][1] + pairs[1][1]) / 2 / 1000
        else:
            values = [float(v) for v in _SEECLICK_FLOATS.findall(prediction)]
            if len(values) == 2:
                px, py = values
            elif len(values) == 4:
                px, py = (values[0] + values[2]) / 2, (values[1] + values[3]) / 2
            else:
                return False
        return target[0] <= px <= target[2] and target[1] <= py <= target[3]
    if mode == "vlmevalkit":
        match = _PYAUTOGUI_XY.search(prediction)
        if not match:
            return False
        px, py = float(match.group(1)), float(match.group(2))
        if px > 1 or py > 1:
            px, py = px / width, py / height
        target = (x1 / width, y1 / height, (x2 - 1) / width, (y2 - 1) / height)
        return target[0] <= px <= target[2] and target[1] <= py <= target[3]
    box = parse_box(prediction, width, height, mode="lmms-eval-screenspot")
    pred = (
        (0.0, 0.0, 0.0, 0.0)
        if box is None
        else (box[0] / width, box[1] / height, box[2] / width, box[3] / height)
    )
    return center_in_box(pred, (x1 / width, y1 / height, x2 / width, y2 / height))


# --------------------------------------------------------------------------------------------------
# CIDEr-D (pycocoevalcap) for caption-style UI tasks
# --------------------------------------------------------------------------------------------------

CIDER_MODES = ("coco", "pretokenized")

# Tokens PTBTokenizer output that pycocoevalcap drops; "(", ")", "{", "}" and quotes are dropped too
# (PTB writes them as -LRB- / -RRB- / -LCB- / -RCB- / `` / '', which are in that list).
# fmt: off
_COCO_DROPPED = frozenset({"''", "'", "``", "`", "-lrb-", "-rrb-", "-lcb-", "-rcb-", ".", "?", "!", ",", ":",
                           "-", "--", "...", ";", "(", ")", "{", "}", "[", "]", '"', "…", "—", "–"})
# fmt: on
_COCO_TOKEN = re.compile(
    r"""
    (?:[^\W\d_]\.){2,}                # abbreviations: u.s. e.g.
  | \d+(?:[.,:]\d+)+                  # numbers with inner separators: 3.5 1,000 10:30
  | \.\d+                             # .5
  | \w+(?:[-'&]\w+)*                  # words, hyphenated words, inner apostrophes
  | \.{2,}                            # ellipsis
  | -{2,}                             # dashes
  | \S                                # any other character on its own
    """,
    re.VERBOSE,
)
_COCO_CLITIC = re.compile(r"(.+?)('s|'re|'ve|'ll|'d|'m)")
# fmt: off
_COCO_SPLIT_WORDS = {"cannot": ("can", "not"), "gonna": ("gon", "na"), "gotta": ("got", "ta"),
                     "wanna": ("wan", "na"), "gimme": ("gim", "me"), "lemme": ("lem", "me")}
# fmt: on


def coco_tokenize(text: str) -> list[str]:
    """A pure-Python stand-in for pycocoevalcap's ``PTBTokenizer`` (Stanford CoreNLP, ``-lowerCase``)
    followed by its punctuation-token removal.

    Lower-cases; splits punctuation off words, keeping numbers such as ``3.5``, ``1,000``, ``10:30``
    and hyphenated words whole; splits clitics the PTB way (``don't`` -> ``do n't``, ``won't`` ->
    ``wo n't``, ``it's`` -> ``it 's``, ``cannot`` -> ``can not``); ``100%`` -> ``100 %``; then drops
    the punctuation tokens pycocoevalcap drops. It approximates, not reproduces, the Java tokenizer
    on unusual input: eval-metrics.md does not document the tokenisation and Java is not used here.
    Square brackets are dropped like parentheses, although PTB's ``-LSB-`` / ``-RSB-`` are not in
    pycocoevalcap's removal list.
    """
    _check_str(text, "text")
    text = (
        text.replace("\n", " ")
        .lower()
        .replace("’", "'")
        .replace("‘", "'")
        .replace("“", '"')
        .replace("”", '"')
    )
    tokens: list[str] = []
    for token in _COCO_TOKEN.findall(text):
        if token in _COCO_SPLIT_WORDS:
            tokens += _COCO_SPLIT_WORDS[token]
        elif token.endswith("n't") and len(token) > 3:
            tokens += [token[:-3], "n't"]
        elif (clitic := _COCO_CLITIC.fullmatch(token)) is not None:
            tokens += [clitic.group(1), clitic.group(2)]
        else:
            tokens.append(token)
    return [t for t in tokens if t not in _COCO_DROPPED]


@dataclass(frozen=True)
class CiderResult:
    """CIDEr-D on pycocoevalcap's scale (papers report ``score * 100``) and the per-item scores."""

    score: float
    scores: tuple[float, ...]


def _ngram_counts(words: Sequence[str], n: int) -> Counter[tuple[str, ...]]:
    return Counter(tuple(words[i : i + k]) for k in range(1, n + 1) for i in range(len(words) - k + 1))


def cider_d(
    predictions: Sequence[str],
    references: Sequence[Sequence[str]],
    *,
    mode: str = "coco",
    n: int = 4,
    sigma: float = 6.0,
) -> CiderResult:
    """CIDEr-D as pycocoevalcap's ``Cider`` computes it.

    Per item: for each n-gram order 1..n, TF-IDF vectors ``tf * (log(N) - log(max(1, df)))`` where
    ``df`` counts the evaluated items whose references contain the n-gram and N is the number of
    items; the clipped cosine ``sum min(h, r) * r / (|h| |r|)`` (0 when a norm is 0) times the length
    penalty ``exp(-(len_h - len_r)^2 / (2 sigma^2))``, averaged over orders, summed over the
    references, divided by their number and multiplied by 10. Score = mean over items. As in
    pycocoevalcap, the "length" is the number of *bigrams* (its ``if n == 1`` counts order index 1),
    and the document frequency comes from the references of the evaluated set only, so a set of one
    item always scores 0.

    Modes: ``"coco"`` (canonical): ``coco_tokenize`` on predictions and references (what
    pycocoevalcap's PTBTokenizer pipeline does, approximated); ``"pretokenized"``: split on
    whitespace only (pycocoevalcap's scorer called on already tokenised text).
    """
    predictions = _check_str_list(predictions, "predictions")
    _check_mode(mode, CIDER_MODES, "cider_d")
    if (
        isinstance(references, str)
        or not isinstance(references, Sequence)
        or len(references) != len(predictions)
    ):
        raise ValueError("references must be a sequence of reference lists, one per prediction")
    refs = [_check_str_list(r, f"references[{i}]") for i, r in enumerate(references)]
    if isinstance(n, bool) or not isinstance(n, int) or n < 1:
        raise ValueError(f"n must be a positive int, got {n!r}")
    if (
        isinstance(sigma, bool)
        or not isinstance(sigma, int | float)
        or not (math.isfinite(sigma) and sigma > 0)
    ):
        raise ValueError(f"sigma must be a positive number, got {sigma!r}")

    def tokens(text: str) -> list[str]:
        return coco_tokenize(text) if mode == "coco" else text.split()

    hyp_counts = [_ngram_counts(tokens(p), n) for p in predictions]
    ref_counts = [[_ngram_counts(tokens(r), n) for r in item] for item in refs]
    doc_freq: Counter[tuple[str, ...]] = Counter()
    for item in ref_counts:
        doc_freq.update({gram for counts in item for gram in counts})
    log_n = math.log(float(len(predictions)))

    def vectorise(
        counts: Counter[tuple[str, ...]],
    ) -> tuple[list[dict[tuple[str, ...], float]], list[float], int]:
        vec: list[dict[tuple[str, ...], float]] = [{} for _ in range(n)]
        norms = [0.0] * n
        length = 0
        for gram, tf in counts.items():
            order = len(gram) - 1
            weight = tf * (log_n - math.log(max(1.0, doc_freq[gram])))
            vec[order][gram] = weight
            norms[order] += weight * weight
            if order == 1:
                length += tf
        return vec, [math.sqrt(v) for v in norms], length

    scores = []
    for hyp, item in zip(hyp_counts, ref_counts, strict=True):
        vec_h, norm_h, len_h = vectorise(hyp)
        total = [0.0] * n
        for ref in item:
            vec_r, norm_r, len_r = vectorise(ref)
            penalty = math.exp(-((len_h - len_r) ** 2) / (2 * sigma**2))
            for order in range(n):
                value = sum(
                    min(w, vec_r[order].get(g, 0.0)) * vec_r[order].get(g, 0.0)
                    for g, w in vec_h[order].items()
                )
                if norm_h[order] != 0 and norm_r[order] != 0:
                    value /= norm_h[order] * norm_r[order]
                total[order] += value * penalty
        scores.append(sum(total) / n / len(item) * 10.0)
    return CiderResult(score=sum(scores) / len(scores), scores=tuple(scores))


# --------------------------------------------------------------------------------------------------
# 1.10 Video QA judged by an LLM (ActivityNet-QA)
# --------------------------------------------------------------------------------------------------


def parse_judge_reply(review: str) -> tuple[str, int]:
    """lmms-eval ``parse_score`` for the ActivityNet-QA GPT judge: ``(pred, score)``.

    The text between the first ``{`` and the next ``}`` is read as a Python dict literal;
    ``score = int(d["score"])`` (4.8 -> 4); ``pred`` is ``"yes"`` if "yes" is in the lower-cased value,
    else ``"no"`` if "no" is, else the lower-cased value. Anything unreadable gives ``("no", 0)``.
    """
    _check_str(review, "review")
    try:
        parsed = ast.literal_eval("{" + review.split("{")[1].split("}")[0] + "}")
        score = int(parsed["score"])
        pred = str(parsed["pred"]).lower()
    except (
        IndexError,
        KeyError,
        TypeError,
        ValueError,
        SyntaxError,
        MemoryError,
        RecursionError,
        OverflowError,  # int(1e999)
    ):
        return "no", 0
    if "yes" in pred:
        return "yes", score
    if "no" in pred:
        return "no", score
    return pred, score


def judge_aggregate(parsed: Sequence[tuple[str, int]]) -> dict[str, float]:
    """Accuracy = #yes / (#yes + #no) x 100 and Score = mean integer score (ActivityNet-QA)."""
    if isinstance(parsed, str) or not isinstance(parsed, Sequence) or not parsed:
        raise ValueError("parsed must be a non-empty sequence of (pred, score) pairs")
    yes = sum(p == "yes" for p, _ in parsed)
    no = sum(p == "no" for p, _ in parsed)
    accuracy = 100.0 * yes / (yes + no) if yes + no else 0.0
    return {"accuracy": accuracy, "score": sum(s for _, s in parsed) / len(parsed)}
