"""The main job, ``mm15 demo``: what exists of the MM1.5 recipe, run end to end at toy scale.

So far the recipe's first piece exists: the image plan and the tile processor. The demo plans real
images (the ones given, plus matplotlib's bundled photograph) and synthetic extreme shapes, processes
them into encoder inputs, checks that every plan's token count matches the tensors produced, and
draws each plan to a PNG a person can check.
"""

from __future__ import annotations

import time
from pathlib import Path

import matplotlib
from PIL import Image
from rich.console import Console
from rich.table import Table

from mm15.geometry import ImagePlanConfig
from mm15.image import ImageProcessor, load_image
from mm15.viz import draw_plan


def demo_images(extra: list[Path]) -> list[tuple[str, Image.Image]]:
    """The given images, matplotlib's sample photograph, and a wide strip and a tiny thumbnail."""
    images = [(path.name, load_image(path)) for path in extra]
    hopper = Path(matplotlib.get_data_path()) / "sample_data" / "grace_hopper.jpg"
    images.append((hopper.name, load_image(hopper)))
    images.append(("strip-120x5000 (synthetic)", Image.new("RGB", (5000, 120), (90, 160, 90))))
    images.append(("thumb-40x30 (synthetic)", Image.new("RGB", (30, 40), (160, 90, 90))))
    return images


def run_demo(out: Path, console: Console, images: list[Path] | None = None) -> None:
    out.mkdir(parents=True, exist_ok=True)
    cfg = ImagePlanConfig()
    processor = ImageProcessor(cfg)
    table = Table(title="MM1.5 image plans (tile 672, grids of 4..9 tiles, overview after)")
    for column in ("image", "h x w", "grid", "resized", "tiles", "tokens", "ms"):
        table.add_column(column)
    for index, (name, image) in enumerate(demo_images(images or [])):
        start = time.perf_counter()
        processed = processor([image])
        ms = (time.perf_counter() - start) * 1e3
        plan = processed.plans[0]
        if processed.pixel_values.shape[0] * plan.tokens_per_tile != plan.num_image_tokens:
            raise RuntimeError(f"{name}: plan and tensor disagree on the number of tiles")
        drawing = out / f"plan_{index}.png"
        draw_plan(image, plan).save(drawing)
        table.add_row(
            name, f"{plan.height}x{plan.width}", f"{plan.grid[0]}x{plan.grid[1]}",
            f"{plan.resized[0]}x{plan.resized[1]}", str(plan.num_tiles), str(plan.num_image_tokens),
            f"{ms:.0f}",
        )
    console.print(table)
    console.print(
        "Training, evaluation and chat are not built yet: see the README's status section. "
        f"Drawings are in {out}/."
    )
