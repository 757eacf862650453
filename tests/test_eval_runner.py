"""``evaluate`` and ``mm15 eval`` on a tiny random model: every MM1.5 category, files, reproducibility,
resume from the cache, real-benchmark files, and bad input."""

from __future__ import annotations

import json
import re
from pathlib import Path

import pytest
import torch
from PIL import Image
from typer.testing import CliRunner

from mm15.cli import app
from mm15.eval import runner as runner_module
from mm15.eval import tasks as registry
from mm15.eval.report import EvalReport, TaskResult
from mm15.eval.runner import ItemCache, evaluate
from mm15.eval.tasks import MMBASE_CATEGORIES, TaskError
from mm15.model.mm15 import MM15Model
from mm15.model.presets import preset

# One spec per MM1.5 category's held-out tasks, with a small budget so the whole file stays fast.
SYNTH = [registry.SYNTH_PREFIX + generator for generator, *_ in registry._SYNTHETIC]
ALL_SYNTH_SPEC = [f"{name}:max_new_tokens=3" for name in SYNTH]
# A quicker mix for the repeated runs: one image, several images, and a box.
FEW = [
    "synth-general-count:max_new_tokens=3",
    "synth-refer-ground:max_new_tokens=3",
    "synth-icl:max_new_tokens=3",
]
REAL = Path(__file__).parent / "fixtures" / "realdata"


pytestmark = pytest.mark.usefixtures("one_thread")  # tests/conftest.py


@pytest.fixture(scope="module")
def model() -> MM15Model:
    torch.manual_seed(0)
    return MM15Model.build(preset("tiny"))


@pytest.fixture(scope="module")
def full_run(model: MM15Model, tmp_path_factory: pytest.TempPathFactory) -> tuple[EvalReport, Path, dict]:
    """Every held-out task, 2 items each; the results JSON (without "run") as first written."""
    out = tmp_path_factory.mktemp("full")
    report = evaluate(model, ALL_SYNTH_SPEC, limit=2, batch_size=4, out_dir=out, progress=False)
    return report, out, _without_run(out / "results.json")


class CountingGenerate:
    """Wraps ``generate`` in the runner to count the prompts sent to the model."""

    def __init__(self, monkeypatch: pytest.MonkeyPatch) -> None:
        self.prompts = 0
        self._real = runner_module.generate
        monkeypatch.setattr(runner_module, "generate", self)

    def __call__(self, model: MM15Model, batch: dict, cfg: object) -> list[str]:
        self.prompts += batch["input_ids"].shape[0]
        return self._real(model, batch, cfg)


def _without_run(path: Path) -> dict:
    data = json.loads(path.read_text())
    data.pop("run")
    return data


def test_every_category_is_scored_and_written(full_run: tuple[EvalReport, Path, dict]) -> None:
    report, out, _ = full_run
    assert set(report.category_scores) == {
        "general",
        "text-rich",
        "knowledge",
        "refer-ground",
        "multi-image",
        "in-context",
    }
    assert report.mmbase == pytest.approx(
        sum(report.category_scores[c] for c in MMBASE_CATEGORIES) / len(MMBASE_CATEGORIES)
    )
    data = json.loads((out / "results.json").read_text())
    assert data["model"]["name"] == "tiny" and len(data["model"]["weights_sha256"]) == 64
    assert list(data["tasks"]) == SYNTH
    for name, result in data["tasks"].items():
        assert result["version"] == registry.get_task(name).version
        assert result["generation"]["max_new_tokens"] == 3 and result["generation"]["temperature"] == 0
        assert result["num_items"] == 2 and 0 <= result["score"] <= 100
        for item in result["items"]:
            assert set(item) == {"id", "prompt", "answers", "output", "prediction", "score"}
            assert item["prompt"].count("<image>") >= 1
    assert data["categories"] == report.category_scores and data["mmbase"] == report.mmbase
    assert data["run"]["generated_items"] == 2 * len(SYNTH) and data["run"]["cached_items"] == 0
    markdown = (out / "results.md").read_text()
    assert "| **knowledge** | | **average** (3 benchmarks) |" in markdown and "MMBase" in markdown
    assert (out / "scores.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    flat = report.scores()
    assert (
        flat["task/synth-icl"] == report.tasks[-1].score and "category/general" in flat and "mmbase" in flat
    )


def test_rerun_reads_the_cache_and_changed_settings_do_not(
    model: MM15Model, full_run: tuple[EvalReport, Path, dict], monkeypatch: pytest.MonkeyPatch
) -> None:
    _, out, before = full_run
    counter = CountingGenerate(monkeypatch)
    again = evaluate(model, ALL_SYNTH_SPEC, limit=2, batch_size=4, out_dir=out, progress=False)
    assert counter.prompts == 0 and again.run["cached_items"] == 2 * len(SYNTH)
    assert _without_run(out / "results.json") == before

    # A bigger budget changes the key: those items are generated again.
    evaluate(model, ["synth-icl:max_new_tokens=4"], limit=2, out_dir=out, progress=False)
    assert counter.prompts == 2


def test_interrupted_run_resumes_and_matches(
    model: MM15Model, full_run: tuple[EvalReport, Path, dict], tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    _, full_out, full = full_run
    # Keep the cache of the first task only, with a damaged half-written line at its end (a kill).
    (tmp_path / "cache").mkdir()
    first = "synth-general-count.jsonl"
    lines = (full_out / "cache" / first).read_text()
    (tmp_path / "cache" / first).write_text(lines + '{"key": "abc", "id": "x", "outp')
    counter = CountingGenerate(monkeypatch)
    report = evaluate(model, FEW, limit=2, batch_size=4, out_dir=tmp_path, progress=False)
    assert counter.prompts == 2 * (len(FEW) - 1)
    assert report.run["cached_items"] == 2
    resumed = _without_run(tmp_path / "results.json")["tasks"]
    assert resumed == {name: full["tasks"][name] for name in resumed}


def test_identical_settings_give_identical_files(
    model: MM15Model, tmp_path: Path, full_run: tuple[EvalReport, Path, dict]
) -> None:
    a, b = tmp_path / "a", tmp_path / "b"
    for out in (a, b):
        evaluate(model, FEW, limit=2, batch_size=3, out_dir=out, progress=False)
    assert _without_run(a / "results.json") == _without_run(b / "results.json")
    assert (a / "results.md").read_text() == (b / "results.md").read_text()
    assert (a / "scores.png").read_bytes() == (b / "scores.png").read_bytes()
    # Batch size 3 and 4 (the full run) give the same outputs: left padding changes nothing.
    full = full_run[2]["tasks"]
    for name, result in json.loads((a / "results.json").read_text())["tasks"].items():
        assert result["items"] == full[name]["items"]


def test_in_memory_evaluation_for_training(model: MM15Model, monkeypatch: pytest.MonkeyPatch) -> None:
    model.train()
    counter = CountingGenerate(monkeypatch)
    report = evaluate(
        model, "synth-general-count:max_new_tokens=2", limit=1, progress=False, model_id="step-7"
    )
    assert model.training  # restored
    assert counter.prompts == 1 and report.model["id"] == "step-7" and "weights_sha256" not in report.model
    assert set(report.category_scores) == {"general"} and report.mmbase is None


def test_bad_arguments_fail_before_generating(
    model: MM15Model, monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    counter = CountingGenerate(monkeypatch)
    with pytest.raises(TaskError, match="unknown task 'nope'"):
        evaluate(model, "synth-icl,nope", progress=False)
    with pytest.raises(TaskError, match="unknown option"):
        evaluate(model, "synth-icl:bogus=1", progress=False)
    with pytest.raises(ValueError, match="batch_size must be >= 1"):
        evaluate(model, "synth-icl", batch_size=0, progress=False)
    # Nothing to score is refused, never reported as 0.00.
    with pytest.raises(ValueError, match="limit must be >= 1, got 0"):
        evaluate(model, "synth-icl", limit=0, progress=False)
    with pytest.raises(TaskError, match="synth-icl: limit must be >= 1, got 0"):
        evaluate(model, "synth-icl:limit=0", progress=False)
    taken = tmp_path / "taken"
    taken.write_text("notes")
    with pytest.raises(ValueError, match="exists and is not a directory"):
        evaluate(model, "synth-icl", out_dir=taken, progress=False)
    assert counter.prompts == 0


def test_real_benchmark_files(model: MM15Model, tmp_path: Path) -> None:
    """POPE from the real annotation file (placeholder images) and a TextVQA file, end to end."""
    pope = REAL / "pope_coco" / "coco_pope_random.json"
    images = tmp_path / "val2014"
    images.mkdir()
    for line in pope.read_text().splitlines()[:2]:
        Image.new("RGB", (80, 60), (120, 30, 30)).save(images / json.loads(line)["image"])
    textvqa = tmp_path / "TextVQA_0.5.1_val.json"
    textvqa.write_text(
        json.dumps(
            {
                "data": [
                    {"question_id": 7, "question": "what brand?", "image_id": "abc", "answers": ["acme"] * 10}
                ]
            }
        )
    )
    Image.new("RGB", (64, 48), "white").save(tmp_path / "abc.jpg")
    specs = [
        f"pope:path={pope},images={images},limit=2,max_new_tokens=2",
        f"textvqa:path={textvqa},max_new_tokens=2",
    ]
    report = evaluate(model, specs, out_dir=tmp_path / "out", progress=False)
    pope_result, textvqa_result = report.tasks
    assert len(pope_result.items) == 2 and set(pope_result.metrics) >= {"accuracy", "precision", "recall"}
    assert pope_result.options["path"] == str(pope)
    assert textvqa_result.items[0]["prompt"] == "<image>\nwhat brand?\n" + registry.SHORT_ANSWER
    assert textvqa_result.category == "text-rich"
    # An empty annotation file stops the run naming the task and file; the tasks before it stay cached.
    empty = tmp_path / "empty_val.json"
    empty.write_text(json.dumps({"data": []}))
    with pytest.raises(TaskError, match=re.escape(f"task textvqa: no items to evaluate in {empty}")):
        evaluate(model, [specs[0], f"textvqa:path={empty}"], out_dir=tmp_path / "out", progress=False)
    # An item whose image is missing stops the task naming the item: it cannot be scored.
    (tmp_path / "abc.jpg").unlink()
    with pytest.raises(TaskError, match=re.escape("task textvqa: item 7: ") + ".*abc.jpg: no such file"):
        evaluate(model, f"textvqa:path={textvqa},max_new_tokens=3", progress=False)


def test_skipped_records_are_reported_with_the_score(model: MM15Model, tmp_path: Path) -> None:
    """What the loader left out (other splits, questions without an image) reaches results.json."""
    problems = {
        "1": {"question": "Which is a mammal?", "choices": ["cat", "frog"], "answer": 0, "hint": "",
              "image": "image.png", "split": "test"},
        "2": {"question": "Which is a solid?", "choices": ["ice", "water"], "answer": 0, "hint": "",
              "image": "image.png", "split": "train"},
        "3": {"question": "Which is a gas?", "choices": ["air", "rock"], "answer": 0, "hint": "",
              "image": None, "split": "test"},
    }  # fmt: skip
    path = tmp_path / "problems.json"
    path.write_text(json.dumps(problems))
    (tmp_path / "images" / "test" / "1").mkdir(parents=True)
    Image.new("RGB", (64, 48), "white").save(tmp_path / "images" / "test" / "1" / "image.png")
    spec = f"scienceqa:path={path},images={tmp_path / 'images'},split=test,max_new_tokens=2"
    report = evaluate(model, spec, out_dir=tmp_path / "out", progress=False)
    (result,) = report.tasks
    assert len(result.items) == 1 and result.skipped == {"split": 1, "no_image": 1}
    saved = json.loads((tmp_path / "out" / "results.json").read_text())["tasks"]["scienceqa"]
    assert saved["skipped"] == {"split": 1, "no_image": 1} and saved["num_items"] == 1
    # A task that skips nothing says so.
    assert evaluate(model, "synth-icl:max_new_tokens=2", limit=1, progress=False).tasks[0].skipped == {}


def _result(name: str, task: str, category: str, score: float, items: int = 10, **kw: str) -> TaskResult:
    return TaskResult(
        name=name,
        task=task,
        category=category,
        version="1",
        metric="m",
        options={},
        prompt_template="",
        generation={},
        score=score,
        metrics={},
        items=[{"id": str(k)} for k in range(items)],
        **kw,
    )


def test_category_scores_average_benchmarks_not_splits(tmp_path: Path) -> None:
    """POPE's three splits are one benchmark (the mean of their F1), RefCOCO's splits one (their mean),
    ChartQA's two sets one (the score over their union); a category averages benchmarks."""
    report = EvalReport(
        model={"name": "m"},
        tasks=[
            _result("pope-random", "pope", "general", 90.0),
            _result("pope-popular", "pope", "general", 80.0, items=30),
            _result("pope-adv", "pope", "general", 70.0),
            _result("vqav2", "vqav2", "general", 50.0),
            _result("chartqa-human", "chartqa", "text-rich", 40.0, items=10),
            _result("chartqa-augmented", "chartqa", "text-rich", 80.0, items=30),
            _result("textvqa", "textvqa", "text-rich", 20.0),
            _result("refcoco-testA", "refcoco", "refer-ground", 60.0),
            _result("refcoco+-testA", "refcoco", "refer-ground", 40.0, items=40),
            _result("refcocog-test", "refcoco", "refer-ground", 20.0),
            _result("synth-refer", "synth-refer", "refer-ground", 100.0),
        ],
    )
    assert report.category_scores == {"general": 65.0, "text-rich": 45.0, "refer-ground": 70.0}
    assert report.benchmark_scores == {
        "general": {"pope": 80.0, "vqav2": 50.0},
        "text-rich": {"chartqa": 70.0, "textvqa": 20.0},  # (10 x 40 + 30 x 80) / 40
        "refer-ground": {"refcoco": 40.0, "synth-refer": 100.0},
    }
    flat = report.scores()
    assert flat["benchmark/pope"] == 80.0 and flat["task/pope-adv"] == 70.0
    assert "benchmark/vqav2" not in flat  # a benchmark of one result is its task score
    # One benchmark name in two categories is two benchmarks: both logged (one key lost one score).
    twice = EvalReport(
        model={"name": "m"},
        tasks=[
            _result("a1", "synth-general-color", "general", 10.0, benchmark="mine"),
            _result("a2", "synth-general-count", "general", 30.0, benchmark="mine"),
            _result("b1", "synth-icl", "in-context", 70.0, benchmark="mine"),
            _result("b2", "synth-icl", "in-context", 90.0, benchmark="mine"),
        ],
    ).scores()
    assert twice["benchmark/general/mine"] == 20.0 and twice["benchmark/in-context/mine"] == 80.0

    paths = report.save(tmp_path)
    data = json.loads(paths["json"].read_text())
    assert data["tasks"]["pope-adv"]["benchmark"] == "pope" and data["tasks"]["vqav2"]["benchmark"] == "vqav2"
    assert data["benchmarks"]["general"]["pope"] == {
        "score": 80.0,
        "results": ["pope-random", "pope-popular", "pope-adv"],
        "combined": "mean of 3 splits",
    }
    assert data["benchmarks"]["text-rich"]["chartqa"]["combined"] == "mean over the items of 2 splits"
    assert data["categories"] == report.category_scores
    markdown = paths["markdown"].read_text()
    for row in (  # every split keeps its row, followed by the benchmark's score
        "| general | pope | pope-random | m | 10 | 90.00 |",
        "| general | pope | pope-adv | m | 10 | 70.00 |",
        "| general | pope | *mean of 3 splits* | | 50 | *80.00* |",
        "| **general** | | **average** (2 benchmarks) | | | **65.00** |",
    ):
        assert row in markdown

    # An explicit benchmark groups results of other names; synthetic tasks are each their own, so
    # their categories are the plain mean of their scores.
    mixed = EvalReport(
        model={},
        tasks=[
            _result("video-mc-a", "video-mc", "video", 10.0, benchmark="mvbench"),
            _result("video-mc-b", "video-mc", "video", 30.0, benchmark="mvbench"),
            _result("video-mc-c", "video-mc", "video", 80.0),
        ],
    )
    assert mixed.benchmark_scores == {"video": {"mvbench": 20.0, "video-mc-c": 80.0}}
    synth = EvalReport(
        model={},
        tasks=[
            _result(name, name, registry.get_task(name).category, 10.0 * k) for k, name in enumerate(SYNTH)
        ],
    )
    for category, score in synth.category_scores.items():
        own = [t.score for t in synth.tasks if t.category == category]
        assert score == pytest.approx(sum(own) / len(own))
        assert set(synth.benchmark_scores[category]) == {
            t.name for t in synth.tasks if t.category == category
        }


def test_results_of_one_benchmark_are_grouped_end_to_end(
    model: MM15Model, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Two POPE runs are splits of one benchmark in results.json; benchmark= changes no cache key."""
    pope = REAL / "pope_coco" / "coco_pope_random.json"
    images = tmp_path / "val2014"
    images.mkdir()
    for line in pope.read_text().splitlines()[:1]:
        Image.new("RGB", (80, 60), (120, 30, 30)).save(images / json.loads(line)["image"])
    common = f"path={pope},images={images},limit=1,max_new_tokens=2"
    specs = [f"pope:{common},name=pope-a", f"pope:{common},name=pope-b", "synth-icl:max_new_tokens=2"]
    report = evaluate(model, specs, limit=1, out_dir=tmp_path / "out", progress=False)
    assert [t.group for t in report.tasks] == ["pope", "pope", "synth-icl"]
    general = report.benchmark_scores["general"]
    assert general["pope"] == pytest.approx((report.tasks[0].score + report.tasks[1].score) / 2)
    data = json.loads((tmp_path / "out" / "results.json").read_text())
    assert data["benchmarks"]["general"]["pope"]["results"] == ["pope-a", "pope-b"]
    counter = CountingGenerate(monkeypatch)
    again = evaluate(
        model, "synth-icl:max_new_tokens=2,benchmark=icl", limit=1, out_dir=tmp_path / "out", progress=False
    )
    assert counter.prompts == 0 and again.tasks[0].group == "icl"


def test_item_cache_ignores_damaged_lines(tmp_path: Path) -> None:
    path = tmp_path / "c.jsonl"
    cache = ItemCache(path)
    cache.put([("k1", "a", "out 1"), ("k2", "b", "out\n2")])
    path.write_text(path.read_text() + "not json\n[1, 2]\n")
    reread = ItemCache(path)
    assert reread.get("k1") == "out 1" and reread.get("k2") == "out\n2" and reread.get("k3") is None
    # A half-written last line (a kill mid-write): the next record starts on a line of its own.
    path.write_text(path.read_text() + '{"key": "k9", "outp')
    ItemCache(path).put([("k3", "c", "out 3")])
    assert ItemCache(path).get("k3") == "out 3"
    # Line separators other than "\n" inside an output (JSON writes them raw) do not split its record.
    ItemCache(path).put([("k4", "d", "two\u2028lines\u0085and\u2029more")])
    assert ItemCache(path).get("k4") == "two\u2028lines\u0085and\u2029more"
    # A last line cut inside a UTF-8 character, and records of the wrong types, cost only themselves.
    with path.open("ab") as f:
        f.write(b'{"key": "k5", "id": "e", "output": 5}\n{"key": "k6", "id": "f", "output": "caf\xc3')
    reread = ItemCache(path)
    assert reread.get("k5") is None and reread.get("k6") is None
    assert [reread.get(k) for k in ("k1", "k3", "k4")] == [
        "out 1",
        "out 3",
        "two\u2028lines\u0085and\u2029more",
    ]


def test_answers_of_another_compute_dtype_are_not_reused(
    model: MM15Model, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """bf16 autocast rounds differently from float32: its answers are not the float32 run's."""
    from mm15.hardware import compute_dtype

    counter = CountingGenerate(monkeypatch)
    with compute_dtype(torch.float32):
        first = evaluate(model, FEW[:1], limit=2, out_dir=tmp_path, progress=False)
    with compute_dtype(torch.bfloat16):
        evaluate(model, FEW[:1], limit=2, out_dir=tmp_path, progress=False)
    assert counter.prompts == 4 and first.model["compute_dtype"] == "float32"


# --------------------------------------------------------------------------------------------------
# mm15 eval
# --------------------------------------------------------------------------------------------------


def test_cli_eval_writes_the_results(model: MM15Model, tmp_path: Path) -> None:
    model_dir = tmp_path / "model"
    model.save_pretrained(model_dir)
    out = tmp_path / "out"
    args = ["eval", "--model", str(model_dir), "--tasks", "synth-icl:max_new_tokens=2", "--limit", "1"]
    result = CliRunner().invoke(
        app, [*args, "--tasks", "synth-general-color:max_new_tokens=2", "--out", str(out)]
    )
    assert result.exit_code == 0, result.output
    data = json.loads((out / "results.json").read_text())
    assert list(data["tasks"]) == ["synth-icl", "synth-general-color"]
    assert data["model"]["path"] == str(model_dir)
    assert (out / "results.md").is_file() and (out / "scores.png").is_file()
    assert "2 items generated, 0 from the cache" in result.output
    again = CliRunner().invoke(
        app, [*args, "--tasks", "synth-general-color:max_new_tokens=2", "--out", str(out)]
    )
    assert again.exit_code == 0 and "0 items generated, 2 from the cache" in again.output


def test_cli_eval_default_folder_names_the_run_and_stage(
    model: MM15Model, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Every stage's model is ``<run>/<stage>/final``: a default folder named after the model's own
    directory made the stages of a run overwrite each other's results in runs/eval/final."""
    for stage in ("ocr", "sft"):
        model.save_pretrained(tmp_path / "tiny" / stage / "final")
    monkeypatch.chdir(tmp_path)
    for stage in ("ocr", "sft"):
        args = [
            "eval",
            "--model",
            f"tiny/{stage}/final",
            "--tasks",
            "synth-icl:max_new_tokens=2",
            "--limit",
            "1",
        ]
        result = CliRunner().invoke(app, args)
        assert result.exit_code == 0, result.output
        assert "1 item generated, 0 from the cache" in result.output
        assert (tmp_path / "runs" / "eval" / f"tiny-{stage}" / "results.json").is_file()
    assert not (tmp_path / "runs" / "eval" / "final").exists()


def test_cli_eval_interrupted_says_the_same_command_continues(
    model: MM15Model, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    model_dir = tmp_path / "model"
    model.save_pretrained(model_dir)

    def interrupted(*args: object, **kwargs: object) -> None:
        raise KeyboardInterrupt

    monkeypatch.setattr(runner_module, "evaluate", interrupted)
    args = ["eval", "--model", str(model_dir), "--tasks", "synth-icl", "--out", str(tmp_path / "out")]
    monkeypatch.setattr("sys.argv", ["mm15", *args])
    result = CliRunner().invoke(app, args)
    assert result.exit_code == 130, result.output
    flat = " ".join(result.output.split())
    assert "interrupted." in flat and f"continues from them: mm15 eval --model {model_dir}" in flat


def test_cli_eval_errors(tmp_path: Path) -> None:
    cli = CliRunner()
    missing = cli.invoke(app, ["eval", "--model", str(tmp_path / "none"), "--tasks", "synth-icl"])
    assert missing.exit_code == 2 and "is not an mm15 model directory" in missing.output
    unknown = cli.invoke(app, ["eval", "--model", str(tmp_path), "--tasks", "synth-icl,nope"])
    assert unknown.exit_code == 2 and "unknown task 'nope'" in unknown.output
    bad_option = cli.invoke(app, ["eval", "--model", str(tmp_path), "--tasks", "textvqa"])
    assert bad_option.exit_code == 2 and "path=... is required" in bad_option.output
    taken = tmp_path / "results.txt"
    taken.write_text("notes")
    # The output is checked before the model is loaded: tmp_path is no model, and that is not the error.
    onto_file = cli.invoke(
        app, ["eval", "--model", str(tmp_path), "--tasks", "synth-icl", "--out", str(taken)]
    )
    assert onto_file.exit_code == 2 and "exists and is not a directory" in onto_file.output, onto_file.output
    nothing = cli.invoke(app, ["eval"])
    assert nothing.exit_code == 2 and "--list" in nothing.output
    listing = cli.invoke(app, ["eval", "--list"])
    assert listing.exit_code == 0 and "synth-chart-qa" in listing.output
