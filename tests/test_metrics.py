"""Benchmark metrics against every test vector of the shared eval-metrics.md, in each mode it names.

Tables are copied from that note (section numbers in the comments); values marked "ours" are our own
expectations for the canonical rules and for modes the note does not list a value for.
"""

from __future__ import annotations

import math
import random
import statistics

import numpy as np
import pytest

from mm15.boxes import format_box, parse_boxes
from mm15.eval.metrics import (
    anls,
    anls_similarity,
    box_iou,
    center_in_box,
    choice_correct,
    cider_d,
    coco_tokenize,
    decode_ferret_boxes,
    exact_match,
    extract_choice,
    flickr_phrase_hit,
    grounding_accuracy,
    grounding_hit,
    grounding_iou,
    judge_aggregate,
    levenshtein,
    mmmu_open_correct,
    mvbench_accuracy,
    mvbench_correct,
    normalize_vqa_answer,
    ocrbench_aggregate,
    ocrbench_correct,
    parse_box,
    parse_judge_reply,
    pope_metrics,
    pope_parse,
    relaxed_accuracy,
    relaxed_correctness,
    screenspot_hit,
    vqa_accuracy,
    xywh_to_xyxy,
)

ALL_VQA_MODES = ("evalai", "lmms-eval-textvqa", "mmf", "lmms-eval-vqav2", "vlmevalkit", "official-vqav2")


# ==================================================================================================
# 1.1 VQA accuracy
# ==================================================================================================

SOFTSCORE_BY_K = {0: 0.0, 1: 0.3, 2: 0.6, 3: 0.9, 4: 1.0, 5: 1.0}


@pytest.mark.parametrize("mode", ALL_VQA_MODES)
@pytest.mark.parametrize(("k", "expected"), SOFTSCORE_BY_K.items())
def test_vqa_score_by_number_of_agreeing_annotators(mode: str, k: int, expected: float) -> None:
    others = ["blue", "green", "white", "black", "pink", "grey", "brown", "gold", "teal", "navy"]
    answers = ["red"] * k + others[: 10 - k]
    assert vqa_accuracy("red", answers, mode=mode) == pytest.approx(expected)


# (input, EvalAI / lmms-eval TextVQA, VLMEvalKit process_answer)
NORMALISATION = [
    ("two", "2", "2"),
    ("a building", "building", "building"),
    ("snow, mountain", "snow mountain", "snow mountain"),
    ("isnt", "isn't", "isn't"),
    ("the two mountain's \t \n   ", "2 mountain 's", "2 mountain's"),
    ("Nokia.", "nokia", "nokia"),
    ("5.", "5", "5."),
    ("3.5", "3.5", "3.5"),
    ("1,000", "1000", "1000"),
    ("Coca-Cola", "coca cola", "coca cola"),
    ("coca - cola", "coca cola", "coca cola"),
    ("Yes!", "yes", "yes"),
    ("It's a dog", "it 's dog", "it's dog"),
    ("None", "0", "0"),
    ("ten dollars", "10 dollars", "10 dollars"),
    ("The Answer Is: No", "answer is: no", "answer is: no"),
]


@pytest.mark.parametrize(("text", "evalai", "vlmevalkit"), NORMALISATION)
def test_vqa_normalisation(text: str, evalai: str, vlmevalkit: str) -> None:
    assert normalize_vqa_answer(text, mode="evalai") == evalai
    assert normalize_vqa_answer(text, mode="vlmevalkit") == vlmevalkit


def test_vqa_normalisation_vqav2_mode_ours() -> None:
    # processPunctuation + processDigitArticle without word_tokenize: "'s" stays attached, "5." loses "."
    assert normalize_vqa_answer("the two mountain's \t \n   ", mode="vqav2") == "2 mountain's"
    assert normalize_vqa_answer("5.", mode="vqav2") == "5"
    assert normalize_vqa_answer("Is it?", mode="vqav2") == "is it"


RED = ["red", "red", "orange", "orange", "red", "rede", "red", "red", "red", "red"]
NO_YES = ["no", "yes", "yes", "yes", "yes", "yes", "yes", "yes", "yes", "yes"]
TABLE = ["table", "table", "table", "picnic table", "picnic table", "picnic table", "picnic table",
         "picnic table", "skateboard", "picnic table"]  # fmt: skip


@pytest.mark.parametrize(
    ("answers", "prediction", "expected"),
    [
        (RED, "red", 1.0),
        (RED, "orange", 0.6),
        (RED, "Red", 1.0),
        (RED, "no", 0.0),
        (NO_YES, "yes", 1.0),
        (NO_YES, "no", 0.3),
        (TABLE, "picnic table", 1.0),
        (TABLE, "table", 0.9),
    ],
)
def test_vqa_real_vqav2_answers_official(answers: list[str], prediction: str, expected: float) -> None:
    assert vqa_accuracy(prediction, answers, mode="official-vqav2") == pytest.approx(expected)


COCA = ["coca cola"] * 4 + ["coca-cola"] * 3 + ["Coca Cola"] * 2 + ["cola"]
# (prediction, answers, {mode: expected}); modes without a value in the note are left out.
VQA_SYNTHETIC = [
    ("two", ["2"] * 10, {"official-vqav2": 0.0, "lmms-eval-vqav2": 1.0, "lmms-eval-textvqa": 1.0,
                         "vlmevalkit": 1.0}),
    ("two", ["2"] * 9 + ["3"], {"official-vqav2": 1.0, "lmms-eval-vqav2": 1.0, "lmms-eval-textvqa": 1.0,
                                "vlmevalkit": 1.0}),
    ("Yes", ["yes"] * 10, {"official-vqav2": 0.0, "lmms-eval-vqav2": 1.0, "lmms-eval-textvqa": 1.0,
                           "vlmevalkit": 1.0}),
    ("5.", ["5"] * 9 + ["6"], {"official-vqav2": 1.0, "lmms-eval-vqav2": 1.0, "lmms-eval-textvqa": 1.0,
                               "vlmevalkit": 0.0}),
    ("Coca-Cola.", COCA, {"lmms-eval-textvqa": 1.0, "vlmevalkit": 1.0, "mmf": 1.0}),
    ("cola", ["cola"] * 2 + ["coca cola"] * 8, {"lmms-eval-textvqa": 0.6}),
]  # fmt: skip


@pytest.mark.parametrize(
    ("prediction", "answers", "mode", "expected"),
    [(p, a, mode, v) for p, a, table in VQA_SYNTHETIC for mode, v in table.items()],
)
def test_vqa_synthetic_cases(prediction: str, answers: list[str], mode: str, expected: float) -> None:
    assert vqa_accuracy(prediction, answers, mode=mode) == pytest.approx(expected)


@pytest.mark.parametrize(("prediction", "answers", "_"), [(p, a, t) for p, a, t in VQA_SYNTHETIC])
def test_vqa_canonical_is_evalai(prediction: str, answers: list[str], _: dict[str, float]) -> None:
    expected = vqa_accuracy(prediction, answers, mode="lmms-eval-textvqa")
    assert vqa_accuracy(prediction, answers) == vqa_accuracy(prediction, answers, mode="mmf") == expected


def test_vqa_edge_cases() -> None:
    assert vqa_accuracy("", ["yes"] * 10) == 0.0
    assert vqa_accuracy("", [""] * 10) == 1.0  # an empty answer agreeing with empty references
    assert vqa_accuracy("  YES \n", ["yes"] * 10) == 1.0
    assert vqa_accuracy("  YES \n", ["yes"] * 10, mode="official-vqav2") == 0.0  # raw, case-sensitive
    assert vqa_accuracy("café", ["Café"] * 3 + ["tea"] * 7) == pytest.approx(0.9)
    assert vqa_accuracy("yes", ["yes"]) == 0.0  # one answer: its only leave-one-out subset is empty
    # At most 32 periods are removed (re.UNICODE passed as the count argument).
    assert normalize_vqa_answer("." * 40) == "." * 8
    assert normalize_vqa_answer("." * 40, mode="vlmevalkit") == "." * 8
    # The punctuation rule looks at the original text: one "p " anywhere deletes that mark everywhere.
    assert normalize_vqa_answer("a-b - c") == "ab c"
    assert normalize_vqa_answer("wont") == "won't"
    assert normalize_vqa_answer("somebody'd") == "somebodyd"  # the reference table's reversed entry


@pytest.mark.parametrize(
    ("call", "message"),
    [
        (lambda: vqa_accuracy("a", ["a"], mode="vqa"), "unknown vqa_accuracy mode"),
        (lambda: vqa_accuracy("a", []), "non-empty"),
        (lambda: vqa_accuracy("a", "a"), "not a single str"),
        (lambda: vqa_accuracy(None, ["a"]), "prediction must be a str"),  # type: ignore[arg-type]
        (lambda: vqa_accuracy("a", ["a", 1]), "must be a str"),  # type: ignore[list-item]
        (lambda: normalize_vqa_answer("a", mode="official"), "unknown normalize_vqa_answer mode"),
    ],
)
def test_vqa_errors(call, message: str) -> None:
    with pytest.raises(ValueError, match=message):
        call()


# ==================================================================================================
# 1.2 ANLS
# ==================================================================================================

COCA_GOLD = ["Coca Cola", "Coca Cola Company"]
# (prediction, gold, ANLS pkg, lmms-eval, VLMEvalKit, pix2struct)
ANLS_TABLE = [
    ("The Coca", COCA_GOLD, 0.0, 0.0, 0.0, 0.0),
    ("CocaCola", COCA_GOLD, 0.8889, 0.8889, 0.8889, 0.8889),
    ("Coca cola", COCA_GOLD, 1.0, 1.0, 1.0, 1.0),
    ("Coca", COCA_GOLD, 0.0, 0.0, 0.0, 0.0),
    ("Cola", COCA_GOLD, 0.0, 0.0, 0.0, 0.0),
    ("Cat", COCA_GOLD, 0.0, 0.0, 0.0, 0.0),
    (" CocaCola    ", COCA_GOLD, 0.8889, 0.9231, 0.9231, 0.5385),
    (" The    Coca ", COCA_GOLD, 0.0, 0.6154, 0.6154, 0.0),
    ("coca cola company", COCA_GOLD, 1.0, 1.0, 1.0, 1.0),
    ("a", ["ab"], 0.0, 0.5, 0.5, 0.0),  # NL = 0.5 exactly
]
ANLS_MODES_IN_TABLE = ("rrc", "lmms-eval", "vlmevalkit", "pix2struct")


@pytest.mark.parametrize(
    ("prediction", "gold", "mode", "expected"),
    [(p, g, mode, row[i]) for p, g, *row in ANLS_TABLE for i, mode in enumerate(ANLS_MODES_IN_TABLE)],
)
def test_anls_table(prediction: str, gold: list[str], mode: str, expected: float) -> None:
    assert anls(prediction, gold, mode=mode) == pytest.approx(expected, abs=5e-5)


def test_anls_canonical_and_alias() -> None:
    for prediction, gold, *_ in ANLS_TABLE:
        assert (
            anls(prediction, gold)
            == anls(prediction, gold, mode="rrc")
            == anls(prediction, gold, mode="anls-pkg")
        )


def test_anls_fixture_overall() -> None:
    # realdata/anls_fixtures: predictions of questions 1-5, all with the Coca-Cola gold answers.
    predictions = ["The Coca", "CocaCola", "Coca cola", "Coca", "Cat"]
    per_item = [anls(p, COCA_GOLD) for p in predictions]
    assert per_item == pytest.approx([0.0, 8 / 9, 1.0, 0.0, 0.0])
    assert statistics.mean(per_item) == pytest.approx(0.3778, abs=5e-5)
    assert round(statistics.mean(per_item), 3) == 0.378


# Similarities before thresholding (shunk031/ANLS score_test.py, which checks them at rel=0.1; the
# note's two-decimal values are truncated, e.g. 4/17 = 0.2353 is written 0.23).
@pytest.mark.parametrize(
    ("prediction", "doc_values", "exact"),
    [
        ("The Coca", (0.44, 0.29), (4 / 9, 5 / 17)),
        ("CocaCola", (0.89, 0.47), (8 / 9, 8 / 17)),
        ("Coca cola", (1.00, 0.53), (1.0, 9 / 17)),
        ("Cola", (0.44, 0.23), (4 / 9, 4 / 17)),
        ("Cat", (0.22, 0.12), (2 / 9, 2 / 17)),
    ],
)
def test_anls_similarity_before_threshold(prediction: str, doc_values: tuple, exact: tuple) -> None:
    for gold, doc_value, value in zip(COCA_GOLD, doc_values, exact, strict=True):
        assert anls_similarity(prediction, gold) == pytest.approx(value)
        assert anls_similarity(prediction, gold) == pytest.approx(doc_value, abs=0.006)


def test_anls_mmf_mode_ours() -> None:
    assert anls("a", ["ab"], mode="mmf") == 0.5  # kept at >= 0.5
    assert anls(" CocaCola    ", COCA_GOLD, mode="mmf") == pytest.approx(8 / 9)  # strip, no collapsing
    assert anls("coca  cola", COCA_GOLD, mode="mmf") == pytest.approx(0.9)  # inner spaces count


@pytest.mark.parametrize("mode", ("rrc", "lmms-eval", "vlmevalkit", "mmf", "pix2struct"))
def test_anls_edge_cases(mode: str) -> None:
    assert anls("", [""], mode=mode) == 1.0
    assert anls("", ["Coca Cola"], mode=mode) == 0.0
    assert anls("Coca Cola", ["", "coca cola"], mode=mode) == 1.0
    assert anls("東京タワー", ["東京タワー"], mode=mode) == 1.0


def test_anls_unicode_and_threshold() -> None:
    # lmms-eval measures len(s.upper()) of the raw strings: "ß".upper() is "SS", two characters.
    assert anls("ß", ["s"], mode="rrc") == 0.0
    assert anls("ß", ["s"], mode="lmms-eval") == 0.5
    assert anls("CocaCola", COCA_GOLD, threshold=0.1) == 0.0
    assert anls("CocaCola", COCA_GOLD, threshold=1.0) == pytest.approx(8 / 9)
    assert levenshtein("kitten", "sitting") == 3
    assert levenshtein("", "abc") == 3


@pytest.mark.parametrize(
    ("call", "message"),
    [
        (lambda: anls("a", ["a"], mode="docvqa"), "unknown anls mode"),
        (lambda: anls("a", ["a"], threshold=0), "threshold"),
        (lambda: anls("a", ["a"], threshold=1.5), "threshold"),
        (lambda: anls("a", []), "non-empty"),
        (lambda: anls(3, ["a"]), "prediction must be a str"),  # type: ignore[arg-type]
        (lambda: levenshtein("a", None), "b must be a str"),  # type: ignore[arg-type]
    ],
)
def test_anls_errors(call, message: str) -> None:
    with pytest.raises(ValueError, match=message):
        call()


# ==================================================================================================
# 1.3 ChartQA relaxed accuracy
# ==================================================================================================

CHARTQA_TABLE = [
    ("abc", "abc", True),
    ("Abc", "abc", True),
    ("abc", "Abc", True),
    ("96%", "100%", True),
    ("94%", "100%", False),
    ("0.96", "100%", True),
    ("0.94", "100%", False),
    ("Won't", "Don't", False),
    ("0", "0.0", False),
    ("0", "0", True),
    ("1,000", "1000", False),
    ("12", "12.6", True),
    ("12", "12.61", False),
    ("12", " 12 ", True),
]


@pytest.mark.parametrize("mode", ("pix2struct", "lmms-eval", "vlmevalkit"))
@pytest.mark.parametrize(("target", "prediction", "expected"), CHARTQA_TABLE)
def test_chartqa_relaxed_correctness(target: str, prediction: str, expected: bool, mode: str) -> None:
    assert relaxed_correctness(prediction, target, mode=mode) is expected
    assert relaxed_accuracy(prediction, [target], mode=mode) == float(expected)


PIX2STRUCT_TARGETS = [["abc"], ["Abc"], ["abc"], ["96%"], ["94%"], ["0.96"], ["0.94"], ["Won't"]]
PIX2STRUCT_PREDICTIONS = ["abc", "abc", "Abc", "100%", "100%", "100%", "100%", "Don't"]


def test_chartqa_pix2struct_aggregates() -> None:
    pairs = list(zip(PIX2STRUCT_PREDICTIONS, PIX2STRUCT_TARGETS, strict=True))
    assert 100 * statistics.mean(relaxed_accuracy(p, t) for p, t in pairs) == pytest.approx(62.5)
    assert 100 * statistics.mean(exact_match(p, t) for p, t in pairs) == pytest.approx(12.5)
    assert 100 * statistics.mean(anls(p, t, mode="pix2struct") for p, t in pairs) == pytest.approx(47.5)
    assert round(100 * cider_d(PIX2STRUCT_PREDICTIONS, PIX2STRUCT_TARGETS).score, 1) == 128.6


def test_chartqa_edge_cases() -> None:
    assert relaxed_correctness("Yes\n", "yes") is False  # the string rule does not strip
    assert relaxed_correctness("Yes\n", "yes", mode="vlmevalkit") is True
    assert relaxed_correctness("１２", "12") is True  # Python float reads non-ASCII decimal digits
    assert relaxed_correctness("", "0") is False
    assert relaxed_correctness("", "") is True
    assert relaxed_correctness("-12.7", "-12") is False and relaxed_correctness("-12.5", "-12") is True
    assert relaxed_correctness("12.9", "12", max_relative_change=0.1) is True
    assert relaxed_accuracy("7", ["3", "7"]) == 1.0
    assert relaxed_accuracy("7", "7") == 1.0
    # One trailing "%" is a percentage, as the reference's t[:-1]; "50%%" is not a number.
    assert relaxed_correctness("0.5", "50%") is True
    assert relaxed_correctness("0.5", "50%%") is False and relaxed_correctness("12%", "12%%%") is False


@pytest.mark.parametrize(
    ("call", "message"),
    [
        (lambda: relaxed_correctness("1", "1", mode="chartqa"), "unknown relaxed_correctness mode"),
        (lambda: relaxed_correctness(1, "1"), "prediction must be a str"),  # type: ignore[arg-type]
        (lambda: relaxed_correctness("1", "1", max_relative_change=-0.1), "max_relative_change"),
        (lambda: relaxed_accuracy("1", []), "non-empty"),
    ],
)
def test_chartqa_errors(call, message: str) -> None:
    with pytest.raises(ValueError, match=message):
        call()


# ==================================================================================================
# 1.4 OCRBench
# ==================================================================================================

# lmms-eval test/eval/test_ocrbench.py (full-width folding): (GT, prediction, dataset, score)
OCRBENCH_LMMS = [
    ("2590", "２５９０", "IIIT5K", True),
    ("both sides", "ｂｏｔｈ　ｓｉｄｅｓ", "IIIT5K", True),
    ("1", "①", "IIIT5K", False),
    ("2", "²", "IIIT5K", False),
    ("IV", "Ⅳ", "IIIT5K", False),
    ("kg", "㎏", "IIIT5K", False),
    ("x+1", "ｘ＋１", "HME100k", False),
]


@pytest.mark.parametrize(("answer", "prediction", "dataset", "expected"), OCRBENCH_LMMS)
def test_ocrbench_lmms_eval_fullwidth(answer: str, prediction: str, dataset: str, expected: bool) -> None:
    assert ocrbench_correct(prediction, answer, dataset, mode="lmms-eval") is expected


@pytest.mark.parametrize(("answer", "prediction", "dataset", "_"), OCRBENCH_LMMS)
def test_ocrbench_official_does_not_fold_ours(answer: str, prediction: str, dataset: str, _: bool) -> None:
    assert ocrbench_correct(prediction, answer, dataset) is False


def test_ocrbench_fold_applies_to_the_answer_too() -> None:
    assert ocrbench_correct("2590", "２５９０", "IIIT5K", mode="lmms-eval") is True


OCRBENCH_RUN = [
    ("CENTRE", "The word is centre.", "IIIT5K", True),
    ("CENTRE", "CENTER", "IIIT5K", False),
    (["$506 million", "506 million"], "$506 million dollars", "docVQA", True),
    ("x ^ { 2 } + 1", "x^{2}+1", "HME100k", True),
    ("x ^ { 2 } + 1", "X^{2}+1", "HME100k", False),
    ("ab", "a\nb", "IIIT5K", False),
]


@pytest.mark.parametrize("mode", ("official", "vlmevalkit", "lmms-eval"))
@pytest.mark.parametrize(("answer", "prediction", "dataset", "expected"), OCRBENCH_RUN)
def test_ocrbench_rule(answer, prediction: str, dataset: str, expected: bool, mode: str) -> None:
    assert ocrbench_correct(prediction, answer, dataset, mode=mode) is expected


def test_ocrbench_edge_cases_and_aggregate() -> None:
    assert ocrbench_correct("", "abc", "IIIT5K") is False
    assert ocrbench_correct("  ÉCOLE  ", "école", "IIIT5K") is True
    assert ocrbench_correct("\\frac { a } { b }", "\\frac{a}{b}", "HME100k") is True
    counts = {"Regular Text Recognition": 50, "Doc-oriented VQA": 200, "Handwritten Mathematical "
              "Expression Recognition": 100, "Key Information Extraction": 200}  # fmt: skip
    types = [t for t, n in counts.items() for _ in range(n)]
    correct = [i % 2 == 0 for i in range(len(types))]
    result = ocrbench_aggregate(types, correct)
    assert result["Text Recognition"] == 25
    assert result["Final Score"] == 275
    assert result["Final Score Norm"] == pytest.approx(27.5)
    assert ocrbench_aggregate(["Scene Text-centric VQA"] * 1000, [True] * 1000)["Final Score Norm"] == 100.0
    with pytest.raises(ValueError, match="unknown OCRBench type"):
        ocrbench_aggregate(["OCR"], [True])
    with pytest.raises(ValueError, match="as long as types"):
        ocrbench_aggregate(["Doc-oriented VQA"], [True, False])
    with pytest.raises(ValueError, match="unknown ocrbench_correct mode"):
        ocrbench_correct("a", "a", "IIIT5K", mode="ocrbench-v2")
    with pytest.raises(ValueError, match="non-empty"):
        ocrbench_correct("a", [], "IIIT5K")


# ==================================================================================================
# 1.5 Multiple choice
# ==================================================================================================

ANIMALS = ["cat", "dog", "cow", "horse"]
RANDOM = "random"  # the reference picks at random: we check the seeded pick

# (response, MMMU official, MMMU lmms-eval, VLMEvalKit can_infer ("" = False), lmms-eval mcq_extract)
SHARED_MC = [
    ("B", "B", "B", "B", "B"),
    ("(B)", "B", "B", "B", "B"),
    ("B.", "B", "B", "B", "B"),
    ("The answer is B.", "B", "B", "B", "B"),
    ("Answer: (C) cow", "C", "C", "C", "C"),
    ("I think A or B, final answer B", "B", "B", "", "B"),
    ("The animal shown in the picture is clearly a horse.", "D", "D", "", ""),
    ("A cat", "A", "A", "A", "A"),
    ("B:dog", RANDOM, RANDOM, "B", "B"),
    ("**B**", RANDOM, RANDOM, "B", "B"),
]
SHARED_MC_MODES = ("mmmu", "lmms-eval-mmmu", "vlmevalkit", "lmms-eval-mcq")


@pytest.mark.parametrize(
    ("response", "mode", "expected"),
    [(r, mode, row[i]) for r, *row in SHARED_MC for i, mode in enumerate(SHARED_MC_MODES)],
)
def test_mc_shared_vectors(response: str, mode: str, expected: str) -> None:
    got = extract_choice(response, ANIMALS, mode=mode)
    if expected == RANDOM:
        assert got == random.Random(42).choice("ABCD")  # the official random.seed(42), first draw
        assert got == extract_choice(response, ANIMALS, mode=mode)  # deterministic
        assert got == extract_choice(response, ANIMALS, mode=mode, rng=random.Random(42))
        assert {extract_choice(response, ANIMALS, mode=mode, seed=s) for s in range(40)} == set("ABCD")
    else:
        assert got == expected
        if expected:
            assert choice_correct(response, expected, ANIMALS, mode=mode)


def test_mc_mmmu_divergence_example() -> None:
    response = "Option C.Because cows moo"
    assert extract_choice(response, ANIMALS, mode="lmms-eval-mmmu") == "C"
    assert extract_choice(response, ANIMALS, mode="mmmu") == random.Random(42).choice("ABCD")


def test_mc_shared_rng_mimics_one_global_generator() -> None:
    rng = random.Random(42)
    picks = [extract_choice("**B**", ANIMALS, mode="mmmu", rng=rng) for _ in range(5)]
    reference = random.Random(42)
    assert picks == [reference.choice("ABCD") for _ in range(5)]


# Ours: the canonical extractor on the shared responses (deterministic, no random fallback).
@pytest.mark.parametrize(
    ("response", "expected"),
    [
        ("B", "B"),
        ("(B)", "B"),
        ("B.", "B"),
        ("The answer is B.", "B"),
        ("Answer: (C) cow", "C"),
        ("I think A or B, final answer B", "B"),
        ("The animal shown in the picture is clearly a horse.", "D"),
        ("A cat", "A"),
        ("B:dog", "B"),
        ("**B**", "B"),
        ("Option C.Because cows moo", "C"),
        ("b", "B"),
        ("  (D) horse\n", "D"),
        ("The correct answer is (A).", "A"),
        ("the answer is a dog", "B"),  # "a" is an article, the text names the dog
        ("I'd say A or B", ""),  # two letters: ambiguous
        ("(A) or (B)", ""),
        ("no idea", ""),
        ("", ""),
        ("Cats and dogs", ""),  # "cat" is not a whole word here; "dog" neither
        ("猫 (B)", "B"),
        # A label or a bracketed letter in lower case (MVBench's checker accepts "(b)" for "(B) ...").
        ("(b)", "B"),
        ("b.", "B"),
        ("b) dog", "B"),
        ("Answer: (c)", "C"),
        ("I pick (d), the horse", "D"),
        ("(a) or (b)", ""),
        ("a big dog", "B"),  # "a" is an article here, not option A: the text names the dog
    ],
)
def test_mc_canonical_ours(response: str, expected: str) -> None:
    assert extract_choice(response, ANIMALS) == expected
    assert extract_choice(response, {"A": "cat", "B": "dog", "C": "cow", "D": "horse"}) == expected


@pytest.mark.parametrize(
    ("response", "options", "expected"),
    [
        # The whole answer is one option although another option's text is inside it (it gave "").
        ("red and blue", ["red", "red and blue", "green", "blue"], "B"),
        ("Red and blue.", ["red", "red and blue", "green", "blue"], "B"),
        ("red", ["red", "red and blue", "green", "blue"], "A"),
        ("sugar water", ["sugar", "sugar water", "salt", "sand"], "B"),
        # A label then another bracketed letter: ambiguous, never the other letter (it gave "A").
        ("B. Because (A) is a cat", ANIMALS, ""),
        ("B) not (A)", ANIMALS, ""),
    ],
)
def test_mc_canonical_whole_option_text_and_label_with_another_letter(
    response: str, options: list[str], expected: str
) -> None:
    assert extract_choice(response, options) == expected


@pytest.mark.parametrize(
    ("response", "expected"),
    [("A", True), ("a", True), ("A.", True), ("A. cat", True), ("(A)", True), ("A) cat", False),
     ("The answer is A", False), (" A", False), ("A\n", False)],
)  # fmt: skip
def test_mc_lmms_eval_ai2d(response: str, expected: bool) -> None:
    assert choice_correct(response, "A", mode="lmms-eval-ai2d") is expected


@pytest.mark.parametrize(
    ("response", "expected"), [("A", True), ("A. cat", True), ("a", True), ("(A)", False), ("A)", False)]
)
def test_mc_lmms_eval_muirbench(response: str, expected: bool) -> None:
    assert choice_correct(response, "A", mode="lmms-eval-muirbench") is expected


@pytest.mark.parametrize(
    ("response", "expected"),
    [("B", True), ("b", True), ("B.", True), ("B. dog", True), (" B ", True), ("(B)", False),
     ("The answer is B.", False)],
)  # fmt: skip
def test_mc_lmms_eval_scienceqa(response: str, expected: bool) -> None:
    assert choice_correct(response, "B", mode="lmms-eval-scienceqa") is expected


@pytest.mark.parametrize(
    ("response", "expected"), [("B", True), ("B. dog", True), ("(B)", False), ("The answer is B", False)]
)
def test_mc_lmms_eval_seedbench(response: str, expected: bool) -> None:
    assert choice_correct(response, "B", mode="lmms-eval-seedbench") is expected


@pytest.mark.parametrize(
    ("response", "expected"),
    [("(A)", "A"), ("A", "A"), ("A. left", "A"), ("a", "A"), (" (B) right", "B"), ("The answer is (A)", "T")],
)
def test_mc_lmms_eval_blink(response: str, expected: str) -> None:
    assert extract_choice(response, mode="lmms-eval-blink") == expected
    assert choice_correct(response, f"({expected})", mode="lmms-eval-blink")


# Ours: LLaVA eval_science_qa.py (no vectors in the note).
@pytest.mark.parametrize(
    ("response", "expected"),
    [("B", True), ("B. dog", True), ("B.", False), ("The answer is B.", True),
     ("The answer is B. The answer is B.", False), ("b", False), ("C", False)],
)  # fmt: skip
def test_mc_llava_scienceqa_ours(response: str, expected: bool) -> None:
    assert choice_correct(response, "B", mode="llava-scienceqa") is expected


@pytest.mark.parametrize(
    ("response", "gold"),
    [
        ("The answer is 3.50", "3.5"),
        ("Therefore, the total is 1,200 dollars.", "1200"),
        ("x = 5", "5"),
        ("so the result is 12%", "12%"),
    ],
)
def test_mmmu_open(response: str, gold: str) -> None:
    assert mmmu_open_correct(response, gold) is True
    assert mmmu_open_correct(response, [gold, "unrelated"]) is True


def test_mmmu_open_misses_ours() -> None:
    assert mmmu_open_correct("The answer is 3.6", "3.5") is False
    assert mmmu_open_correct("", "5") is False
    assert mmmu_open_correct("it is b", "b") is True  # single characters are padded with a space
    assert mmmu_open_correct("it is blue", "b") is False


def test_mc_edge_cases() -> None:
    assert extract_choice("", mode="lmms-eval-mcq") == ""
    assert extract_choice("   ", ANIMALS, mode="vlmevalkit") == ""
    assert extract_choice("Z", ANIMALS, mode="vlmevalkit") == "Z"
    assert extract_choice("E", mode="lmms-eval-mcq") == "E"  # default letters A-H
    assert extract_choice("E", ANIMALS, mode="lmms-eval-mcq") == ""
    assert extract_choice("", mode="lmms-eval-blink") == ""
    assert choice_correct("B", "b", ANIMALS) is True


@pytest.mark.parametrize(
    ("call", "message"),
    [
        (lambda: extract_choice("A", ANIMALS, mode="mmbench"), "unknown extract_choice mode"),
        (lambda: extract_choice("A", None), "options are required"),
        (lambda: extract_choice("A", []), "must not be empty"),
        (lambda: extract_choice("A", "AB"), "sequence of option texts"),
        (lambda: extract_choice("A", {"a": "cat"}), "upper-case"),
        (lambda: extract_choice("A", ANIMALS, seed="42"), "seed"),  # type: ignore[arg-type]
        (lambda: extract_choice("A", ANIMALS, rng=42), "rng"),  # type: ignore[arg-type]
        (lambda: choice_correct("A", "A", mode="mvbench"), "unknown choice_correct mode"),
        (lambda: mmmu_open_correct("1", []), "non-empty"),
    ],
)
def test_mc_errors(call, message: str) -> None:
    with pytest.raises(ValueError, match=message):
        call()


# MVBench (1.10): (prediction, lmms-eval, official check_ans), GT letter B / text "(B) a man."
MVBENCH = [
    ("(B) a man", True, True),
    ("B", True, True),
    ("B) a man", True, True),
    ("(b)", True, True),
    ("Best option:(B)", True, False),
    ("", False, True),
    ("a man is running (B)", False, False),
    ("(C) a dog", False, False),
    ("C", False, False),
]


@pytest.mark.parametrize(("prediction", "lmms_eval", "official"), MVBENCH)
def test_mvbench(prediction: str, lmms_eval: bool, official: bool) -> None:
    assert mvbench_correct(prediction, "B", mode="lmms-eval") is lmms_eval
    assert mvbench_correct(prediction, "(B) a man.", mode="lmms-eval") is lmms_eval
    assert mvbench_correct(prediction, "(B) a man.") is official


def test_mvbench_aggregation() -> None:
    assert mvbench_accuracy(["", "B"], ["B", "B"], mode="lmms-eval") == 100.0  # empty left out
    assert mvbench_accuracy(["", "B"], ["(B) a man.", "(B) a man."]) == 100.0  # '' in '(b)'
    assert mvbench_accuracy(["C", "B"], ["(B) a man.", "(B) a man."]) == 50.0
    assert mvbench_accuracy([""], ["B"], mode="lmms-eval") == 0.0
    with pytest.raises(ValueError, match="same length"):
        mvbench_accuracy(["B"], ["B", "C"])
    with pytest.raises(ValueError, match="unknown mvbench_correct mode"):
        mvbench_correct("B", "B", mode="vlmevalkit")


# ==================================================================================================
# 1.6 POPE
# ==================================================================================================

POPE_PARSE = [
    ("Yes", "yes", "yes"),
    ("no.", "no", "no"),
    ("Yes, there is a dog.", "yes", "yes"),
    ("There is no dog.", "no", "no"),
    ("I don't see one.", "yes", "unknown"),
    ("Nope", "yes", "unknown"),
    ("No, there is not.", "no", "no"),
    ("Not really", "yes", "unknown"),
    ("Yes.", "yes", "yes"),
]


@pytest.mark.parametrize(("response", "official", "vlmevalkit"), POPE_PARSE)
def test_pope_parse(response: str, official: str, vlmevalkit: str) -> None:
    assert pope_parse(response) == official
    assert pope_parse(response, mode="vlmevalkit") == vlmevalkit


def test_pope_parse_edge_cases() -> None:
    assert pope_parse("") == "yes"  # no negation word: yes, as in the reference
    assert pope_parse("NO") == "yes"
    assert pope_parse("yes. But no.") == "yes"  # only the first sentence
    assert pope_parse("Yes.\n", mode="lmms-eval") == "yes."
    assert pope_parse(" No ", mode="lmms-eval") == "no"
    assert pope_parse("yes and no", mode="vlmevalkit") == "unknown"


@pytest.mark.parametrize("mode", ("official", "lmms-eval", "vlmevalkit"))
def test_pope_metrics_first_vector(mode: str) -> None:
    result = pope_metrics(["yes", "no", "no", "yes", "yes"], ["yes", "yes", "no", "no", "yes"], mode=mode)
    assert result["accuracy"] == pytest.approx(0.6)
    assert result["precision"] == pytest.approx(2 / 3)
    assert result["recall"] == pytest.approx(2 / 3)
    assert result["f1"] == pytest.approx(2 / 3)
    assert result["yes_ratio"] == pytest.approx(0.6)


@pytest.mark.parametrize(
    ("mode", "yes_ratio"), [("official", 0.75), ("lmms-eval", 0.25), ("vlmevalkit", 0.75)]
)
def test_pope_metrics_second_vector(mode: str, yes_ratio: float) -> None:
    result = pope_metrics(["yes", "yes", "yes", "no"], ["yes", "no", "no", "no"], mode=mode)
    assert result["accuracy"] == pytest.approx(0.5)
    assert result["precision"] == pytest.approx(1 / 3)
    assert result["recall"] == pytest.approx(1.0)
    assert result["f1"] == pytest.approx(0.5)
    assert result["yes_ratio"] == pytest.approx(yes_ratio)


def test_pope_unparsed_answers_ours() -> None:
    predictions, labels = ["yes.", "Nope", "no"], ["yes", "yes", "no"]
    official = pope_metrics(predictions, labels)
    assert official["accuracy"] == 1.0 and official["recall"] == 1.0  # "Nope" has no negation word: yes
    lmms = pope_metrics(predictions, labels, mode="lmms-eval")  # "yes." and "nope" are neither
    assert lmms["accuracy"] == pytest.approx(1 / 3)
    assert (lmms["tp"], lmms["fn"], lmms["precision"], lmms["recall"]) == (0.0, 0.0, 0.0, 0.0)
    vlm = pope_metrics(predictions, labels, mode="vlmevalkit")  # "Nope" is unknown: a false negative
    assert (vlm["tp"], vlm["fn"], vlm["accuracy"]) == (1.0, 1.0, pytest.approx(2 / 3))
    assert pope_metrics(["no"], [" YES "])["f1"] == 0.0


@pytest.mark.parametrize(
    ("call", "message"),
    [
        (lambda: pope_metrics(["yes"], ["maybe"]), "labels must be"),
        (lambda: pope_metrics(["yes"], ["yes", "no"]), "same length"),
        (lambda: pope_metrics([], []), "non-empty"),
        (lambda: pope_parse("yes", mode="llava"), "unknown pope_parse mode"),
    ],
)
def test_pope_errors(call, message: str) -> None:
    with pytest.raises(ValueError, match=message):
        call()


# ==================================================================================================
# 1.7 RefCOCO grounding; 1.8 Flickr30k Entities
# ==================================================================================================

W, H = 640, 480
GT_PX = xywh_to_xyxy([64, 48, 320, 240])  # COCO [x, y, w, h] -> pixels (64, 48, 384, 288)

# (model text, lmms-eval IoU, VLMEvalKit absolute box, VLMEvalKit IoU); None = no box found
REFCOCO_TABLE = [
    ("[0.1, 0.1, 0.6, 0.6]", 1.0, (64, 48, 384, 288), 1.0),
    ("[0.2, 0.2, 0.7, 0.7]", 0.4706, (128, 96, 448, 336), 0.4706),
    ("[0.1,0.1,0.6,0.6]", 1.0, (64, 48, 384, 288), 1.0),
    ("[0.1 0.1 0.6 0.6]", 0.0, (64, 48, 384, 288), 1.0),
    ("(0.1, 0.1, 0.6, 0.6)", 0.0, (64, 48, 384, 288), 1.0),
    ("[100, 100, 600, 600]", 0.0, (64, 48, 384, 288), 1.0),
    ("[64, 48, 384, 288]", 0.0, (40.96, 23.04, 245.76, 138.24), 0.195),
    ("[.1, .1, .6, .6]", 0.0, (64, 48, 384, 288), 1.0),
    ("The box is [0.10, 0.10, 0.60, 0.60].", 1.0, (64, 48, 384, 288), 1.0),
]


@pytest.mark.parametrize(("text", "lmms_iou", "vlm_box", "vlm_iou"), REFCOCO_TABLE)
def test_refcoco_lmms_eval_and_vlmevalkit(text: str, lmms_iou: float, vlm_box: tuple, vlm_iou: float) -> None:
    assert GT_PX == (64, 48, 384, 288)
    assert grounding_iou(text, GT_PX, W, H, mode="lmms-eval") == pytest.approx(lmms_iou, abs=5e-5)
    assert parse_box(text, W, H, mode="vlmevalkit") == pytest.approx(vlm_box)
    assert grounding_iou(text, GT_PX, W, H, mode="vlmevalkit") == pytest.approx(vlm_iou, abs=5e-4)
    assert grounding_hit(text, GT_PX, W, H, mode="lmms-eval") is (lmms_iou >= 0.5)
    assert grounding_hit(text, GT_PX, W, H, mode="vlmevalkit") is (vlm_iou >= 0.5)


def test_refcoco_lmms_eval_parse_details() -> None:
    assert parse_box("[0.1 0.1 0.6 0.6]", W, H, mode="lmms-eval") is None  # [0,0,0,0] in the reference
    assert parse_box("[100, 100, 600, 600]", W, H, mode="lmms-eval") == (64000, 48000, 384000, 288000)
    assert parse_box("(0.1, 0.1, 0.6, 0.6)", W, H, mode="lmms-eval-screenspot") == pytest.approx(GT_PX)
    assert parse_box("[100, 100, 600, 600]", W, H, mode="lmms-eval-screenspot") == pytest.approx(GT_PX)
    # A reversed prediction is used as written: IoU 0.
    assert box_iou((0.1, 0.1, 0.6, 0.6), (0.6, 0.6, 0.1, 0.1)) == 0.0
    assert grounding_iou("[0.6, 0.6, 0.1, 0.1]", GT_PX, W, H, mode="lmms-eval") == 0.0


def test_refcoco_center_acc() -> None:
    assert center_in_box((0.3, 0.3, 0.9, 0.9), (0.1, 0.1, 0.6, 0.6)) is True  # centre on the border
    assert center_in_box((0.5, 0.5, 0.9, 0.9), (0.1, 0.1, 0.6, 0.6)) is False


def test_ferret_decode_and_score() -> None:
    text = "The dog [100, 100, 600, 600]."
    assert decode_ferret_boxes(text, W, H) == [("The dog", (64, 48, 384, 288))]
    assert parse_box(text, W, H, mode="ferret") == (64, 48, 384, 288)
    assert grounding_iou(text, GT_PX, W, H, mode="ferret") == 1.0
    assert grounding_iou("[100, 100, 600, 600]", GT_PX, W, H, mode="ferret") == 1.0
    # Floats raise inside the reference: no boxes at all, scored with a zero box.
    assert decode_ferret_boxes("[0.1, 0.1, 0.6, 0.6]", W, H) == []
    assert grounding_iou("[0.1, 0.1, 0.6, 0.6]", GT_PX, W, H, mode="ferret") == 0.0


def test_ferret_multi_box_quirk() -> None:
    decoded = decode_ferret_boxes("a man [120, 50, 400, 900] and a dog [500, 500, 700, 700].", 1000, 1000)
    assert [entity for entity, _ in decoded] == ["a man", ""]
    assert [box for _, box in decoded] == [(120, 50, 400, 900), (500, 500, 700, 700)]


def test_vlmevalkit_box_search_ends_on_long_runs_of_digits() -> None:
    """VLMEvalKit's number pattern split a run of digits in so many ways that a failed search on an answer
    cut inside a long decimal took seconds at 40 digits and ran for ever at 60; the same matches now."""
    assert parse_box("[0." + "1" * 5000, W, H, mode="vlmevalkit") is None
    assert parse_box("[" + "1" * 60 + ".]", W, H, mode="vlmevalkit") is None
    # Optional separators, as in VLMEvalKit: "[1234]" is the box 1, 2, 3, 4 in the grid of 1000.
    assert parse_box("[1234]", 1000, 1000, mode="vlmevalkit") == (1.0, 2.0, 3.0, 4.0)
    assert parse_box("see [[0.1, 0.2 0.6,0.8]", W, H, mode="vlmevalkit") == (64.0, 96.0, 384.0, 384.0)


def test_a_number_too_long_for_a_float_is_a_miss_not_a_crash() -> None:
    """A 400-digit coordinate raised OverflowError (Ferret) or a ValueError for a non-finite box
    (lmms-eval): one degenerate answer stopped the scoring of the whole data set."""
    big = "1" * 400
    assert decode_ferret_boxes(f"a man [120, 50, 400, {big}].", W, H) == []
    assert parse_box(f"a man [120, 50, 400, {big}].", W, H, mode="ferret") is None
    assert grounding_iou(f"[0.1, 0.1, 0.6, {big}]", GT_PX, W, H, mode="lmms-eval") == 0.0
    assert screenspot_hit(f"[0.1, 0.1, 0.6, {big}]", GT_PX, W, H, mode="lmms-eval") is False
    assert parse_box(f"[0.1 0.1 0.6 {big}]", W, H, mode="vlmevalkit") is None


def test_ferret_truncates_pixels_ours() -> None:
    assert decode_ferret_boxes("x [1, 1, 999, 999]", 333, 333) == [("x", (0, 0, 332, 332))]
    assert decode_ferret_boxes("x [1, 2, 3]", 100, 100) == []  # too few numbers (the reference crashes)


def test_refcoco_json_cases() -> None:
    # Appendix "refcoco": normalised GT [0.1, 0.1, 0.6, 0.6] on a 640x480 image.
    assert grounding_iou("[0.1, 0.1, 0.6, 0.6]", GT_PX, W, H, mode="lmms-eval") == pytest.approx(1.0)
    assert grounding_iou("[0.2, 0.2, 0.7, 0.7]", GT_PX, W, H, mode="lmms-eval") == pytest.approx(
        0.4706, abs=5e-5
    )
    for mode in ("vlmevalkit", "ferret"):
        assert grounding_iou("[100, 100, 600, 600]", GT_PX, W, H, mode=mode) == pytest.approx(1.0)


# Ours: the canonical tolerant parser with a declared scale.
@pytest.mark.parametrize(
    ("text", "coords", "iou"),
    [
        ("[0.1, 0.1, 0.6, 0.6]", "norm", 1.0),
        ("(0.1 0.1 0.6 0.6)", "norm", 1.0),
        ("[.6, .6, .1, .1]", "norm", 1.0),  # reordered corners
        ("[100, 100, 600, 600]", "grid1000", 1.0),
        ("[64, 48, 384, 288]", "pixel", 1.0),
        ("[64, 48, 384, 288]", "grid1000", 0.1953),
        ("[0.1, 0.1, 0.6, 0.6]", "mm15", 0.0),  # a declared scale is never guessed
        ("no box here", "mm15", 0.0),
    ],
)
def test_grounding_canonical_ours(text: str, coords: str, iou: float) -> None:
    assert grounding_iou(text, GT_PX, W, H, coords=coords) == pytest.approx(iou, abs=5e-5)


def test_grounding_canonical_matches_our_box_format() -> None:
    text = f"the dog {format_box(GT_PX, H, W)}"
    assert text == "the dog [100, 100, 600, 600]"
    (decoded,) = parse_boxes(text, H, W)  # bin centres, as mm15.boxes decodes them
    assert parse_box(text, W, H) == pytest.approx(decoded)
    assert grounding_iou(text, GT_PX, W, H) == pytest.approx(box_iou(decoded, GT_PX))
    assert 0.99 < grounding_iou(text, GT_PX, W, H) < 1.0
    assert parse_box("[0, 0, 999, 999]", W, H) == pytest.approx((0.32, 0.24, 639.68, 479.76))
    assert parse_box("[-5, 20, 1500, 30]", W, H) == pytest.approx((0.0, 9.84, 640.0, 14.64))  # clipped


def test_grounding_accepts_numpy_inputs() -> None:
    gt = np.array([64, 48, 384, 288], dtype=np.int64)
    assert grounding_iou("[100, 100, 600, 600]", gt, np.int64(W), np.int64(H), mode="ferret") == 1.0
    assert box_iou(np.array([0.0, 0.0, 2.0, 2.0]), (1, 1, 3, 3)) == pytest.approx(1 / 7)
    assert xywh_to_xyxy(np.array([1, 2, 3, 4])) == (1.0, 2.0, 4.0, 6.0)


def test_grounding_accuracy_and_threshold() -> None:
    texts = ["[100, 100, 600, 600]", "[200, 200, 700, 700]", "nothing", "[0, 0, 10, 10]"]
    acc = grounding_accuracy(texts, [GT_PX] * 4, [(W, H)] * 4)
    assert acc == 25.0
    assert grounding_hit("[200, 200, 700, 700]", GT_PX, W, H, coords="grid1000", threshold=0.4) is True
    assert grounding_hit("[200, 200, 700, 700]", GT_PX, W, H, coords="grid1000") is False


@pytest.mark.parametrize(
    ("call", "message"),
    [
        (lambda: parse_box("[1, 2, 3, 4]", W, H, mode="qwen"), "unknown parse_box mode"),
        (lambda: parse_box("[1, 2, 3, 4]", W, H, coords="thousandths"), "unknown coords mode"),
        (lambda: parse_box("[1, 2, 3, 4]", 0, H), "width must be a positive int"),
        (lambda: parse_box("[1, 2, 3, 4]", W, 4.5), "height must be a positive int"),  # type: ignore[arg-type]
        (lambda: grounding_iou("[1, 2, 3, 4]", (10, 10, 5, 5), W, H), "x1 <= x2"),
        (lambda: grounding_iou("[1, 2, 3, 4]", (1, 2, 3), W, H), "4 numbers"),
        (lambda: grounding_iou("[1, 2, 3, 4]", (1, 2, 3, math.nan), W, H), "finite"),
        (lambda: grounding_hit("[1, 2, 3, 4]", GT_PX, W, H, threshold=0), "threshold"),
        (lambda: grounding_accuracy(["a"], [], [(W, H)]), "same length"),
        (lambda: xywh_to_xyxy([1, 2, -3, 4]), "x1 <= x2"),
        (lambda: box_iou((0, 0, 1), (0, 0, 1, 1)), "4 numbers"),
    ],
)
def test_grounding_errors(call, message: str) -> None:
    with pytest.raises(ValueError, match=message):
        call()


def test_flickr_example() -> None:
    gt = [[10, 10, 50, 50], [60, 10, 100, 50]]  # merged: [10, 10, 100, 50]
    assert box_iou((10, 20, 100, 100), (10, 10, 100, 50)) == pytest.approx(2700 / 8100)
    assert flickr_phrase_hit("A man [10, 20, 100, 100] is walking.", "a man", gt, 1000, 1000) is False
    assert flickr_phrase_hit("the man [10, 10, 100, 50].", "a man", gt, 1000, 1000) is False  # no match
    # Ours: a correct box with a matching phrase hits; -1 takes the best of all kept boxes.
    assert flickr_phrase_hit("A man [10, 10, 100, 50].", "a man", gt, 1000, 1000) is True
    two = "A man [0, 0, 5, 5], a man [10, 10, 100, 50]."
    assert flickr_phrase_hit(two, "a man", gt, 1000, 1000) is False
    assert flickr_phrase_hit(two, "a man", gt, 1000, 1000, k=-1) is True
    with pytest.raises(ValueError, match="k must be"):
        flickr_phrase_hit(two, "a man", gt, 1000, 1000, k=0)
    with pytest.raises(ValueError, match="gt_boxes"):
        flickr_phrase_hit(two, "a man", [], 1000, 1000)


# ==================================================================================================
# 1.9 ScreenSpot
# ==================================================================================================


def test_screenspot_lmms_eval_center_example() -> None:
    assert center_in_box((0.15, 0.12, 0.2, 0.18), (0.1, 0.1, 0.3, 0.2)) is True
    gt = (0.1 * W, 0.1 * H, 0.3 * W, 0.2 * H)
    assert screenspot_hit("[0.15, 0.12, 0.2, 0.18]", gt, W, H, mode="lmms-eval") is True
    assert screenspot_hit("(150, 120, 200, 180)", gt, W, H, mode="lmms-eval") is True  # /1000 when > 1


def test_screenspot_annotation_format() -> None:
    # VLMEvalKit's docstring example: {"bbox": [42, 1102, 197, 70], ...} is [x, y, w, h] in pixels.
    assert xywh_to_xyxy([42, 1102, 197, 70]) == (42, 1102, 239, 1172)


# Ours: a 1000 x 800 screenshot, element (100, 200)-(300, 400) in pixels.
SS_W, SS_H, SS_BOX = 1000, 800, (100.0, 200.0, 300.0, 400.0)


@pytest.mark.parametrize(
    ("prediction", "mode", "coords", "hit"),
    [
        ("[150, 300]", "canonical", "mm15", True),
        ("Click [299, 499]", "canonical", "mm15", True),  # bin centre (299.5, 399.5)
        ("[300, 500]", "canonical", "mm15", False),  # (300.5, 400.4): just outside
        ("[100, 250, 300, 500]", "canonical", "mm15", True),  # a box: its centre
        ("[0.2, 0.375]", "canonical", "norm", True),
        ("[300, 400]", "canonical", "pixel", True),  # borders count
        ("I cannot tell", "canonical", "mm15", False),
        ("(0.2,0.375)", "seeclick", "mm15", True),
        ("(0.1,0.25,0.3,0.5)", "seeclick", "mm15", True),
        ("<box>(100,250),(300,500)</box>", "seeclick", "mm15", True),
        ("(0.2,0.375,0.5)", "seeclick", "mm15", False),  # 3 numbers: wrong format
        ("pyautogui.click(x=200, y=300)", "vlmevalkit", "mm15", True),
        ("pyautogui.click(x=0.2, y=0.375)", "vlmevalkit", "mm15", True),
        ("pyautogui.click(x=300, y=300)", "vlmevalkit", "mm15", False),  # far edge is x1 + w - 1
        ("[0.1, 0.25, 0.3, 0.5]", "lmms-eval", "mm15", True),
        ("[0.3, 0.5, 0.9, 0.9]", "lmms-eval", "mm15", False),
    ],
)
def test_screenspot_modes_ours(prediction: str, mode: str, coords: str, hit: bool) -> None:
    assert screenspot_hit(prediction, SS_BOX, SS_W, SS_H, mode=mode, coords=coords) is hit


def test_screenspot_edge_cases_and_errors() -> None:
    # lmms-eval scores an unreadable answer as the box [0,0,0,0]: a hit when the target holds the origin.
    assert screenspot_hit("??", (0, 0, 50, 50), SS_W, SS_H, mode="lmms-eval") is True
    assert screenspot_hit("??", (0, 0, 50, 50), SS_W, SS_H) is False
    assert screenspot_hit("", SS_BOX, SS_W, SS_H, mode="seeclick") is False
    with pytest.raises(ValueError, match="unknown screenspot_hit mode"):
        screenspot_hit("[1, 2]", SS_BOX, SS_W, SS_H, mode="showui")
    with pytest.raises(ValueError, match="target_box"):
        screenspot_hit("[1, 2]", (1, 2, 3), SS_W, SS_H)


# ==================================================================================================
# CIDEr-D
# ==================================================================================================


@pytest.mark.parametrize(
    ("text", "tokens"),
    [
        ("Won't", ["wo", "n't"]),
        ("Don't", ["do", "n't"]),
        ("100%", ["100", "%"]),
        ("0.96", ["0.96"]),
        ("A man, riding a horse.", ["a", "man", "riding", "a", "horse"]),
        ("It's John's (big) dog!", ["it", "'s", "john", "'s", "big", "dog"]),
        ('"Settings" -- tap here...', ["settings", "tap", "here"]),
        ("1,000 items at 10:30 in the U.S.", ["1,000", "items", "at", "10:30", "in", "the", "u.s."]),
        ("I cannot log-in", ["i", "can", "not", "log-in"]),
        ("Café\nMenü", ["café", "menü"]),
        ("", []),
    ],
)
def test_coco_tokenize_ours(text: str, tokens: list[str]) -> None:
    assert coco_tokenize(text) == tokens


def test_cider_pix2struct_vector_per_item() -> None:
    # 128.6 (pix2struct metrics_test.py); per item: identical single words 2.5 each, "100 %" vs
    # "96 %" 0.769, no overlap 0, "do n't" vs "wo n't" 1.25.
    result = cider_d(PIX2STRUCT_PREDICTIONS, PIX2STRUCT_TARGETS)
    assert result.scores == pytest.approx([2.5, 2.5, 2.5, 10 / 13, 10 / 13, 0.0, 0.0, 1.25])
    assert 100 * result.score == pytest.approx(128.60577, abs=1e-4)
    # Split on spaces only: no lower-casing, and "100%" / "96%", "Don't" / "Won't" share nothing.
    pretokenized = cider_d(PIX2STRUCT_PREDICTIONS, PIX2STRUCT_TARGETS, mode="pretokenized")
    assert pretokenized.scores == pytest.approx([2.5, 0, 0, 0, 0, 0, 0, 0])


def test_cider_properties_ours() -> None:
    refs = [["a red button"], ["the settings icon"], ["a search bar at the top"]]
    perfect = cider_d(["a red button", "the settings icon", "a search bar at the top"], refs)
    assert perfect.scores[0] > 0 and perfect.score > cider_d(["a red button", "x", "y"], refs).score
    assert cider_d(["", "", ""], refs).score == 0.0  # empty predictions
    assert cider_d(["a red button"], [["a red button"]]).score == 0.0  # one item: every idf is 0
    # The length penalty counts bigrams: a one-word and a two-word caption differ by one "length" unit.
    long_refs = [["open the settings menu now"], ["close"], ["back"]]
    short = cider_d(["open the settings menu", "close", "back"], long_refs).scores[0]
    full = cider_d(["open the settings menu now", "close", "back"], long_refs).scores[0]
    assert short < full
    refs2 = [["a red button"], ["a blue tab"]]
    messy = cider_d(["A  RED\tbutton.", "blue"], refs2)
    assert messy.scores == cider_d(["a red button", "blue"], refs2).scores  # case, spaces, "." ignored
    assert messy.scores[0] > 0


@pytest.mark.parametrize(
    ("call", "message"),
    [
        (lambda: cider_d(["a"], [["a"]], mode="spice"), "unknown cider_d mode"),
        (lambda: cider_d(["a", "b"], [["a"]]), "one per prediction"),
        (lambda: cider_d(["a"], [[]]), "non-empty"),
        (lambda: cider_d([], []), "non-empty"),
        (lambda: cider_d(["a"], [["a"]], n=0), "n must be"),
        (lambda: cider_d(["a"], [["a"]], sigma=0), "sigma"),
        (lambda: coco_tokenize(None), "text must be a str"),  # type: ignore[arg-type]
    ],
)
def test_cider_errors(call, message: str) -> None:
    with pytest.raises(ValueError, match=message):
        call()


# ==================================================================================================
# 1.10 Video QA judge (ActivityNet-QA)
# ==================================================================================================


@pytest.mark.parametrize(
    ("reply", "parsed"),
    [
        ("{'pred': 'yes', 'score': 4}", ("yes", 4)),
        ("Sure! {'pred': 'Yes', 'score': 5}", ("yes", 5)),
        ("{'pred': 'yes', 'score': 4.8}", ("yes", 4)),
        ("no dictionary here", ("no", 0)),  # ours: failures
        ("{'pred': 'yes'}", ("no", 0)),
        ("{'pred': 'yes', 'score': 'high'}", ("no", 0)),
        ("{'pred': 'NO', 'score': 1}", ("no", 1)),
        ("{'pred': 'yes', 'score': 1e999}", ("no", 0)),  # an infinite score: a failure, not a crash
    ],
)
def test_judge_parse(reply: str, parsed: tuple[str, int]) -> None:
    assert parse_judge_reply(reply) == parsed


def test_judge_aggregate() -> None:
    result = judge_aggregate([("yes", 5), ("no", 1), ("yes", 3)])
    assert round(result["accuracy"], 1) == 66.7
    assert result["score"] == 3.0
    with pytest.raises(ValueError, match="non-empty"):
        judge_aggregate([])
