"""The main job, ``mm15 demo``: what exists of the MM1.5 recipe, run end to end at toy scale.

1. The image plan: real and synthetic images planned, processed into encoder inputs (token counts
   checked against the tensors) and drawn, so the tiling can be checked by eye.
2. The tiny recipe: MM1.5's three stages (pre-training 50:10:40, high-resolution OCR continual
   pre-training, SFT on the 80/10/10 mixture) on synthetic data, with checkpoints, loss plots and a
   summary under ``<out>/tiny``.
3. Live answers: the trained model answers held-out (eval-seed) synthetic samples it never saw,
   next to their ground truth; a grounding answer is drawn on its image.

The evaluation harness over the benchmark categories (before/after each stage) is not built yet.
"""

from __future__ import annotations

import time
from pathlib import Path

import matplotlib
from PIL import Image, ImageDraw
from rich.console import Console
from rich.table import Table

from mm15.geometry import ImagePlanConfig
from mm15.image import ImageProcessor, load_image
from mm15.viz import draw_plan

LIVE_EXAMPLES = (
    ("general-count", 3),
    ("chart-qa", 5),
    ("refer-ground", 7),
    ("multi-image", 2),
    ("text-only", 4),
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
            name,
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


def live_answers(model_dir: Path, out: Path, console: Console) -> None:
    """The trained model on held-out synthetic samples, with the truth; grounding boxes drawn."""
    from mm15.boxes import parse_boxes
    from mm15.chat import render_regions
    from mm15.data.synth import generate as synth
    from mm15.hardware import autocast
    from mm15.model.generate import GenerationConfig, generate
    from mm15.model.mm15 import MM15Model, MM15Processor

    model = MM15Model.from_pretrained(model_dir)
    processor = MM15Processor.for_model(model)
    table = Table(title="live answers on held-out samples (eval seeds)")
    for column in ("generator", "question", "answer", "truth"):
        table.add_column(column, overflow="fold")
    for name, index in LIVE_EXAMPLES:
        sample = synth(name, index, split="eval")
        pictures = [load_image(ref) for ref in sample.images]
        sizes = [(p.height, p.width) for p in pictures]
        question = render_regions(sample.turns[0].content, sample, sizes)
        truth = render_regions(sample.turns[1].content, sample, sizes)
        prompt = model.tokenizer.apply_chat_template(
            [{"role": "user", "content": question}], tokenize=False, add_generation_prompt=True
        )
        with autocast():
            answer = generate(model, processor([prompt], [pictures]), GenerationConfig(max_new_tokens=48))[0]
        table.add_row(name, compact(question), compact(answer) or "(nothing)", compact(truth))
        if name == "refer-ground" and pictures:
            drawn = pictures[0].copy()
            draw = ImageDraw.Draw(drawn)
            for box in parse_boxes(truth, *sizes[0]):
                draw.rectangle(box, outline=(0, 200, 0), width=3)
            for box in parse_boxes(answer, *sizes[0]):
                draw.rectangle(box, outline=(230, 0, 0), width=3)
            drawn.save(out / "grounding.png")
    console.print(table)
    console.print(f"grounding drawn to {out / 'grounding.png'} (green: truth, red: the model's boxes)")


def run_demo(
    out: Path, console: Console, images: list[Path] | None = None, recipe: Path = Path("recipes/tiny.yaml")
) -> None:
    from mm15.train.config import load_recipe
    from mm15.train.run import run_recipe

    out.mkdir(parents=True, exist_ok=True)
    start = time.perf_counter()
    console.rule("1. the image plan")
    show_plans(out, console, images or [])
    console.rule("2. the tiny recipe: pre-training, OCR continual pre-training, SFT")
    config = load_recipe(recipe)
    run_dir = out / config.name
    run_recipe(config, console, out=run_dir)
    if (run_dir / "summary.md").is_file():
        console.print((run_dir / "summary.md").read_text())
    console.rule("3. live answers")
    live_answers(run_dir / config.stages[-1].name / "final", out, console)
    console.print(
        f"demo finished in {time.perf_counter() - start:.0f} s; outputs in {out}/. Not built yet: the "
        "evaluation harness, chat CLI and server (see the README's status)."
    )
