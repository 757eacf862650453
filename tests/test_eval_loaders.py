"""Benchmark annotation loaders (mm15.eval.loaders) on real annotation samples and real-format files.

The real samples live in ``tests/fixtures/realdata`` (see ``tests/fixtures/README.md``); scores are
computed with ``mm15.eval.metrics`` from constructed predictions.
"""

from __future__ import annotations

import json
from collections import Counter
from pathlib import Path
from typing import Any

import pytest

from mm15.boxes import format_box, format_point
from mm15.eval.loaders import (
    EvalSet,
    LoaderError,
    load_chartqa,
    load_docvqa,
    load_infovqa,
    load_multiple_choice,
    load_ocrbench,
    load_pope,
    load_refcoco,
    load_rrc_submission,
    load_screenspot,
    load_textvqa,
    load_vqav2,
    record_splits,
)
from mm15.eval.metrics import (
    OCRBENCH_TYPES,
    anls,
    choice_correct,
    grounding_accuracy,
    mmmu_open_correct,
    ocrbench_aggregate,
    ocrbench_correct,
    pope_metrics,
    relaxed_accuracy,
    screenspot_hit,
    vqa_accuracy,
)

REAL = Path(__file__).parent / "fixtures" / "realdata"
VQA_DIR = REAL / "vqav2_refcocog_tiny"
REFS = VQA_DIR / "refcocog_refs_umd.json"
INSTANCES = VQA_DIR / "refcocog_instances.json"


def _write(path: Path, data: Any) -> Path:
    path.write_text(json.dumps(data), encoding="utf-8")
    return path


# --------------------------------------------------------------------------------------------------
# ANLS (shunk031/ANLS fixtures, DocVQA/RRC format)
# --------------------------------------------------------------------------------------------------


def test_anls_fixture_scores_as_the_reference_expects() -> None:
    gold = load_docvqa(REAL / "anls_fixtures" / "gold_label.json")
    submission = load_rrc_submission(REAL / "anls_fixtures" / "submission.json")
    assert [item.id for item in gold] == ["1", "2", "3", "4", "5"]
    assert gold[0].answers == ["Coca Cola", "Coca Cola Company"]
    assert gold[0].image == "bar"  # image_local_name
    scores = [anls(submission[item.id], item.answers) for item in gold]
    assert scores == pytest.approx([0.0, 0.89, 1.0, 0.0, 0.0], abs=0.005)
    assert sum(scores) / len(scores) == pytest.approx(0.378, abs=0.0005)
    # The InfoVQA entry point reads the same format.
    assert [item.answers for item in load_infovqa(REAL / "anls_fixtures" / "gold_label.json")] == [
        item.answers for item in gold
    ]


# --------------------------------------------------------------------------------------------------
# OCRBench (all 1000 real items)
# --------------------------------------------------------------------------------------------------


def test_ocrbench_real_file_gold_scores_100_and_empty_scores_0() -> None:
    items = load_ocrbench(REAL / "ocrbench_annotations" / "OCRBench.json")
    assert len(items) == 1000
    assert len({item.id for item in items}) == 1000
    counts = Counter(item.meta["type"] for item in items)
    assert set(counts) == set(OCRBENCH_TYPES)
    assert counts["Handwritten Mathematical Expression Recognition"] == 100
    assert counts["Doc-oriented VQA"] == counts["Scene Text-centric VQA"] == 200
    assert all(item.answers and item.image for item in items)
    types = [item.meta["type"] for item in items]

    perfect = [ocrbench_correct(item.answers[0], item.answers, item.meta["dataset_name"]) for item in items]
    result = ocrbench_aggregate(types, perfect)
    assert result["Final Score"] == 1000
    assert result["Final Score Norm"] == 100
    assert result["Text Recognition"] == 300

    empty = [ocrbench_correct("", item.answers, item.meta["dataset_name"]) for item in items]
    assert ocrbench_aggregate(types, empty)["Final Score"] == 0


# --------------------------------------------------------------------------------------------------
# POPE (first 300 lines of each real split)
# --------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("category", ["random", "popular", "adversarial"])
def test_pope_real_splits(category: str) -> None:
    items = load_pope(REAL / "pope_coco" / f"coco_pope_{category}.json")
    assert len(items) == 300
    assert all(item.meta["category"] == category for item in items)
    assert all(item.image and item.image.startswith("COCO_val2014_") for item in items)
    labels = [item.answers[0] for item in items]
    yes_fraction = labels.count("yes") / len(labels)

    all_yes = pope_metrics(["Yes, there is."] * len(items), labels)
    assert all_yes["yes_ratio"] == 1.0
    assert all_yes["accuracy"] == pytest.approx(yes_fraction)
    assert all_yes["recall"] == 1.0

    perfect = pope_metrics([label.capitalize() + "." for label in labels], labels)
    assert 100 * perfect["accuracy"] == 100
    assert 100 * perfect["f1"] == pytest.approx(100)
    assert perfect["yes_ratio"] == pytest.approx(yes_fraction)


def test_pope_bad_label_names_file_and_line(tmp_path: Path) -> None:
    path = tmp_path / "coco_pope_random.json"
    path.write_text(
        '{"question_id": 1, "image": "a.jpg", "text": "Is there a cat?", "label": "yes"}\n\n\n'
        '{"question_id": 2, "image": "a.jpg", "text": "Is there a dog?", "label": "maybe"}\n'
    )
    # The second record, on the file's fourth line (blank lines are skipped, not counted away).
    with pytest.raises(LoaderError, match=r"coco_pope_random\.json: line 4 \(question_id=2\).*maybe"):
        load_pope(path)
    # A JSON array has no lines to name: its records are named by index.
    path.write_text('[{"question_id": 1, "image": "a.jpg", "text": "Is there a cat?", "label": "maybe"}]')
    with pytest.raises(LoaderError, match=r"coco_pope_random\.json: record 0 \(question_id=1\)"):
        load_pope(path)
    path.write_text('{"question_id": 1, "image": "a.jpg", "text": "Is there a cat?"}\n')
    with pytest.raises(LoaderError, match="missing field 'label'"):
        load_pope(path)
    path.write_text('{"question_id": 1, "image": "a.jpg"\n')
    with pytest.raises(LoaderError, match="line 1 is not valid JSON"):
        load_pope(path)


# --------------------------------------------------------------------------------------------------
# VQAv2 (53 real questions with 10 human answers each)
# --------------------------------------------------------------------------------------------------


def _independent_vqa_accuracy(prediction: str, answers: list[str]) -> float:
    # Written out again here: mean over annotators of min(1, matches among the other nine / 3).
    total = 0.0
    for i in range(len(answers)):
        others = answers[:i] + answers[i + 1 :]
        total += min(1.0, sum(a == prediction for a in others) / 3)
    return total / len(answers)


def test_vqav2_most_common_answer_accuracy() -> None:
    items = load_vqav2(
        VQA_DIR / "v2_OpenEnded_mscoco_train2014_questions.json",
        VQA_DIR / "v2_mscoco_train2014_annotations.json",
    )
    assert len(items) == 53
    assert all(len(item.answers) == 10 for item in items)
    assert items[0].image == "COCO_val2014_000000006818.jpg"  # the file's data_subtype is val2014
    predictions = [Counter(item.answers).most_common(1)[0][0] for item in items]
    pairs = list(zip(predictions, items, strict=True))
    ours = [vqa_accuracy(p, item.answers) for p, item in pairs]
    expected = [_independent_vqa_accuracy(p, item.answers) for p, item in pairs]
    assert ours == pytest.approx(expected)
    assert 0 < sum(expected) / len(expected) < 1
    # A question all ten annotators answered alike: that answer scores 1.0.
    unanimous = next(item for item in items if len(set(item.answers)) == 1)
    assert vqa_accuracy(unanimous.answers[0], unanimous.answers) == 1.0
    assert unanimous.meta["multiple_choice_answer"] == unanimous.answers[0]


def test_vqav2_val_pair_and_mismatch(tmp_path: Path) -> None:
    questions = VQA_DIR / "v2_OpenEnded_mscoco_val2014_questions.json"
    items = load_vqav2(questions, VQA_DIR / "v2_mscoco_val2014_annotations.json")
    assert [item.meta["image_id"] for item in items] == [397133] * 3
    assert load_vqav2(questions)[0].answers == []  # no annotations (test-dev style)

    annotations = json.loads((VQA_DIR / "v2_mscoco_val2014_annotations.json").read_text())
    del annotations["annotations"][1]
    short = _write(tmp_path / "ann.json", annotations)
    with pytest.raises(LoaderError, match=r"record 1 \(question_id=262148001\).*no annotation"):
        load_vqav2(questions, short)
    annotations["annotations"][0]["answers"][3]["answer"] = 7
    bad = _write(tmp_path / "ann_bad.json", annotations)
    with pytest.raises(LoaderError, match=r"ann_bad\.json: record 0\.answers\[3\].*'answer' must be a str"):
        load_vqav2(questions, bad)


def test_vqav2_duplicate_question_id_is_reported_as_such(tmp_path: Path) -> None:
    # The same question listed twice finds its annotation already taken: that is a duplicate, not a
    # question without an annotation.
    questions = json.loads((VQA_DIR / "v2_OpenEnded_mscoco_train2014_questions.json").read_text())
    questions["questions"].append(dict(questions["questions"][0]))
    qid = questions["questions"][0]["question_id"]
    path = _write(tmp_path / "questions.json", questions)
    with pytest.raises(LoaderError, match=rf"record 53 \(question_id={qid}\): duplicate question_id {qid}$"):
        load_vqav2(path, VQA_DIR / "v2_mscoco_train2014_annotations.json")
    with pytest.raises(LoaderError, match=f"duplicate question_id {qid}"):
        load_vqav2(path)  # without annotations too


# --------------------------------------------------------------------------------------------------
# RefCOCOg (15 real refs, 28 expressions)
# --------------------------------------------------------------------------------------------------


def _iou(a: tuple[float, ...], b: tuple[float, ...]) -> float:
    inter = max(0.0, min(a[2], b[2]) - max(a[0], b[0])) * max(0.0, min(a[3], b[3]) - max(a[1], b[1]))
    area = (a[2] - a[0]) * (a[3] - a[1]) + (b[2] - b[0]) * (b[3] - b[1]) - inter
    return inter / area


def test_refcocog_boxes_and_splits() -> None:
    items = load_refcoco(REFS, INSTANCES)
    refs = json.loads(REFS.read_text())
    assert len(items) == sum(len(ref["sentences"]) for ref in refs) == 28
    instances = json.loads(INSTANCES.read_text())
    ann = next(a for a in instances["annotations"] if a["id"] == refs[0]["ann_id"])
    x, y, w, h = ann["bbox"]
    assert items[0].meta["box"] == pytest.approx((x, y, x + w, y + h))
    image = next(i for i in instances["images"] if i["id"] == refs[0]["image_id"])
    assert (items[0].meta["width"], items[0].meta["height"]) == (image["width"], image["height"])
    assert items[0].image == image["file_name"]
    assert items[0].question == refs[0]["sentences"][0]["sent"]

    val = load_refcoco(REFS, INSTANCES, split="val")
    n_val = sum(len(ref["sentences"]) for ref in refs if ref["split"] == "val")
    assert len(val) == n_val and all(item.meta["split"] == "val" for item in val)
    assert val.skipped["split"] == sum(ref["split"] != "val" for ref in refs)
    assert len(load_refcoco(REFS, INSTANCES, split=["val", "test"])) == sum(
        len(ref["sentences"]) for ref in refs if ref["split"] in ("val", "test")
    )
    with pytest.raises(LoaderError, match=r"no ref in split\(s\) \['testA'\]"):
        load_refcoco(REFS, INSTANCES, split="testA")


def test_refcoco_boxes_must_lie_in_their_image(tmp_path: Path) -> None:
    refs = json.loads(REFS.read_text())[:1]
    instances = json.loads(INSTANCES.read_text())
    image = next(i for i in instances["images"] if i["id"] == refs[0]["image_id"])
    ann = next(a for a in instances["annotations"] if a["id"] == refs[0]["ann_id"])
    width, height = image["width"], image["height"]
    refs_path = _write(tmp_path / "refs.json", refs)
    # COCO's float boxes may pass the edge by rounding: up to one pixel is inside.
    ann["bbox"] = [width - 10.5, 0.0, 11.4, float(height) + 0.9]
    assert len(load_refcoco(refs_path, _write(tmp_path / "instances.json", instances))) == len(
        refs[0]["sentences"]
    )
    ann["bbox"] = [width + 5.0, 0.0, 10.0, 10.0]  # e.g. width and height swapped in the image record
    with pytest.raises(
        LoaderError, match=rf"ann_id {ann['id']} in .*: box .* lies outside the {width}x{height} image"
    ):
        load_refcoco(refs_path, _write(tmp_path / "instances.json", instances))


def test_refcocog_acc_at_05_with_gt_and_shifted_boxes() -> None:
    items = load_refcoco(REFS, INSTANCES)
    boxes = [item.meta["box"] for item in items]
    sizes = [(item.meta["width"], item.meta["height"]) for item in items]
    texts = [format_box(box, h, w) for box, (w, h) in zip(boxes, sizes, strict=True)]
    assert grounding_accuracy(texts, boxes, sizes) == 100.0

    shifted_texts, expected_hits = [], 0
    for i, (box, (w, h)) in enumerate(zip(boxes, sizes, strict=True)):
        x1, y1, x2, y2 = box
        fraction = 0.2 if i % 2 == 0 else 0.6  # IoU about 0.67 (hit) or 0.25 (miss) before clipping
        dx = fraction * (x2 - x1) * (1 if (x1 + x2) / 2 < w / 2 else -1)
        moved = (max(0.0, x1 + dx), y1, min(float(w), x2 + dx), y2)
        expected_hits += _iou(moved, box) >= 0.5
        shifted_texts.append(format_box(moved, h, w))
    expected = 100.0 * expected_hits / len(items)
    assert 0 < expected < 100
    assert grounding_accuracy(shifted_texts, boxes, sizes) == pytest.approx(expected)


def test_refcoco_bad_inputs(tmp_path: Path) -> None:
    pickle_path = tmp_path / "refs(umd).p"
    pickle_path.write_bytes(b"\x80\x04K\x01.")
    with pytest.raises(LoaderError, match=r"refs\(umd\)\.p: pickle files are not loaded.*JSON"):
        load_refcoco(pickle_path, INSTANCES)
    refs = json.loads(REFS.read_text())
    refs[2]["ann_id"] = 1
    with pytest.raises(LoaderError, match=r"refs\.json: record 2 \(ref_id=\d+\): ann_id 1 is not in"):
        load_refcoco(_write(tmp_path / "refs.json", refs), INSTANCES)
    refs = json.loads(REFS.read_text())
    del refs[0]["sentences"][1]["sent"]
    with pytest.raises(LoaderError, match=r"record 0\.sentences\[1\] \(sent_id=\d+\): missing field 'sent'"):
        load_refcoco(_write(tmp_path / "refs2.json", refs), INSTANCES)
    instances = json.loads(INSTANCES.read_text())
    instances["annotations"][4]["bbox"] = [1, 2, 3]
    with pytest.raises(LoaderError, match=r"record annotations\[4\].*\[x, y, w, h\]"):
        load_refcoco(REFS, _write(tmp_path / "inst.json", instances))
    (tmp_path / "broken.json").write_text('{"images": [')
    with pytest.raises(LoaderError, match=r"broken\.json: invalid JSON at line 1"):
        load_refcoco(REFS, tmp_path / "broken.json")


# --------------------------------------------------------------------------------------------------
# ScreenSpot, TextVQA, DocVQA, ChartQA, multiple choice: hand-written files in the real formats
# --------------------------------------------------------------------------------------------------

CALENDAR_W, CALENDAR_H = 2360, 1640  # tests/fixtures/seeclick_calendar.png


def test_screenspot_format_and_click_scoring(tmp_path: Path) -> None:
    # Our own hand-drawn targets on the SeeClick calendar screenshot, in ScreenSpot's format.
    records = [
        {"img_filename": "seeclick_calendar.png", "bbox": [370, 60, 70, 70], "instruction": "add an event",
         "data_type": "icon", "data_source": "ios"},
        {"img_filename": "seeclick_calendar.png", "bbox": [1330, 70, 120, 60],
         "instruction": "switch to Year", "data_type": "text", "data_source": "ios"},
    ]  # fmt: skip
    items = load_screenspot(_write(tmp_path / "screenspot_mobile.json", records))
    assert isinstance(items, EvalSet) and len(items) == 2
    assert items[0].meta == {"box": (370.0, 60.0, 440.0, 130.0), "data_type": "icon", "data_source": "ios",
                             "platform": "mobile"}  # fmt: skip
    assert items[1].question == "switch to Year" and items[1].image == "seeclick_calendar.png"
    for item in items:
        x1, y1, x2, y2 = item.meta["box"]
        inside = format_point(((x1 + x2) / 2, (y1 + y2) / 2), CALENDAR_H, CALENDAR_W)
        assert screenspot_hit(inside, item.meta["box"], CALENDAR_W, CALENDAR_H)
        outside = format_point((x2 + 50, y2 + 50), CALENDAR_H, CALENDAR_W)
        assert not screenspot_hit(outside, item.meta["box"], CALENDAR_W, CALENDAR_H)

    records[1]["bbox"] = [1330, 70, 120]
    with pytest.raises(LoaderError, match=r"screenspot_web\.json: record 1 \(img_filename=.*\).*bbox"):
        load_screenspot(_write(tmp_path / "screenspot_web.json", records))
    records[1]["bbox"] = [1330, 70, 120, 60]
    del records[0]["data_type"]
    with pytest.raises(LoaderError, match=r"record 0 .*missing field 'data_type'"):
        load_screenspot(_write(tmp_path / "screenspot_web.json", records))


def test_textvqa_format(tmp_path: Path) -> None:
    answers = ["nokia"] * 7 + ["nokia phone", "noika", "nokia"]
    data = {
        "dataset_type": "val",
        "dataset_name": "textvqa",
        "dataset_version": "0.5.1",
        "data": [
            {"question": "what brand is the phone?", "image_id": "0054c91397f2fe05",
             "image_classes": ["Phone"], "flickr_original_url": "", "flickr_300k_url": "",
             "image_width": 1024, "image_height": 768,
             "answers": answers, "question_tokens": ["what", "brand"], "question_id": 34602,
             "set_name": "val"},
        ],
    }  # fmt: skip
    items = load_textvqa(_write(tmp_path / "TextVQA_0.5.1_val.json", data))
    item = items[0]
    assert (item.id, item.image, item.meta["width"], item.meta["set_name"]) == (
        "34602", "0054c91397f2fe05.jpg", 1024, "val"
    )  # fmt: skip
    assert vqa_accuracy("Nokia", item.answers) == 1.0
    assert vqa_accuracy("noika", item.answers) == pytest.approx(0.3)

    del data["data"][0]["answers"]
    path = _write(tmp_path / "TextVQA_0.5.1_test.json", data)
    assert load_textvqa(path, require_answers=False)[0].answers == []
    with pytest.raises(LoaderError, match=r"0\.5\.1_test\.json: record 0 \(question_id=34602\).*'answers'"):
        load_textvqa(path)
    data["data"][0]["answers"] = []  # the unlabelled split written with an empty list
    path = _write(tmp_path / "TextVQA_0.5.1_test.json", data)
    assert load_textvqa(path, require_answers=False)[0].answers == []
    with pytest.raises(LoaderError, match="'answers' is empty"):
        load_textvqa(path)
    with pytest.raises(LoaderError, match='"data" list'):
        load_textvqa(_write(tmp_path / "x.json", [1, 2]))


def test_docvqa_format(tmp_path: Path) -> None:
    data = {
        "dataset_name": "docvqa", "dataset_split": "val", "dataset_version": "1.0",
        "data": [
            {"questionId": 49153, "question": "What is the ‘actual’ value per 1000, during the year 1975?",
             "question_types": ["figure/diagram"], "image": "documents/pybv0228_81.png", "docId": 14465,
             "ucsf_document_id": "pybv0228", "ucsf_document_page_no": "81", "answers": ["0.28"],
             "data_split": "val"},
            {"questionId": 24581, "question": "What is name of university?", "question_types": ["others"],
             "image": "documents/nkbl0226_1.png", "docId": 7027, "answers": ["university of california",
             "University of California", "university of california, san diego"], "data_split": "val"},
        ],
    }  # fmt: skip
    items = load_docvqa(_write(tmp_path / "val_v1.0.json", data))
    assert [item.image for item in items] == ["documents/pybv0228_81.png", "documents/nkbl0226_1.png"]
    assert items[0].meta["doc_id"] == 14465
    assert anls("0.28", items[0].answers) == 1.0
    assert anls("University of California San Diego", items[1].answers) == pytest.approx(1 - 1 / 35)

    data["data"][1]["answers"] = "university of california"
    with pytest.raises(LoaderError, match=r"record 1 \(questionId=24581\): field 'answers' must be a list"):
        load_docvqa(_write(tmp_path / "val_bad.json", data))
    data["data"][1]["answers"] = []
    with pytest.raises(LoaderError, match="'answers' is empty"):
        load_docvqa(_write(tmp_path / "val_bad.json", data))


def test_chartqa_format(tmp_path: Path) -> None:
    records = [
        {"imgname": "41699051005347.png", "query": "How many food item is shown in the bar graph?",
         "label": "14"},
        {"imgname": "multi_col_1021.png", "query": "What is the value of Haiti in 2019?", "label": "12.6"},
    ]  # fmt: skip
    items = load_chartqa(_write(tmp_path / "test_human.json", records))
    assert [item.id for item in items] == ["test_human:0", "test_human:1"]
    assert items[1].image == "multi_col_1021.png" and items[1].meta == {"subset": "human"}
    assert relaxed_accuracy("14", items[0].answers) == 1.0
    assert relaxed_accuracy("12", items[1].answers) == 1.0  # within 5 %
    assert relaxed_accuracy("11", items[1].answers) == 0.0

    records[1]["label"] = 12.6
    with pytest.raises(LoaderError, match=r"test_augmented\.json: record 1 .*'label' must be a string"):
        load_chartqa(_write(tmp_path / "test_augmented.json", records))
    with pytest.raises(LoaderError, match="expected a JSON list"):
        load_chartqa(_write(tmp_path / "test_x.json", {"data": records}))


def test_multiple_choice_mmmu_ai2d_scienceqa(tmp_path: Path) -> None:
    mmmu = [
        {"id": "validation_Accounting_1", "question": "Which is right? <image 1>",
         "options": "['$6', '$7', '$8', '$9']", "answer": "B", "image_1": "validation_Accounting_1_1.png",
         "question_type": "multiple-choice", "subfield": "Financial Accounting"},
        {"id": "validation_Math_5", "question": "What is x?", "options": "[]", "answer": "42",
         "question_type": "open"},
    ]  # fmt: skip
    path = _write(tmp_path / "mmmu_val.json", mmmu)
    items = load_multiple_choice(path)
    assert items[0].answers == ["B"] and items[0].meta["options"] == ["$6", "$7", "$8", "$9"]
    assert items[0].image == "validation_Accounting_1_1.png"
    assert choice_correct("The answer is (B) $7.", items[0].answers[0], items[0].meta["options"])
    assert not choice_correct("A", items[0].answers[0], items[0].meta["options"])
    assert items[1].answers == ["42"] and mmmu_open_correct("x = 42", items[1].answers)
    skipped = load_multiple_choice(path, skip_open=True)
    assert len(skipped) == 1 and skipped.skipped == {"open": 1}

    ai2d = [{"question": "Which label shows the sun?", "options": ["A", "B", "C", "D"], "answer": "2",
             "image": "ai2d/1234.png"}]  # fmt: skip
    item = load_multiple_choice(_write(tmp_path / "ai2d.json", ai2d))[0]
    assert item.answers == ["C"] and item.meta["answer_index"] == 2 and item.id == "0"
    assert choice_correct("C", item.answers[0], item.meta["options"], mode="lmms-eval-ai2d")

    scienceqa = {
        "5": {"question": "Which figure of speech is used?", "choices": ["simile", "metaphor"], "answer": 1,
              "image": None, "split": "test", "subject": "language science"},
        "6": {"question": "Which animal is a mammal?", "choices": ["frog", "cat", "eagle"], "answer": 1,
              "image": "image.png", "split": "test", "subject": "natural science"},
        "7": {"question": "Which is a solid?", "choices": ["ice", "water"], "answer": 0, "image": "image.png",
              "split": "train"},
    }  # fmt: skip
    path = _write(tmp_path / "problems.json", scienceqa)
    items = load_multiple_choice(path, split="test", require_image=True)
    assert [(i.id, i.image, i.answers) for i in items] == [("6", "test/6/image.png", ["B"])]
    assert items.skipped == {"split": 1, "no_image": 1}
    assert len(load_multiple_choice(path)) == 3

    scienceqa["6"]["answer"] = 3
    with pytest.raises(LoaderError, match=r"problems\.json: record 6: answer 3 is not an option"):
        load_multiple_choice(_write(tmp_path / "problems.json", scienceqa))
    scienceqa["6"]["answer"] = 1
    scienceqa["6"]["choices"] = "frog, cat"
    with pytest.raises(LoaderError, match=r"record 6: field 'choices' is a string but not a list literal"):
        load_multiple_choice(_write(tmp_path / "problems.json", scienceqa))


def test_multiple_choice_jsonl_errors_name_the_line(tmp_path: Path) -> None:
    path = tmp_path / "mc.jsonl"
    path.write_text(
        '{"id": "a", "question": "Q?", "options": ["x", "y"], "answer": "A"}\n\n'
        '{"id": "b", "question": "Q?", "options": ["x", "y"], "answer": "C"}\n'
    )
    with pytest.raises(LoaderError, match=r"mc\.jsonl: line 3 \(id='b'\): answer 'C' is not an option"):
        load_multiple_choice(path)


def test_scienceqa_images_are_read_from_their_split_folder(tmp_path: Path) -> None:
    # ScienceQA stores images/<split>/<pid>/image.png: a train or val question's image is not under
    # the test folder.
    scienceqa = {
        "6": {"question": "Which animal is a mammal?", "choices": ["frog", "cat"], "answer": 1,
              "image": "image.png", "split": "test"},
        "7": {"question": "Which is a solid?", "choices": ["ice", "water"], "answer": 0, "image": "image.png",
              "split": "train"},
        "8": {"question": "Which is a gas?", "choices": ["air", "rock"], "answer": 0, "image": "image.png",
              "split": "val"},
    }  # fmt: skip
    path = _write(tmp_path / "problems.json", scienceqa)
    assert [item.image for item in load_multiple_choice(path)] == [
        "test/6/image.png",
        "train/7/image.png",
        "val/8/image.png",
    ]
    train = load_multiple_choice(path, split="train")
    assert [item.image for item in train] == ["train/7/image.png"] and train.skipped == {"split": 2}
    assert record_splits(path) == ["test", "train", "val"]
    assert record_splits(REFS) == ["test", "train", "val"]
    with pytest.raises(
        LoaderError, match=r"no record in split\(s\) \['minival'\]; the file has \['test', 'train', 'val'\]"
    ):
        load_multiple_choice(path, split="minival")


SEED_IMAGE_QUESTION = {
    "answer": "A", "choice_a": "One", "choice_b": "Two", "choice_c": "Three", "choice_d": "Four",
    "data_id": "1454426_2591111986", "data_type": "image", "question": "How many towels are in the image?",
    "question_id": "101669", "question_type_id": 5,
}  # fmt: skip
SEED_VIDEO_QUESTION = {
    "answer": "B", "choice_a": "throwing something in the air and letting it fall",
    "choice_b": "throwing something in the air and catching it",
    "choice_c": "lifting up one end of something, then letting it drop down",
    "choice_d": "poking something so that it falls over", "data_id": "94328.webm", "data_type": "video",
    "question": "What is the action being carried out in the video?", "question_id": "v1738",
    "question_type_id": 10,
}  # fmt: skip


def test_seed_bench_official_file_and_lmms_lab_records(tmp_path: Path) -> None:
    # The layout of SEED-Bench.json as distributed (AILab-CVC/SEED-Bench DATASET.md): a "questions"
    # list beside the question_type table, options as choice_a..choice_d, image and video questions.
    official = {"question_type": {"Instances Counting": 5, "Action Recognition": 10},
                "questions": [SEED_IMAGE_QUESTION, SEED_VIDEO_QUESTION]}  # fmt: skip
    items = load_multiple_choice(_write(tmp_path / "SEED-Bench.json", official))
    (item,) = items
    assert (item.id, item.question, item.answers) == ("101669", "How many towels are in the image?", ["A"])
    assert item.meta["options"] == ["One", "Two", "Three", "Four"] and item.meta["question_type_id"] == 5
    assert item.image == "1454426_2591111986"  # the file's name in SEED-Bench-image/
    assert items.skipped == {"video": 1}
    # lmms-lab's records: a plain list with the same fields.
    listed = load_multiple_choice(_write(tmp_path / "seed.json", [SEED_IMAGE_QUESTION]))
    assert [(i.id, i.answers, i.meta["options"][1]) for i in listed] == [("101669", ["A"], "Two")]

    gap = dict(SEED_IMAGE_QUESTION)
    del gap["choice_b"]
    with pytest.raises(
        LoaderError, match=r"record 0 \(question_id='101669'\): choice fields must run from choice_a"
    ):
        load_multiple_choice(_write(tmp_path / "gap.json", [gap]))
    other = {**SEED_IMAGE_QUESTION, "data_type": "Single Image"}
    with pytest.raises(LoaderError, match=r"data_type must be 'image' or 'video', got 'Single Image'"):
        load_multiple_choice(_write(tmp_path / "other.json", {"questions": [other]}))
