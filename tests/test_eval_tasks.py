"""The evaluation task registry: lookups and errors, task specs, held-out synthetic items, real sources."""

from __future__ import annotations

import json
import re
import sys
from pathlib import Path

import pytest
from PIL import Image

from mm15.data.synth import generate, sample_seed
from mm15.eval import tasks as registry
from mm15.eval.tasks import (
    CATEGORIES,
    MMBASE_CATEGORIES,
    Task,
    TaskError,
    TaskItem,
    TaskSpec,
    get_task,
    parse_task_specs,
    register_task,
    resolve_task_specs,
    task_names,
)
from mm15.model.generate import GenerationConfig

REAL = Path(__file__).parent / "fixtures" / "realdata"
MM15_CATEGORIES = ("general", "text-rich", "knowledge", "refer-ground", "multi-image", "in-context")
# The held-out tasks of MM1.5's categories registered by mm15.eval.tasks (variant_tasks adds its own).
SYNTH_TASKS = [registry.SYNTH_PREFIX + generator for generator, *_ in registry._SYNTHETIC] + ["synth-refer"]


def _task(name: str, category: str = "general") -> Task:
    return Task(
        name=name,
        category=category,
        version="1",
        description="a test task",
        prompt="{question}",
        generation=GenerationConfig(max_new_tokens=2),
        parse=registry.short_answer,
        score=registry.normalized_match,
        metric="exact",
        source=lambda options: [TaskItem("0", "What?", ("yes",))],
    )


# --------------------------------------------------------------------------------------------------
# Registry
# --------------------------------------------------------------------------------------------------


def test_every_mm15_category_has_a_synthetic_task() -> None:
    assert set(MMBASE_CATEGORIES) <= set(CATEGORIES)
    for category in MM15_CATEGORIES:
        names = task_names(category)
        assert any(name.startswith("synth-") for name in names), category
        assert all(get_task(name).category == category for name in names)
    assert {"video", "ui"} <= set(CATEGORIES)


def test_unknown_task_and_category_list_the_choices() -> None:
    with pytest.raises(TaskError, match=r"unknown task 'nope'; choose from: .*synth-chart-qa.*textvqa"):
        get_task("nope")
    with pytest.raises(TaskError, match=r"unknown category 'vision'; choose from: general, text-rich"):
        task_names("vision")


def test_register_twice_is_an_error_unless_replace() -> None:
    task = _task("test-registry-probe")
    try:
        register_task(task)
        assert get_task("test-registry-probe") is task
        with pytest.raises(TaskError, match="registered twice"):
            register_task(_task("test-registry-probe"))
        other = register_task(_task("test-registry-probe"), replace=True)
        assert get_task("test-registry-probe") is other
    finally:
        registry._TASKS.pop("test-registry-probe", None)
    with pytest.raises(TaskError, match="unknown category"):
        _task("bad-category", category="vision")
    with pytest.raises(TaskError, match="without ':'"):
        _task("bad:name")


def test_variant_module_is_imported_on_first_lookup(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    (tmp_path / "mm15_variant_probe.py").write_text(
        "from mm15.eval.tasks import register_task, get_task\n"
        "import dataclasses\n"
        "base = get_task('synth-icl')\n"
        "register_task(dataclasses.replace(base, name='probe-video', category='video'))\n"
    )
    monkeypatch.syspath_prepend(str(tmp_path))
    monkeypatch.setattr(registry, "VARIANT_MODULE", "mm15_variant_probe")
    monkeypatch.setattr(registry, "_variants_loaded", False)
    try:
        assert "probe-video" in task_names("video")
        assert "probe-video" in task_names()
    finally:
        registry._TASKS.pop("probe-video", None)
        sys.modules.pop("mm15_variant_probe", None)
    # A missing variant module is fine: nothing to register.
    monkeypatch.setattr(registry, "VARIANT_MODULE", "mm15_no_such_variant_module")
    monkeypatch.setattr(registry, "_variants_loaded", False)
    assert "synth-icl" in task_names()


# --------------------------------------------------------------------------------------------------
# Task specs
# --------------------------------------------------------------------------------------------------


def test_spec_parsing() -> None:
    specs = parse_task_specs(" synth-icl , textvqa:path=/d/val.json,images=/d/img ,general:limit=3")
    assert specs == [
        TaskSpec("synth-icl", {}),
        TaskSpec("textvqa", {"path": "/d/val.json", "images": "/d/img"}),
        TaskSpec("general", {"limit": "3"}),
    ]
    assert parse_task_specs(["synth-icl", "pope:path=x"]) == [
        TaskSpec("synth-icl"),
        TaskSpec("pope", {"path": "x"}),
    ]
    with pytest.raises(TaskError, match="before any task name"):
        parse_task_specs("limit=3,synth-icl")
    with pytest.raises(TaskError, match="not key=value"):
        parse_task_specs("synth-icl:limit")
    with pytest.raises(TaskError, match="given twice"):
        parse_task_specs("synth-icl:limit=1,limit=2")
    with pytest.raises(TaskError, match="no task given"):
        parse_task_specs(" , ")


def test_groups_options_and_errors(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    general = resolve_task_specs("general:limit=3,max_new_tokens=2")
    assert [name for name, _, _ in general] == [n for n in task_names("general") if n.startswith("synth-")]
    assert all(options["limit"] == 3 and options["max_new_tokens"] == 2 for _, _, options in general)
    synth = [name for name, _, _ in resolve_task_specs("synth")]
    assert set(SYNTH_TASKS) <= set(synth) and all(name.startswith("synth-") for name in synth)
    val = tmp_path / "val.json"
    val.write_text("[]")
    ((_, task, options),) = resolve_task_specs(f"textvqa:path={val}")
    assert options["path"] == val and options["images"] is None
    assert task.generation_for(options).max_new_tokens == task.generation.max_new_tokens
    # "~" is the home folder, for the check and for the loaders (which were given the literal "~/...").
    home = tmp_path / "home"
    (home / "tv").mkdir(parents=True)
    (home / "tv" / "val.json").write_text("[]")
    monkeypatch.setenv("HOME", str(home))
    for given in ("~/tv/val.json", Path("~/tv/val.json")):
        ((_, _, options),) = resolve_task_specs([TaskSpec("textvqa", {"path": given, "images": "~/tv"})])
        assert (options["path"], options["images"]) == (home / "tv" / "val.json", home / "tv"), given
    # Path options must exist: found when the specs resolve, before any task runs.
    with pytest.raises(TaskError, match=r"task textvqa: option images=/d/img: no such file or folder"):
        resolve_task_specs(f"textvqa:path={val},images=/d/img")
    with pytest.raises(TaskError, match=r"option path=/d/val.json: no such file or folder"):
        resolve_task_specs([TaskSpec("textvqa", {"path": Path("/d/val.json")})])

    with pytest.raises(TaskError, match=r"unknown task 'nope'; choose a task .* a category"):
        resolve_task_specs("nope")
    with pytest.raises(TaskError, match=r"synth-icl: unknown option\(s\) colour; it accepts seed"):
        resolve_task_specs("synth-icl:colour=red")
    with pytest.raises(TaskError, match="limit must be int, got 'many'"):
        resolve_task_specs("synth-icl:limit=many")
    with pytest.raises(TaskError, match=r"textvqa: option path=\.\.\. is required"):
        resolve_task_specs("textvqa")
    with pytest.raises(TaskError, match="max_new_tokens must be >= 1"):
        resolve_task_specs("synth-icl:max_new_tokens=0")
    with pytest.raises(TaskError, match="listed twice"):
        resolve_task_specs("synth-icl,synth-icl:seed=1")
    # A size past a C integer overflowed len() after the model had loaded.
    with pytest.raises(TaskError, match="option size must fit in 64 bits, got 99999999999999999999999"):
        resolve_task_specs("synth-icl:size=99999999999999999999999")
    with pytest.raises(TaskError, match="option seed must fit in 64 bits"):
        resolve_task_specs([TaskSpec("synth-icl", {"seed": 2**63})])
    assert resolve_task_specs(f"synth-icl:seed={2**63 - 1}")[0][2]["seed"] == 2**63 - 1
    twice = resolve_task_specs("synth-icl,synth-icl:seed=1,name=icl-seed1")
    assert [name for name, _, _ in twice] == ["synth-icl", "icl-seed1"]
    assert twice[1][2]["seed"] == 1
    spec = resolve_task_specs([TaskSpec("synth-icl", {"limit": 2, "seed": 3})])
    assert spec[0][2]["limit"] == 2 and spec[0][2]["seed"] == 3
    with pytest.raises(TaskError, match="must be int"):
        resolve_task_specs([TaskSpec("synth-icl", {"limit": True})])


# --------------------------------------------------------------------------------------------------
# Held-out synthetic items
# --------------------------------------------------------------------------------------------------


def test_held_out_items_are_never_training_items() -> None:
    for name in SYNTH_TASKS:
        task = get_task(name)
        held_out = task.items(task.resolve_options({}))
        # synth-refer and synth-refer-ground keep some samples of the refer-ground generator (referring,
        # grounding questions); the others take every sample.
        generator = held_out[0].id.split("/")[0]
        eval_seeds = {sample_seed(generator, "eval", i) for i in range(2000)}
        assert not eval_seeds & {sample_seed(generator, "train", i) for i in range(2000)}
        train_pictures = [
            [image.tobytes() for image in generate(generator, i, "train").images] for i in range(3)
        ]
        indices = [int(held_out[index].id.split("/")[-1]) for index in range(3)]
        assert indices == sorted(set(indices))
        if name not in ("synth-refer", "synth-refer-ground"):
            assert indices == [0, 1, 2]
        for index in range(3):
            item = held_out[index]
            assert item.id.startswith(f"{generator}/eval/0/")
            pictures = [image.tobytes() for image in item.images]
            assert pictures not in train_pictures


@pytest.mark.parametrize("name", SYNTH_TASKS)
def test_the_reference_answer_scores_full_marks(name: str) -> None:
    task = get_task(name)
    items = task.items(task.resolve_options({}))
    for item in items[:3]:
        assert task.render(item).count("<image>") == len(item.images) >= 1
        assert task.score(task.parse("", item), item) == 0.0
    # Every item: an answer that ends in a period ("Zoe B.") once scored 0 on the table task.
    wrong = [item.id for item in items if task.score(task.parse(item.answers[0], item), item) != 1.0]
    assert not wrong, wrong


def test_relaxed_score_is_pix2struct_relaxed_accuracy_and_nothing_more() -> None:
    from mm15.eval.metrics import relaxed_correctness
    from mm15.eval.tasks import relaxed_score

    def item(answer: str) -> TaskItem:
        return TaskItem(id="q", question="?", answers=(answer,))

    cases = [
        ("U.S.", "U.S.", 1.0),  # ChartQA test_human record 5480.png
        ("16.", "16", 1.0),  # float("16.") is 16: the number rule
        ("Yes.", "Yes", 0.0),  # the string rule: a word's period is not dropped
        ("No.", "no", 0.0),
        ("Asia.", "Asia", 0.0),
        ("16.5.", "17", 0.0),  # not a number, and not the string
        ("U.S", "U.S.", 0.0),
        ("asia", "Asia", 1.0),
    ]
    for prediction, answer, expected in cases:
        assert relaxed_score(prediction, item(answer)) == expected, (prediction, answer)
        assert relaxed_score(prediction, item(answer)) == float(relaxed_correctness(prediction, answer))
    # Its tasks name exactly that metric, and their version says the scoring changed.
    users = [t for t in registry.tasks() if t.score is relaxed_score]
    assert {t.name for t in users} == {"chartqa", "synth-chart-qa", "synth-table-qa", "synth-math-chart"}
    assert all(t.metric == "relaxed accuracy (pix2struct)" and int(t.version) >= 2 for t in users)


def test_synthetic_items_are_deterministic_and_seeded() -> None:
    task = get_task("synth-general-count")
    first = task.items(task.resolve_options({}))[0]
    again = task.items(task.resolve_options({}))[0]
    other_seed = task.items(task.resolve_options({"seed": "1"}))[0]
    assert (first.question, first.answers) == (again.question, again.answers)
    assert first.images[0].tobytes() == again.images[0].tobytes()
    assert other_seed.id == "general-count/eval/1/0"
    assert len(task.items(task.resolve_options({"size": "5"}))) == 5
    with pytest.raises(IndexError):
        task.items(task.resolve_options({"size": "5"}))[5]


def test_refer_ground_item_carries_its_truth_region() -> None:
    task = get_task("synth-refer-ground")
    item = task.items(task.resolve_options({}))[0]
    assert item.question == "<image>\nGive the bounding box of the green circle."
    assert item.meta["box"] == (204.0, 81.0, 233.0, 110.0)
    assert (item.meta["width"], item.meta["height"]) == (448, 336)
    assert task.score("[455, 241, 520, 327]", item) == 1.0
    assert task.score("[0, 0, 100, 100]", item) == 0.0


def test_refer_ground_task_asks_only_grounding_questions() -> None:
    """A referring question writes its object's box ("What is the object in [20, 859, 91, 912]?", eval
    6): echoing it scored all 106 such items of the first 500 when every sample was an item. The task
    keeps the samples whose first question is a grounding one, the first ``size`` of them in order."""
    task = get_task("synth-refer-ground")
    assert task.version == "2"
    items = task.items(task.resolve_options({"size": "60"}))
    indices = [int(item.id.split("/")[-1]) for item in items]
    grounding = [
        index
        for index in range(indices[-1] + 1)
        if generate("refer-ground", index, "eval").truth["qa"][0]["task"] in ("ground", "ground-multi")
    ]
    assert indices == grounding and len(items) == 60
    for item in items:
        assert not re.search(r"\[\d+, \d+, \d+, \d+\]", item.question), item.question
        assert task.score(item.question, item) == 0.0  # echoing the question scores nothing
        assert task.score(item.answers[0], item) == 1.0


def test_read_text_scores_find_items_by_iou_and_read_items_by_anls() -> None:
    """A "find" item's reference is a box: ANLS on its digits gave 0.85 to a box of the right size
    below the text (IoU 0) and 0.68 to one around it (IoU 0.63). Find items are scored as grounding
    (Acc@IoU>=0.5), read items by ANLS, each item by its own kind."""
    task = get_task("synth-read-text")
    assert task.version == "2" and task.category == "text-rich"
    items = task.items(task.resolve_options({"size": "4"}))
    read, find = items[0], items[1]  # even indices ask to read the text at a box, odd ones to find one
    x1, y1, x2, y2 = (int(v) for v in re.findall(r"\d+", find.answers[0]))  # [649, 95, 784, 140]
    assert task.score(f"[{x1}, {y2 + 5}, {x2}, {y2 + 50}]", find) == 0.0  # below the text
    assert task.score(f"[{x1 - 9}, {y1 - 9}, {x2 + 9}, {y2 + 9}]", find) == 1.0  # IoU 0.63
    assert task.score(f"[{x1}, {y1}, {x2}]", find) == 0.0
    assert find.meta["box"] == generate("read-text", 1, "eval").regions[0].box  # the truth, in pixels
    assert task.score(find.answers[0], find) == 1.0
    reference = read.answers[0]
    assert "box" not in read.meta and task.score(reference, read) == 1.0
    assert 0.5 < task.score(reference[:-1], read) < 1.0  # ANLS: partial credit for a near miss
    assert task.score(find.answers[0], read) == 0.0
    scores = [1.0, 0.0, 0.5, 1.0]
    result = task.aggregate([""] * 4, items, scores)
    assert result == {
        "score": 62.5,
        "anls/read": 75.0,
        "accuracy/find": 50.0,
        "items/read": 2.0,
        "items/find": 2.0,
    }


def test_refer_task_keeps_the_referring_questions_and_scores_the_object_name() -> None:
    task = get_task("synth-refer")
    assert task.category == "refer-ground"
    items = task.items(task.resolve_options({"size": "12"}))
    for item in items:
        sample = generate("refer-ground", int(item.id.split("/")[-1]), "eval")
        assert sample.truth["qa"][0]["task"] in ("refer-box", "refer-point")
        assert item.question.startswith("<image>\nWhat")
    # Access out of order finds the same items as in order.
    fresh = task.items(task.resolve_options({"size": "12"}))
    assert [fresh[i].id for i in (7, 2, 11)] == [items[i].id for i in (7, 2, 11)]
    item = items[0]
    assert item.meta["objects"] == ["purple star"]
    assert task.score("A large purple star.", item) == 1.0
    assert task.score("It is a small purple square [1, 2, 3, 4].", item) == 0.0
    assert task.score("purple", item) == 0.0
    assert task.score("A purple starfish.", item) == 0.0  # whole words only


# --------------------------------------------------------------------------------------------------
# Real benchmark sources (annotation files from tests/fixtures/realdata)
# --------------------------------------------------------------------------------------------------


def test_pope_task_on_the_real_file_and_f1_aggregate() -> None:
    ((_, task, options),) = resolve_task_specs(f"pope:path={REAL / 'pope_coco' / 'coco_pope_random.json'}")
    items = task.items(options)
    assert len(items) == 300
    first = items[0]
    assert first.images[0].parent == REAL / "pope_coco"  # the images= default: the file's folder
    assert first.images[0].name.startswith("COCO_val2014_")
    assert task.render(first).startswith("<image>\nIs there a ")
    labels = [item.answers[0] for item in items]
    predictions = [label.capitalize() + "." for label in labels]
    scores = [task.score(task.parse(p, item), item) for p, item in zip(predictions, items, strict=True)]
    result = task.aggregate(predictions, items, scores)
    assert result["score"] == pytest.approx(100.0) and result["accuracy"] == pytest.approx(100.0)


def test_multiple_choice_prompt_lists_the_options(tmp_path: Path) -> None:
    path = tmp_path / "ai2d.json"
    path.write_text(
        json.dumps(
            [
                {"id": "q1", "question": "Which is a planet?", "options": ["Moon", "Mars"], "answer": 1},
                {
                    "id": "q2",
                    "question": "Pick one",
                    "options": ["a", "b", "c"],
                    "answer": 0,
                    "image": "x.png",
                },
            ]
        )
    )
    ((_, task, options),) = resolve_task_specs(f"ai2d:path={path}")
    text_only, with_image = task.items(options)
    assert task.render(text_only) == ("Which is a planet?\nA. Moon\nB. Mars\n" + registry.CHOICE_ANSWER)
    assert text_only.images == () and with_image.images == (tmp_path / "x.png",)
    assert task.render(with_image).startswith("<image>\nPick one\nA. a")
    assert task.score("B", text_only) == 1.0 and task.score("A", text_only) == 0.0


def _sqa(
    question: str, choices: list[str], split: str, hint: str = "", image: str | None = "image.png"
) -> dict:
    """One ScienceQA problems.json record (the answer is the first choice)."""
    return {
        "question": question,
        "choices": choices,
        "answer": 0,
        "hint": hint,
        "image": image,
        "split": split,
    }


SCIENCEQA = {
    "6": _sqa(
        "Which figure of speech is used in this text?",
        ["onomatopoeia", "hyperbole"],
        "test",
        hint="The last time Mr. Dudley tried to start the car, it went clunk, clunk, clunk.",
    ),
    "7": _sqa("Which is a solid?", ["ice", "water"], "test"),
    "8": _sqa("Which is a gas?", ["air", "rock"], "train"),
    "9": _sqa("Which is a liquid?", ["milk", "rock"], "test", image=None),
}


def test_scienceqa_prompt_gives_the_hint_as_context(tmp_path: Path) -> None:
    # lmms-eval's sqa_doc_to_text: "Context: {hint}\n" before the question when the hint is not empty.
    path = tmp_path / "problems.json"
    path.write_text(json.dumps(SCIENCEQA))
    ((_, task, options),) = resolve_task_specs(f"scienceqa:path={path},split=test")
    with_hint, without_hint = task.items(options)
    assert task.render(with_hint) == (
        "<image>\nContext: The last time Mr. Dudley tried to start the car, it went clunk, clunk, clunk.\n"
        "Which figure of speech is used in this text?\nA. onomatopoeia\nB. hyperbole\n"
        + registry.CHOICE_ANSWER
    )
    assert (
        task.render(without_hint) == "<image>\nWhich is a solid?\nA. ice\nB. water\n" + registry.CHOICE_ANSWER
    )
    assert task.version == "2"  # the prompt changed: answers cached under version 1 are not reused
    # The other multiple-choice tasks are prompted as before.
    ai2d = tmp_path / "ai2d.json"
    ai2d.write_text(json.dumps([{"question": "Which?", "options": ["a", "b"], "answer": 0, "hint": "h"}]))
    ((_, task, options),) = resolve_task_specs(f"ai2d:path={ai2d}")
    assert task.render(task.items(options)[0]) == "Which?\nA. a\nB. b\n" + registry.CHOICE_ANSWER


def test_refcoco_and_scienceqa_require_a_split(tmp_path: Path) -> None:
    # Their files hold every split, train included: without split= they would score training items.
    refs = REAL / "vqav2_refcocog_tiny" / "refcocog_refs_umd.json"
    instances = REAL / "vqav2_refcocog_tiny" / "refcocog_instances.json"
    listing = r"is required \(.*refcocog_refs_umd\.json holds the splits test, train, val\)"
    with pytest.raises(TaskError, match=r"task refcoco: option split=\.\.\. " + listing):
        resolve_task_specs(f"refcoco:path={refs},instances={instances}")
    task = get_task("refcoco")
    with pytest.raises(TaskError, match=r"split=\.\.\. is required"):  # a source called without resolving
        task.items({"path": refs, "instances": instances, "images": None, "split": None})
    path = tmp_path / "problems.json"
    path.write_text(json.dumps(SCIENCEQA))
    with pytest.raises(TaskError, match=r"task scienceqa: .*holds the splits test, train\)"):
        resolve_task_specs(f"scienceqa:path={path}")
    # A recipe checked away from its data still needs the split; the message says the file is unreadable.
    with pytest.raises(TaskError, match="could not be read to list its splits"):
        resolve_task_specs(f"scienceqa:path={tmp_path / 'elsewhere.json'}", check_files=False)

    ((_, task, options),) = resolve_task_specs(f"scienceqa:path={path},split=train")
    (item,) = task.items(options)
    assert item.meta["split"] == "train"
    # ScienceQA's images are stored per split: images/<split>/<pid>/image.png.
    assert item.images == (tmp_path / "train" / "8" / "image.png",)
    assert registry.skipped_counts(task.items(options)) == {"split": 3}
    ((_, task, options),) = resolve_task_specs(f"scienceqa:path={path},split=test,images={tmp_path}")
    items = task.items(options)
    assert [i.images[0] for i in items] == [tmp_path / "test" / k / "image.png" for k in ("6", "7")]
    assert registry.skipped_counts(items) == {"split": 1, "no_image": 1}
    ((_, task, options),) = resolve_task_specs(f"refcoco:path={refs},instances={instances},split=test")
    items = task.items(options)
    assert {i.meta["split"] for i in items} == {"test"} and registry.skipped_counts(items)["split"] > 0


def test_seedbench_task_reads_the_official_file(tmp_path: Path) -> None:
    question = {
        "answer": "A",
        "choice_a": "One",
        "choice_b": "Two",
        "choice_c": "Three",
        "choice_d": "Four",
        "data_id": "1454426_2591111986",
        "data_type": "image",
        "question": "How many towels are in the image?",
        "question_id": "101669",
        "question_type_id": 5,
    }
    video = {**question, "data_id": "94328.webm", "data_type": "video", "question_id": "v1738",
             "question_type_id": 10}  # fmt: skip
    path = tmp_path / "SEED-Bench.json"
    path.write_text(json.dumps({"question_type": {"Instances Counting": 5}, "questions": [question, video]}))
    images = tmp_path / "SEED-Bench-image"
    images.mkdir()
    ((_, task, options),) = resolve_task_specs(f"seedbench:path={path},images={images}")
    items = task.items(options)
    (item,) = items
    assert item.images == (images / "1454426_2591111986",)
    assert task.render(item) == (
        "<image>\nHow many towels are in the image?\nA. One\nB. Two\nC. Three\nD. Four\n"
        + registry.CHOICE_ANSWER
    )
    assert task.score("A", item) == 1.0 and task.score("B", item) == 0.0
    assert registry.skipped_counts(items) == {"video": 1}


def _screenspot(
    image: str, bbox: list[int], instruction: str, kind: str = "icon", source: str = "ios"
) -> dict:
    """One ScreenSpot record (its box is x, y, width, height in the image's pixels)."""
    return {
        "img_filename": image,
        "bbox": bbox,
        "instruction": instruction,
        "data_type": kind,
        "data_source": source,
    }


def test_screenspot_and_refcoco_items(tmp_path: Path) -> None:
    calendar = Path(__file__).parent / "fixtures" / "seeclick_calendar.png"
    path = tmp_path / "screenspot_mobile.json"
    path.write_text(json.dumps([_screenspot(calendar.name, [300, 50, 200, 100], "add an event")]))
    ((_, task, options),) = resolve_task_specs(f"screenspot:path={path},images={calendar.parent}")
    (item,) = task.items(options)
    assert (item.meta["width"], item.meta["height"]) == (2360, 1640)
    assert task.render(item) == '<image>\nWhere is "add an event"? Answer in [x1, y1, x2, y2] format.'
    assert task.score("[169, 60]", item) == 1.0 and task.score("[900, 900]", item) == 0.0

    # A screenshot stored sideways with an EXIF orientation: scored in the upright image the model sees.
    exif = Image.Exif()
    exif[0x0112] = 6
    Image.new("RGB", (100, 60), (9, 9, 9)).save(tmp_path / "rotated.jpg", exif=exif)
    path.write_text(json.dumps([_screenspot("rotated.jpg", [10, 70, 20, 20], "tap")]))
    ((_, task, options),) = resolve_task_specs(f"screenspot:path={path},images={tmp_path}")
    (item,) = task.items(options)
    assert (item.meta["width"], item.meta["height"]) == (60, 100)
    assert task.score("[166, 700, 500, 900]", item) == 1.0
    # A box past the screenshot's edge (here in the stored sideways frame) could never be clicked.
    path.write_text(json.dumps([_screenspot("rotated.jpg", [70, 10, 20, 20], "tap")]))
    ((_, task, options),) = resolve_task_specs(f"screenspot:path={path},images={tmp_path}")
    with pytest.raises(
        TaskError,
        match=r"record screenspot_mobile:0: box \[70\.0, 10\.0, 90\.0, 30\.0\] .* outside the 60x100 image",
    ):
        task.items(options)[0]

    refs = REAL / "vqav2_refcocog_tiny" / "refcocog_refs_umd.json"
    instances = REAL / "vqav2_refcocog_tiny" / "refcocog_instances.json"
    ((_, task, options),) = resolve_task_specs(f"refcoco:path={refs},instances={instances},split=val")
    items = task.items(options)
    assert items and all(item.meta["split"] == "val" for item in items)
    assert task.render(items[0]).startswith("<image>\nGive the bounding box of ")
    from mm15.boxes import format_box

    meta = items[0].meta
    truth = format_box(meta["box"], meta["height"], meta["width"])
    assert task.score(truth, items[0]) == 1.0
    with pytest.raises(TaskError, match=r"refcoco: option instances=\.\.\. is required"):
        resolve_task_specs(f"refcoco:path={refs}")


def test_screenspot_reports_accuracy_per_platform_and_target_type(tmp_path: Path) -> None:
    calendar = Path(__file__).parent / "fixtures" / "seeclick_calendar.png"
    records = [
        _screenspot(calendar.name, [300, 50, 200, 100], "add an event", "text"),
        _screenspot(calendar.name, [300, 50, 200, 100], "add an event icon", "icon"),
        _screenspot(calendar.name, [300, 50, 200, 100], "the plus", "icon"),
    ]
    path = tmp_path / "screenspot_desktop.json"
    path.write_text(json.dumps(records))
    ((_, task, options),) = resolve_task_specs(f"screenspot:path={path},images={calendar.parent}")
    items = list(task.items(options))
    predictions = ["[169, 60]", "[169, 60]", "[900, 900]"]
    scores = [task.score(p, item) for p, item in zip(predictions, items, strict=True)]
    result = task.aggregate(predictions, items, scores)
    assert result == {
        "score": pytest.approx(200 / 3),  # the headline: every item alike
        "accuracy/desktop/icon": 50.0,
        "items/desktop/icon": 2.0,
        "accuracy/desktop/text": 100.0,
        "items/desktop/text": 1.0,
    }


def test_benchmarks_and_how_their_splits_combine() -> None:
    """Category scores average benchmarks: each task names the benchmark its results are splits of."""
    assert (get_task("pope").benchmark, get_task("pope").split_mean) == ("pope", "splits")
    assert (get_task("refcoco").benchmark, get_task("refcoco").split_mean) == ("refcoco", "splits")
    assert (get_task("chartqa").benchmark, get_task("chartqa").split_mean) == ("chartqa", "items")
    for name in SYNTH_TASKS:
        assert get_task(name).benchmark == name
    # Generic formats whose files may be different benchmarks: each result counts alone by default.
    assert get_task("video-mc").benchmark is None and get_task("ui-click").benchmark is None
    assert get_task("video-mc").split_mean == "splits"  # MVBench: the mean of its tasks' accuracies
    with pytest.raises(TaskError, match="split_mean must be one of"):
        Task(**{**_task("x").__dict__, "split_mean": "tokens"})
    # benchmark= is an option of every task.
    ((_, _, options),) = resolve_task_specs("synth-icl:benchmark=icl-all")
    assert options["benchmark"] == "icl-all"


def test_missing_image_folder_is_reported_when_read(tmp_path: Path) -> None:
    path = tmp_path / "screenspot_web.json"
    path.write_text(json.dumps([_screenspot("missing.png", [1, 1, 2, 2], "x", "text", "web")]))
    ((_, task, options),) = resolve_task_specs(f"screenspot:path={path}")
    with pytest.raises(TaskError, match="cannot read the image"):
        task.items(options)[0]
    Image.new("RGB", (10, 10)).save(tmp_path / "missing.png")
    assert task.items(options)[0].meta["width"] == 10


def test_sample_to_item_keeps_the_first_question_and_its_images() -> None:
    from mm15.data.sample import Region, Sample, Turn

    red, blue = Image.new("RGB", (40, 20), "red"), Image.new("RGB", (20, 40), "blue")
    sample = Sample(
        id="s",
        turns=[
            Turn("user", "<image>\nWhat is at <region0>?"),
            Turn("assistant", "A square <region0>."),
            Turn("user", "And here? <image>"),
            Turn("assistant", "Blue."),
        ],
        category="general",
        source="test",
        images=[red, blue],
        regions=[Region(0, box=(0.0, 0.0, 20.0, 10.0))],
    )
    item = registry.sample_to_item(sample)
    assert item.question == "<image>\nWhat is at [0, 0, 500, 500]?"
    assert item.answers == ("A square [0, 0, 500, 500].",)
    assert len(item.images) == 1 and item.images[0].size == (40, 20)
