"""MM1.5-UI: screens of any aspect ratio through the image plan, and the Ferret-UI elementary tasks.

The tasks are scored with constructed predictions (the reference answer -> 100, a wrong one -> 0) on
held-out synthetic screens and on the real SeeClick iPadOS screenshot with hand-drawn target boxes
(``tests/fixtures/seeclick_calendar_boxes.json``).
"""

from __future__ import annotations

import json
import re
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from mm15.chat import ChatEncoder
from mm15.data.synth import generate
from mm15.eval.tasks import TaskError, TaskItem, get_task, resolve_task_specs, skipped_counts
from mm15.eval.variant_tasks import UI_CLASSES, line_class, load_ui_elements, ui_list_f1
from mm15.geometry import ImagePlanConfig, plan_image
from mm15.model.presets import preset

FIXTURES = Path(__file__).parent / "fixtures"
SEECLICK_BOXES = FIXTURES / "seeclick_calendar_boxes.json"
MM15 = ImagePlanConfig()  # 672-px tiles, (4, 9) grids, 144 tokens per tile


# ------------------------------------------------------------------------------ screens -> plans


def test_tall_phone_screenshot_gets_a_tall_grid() -> None:
    # An iPhone screenshot, 1170 x 2532 (w x h): 4 x 2 tiles of 672 hold it without downscaling
    # (2688 x 1344 >= 2532 x 1170), and no other grid of 4-9 tiles does.
    plan = plan_image(2532, 1170, MM15)
    assert plan.grid == (4, 2) and plan.split
    assert plan.resized == (2688, 1242)  # the height binds; aspect kept to a pixel
    assert plan.num_tiles == 9 and plan.num_image_tokens == 9 * 144 == 1296
    assert plan.tiles[-1].is_overview  # overview after the tiles
    assert plan.overview_resized == (672, 311)


def test_wide_tablet_screenshot_gets_the_largest_grid() -> None:
    # The SeeClick iPad screenshot, 2360 x 1640: no grid of <= 9 tiles covers it (3 x 4 would), so the
    # grid keeping the most pixels wins: 3 x 3 (1401 x 2016) over 2 x 4 (1344 x 1934).
    with Image.open(FIXTURES / "seeclick_calendar.png") as image:
        width, height = image.size
    plan = plan_image(height, width, MM15)
    assert plan.grid == (3, 3)
    assert plan.resized == (1401, 2016)
    assert plan.num_image_tokens == 10 * 144 == 1440  # MM1.5's per-image maximum


@pytest.mark.parametrize(
    ("size", "grid", "tokens"),
    [
        # Synthetic phones (844 x 390 at scale 1, x1.5): 4 x 2 pads 102 px of width, 3 x 2 would pad 412.
        ((844, 390), (4, 2), 9 * 144),
        ((1266, 585), (4, 2), 9 * 144),
        # Synthetic landscape tablets (820 x 1180, x0.75): 2 x 3 pads 82 px, 2 x 2 would pad 410.
        ((820, 1180), (2, 3), 7 * 144),
        ((615, 885), (2, 3), 7 * 144),
    ],
)
def test_synthetic_screen_sizes_plan_to_their_orientation(
    size: tuple[int, int], grid: tuple[int, int], tokens: int
) -> None:
    plan = plan_image(*size, MM15)
    assert plan.grid == grid and plan.num_image_tokens == tokens
    # Tall screens get more rows than columns, wide screens more columns than rows.
    assert (plan.grid[0] > plan.grid[1]) == (size[0] > size[1])


def test_generated_screens_encode_with_their_plans() -> None:
    from mm15.model.llm import build_tiny_tokenizer
    from mm15.model.mm15 import IMAGE_TOKEN

    tokenizer = build_tiny_tokenizer()
    tokenizer.add_special_tokens({"additional_special_tokens": [IMAGE_TOKEN]})
    cfg = preset("tiny").image  # what the UI recipe trains with: 64-px tiles, 16 tokens
    encoder = ChatEncoder(tokenizer, cfg, max_length=4096)
    for index in (0, 2):  # index 0 is a phone, index 2 a tablet (ui generators: index % 3 == 2)
        sample = generate("ui-find-widget", index, split="eval")
        width, height = sample.images[0].size
        encoded = encoder.encode(sample, [(height, width)])
        (plan,) = encoded.plans
        assert plan.split and (plan.grid[0] > plan.grid[1]) == (height > width)
        assert encoded.num_image_tokens == (plan.grid[0] * plan.grid[1] + 1) * 16
        assert sample.truth["device"] == ("tablet" if index == 2 else "phone")


# --------------------------------------------------------------------------------- SeeClick fixture


def test_fixture_boxes_lie_on_the_drawn_elements() -> None:
    data = load_ui_elements(SEECLICK_BOXES)
    pixels = np.asarray(Image.open(FIXTURES / data["image"]).convert("RGB")).astype(int)
    assert pixels.shape[:2] == (data["height"], data["width"])
    for element in data["elements"]:
        x1, y1, x2, y2 = (int(v) for v in element.get("text_box", element["box"]))
        ink = pixels[y1:y2, x1:x2]
        # Each box holds its element: not flat background, and ink touches every side of a tight box.
        assert ink.std() > 10, element
        if element["class"] == "icon":  # the toolbar icons are Calendar red
            red = (ink[..., 0] > 200) & (ink[..., 1] < 120)
            assert red.mean() > 0.05 or element["name"] == "search", element


def run_task(name: str, predict, **options) -> tuple[float, list[TaskItem]]:
    """The task's headline score for predictions made by ``predict(item)``."""
    ((_, task, resolved),) = resolve_task_specs(
        [f"{name}:" + ",".join(f"{k}={v}" for k, v in options.items())]
    )
    items = list(task.items(resolved))
    predictions = [task.parse(predict(item), item) for item in items]
    scores = [task.score(p, item) for p, item in zip(predictions, items, strict=True)]
    return task.aggregate(predictions, items, scores)["score"], items


def far_box(item: TaskItem) -> str:
    """A box in the image corner diagonally opposite the target's centre: never the target."""
    x1, y1, x2, y2 = item.meta["box"]
    cx = (x1 + x2) / 2 / item.meta["width"]
    cy = (y1 + y2) / 2 / item.meta["height"]
    left, top = (900 if cx < 0.5 else 0), (900 if cy < 0.5 else 0)
    return f"[{left}, {top}, {left + 99}, {top + 99}]"


@pytest.mark.parametrize(
    ("task", "count", "wrong"),
    [
        ("ui-ocr", 12, lambda item: "zzz"),
        ("ui-icon", 5, lambda item: "zzz"),
        ("ui-widget", 17, lambda item: "toggle"),  # no toggle on the screen
        ("ui-ground", 29, far_box),  # 12 texts, 5 icons, 12 other widgets
        ("ui-click", 29, far_box),
    ],
)
def test_seeclick_tasks_score_perfect_100_and_wrong_0(task: str, count: int, wrong) -> None:
    perfect, items = run_task(task, lambda item: item.answers[0], path=SEECLICK_BOXES)
    assert len(items) == count
    assert perfect == 100.0
    assert run_task(task, wrong, path=SEECLICK_BOXES)[0] == 0.0
    assert all(item.images[0] == FIXTURES / "seeclick_calendar.png" for item in items)
    assert all(item.meta["width"] == 2360 and item.meta["height"] == 1640 for item in items)


def test_seeclick_ground_questions_and_answers() -> None:
    _, items = run_task("ui-ground", lambda item: item.answers[0], path=SEECLICK_BOXES)
    by_question = {item.question: item for item in items}
    today = by_question['Where is the text "Today"? Answer in [x1, y1, x2, y2] format.']
    # (2246, 209, 2325, 236) of 2360 x 1640 in text units [0, 1000), as mm15.boxes writes them.
    assert today.answers == ("[951, 127, 985, 143]",)
    plus = by_question["Where is the plus icon? Answer in [x1, y1, x2, y2] format."]
    assert plus.meta["box"] == (362.0, 85.0, 397.0, 120.0)
    task = get_task("ui-click")
    # A click at the centre of the Month segment, as a point, hits; the Week segment's centre misses.
    month = next(i for i in run_task("ui-click", str, path=SEECLICK_BOXES)[1] if '"Month"' in i.question)
    assert task.score("[532, 62]", month) == 1.0
    assert task.score("[469, 62]", month) == 0.0


def test_bad_ui_elements_files_are_task_errors(tmp_path: Path) -> None:
    data = json.loads(SEECLICK_BOXES.read_text())
    data["elements"][0]["box"] = [10, 10, 5000, 20]  # outside the image
    bad = tmp_path / "bad.json"
    bad.write_text(json.dumps(data))
    with pytest.raises(TaskError, match="inside the 2360x1640 image"):
        load_ui_elements(bad)
    data = json.loads(SEECLICK_BOXES.read_text())
    (tmp_path / "ok.json").write_text(json.dumps(data))  # the screenshot is not next to this copy
    with pytest.raises(TaskError, match="does not exist"):
        run_task("ui-ocr", str, path=tmp_path / "ok.json")
    assert (
        run_task("ui-ocr", lambda item: item.answers[0], path=tmp_path / "ok.json", images=FIXTURES)[0] == 100
    )


@pytest.mark.parametrize(
    ("task", "element", "message"),
    [
        # A button without text: a bare KeyError when the questions were built.
        (
            "ui-ground",
            {"class": "button", "box": [10, 300, 100, 350]},
            r"\(button\): a button needs a 'text'",
        ),
        # A null text: asked, generated, then scoring crashed on None.
        (
            "ui-ocr",
            {"class": "label", "text": None, "box": [10, 300, 100, 350]},
            r"\(label\): 'text' must be a non-empty string, got None",
        ),
        (
            "ui-ocr",
            {"class": "label", "text": 2023, "box": [10, 300, 100, 350]},
            r"\(label\): 'text' must be .*got 2023",
        ),
        # A toggle without a label: asked 'Where is the toggle for "None"?'.
        (
            "ui-ground",
            {"class": "toggle", "box": [10, 300, 100, 350]},
            r"\(toggle\): a toggle needs a 'label' or 'text'",
        ),
        (
            "ui-icon",
            {"class": "icon", "name": "", "box": [10, 300, 100, 350]},
            r"\(icon\): 'name' must be a non-empty",
        ),
    ],
)
def test_ui_elements_without_their_names_are_task_errors_at_load(
    tmp_path: Path, task: str, element: dict, message: str
) -> None:
    data = json.loads(SEECLICK_BOXES.read_text())
    data["elements"].append(element)
    path = tmp_path / "boxes.json"
    path.write_text(json.dumps(data))
    with pytest.raises(TaskError, match=rf"{re.escape(str(path))}: element 17 {message}"):
        run_task(task, lambda item: item.answers[0], path=path, images=FIXTURES)
    # A toggle named by its label is asked about by it.
    data["elements"][-1] = {"class": "toggle", "label": "Wi-Fi", "box": [10, 300, 100, 350]}
    path.write_text(json.dumps(data))
    _, items = run_task("ui-ground", lambda item: item.answers[0], path=path, images=FIXTURES)
    assert 'Where is the toggle for "Wi-Fi"? Answer in [x1, y1, x2, y2] format.' in {
        i.question for i in items
    }


def test_ui_elements_size_must_be_the_screenshots(tmp_path: Path) -> None:
    # The boxes are pixels of a width x height image: a wrong height (here the width typed twice)
    # would move every reference box, so it stops the task instead.
    data = json.loads(SEECLICK_BOXES.read_text())
    data["height"] = 2360
    path = tmp_path / "boxes.json"
    path.write_text(json.dumps(data))
    with pytest.raises(
        TaskError, match=r"'width' x 'height' is 2360x2360 but the screenshot .* is 2360x1640"
    ):
        run_task("ui-ground", lambda item: item.answers[0], path=path, images=FIXTURES)
    # A screenshot stored sideways with an EXIF orientation is compared as the model sees it, upright.
    exif = Image.Exif()
    exif[0x0112] = 6  # rotate 90 degrees: the stored 100 x 60 pixels show as 60 x 100
    Image.new("RGB", (100, 60), (240, 240, 240)).save(tmp_path / "sideways.jpg", exif=exif)
    screen = {"image": "sideways.jpg", "width": 60, "height": 100,
              "elements": [{"class": "button", "text": "OK", "box": [10, 70, 50, 90]}]}  # fmt: skip
    path.write_text(json.dumps(screen))
    assert run_task("ui-ocr", lambda item: item.answers[0], path=path)[0] == 100.0
    path.write_text(json.dumps({**screen, "width": 100, "height": 60}))
    with pytest.raises(TaskError, match=r"is 100x60 but the screenshot .* is 60x100"):
        run_task("ui-ocr", lambda item: item.answers[0], path=path)


# ------------------------------------------------------------------------ held-out synthetic screens


def wrong_answer(item: TaskItem) -> str:
    if "box" in item.meta:
        return far_box(item)
    return "zzz"


@pytest.mark.parametrize(
    "task",
    [
        "synth-ui-ocr",
        "synth-ui-icon",
        "synth-ui-widget",
        "synth-ui-find-text",
        "synth-ui-find-icon",
        "synth-ui-find-widget",
        "synth-ui-list",
        "synth-ui-click",
    ],
)
def test_synthetic_ui_tasks_score_perfect_100_and_wrong_0(task: str) -> None:
    perfect, items = run_task(task, lambda item: item.answers[0], size=3)
    assert len(items) == 3 and perfect == 100.0
    assert run_task(task, wrong_answer, size=3)[0] == 0.0
    assert {get_task(task).category} == {"ui"}
    # Held out: the items are the eval split's samples.
    assert all("/eval/" in item.id for item in items)


def test_ui_category_runs_without_files() -> None:
    names = [name for name, _, _ in resolve_task_specs("ui")]
    assert "synth-ui-find-widget" in names and "ui-ground" not in names  # ui-ground needs path=


# ------------------------------------------------------------------------------ widget listing F1


def test_listing_f1_counts_class_and_iou() -> None:
    truth = [("button", (0, 0, 100, 50)), ("icon", (200, 200, 250, 250)), ("label", (0, 300, 400, 340))]
    width = height = 1000  # text units equal pixels here, up to the half-unit bin centre
    exact = 'button "OK" [0, 0, 100, 50]\nsearch icon [200, 200, 250, 250]\nlabel "Hi" [0, 300, 400, 340]'
    assert ui_list_f1(exact, truth, width, height) == 1.0
    # Two of three right, one wrong class, one extra line: 2 matched, 4 predicted, 3 true.
    partial = (
        'button "OK" [0, 0, 100, 50]\ntoggle for "x" [200, 200, 250, 250]\n'
        'label "Hi" [0, 300, 400, 340]\nlabel "extra" [600, 600, 700, 700]'
    )
    assert ui_list_f1(partial, truth, width, height) == pytest.approx(2 * 2 / 7)
    assert ui_list_f1("no boxes at all", truth, width, height) == 0.0
    assert ui_list_f1('button "OK" [500, 500, 600, 550]', truth, width, height) == 0.0  # IoU 0


def test_line_class_reads_the_first_class_named() -> None:
    assert line_class('text field "Email" [1, 2, 3, 4]') == "text field"
    assert line_class("search icon [1, 2, 3, 4]") == "icon"
    assert line_class('toggle for "Wi-Fi" (on) [1, 2, 3, 4]') == "toggle"
    assert line_class("[1, 2, 3, 4]") is None
    # Ranked where the class is a whole word: "button" inside "Buttons:" comes first but is no mention.
    assert line_class("Buttons: icon button [10, 10, 50, 50]") == "icon"


@pytest.mark.parametrize("task", ["ui-ground", "ui-click"])
def test_targets_named_twice_on_a_screen_are_counted_as_skipped(task: str, tmp_path: Path) -> None:
    # Two "Save" buttons and two "bell" icons: no question about them has one right answer.
    data = json.loads(SEECLICK_BOXES.read_text())
    data["elements"] += [
        {"class": "button", "text": "Save", "box": [100, 300, 200, 340]},
        {"class": "button", "text": "Save", "box": [300, 300, 400, 340]},
        {"class": "icon", "name": "bell", "box": [500, 85, 540, 120]},
        {"class": "icon", "name": "bell", "box": [600, 85, 640, 120]},
    ]
    path = tmp_path / "boxes.json"
    path.write_text(json.dumps(data))
    spec = get_task(task)
    items = spec.items(spec.resolve_options({"path": str(path), "images": str(FIXTURES)}))
    assert len(items) == 29  # the fixture's own targets, as without the duplicates
    # Each button twice as text and twice as a widget, each icon twice by name.
    assert skipped_counts(items) == {"not_unique": 6}
    assert skipped_counts(spec.items(spec.resolve_options({"path": str(SEECLICK_BOXES)}))) == {}
    assert set(UI_CLASSES) == {"button", "text field", "toggle", "checkbox", "icon", "label"}


# ------------------------------------------------------------------------------------------ recipe

ROOT = Path(__file__).resolve().parent.parent


def test_ui_recipe_loads_and_fine_tunes_the_tiny_sft_model() -> None:
    import yaml

    from mm15.train.config import RecipeConfig, load_recipe

    recipe = load_recipe(ROOT / "recipes" / "ui.yaml")
    tiny = load_recipe(ROOT / "recipes" / "tiny.yaml")
    assert RecipeConfig.from_dict(yaml.safe_load(yaml.safe_dump(recipe.to_dict()))) == recipe
    (stage,) = recipe.stages
    assert Path(stage.parent) == tiny.run_dir / tiny.stages[-1].name / "final"
    assert recipe.model == tiny.model
    assert stage.data.resolve_sources() == {"ui": "synth:ui"}
    plan = recipe.image_plan("sft")
    assert plan.split and (plan.n_min, plan.n_max) == (4, 9)
    # The optimizer settings are the tiny recipe's SFT ones (MM1.5-UI reuses its SFT hyperparameters).
    assert stage.optimizer == tiny.stages[-1].optimizer


def test_ui_recipe_comment_names_the_grids_its_plan_gives() -> None:
    # The header comment says which grids phones and landscape tablets get; at this recipe's 64-px
    # tiles a tablet gets 3 x 3 (2 x 3 is MM1.5's 672-px tiling, test above).
    from mm15.train.config import load_recipe

    text = (ROOT / "recipes" / "ui.yaml").read_text()
    comment = " ".join(line.lstrip("# ").strip() for line in text.splitlines() if line.startswith("#"))
    said = re.search(r"phones get (\d) x (\d) grids.*?landscape tablets (\d) x (\d)", comment)
    assert said, comment
    plan = load_recipe(ROOT / "recipes" / "ui.yaml").image_plan("sft")
    phone, tablet = plan_image(844, 390, plan), plan_image(820, 1180, plan)
    assert tuple(map(int, said.groups())) == (*phone.grid, *tablet.grid) == (4, 2, 3, 3)
    assert plan_image(820, 1180, MM15).grid == (2, 3)


def test_ui_recipe_trains_two_steps(tmp_path: Path) -> None:
    import subprocess
    import sys

    import torch

    from mm15.model.mm15 import MM15Model

    torch.manual_seed(0)
    MM15Model.build(preset("tiny")).save_pretrained(tmp_path / "parent")
    out = tmp_path / "run"
    args = ["train", "recipes/ui.yaml", "--parent", str(tmp_path / "parent"), "--max-steps", "2"]
    subprocess.run([sys.executable, "-m", "mm15.cli", *args, "--out", str(out)], cwd=ROOT, check=True)
    rows = [json.loads(line) for line in (out / "sft" / "metrics.jsonl").read_text().splitlines()]
    assert len(rows) == 2 and (out / "sft" / "final").is_dir()
