"""The main job, ``mm15 demo``: the MM1.5 recipe at toy scale, evaluated before and after each stage.

1. The image plan: real and synthetic images planned, processed into encoder inputs (token counts
   checked against the tensors) and drawn, so the tiling can be checked by eye.
2. The untrained model is evaluated on the held-out synthetic benchmarks of every MM1.5 category
   (general, text-rich, knowledge, refer & ground, multi-image, in-context; ``mm15.eval``).
3. The tiny recipe's stages -- pre-training 50:10:40, high-resolution OCR continual pre-training, SFT on
   the 80/10/10 mixture -- each followed by the same evaluation, so the effect of every stage shows.
4. A report, ``<out>/report.md``: the category table per checkpoint and its chart, loss curves per stage,
   grounding predictions drawn over their images, live answers of the final model on held-out
   samples it never saw (reading text, grounding with the box drawn, a multi-image question, a video
   clip and a phone screen), each next to the truth, and whether the final model reads its prompt
   (``mm15.eval.probes``: the reason referring and grounding stay at zero at this budget).
"""

from __future__ import annotations

import dataclasses
import resource
import time
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import matplotlib
from PIL import Image, ImageDraw
from rich.console import Console
from rich.table import Table

from mm15.geometry import ImagePlanConfig
from mm15.image import ImageProcessor, load_image
from mm15.paths import check_output_dir, shown
from mm15.viz import draw_plan

if TYPE_CHECKING:
    from mm15.eval.probes import ContextUse
    from mm15.train.config import RecipeConfig

# The categories MM1.5 reports (mm15-spec.md section 7); each expands to its synthetic held-out tasks.
DEMO_CATEGORIES = ("general", "text-rich", "knowledge", "refer-ground", "multi-image", "in-context")
EVAL_LIMIT = 20  # items per task
# Caps the long-answer tasks (code transcription) so an untrained model's rambling stays cheap.
MAX_NEW_TOKENS = 48


def demo_task_specs() -> str:
    """The synthetic tasks of every demo category, each with its answer budget capped at MAX_NEW_TOKENS."""
    from mm15.eval.tasks import get_task, task_names

    specs = []
    for category in DEMO_CATEGORIES:
        for name in task_names(category):
            task = get_task(name)
            if task.needs_files:
                continue
            specs.append(f"{name}:max_new_tokens={min(task.generation.max_new_tokens, MAX_NEW_TOKENS)}")
    return ",".join(specs)


# Held-out (eval-split) samples the final model answers live: (generator, index, what it shows).
LIVE_EXAMPLES = (
    ("general-color", 3, "general VQA"),
    ("read-text", 0, "reading text"),
    ("refer-ground", 4, "grounding (box drawn)"),
    ("multi-image", 3, "multi-image"),
    ("icl", 1, "in-context"),
    ("video", 0, "video (frames, no splitting)"),
    ("ui-find-text", 2, "phone screen (box drawn)"),
)


def demo_images(extra: list[Path]) -> list[tuple[str, Image.Image]]:
    """The given images, matplotlib's sample photograph, and a wide strip and a tiny thumbnail."""
    images = [(path.name, load_image(path)) for path in extra]
    hopper = Path(matplotlib.get_data_path()) / "sample_data" / "grace_hopper.jpg"
    images.append((hopper.name, load_image(hopper)))
    images.append(("strip-120x5000 (synthetic)", Image.new("RGB", (5000, 120), (90, 160, 90))))
    images.append(("thumb-40x30 (synthetic)", Image.new("RGB", (30, 40), (160, 90, 90))))
    return images


def show_plans(out: Path, console: Console, images: list[Path]) -> None:
    processor = ImageProcessor(ImagePlanConfig())
    table = Table(title="MM1.5 image plans (tile 672, grids of 4..9 tiles, overview after)")
    for column in ("image", "h x w", "grid", "resized", "tiles", "tokens", "ms"):
        table.add_column(column)
    for index, (name, image) in enumerate(demo_images(images)):
        start = time.perf_counter()
        processed = processor([image])
        ms = (time.perf_counter() - start) * 1e3
        plan = processed.plans[0]
        if processed.pixel_values.shape[0] * plan.tokens_per_tile != plan.num_image_tokens:
            raise RuntimeError(f"{name}: plan and tensor disagree on the number of tiles")
        draw_plan(image, plan).save(out / f"plan_{index}.png")
        table.add_row(
            shown(name),
            f"{plan.height}x{plan.width}",
            f"{plan.grid[0]}x{plan.grid[1]}",
            f"{plan.resized[0]}x{plan.resized[1]}",
            str(plan.num_tiles),
            str(plan.num_image_tokens),
            f"{ms:.0f}",
        )
    console.print(table)


def compact(text: str, limit: int = 120) -> str:
    """One line for a table cell: whitespace folded, image placeholders shown as [image]."""
    return " ".join(text.replace("<image>", "[image]").split())[:limit]


def _sample_from_id(sample_id: str) -> Any:
    """The synthetic sample an eval item id (``generator/split/seed/index``) names."""
    from mm15.data.synth import generate

    name, split, seed, index = sample_id.split("/")
    return generate(name, int(index), split=split, seed=int(seed))  # type: ignore[arg-type]


def _draw_boxes(image: Image.Image, truth: str, answer: str) -> Image.Image:
    """``image`` with the truth's boxes and points in green and the answer's in red."""
    from mm15.boxes import parse_boxes, parse_points

    drawn = image.convert("RGB")
    draw = ImageDraw.Draw(drawn)
    width = max(2, min(drawn.size) // 150)
    for text, colour in ((truth, (0, 190, 0)), (answer, (230, 0, 0))):
        for x1, y1, x2, y2 in parse_boxes(text, drawn.height, drawn.width):
            # PIL draws an outline inward from the rectangle it is given: around the box, not over a
            # small target (a 7-pixel-high word vanished under a 4-pixel outline).
            draw.rectangle(
                (x1 - width, y1 - width, x2 + width - 1, y2 + width - 1), outline=colour, width=width
            )
        for x, y in parse_points(text, drawn.height, drawn.width):
            r = 3 * width
            draw.ellipse((x - r, y - r, x + r, y + r), outline=colour, width=width)
    return drawn


def _strip(pictures: list[Image.Image], height: int) -> Image.Image:
    """``pictures`` side by side, each scaled to ``height`` pixels high, 4 white pixels apart."""
    scaled = [p.convert("RGB").resize((max(1, round(p.width * height / p.height)), height)) for p in pictures]
    strip = Image.new("RGB", (sum(p.width for p in scaled) + 4 * (len(scaled) - 1), height), "white")
    x = 0
    for picture in scaled:
        strip.paste(picture, (x, 0))
        x += picture.width + 4
    return strip


def answer_live(model: Any, name: str, index: int) -> tuple[str, str, str, list[Image.Image]]:
    """(question, answer, truth, images) for held-out sample ``index`` of generator ``name``."""
    from mm15.chat import render_regions
    from mm15.data.synth import generate
    from mm15.eval.runner import chat_prompt
    from mm15.hardware import autocast
    from mm15.model.generate import GenerationConfig
    from mm15.model.generate import generate as generate_answers
    from mm15.model.mm15 import MM15Processor

    sample = generate(name, index, split="eval")
    pictures = [load_image(ref) for ref in sample.images]
    sizes = [(p.height, p.width) for p in pictures]
    question = render_regions(sample.turns[0].content, sample, sizes)
    truth = render_regions(sample.turns[1].content, sample, sizes)
    prompt = chat_prompt(model.tokenizer, question)
    with autocast():
        batch = MM15Processor.for_model(model)([prompt], [pictures])
        answer = generate_answers(model, batch, GenerationConfig(max_new_tokens=64))[0]
    return question, answer, truth, pictures


def live_answers(model: Any, out: Path, console: Console) -> list[dict[str, str]]:
    """The final model on held-out samples, next to the truth; grounding answers drawn (PNG per example)."""
    table = Table(title="live answers of the final model on held-out samples (eval seeds)")
    for column in ("shows", "question", "answer", "truth"):
        table.add_column(column, overflow="fold")
    rows = []
    for name, index, shows in LIVE_EXAMPLES:
        question, answer, truth, pictures = answer_live(model, name, index)
        row = {"shows": shows, "question": compact(question), "answer": compact(answer) or "(nothing)"}
        row["truth"] = compact(truth)
        if pictures:
            if name == "video":  # a contact strip of the first frames
                picture = _strip(pictures[:6], 96)
            elif len(pictures) > 1:  # every image, in order (an in-context question's is the last)
                picture = _strip(pictures, 160)
            else:
                picture = _draw_boxes(pictures[0], truth, answer) if "box" in shows else pictures[0]
            picture.thumbnail((480, 480) if len(pictures) == 1 else (960, 480))
            row["image"] = f"live_{name}.png"
            picture.save(out / row["image"])
        # The model's answer is arbitrary text, and questions hold "[image]": never markup.
        table.add_row(*(shown(row[k]) for k in ("shows", "question", "answer", "truth")))
        rows.append(row)
    console.print(table)
    return rows


@dataclass
class Checkpoint:
    """One evaluated model of the demo: the untrained init or a stage's final export."""

    label: str
    categories: dict[str, float]
    mmbase: float | None
    report: Any


def evaluate_checkpoint(model: Any, label: str, out: Path, console: Console, limit: int) -> Checkpoint:
    from mm15.eval.runner import evaluate

    report = evaluate(
        model,
        demo_task_specs(),
        limit=limit,
        out_dir=out / "eval" / label,
        # No model_id: the weights are hashed (a few ms for this model), so a rerun into the same --out
        # with other weights (another recipe or seed) generates afresh instead of reusing old answers.
        console=console,
    )
    scores = report.category_scores
    console.print(
        f"[bold]{shown(label)}[/bold]: "
        + ", ".join(f"{c} {scores.get(c, 0.0):.1f}" for c in DEMO_CATEGORIES)
        + (f", MMBase {report.mmbase:.1f}" if report.mmbase is not None else "")
    )
    return Checkpoint(label, scores, report.mmbase, report)


def _plot_categories(checkpoints: list[Checkpoint], path: Path) -> None:
    """Grouped bars: one group per category, one bar per checkpoint."""
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(9, 4))
    width = 0.8 / len(checkpoints)
    for k, checkpoint in enumerate(checkpoints):
        xs = [i + (k - (len(checkpoints) - 1) / 2) * width for i in range(len(DEMO_CATEGORIES))]
        ax.bar(
            xs, [checkpoint.categories.get(c, 0.0) for c in DEMO_CATEGORIES], width, label=checkpoint.label
        )
    ax.set_xticks(range(len(DEMO_CATEGORIES)), DEMO_CATEGORIES)
    ax.set_ylabel("score (x100)")
    ax.set_title("held-out synthetic benchmarks: untrained and after each stage")
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def _grounding_sheet(report: Any, path: Path, count: int = 6) -> int:
    """The final model's first grounding predictions drawn over their images (truth green, answer red)."""
    task = next((t for t in report.tasks if t.task == "synth-refer-ground"), None)
    if task is None:
        return 0
    tiles = []
    for item in task.items[:count]:
        sample = _sample_from_id(item["id"])
        image = load_image(sample.images[0])
        drawn = _draw_boxes(image, " ".join(item["answers"]), item["output"])
        drawn.thumbnail((240, 240))
        tiles.append(drawn)
    sheet = Image.new("RGB", (240 * len(tiles), 240), "white")
    for k, tile in enumerate(tiles):
        sheet.paste(tile, (240 * k, 0))
    sheet.save(path)
    return len(tiles)


def write_report(
    out: Path,
    recipe_name: str,
    run_dir: Path,
    stages: list[str],
    checkpoints: list[Checkpoint],
    live: list[dict[str, str]],
    probes: ContextUse,
    seconds: float,
    peak_gib: float,
) -> Path:
    """``<out>/report.md``: what the demo measured, with its PNGs."""
    lines = [
        f"# mm15 demo: the {recipe_name} recipe, evaluated before and after each stage",
        "",
        f"Finished in {seconds / 60:.1f} min, peak memory {peak_gib:.2f} GiB.",
        "",
        f"## Held-out synthetic benchmarks ({EVAL_LIMIT} items per task; scores x100)",
        "",
        "| model | " + " | ".join(DEMO_CATEGORIES) + " | MMBase |",
        "|---|" + "---:|" * (len(DEMO_CATEGORIES) + 1),
    ]
    for c in checkpoints:
        cells = [f"{c.categories.get(cat, 0.0):.1f}" for cat in DEMO_CATEGORIES]
        mmbase = f"{c.mmbase:.1f}" if c.mmbase is not None else "-"
        lines.append(f"| {c.label} | " + " | ".join(cells) + f" | {mmbase} |")
    lines += [
        "",
        "![category scores](categories.png)",
        "",
        "Per-task results, prompts and every output: `eval/<model>/results.md` and `results.json`.",
        "",
        "## Loss curves",
        "",
        *[f"![{stage}]({run_dir.name}/{stage}/loss.png)" for stage in stages],
        "",
        f"Training summary: [{run_dir.name}/summary.md]({run_dir.name}/summary.md).",
        "",
        "## Grounding predictions of the final model (truth green, answer red)",
        "",
        "![grounding](grounding.png)",
        "",
        "## Live answers on held-out samples",
        "",
        "| shows | question | answer | truth | image |",
        "|---|---|---|---|---|",
    ]
    for row in live:
        image = f"![{row['shows']}]({row['image']})" if "image" in row else ""
        cells = [row[k].replace("|", "\\|") for k in ("shows", "question", "answer", "truth")]
        lines.append("| " + " | ".join(cells) + f" | {image} |")
    lines += [
        "",
        "## Does the final model read its prompt?",
        "",
        "Referring and grounding carry something from the context (a name, a box) into the answer. Two",
        "probes on held-out samples (`mm15/eval/probes.py`) ask whether the model does that at all:",
        "",
        *probes.table(),
        "",
    ]
    path = out / "report.md"
    path.write_text("\n".join(lines))
    return path


def _train_and_evaluate(
    config: RecipeConfig, run_dir: Path, out: Path, console: Console, limit: int
) -> tuple[list[Checkpoint], list[dict[str, str]], ContextUse]:
    """Evaluate the untrained model, then train each stage and evaluate its export; the live answers and
    the context-use probes of the final model."""
    import torch

    from mm15.eval.probes import context_use
    from mm15.model.mm15 import MM15Model
    from mm15.train.run import run_recipe

    console.rule("2. the untrained model on the held-out benchmarks")
    torch.manual_seed(config.seed)
    checkpoints = [
        evaluate_checkpoint(MM15Model.build(config.model.build()), "untrained", out, console, limit)
    ]
    for number, stage in enumerate(config.stages, start=3):
        console.rule(f"{number}. stage {shown(stage.name)}, then the same evaluation")
        # resume: a demo stopped mid-stage (Ctrl+C) continues from that stage's last checkpoint when run
        # again, exactly as it would have gone on; a stage with no checkpoint starts afresh.
        run_recipe(config, console, stage_name=stage.name, out=run_dir, resume=True)
        final = MM15Model.from_pretrained(run_dir / stage.name / "final")
        checkpoints.append(evaluate_checkpoint(final, f"after {stage.name}", out, console, limit))
    console.rule("live answers")
    final.eval()
    live = live_answers(final, out, console)
    console.rule("does the final model read its prompt?")
    probes = context_use(final, limit)
    for line in probes.table():
        console.print(line, markup=False, highlight=False)
    return checkpoints, live, probes


class DemoInputError(ValueError):
    """A bad argument of ``run_demo`` (output path, recipe, image), found before anything runs."""


def run_demo(
    out: Path,
    console: Console,
    images: list[Path] | None = None,
    recipe: Path = Path("recipes/tiny.yaml"),
    limit: int = EVAL_LIMIT,
) -> None:
    from mm15.hardware import compute_dtype
    from mm15.train.config import load_recipe
    from mm15.train.run import stage_dtype

    # The inputs are checked before anything runs: a bad one fails in a second, not minutes in.
    try:
        check_output_dir(out, "--out")
        config = load_recipe(recipe)
        for path in images or []:
            # Decoded, not just the header read: a file cut after its header would otherwise pass here
            # and stop stage 1 with a traceback, leaving an empty --out behind.
            load_image(path).close()
    except (ValueError, FileNotFoundError) as err:  # ImageError is a ValueError
        hint = ""
        if isinstance(err, FileNotFoundError) and not recipe.is_absolute() and not recipe.exists():
            hint = f" under {Path.cwd()} (run from the mm15 checkout, or give --recipe PATH)"
        raise DemoInputError(f"{err}{hint}") from None
    try:
        out.mkdir(parents=True, exist_ok=True)
    except OSError as err:  # checked above; this is the folder changing since
        raise DemoInputError(f"cannot create --out {out}: {err.strerror or err}") from None
    start = time.perf_counter()
    console.rule("1. the image plan")
    show_plans(out, console, images or [])
    # The demo evaluates after every stage itself (more items than the recipe's in-training checks).
    config = dataclasses.replace(
        config, stages=tuple(dataclasses.replace(s, eval_every=0) for s in config.stages)
    )
    run_dir = out / config.name
    # Evaluate in the dtype the recipe trains in (its last stage's ``autocast``), not the machine default.
    with compute_dtype(stage_dtype(config.stages[-1].autocast)):
        checkpoints, live, probes = _train_and_evaluate(config, run_dir, out, console, limit)
    _plot_categories(checkpoints, out / "categories.png")
    _grounding_sheet(checkpoints[-1].report, out / "grounding.png")
    table = Table(title=f"held-out synthetic benchmarks ({limit} items per task, scores x100)")
    table.add_column("model")
    for category in DEMO_CATEGORIES:
        table.add_column(category, justify="right")
    table.add_column("MMBase", justify="right")
    for c in checkpoints:
        mmbase = f"{c.mmbase:.1f}" if c.mmbase is not None else "-"
        table.add_row(shown(c.label), *[f"{c.categories.get(k, 0.0):.1f}" for k in DEMO_CATEGORIES], mmbase)
    console.print(table)
    seconds = time.perf_counter() - start
    # This process's peak plus its largest child's (the data worker): an upper bound, since the worker
    # shares its parent's pages until either writes them.
    peak = sum(resource.getrusage(who).ru_maxrss for who in (resource.RUSAGE_SELF, resource.RUSAGE_CHILDREN))
    peak /= 2**20
    report = write_report(
        out, config.name, run_dir, [s.name for s in config.stages], checkpoints, live, probes, seconds, peak
    )
    console.print(
        f"demo finished in {seconds / 60:.1f} min (peak memory {peak:.2f} GiB); report: {shown(report)}"
    )
