"""Evaluation results: per-item records, task and category scores, MMBase, and their files.

``EvalReport`` is what ``mm15.eval.runner.evaluate`` returns. ``save(out_dir)`` writes

* ``results.json``: the model (name, path, config and weight hashes), every task's version, options,
  prompt template, generation settings, metric, score, items (id, prompt, answers, raw output,
  parsed prediction, score), the annotation records its loader skipped by reason (``"split"``,
  ``"no_image"``, ...) and the benchmark it counts toward; the benchmark scores (each from its splits),
  the category scores and MMBase. Everything that can differ between two
  runs with the same settings (timestamps, durations, how many items came from the cache) is under the
  one key ``"run"``, so two runs compare equal once it is removed;
* ``results.md``: a Markdown table grouped by category and benchmark: every result (split) on its own
  row, each benchmark of several splits with its combined score, category averages and MMBase;
* ``scores.png``: a bar chart of the category scores.

Scores are x100. A category score is the unweighted mean over its *benchmarks* (MM1.5, mm15-spec.md
section 7.1), not over its results: the results of one benchmark (``TaskResult.benchmark``: POPE's
random, popular and adversarial files, RefCOCO's splits, ChartQA's human and augmented sets) are first
combined into the benchmark's score, by the rule of its task (``TaskResult.split_mean``): ``"splits"``,
the unweighted mean of the split scores (POPE: F1 per split and their mean; RefCOCO: Acc@0.5 per split
and their mean), or ``"items"``, the mean over the union of the splits' items, each split's score
weighted by its item count (ChartQA's overall). A benchmark whose results disagree on the rule (set
with ``benchmark=`` across tasks) takes the unweighted mean. MMBase is the mean of the general,
text-rich and knowledge category scores, ``None`` unless all three categories were evaluated.
"""

from __future__ import annotations

import json
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from mm15.eval.tasks import CATEGORIES, MMBASE_CATEGORIES, Task, TaskError, get_task
from mm15.paths import write_text_atomic

__all__ = ["FORMAT_VERSION", "EvalReport", "TaskResult"]

# 2: each task's "benchmark", the "benchmarks" section, and categories averaged over benchmarks.
FORMAT_VERSION = 2
RESULTS_JSON = "results.json"
RESULTS_MD = "results.md"
SCORES_PNG = "scores.png"


@dataclass
class TaskResult:
    """One task's outcome. ``items`` are dicts with id, prompt, answers, output, prediction, score;
    ``skipped`` counts the annotation records the task's loader left out, by reason (e.g. the other
    splits, ScienceQA's questions without an image), so the score says what it was computed on.
    ``benchmark`` names the benchmark the result is a split of and ``split_mean`` how that benchmark's
    splits combine (module docstring); left ``None``, both come from the registered task ``task``
    (``Task.benchmark``, ``Task.split_mean``), and for a task that is not registered, or whose results
    are each their own benchmark, the benchmark is the result's name."""

    name: str
    task: str
    category: str
    version: str
    metric: str
    options: dict[str, Any]
    prompt_template: str
    generation: dict[str, Any]
    score: float
    metrics: dict[str, float]
    items: list[dict[str, Any]] = field(default_factory=list)
    skipped: dict[str, int] = field(default_factory=dict)
    benchmark: str | None = None
    split_mean: str | None = None

    def __post_init__(self) -> None:
        if self.benchmark is None or self.split_mean is None:
            try:
                registered: Task | None = get_task(self.task)
            except TaskError:
                registered = None
            if self.benchmark is None:
                self.benchmark = (registered.benchmark if registered else None) or self.name
            if self.split_mean is None:
                self.split_mean = registered.split_mean if registered else "items"

    @property
    def group(self) -> str:
        """The benchmark this result counts toward."""
        return self.benchmark or self.name

    def to_dict(self) -> dict[str, Any]:
        return {
            "task": self.task,
            "category": self.category,
            "benchmark": self.group,
            "version": self.version,
            "metric": self.metric,
            "options": self.options,
            "prompt_template": self.prompt_template,
            "generation": self.generation,
            "num_items": len(self.items),
            "skipped": self.skipped,
            "score": self.score,
            "metrics": self.metrics,
            "items": self.items,
        }


@dataclass
class EvalReport:
    """Every task's result for one model; ``run`` holds the fields that vary between identical runs."""

    model: dict[str, Any]
    tasks: list[TaskResult]
    run: dict[str, Any] = field(default_factory=dict)

    def benchmark_results(self) -> dict[str, dict[str, list[TaskResult]]]:
        """Category -> benchmark -> its results (splits), in MM1.5's category order and result order."""
        grouped: dict[str, dict[str, list[TaskResult]]] = {}
        for category in CATEGORIES:
            for t in self.tasks:
                if t.category == category:
                    grouped.setdefault(category, {}).setdefault(t.group, []).append(t)
        return grouped

    @property
    def benchmark_scores(self) -> dict[str, dict[str, float]]:
        """Category -> benchmark -> the benchmark's score (x100) from its splits (module docstring)."""
        return {
            category: {name: _combine(results) for name, results in benchmarks.items()}
            for category, benchmarks in self.benchmark_results().items()
        }

    @property
    def category_scores(self) -> dict[str, float]:
        """Category -> unweighted mean of its benchmark scores (x100), in MM1.5's category order,
        evaluated categories only."""
        return {
            category: sum(scores.values()) / len(scores) for category, scores in self.benchmark_scores.items()
        }

    @property
    def mmbase(self) -> float | None:
        """Mean of the general, text-rich and knowledge scores; None unless all three were evaluated."""
        scores = self.category_scores
        if not all(c in scores for c in MMBASE_CATEGORIES):
            return None
        return sum(scores[c] for c in MMBASE_CATEGORIES) / len(MMBASE_CATEGORIES)

    def scores(self) -> dict[str, float]:
        """A flat dict for logging (TensorBoard, metrics.jsonl): ``task/<name>``, ``benchmark/<name>``
        for each benchmark of several results (its combined score), ``category/<name>``, and
        ``mmbase`` when defined. A benchmark name given to results of several categories (the
        ``benchmark=`` option) is one benchmark per category, each logged as
        ``benchmark/<category>/<name>`` (one key for both wrote one score over the other)."""
        flat = {f"task/{t.name}": t.score for t in self.tasks}
        scores = self.benchmark_scores
        by_category = self.benchmark_results()
        names = Counter(name for benchmarks in by_category.values() for name in benchmarks)
        for category, benchmarks in by_category.items():
            for name, results in benchmarks.items():
                if len(results) > 1:
                    key = f"benchmark/{category}/{name}" if names[name] > 1 else f"benchmark/{name}"
                    flat[key] = scores[category][name]
        flat.update({f"category/{c}": s for c, s in self.category_scores.items()})
        if self.mmbase is not None:
            flat["mmbase"] = self.mmbase
        return flat

    def to_dict(self) -> dict[str, Any]:
        return {
            "mm15_eval_format": FORMAT_VERSION,
            "model": self.model,
            "tasks": {t.name: t.to_dict() for t in self.tasks},
            "benchmarks": {
                category: {
                    name: {
                        "score": _combine(results),
                        "results": [t.name for t in results],
                        "combined": _rule(results),
                    }
                    for name, results in benchmarks.items()
                }
                for category, benchmarks in self.benchmark_results().items()
            },
            "categories": self.category_scores,
            "mmbase": self.mmbase,
            "run": self.run,
        }

    def to_json(self) -> str:
        return json.dumps(self.to_dict(), indent=2, ensure_ascii=False, default=str) + "\n"

    def to_markdown(self) -> str:
        """Results grouped by category and benchmark: every result on its row, a benchmark of several
        results followed by its combined score, each category by its average; MMBase at the end."""
        name = self.model.get("name") or "model"
        where = f" ({self.model['path']})" if self.model.get("path") else ""
        lines = [
            f"# Evaluation of {name}{where}",
            "",
            "| category | benchmark | task | metric | items | score |",
            "|---|---|---|---|---:|---:|",
        ]
        categories = self.category_scores
        for category, benchmarks in self.benchmark_results().items():
            for bench, results in benchmarks.items():
                for t in results:
                    lines.append(
                        f"| {category} | {bench} | {t.name} | {t.metric} | {len(t.items)} | {t.score:.2f} |"
                    )
                if len(results) > 1:
                    count = sum(len(t.items) for t in results)
                    lines.append(
                        f"| {category} | {bench} | *{_rule(results)}* | | {count} | "
                        f"*{_combine(results):.2f}* |"
                    )
            lines.append(
                f"| **{category}** | | **average** ({len(benchmarks)} benchmark"
                f"{'s' if len(benchmarks) != 1 else ''}) | | | **{categories[category]:.2f}** |"
            )
        mmbase = self.mmbase
        lines += [
            "",
            f"MMBase (mean of {', '.join(MMBASE_CATEGORIES)}): "
            + (f"**{mmbase:.2f}**" if mmbase is not None else "n/a (needs all three categories)"),
            "",
            "Scores x100. A category score is the unweighted mean of its benchmarks' scores; a benchmark"
            " run in several splits counts once, with the score combined from its splits.",
            "",
        ]
        return "\n".join(lines)

    def plot(self, path: Path) -> None:
        """A bar chart of the category scores (and MMBase), written as PNG.

        Drawn on a standalone ``Figure`` (rendered by the Agg canvas), not through pyplot, so the
        caller's pyplot backend and open figures (a notebook, a training loop's plots) are untouched.
        """
        from matplotlib.figure import Figure

        scores = self.category_scores
        labels, values = list(scores), list(scores.values())
        colors = ["#4c72b0"] * len(labels)
        if self.mmbase is not None:
            labels.append("MMBase")
            values.append(self.mmbase)
            colors.append("#dd8452")
        figure = Figure(figsize=(max(4.0, 1.1 * len(labels) + 1.5), 3.6), dpi=100)
        axes = figure.subplots()
        bars = axes.bar(labels, values, color=colors)
        for bar, value in zip(bars, values, strict=True):
            axes.annotate(
                f"{value:.1f}", (bar.get_x() + bar.get_width() / 2, value), ha="center", va="bottom"
            )
        axes.set_ylim(0, 105)
        axes.set_ylabel("score (x100)")
        axes.set_title(f"{self.model.get('name') or 'model'}: category scores")
        axes.tick_params(axis="x", labelrotation=20)
        figure.tight_layout()
        # No "Software" entry (it names the matplotlib version): identical runs write identical bytes.
        figure.savefig(path, format="png", metadata={"Software": None})

    def save(self, out_dir: str | Path) -> dict[str, Path]:
        """Write results.json, results.md and scores.png into ``out_dir``; returns their paths."""
        out = Path(out_dir)
        out.mkdir(parents=True, exist_ok=True)
        paths = {"json": out / RESULTS_JSON, "markdown": out / RESULTS_MD, "plot": out / SCORES_PNG}
        write_text_atomic(paths["json"], self.to_json())
        write_text_atomic(paths["markdown"], self.to_markdown())
        self.plot(paths["plot"])
        return paths


def _rule(results: list[TaskResult]) -> str:
    """How ``results`` (one benchmark's splits) are combined, in words."""
    if len(results) == 1:
        return "single result"
    rules = {t.split_mean for t in results}
    if rules == {"items"} and all(t.items for t in results):
        return f"mean over the items of {len(results)} splits"
    return f"mean of {len(results)} splits"


def _combine(results: list[TaskResult]) -> float:
    """One benchmark's score from its results (module docstring): the unweighted mean of the split
    scores, or for ``split_mean == "items"`` the item-weighted mean (the score over the splits' union)."""
    if len(results) == 1:
        return results[0].score
    if {t.split_mean for t in results} == {"items"} and all(t.items for t in results):
        total = sum(len(t.items) for t in results)
        return sum(t.score * len(t.items) for t in results) / total
    return sum(t.score for t in results) / len(results)
