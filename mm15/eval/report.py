"""Evaluation results: per-item records, task and category scores, MMBase, and their files.

``EvalReport`` is what ``mm15.eval.runner.evaluate`` returns. ``save(out_dir)`` writes

* ``results.json``: the model (name, path, config and weight hashes), every task's version, options,
  prompt template, generation settings, metric, score, items (id, prompt, answers, raw output,
  parsed prediction, score) and the annotation records its loader skipped by reason (``"split"``,
  ``"no_image"``, ...), the category scores and MMBase. Everything that can differ between two
  runs with the same settings (timestamps, durations, how many items came from the cache) is under the
  one key ``"run"``, so two runs compare equal once it is removed;
* ``results.md``: a Markdown table grouped by category, with category averages and MMBase;
* ``scores.png``: a bar chart of the category scores.

Scores are x100. A category score is the unweighted mean of its tasks' scores and MMBase the mean of
the general, text-rich and knowledge category scores (MM1.5, mm15-spec.md section 7.1); MMBase is
``None`` unless all three categories were evaluated.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from mm15.eval.tasks import CATEGORIES, MMBASE_CATEGORIES

__all__ = ["FORMAT_VERSION", "EvalReport", "TaskResult"]

FORMAT_VERSION = 1
RESULTS_JSON = "results.json"
RESULTS_MD = "results.md"
SCORES_PNG = "scores.png"


@dataclass
class TaskResult:
    """One task's outcome. ``items`` are dicts with id, prompt, answers, output, prediction, score;
    ``skipped`` counts the annotation records the task's loader left out, by reason (e.g. the other
    splits, ScienceQA's questions without an image), so the score says what it was computed on."""

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

    def to_dict(self) -> dict[str, Any]:
        return {
            "task": self.task,
            "category": self.category,
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

    @property
    def category_scores(self) -> dict[str, float]:
        """Category -> mean task score (x100), in MM1.5's category order, evaluated categories only."""
        scores: dict[str, float] = {}
        for category in CATEGORIES:
            values = [t.score for t in self.tasks if t.category == category]
            if values:
                scores[category] = sum(values) / len(values)
        return scores

    @property
    def mmbase(self) -> float | None:
        """Mean of the general, text-rich and knowledge scores; None unless all three were evaluated."""
        scores = self.category_scores
        if not all(c in scores for c in MMBASE_CATEGORIES):
            return None
        return sum(scores[c] for c in MMBASE_CATEGORIES) / len(MMBASE_CATEGORIES)

    def scores(self) -> dict[str, float]:
        """A flat dict for logging (TensorBoard, metrics.jsonl): ``task/<name>``, ``category/<name>``,
        and ``mmbase`` when defined."""
        flat = {f"task/{t.name}": t.score for t in self.tasks}
        flat.update({f"category/{c}": s for c, s in self.category_scores.items()})
        if self.mmbase is not None:
            flat["mmbase"] = self.mmbase
        return flat

    def to_dict(self) -> dict[str, Any]:
        return {
            "mm15_eval_format": FORMAT_VERSION,
            "model": self.model,
            "tasks": {t.name: t.to_dict() for t in self.tasks},
            "categories": self.category_scores,
            "mmbase": self.mmbase,
            "run": self.run,
        }

    def to_json(self) -> str:
        return json.dumps(self.to_dict(), indent=2, ensure_ascii=False, default=str) + "\n"

    def to_markdown(self) -> str:
        """Tasks grouped by category, each category followed by its average; MMBase at the end."""
        name = self.model.get("name") or "model"
        where = f" ({self.model['path']})" if self.model.get("path") else ""
        lines = [
            f"# Evaluation of {name}{where}",
            "",
            "| category | task | metric | items | score |",
            "|---|---|---|---:|---:|",
        ]
        categories = self.category_scores
        for category, average in categories.items():
            for t in (t for t in self.tasks if t.category == category):
                lines.append(f"| {category} | {t.name} | {t.metric} | {len(t.items)} | {t.score:.2f} |")
            lines.append(f"| **{category}** | **average** | | | **{average:.2f}** |")
        mmbase = self.mmbase
        lines += [
            "",
            f"MMBase (mean of {', '.join(MMBASE_CATEGORIES)}): "
            + (f"**{mmbase:.2f}**" if mmbase is not None else "n/a (needs all three categories)"),
            "",
            "Scores x100. A category score is the mean of its tasks' scores.",
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
        _write_atomic(paths["json"], self.to_json())
        _write_atomic(paths["markdown"], self.to_markdown())
        self.plot(paths["plot"])
        return paths


def _write_atomic(path: Path, text: str) -> None:
    """Write to a temporary file then rename, so an interrupted run never leaves half a results file."""
    tmp = path.with_suffix(path.suffix + ".tmp")
    tmp.write_text(text, encoding="utf-8")
    tmp.replace(path)
