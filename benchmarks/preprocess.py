"""Preprocessing speed: mm15's decode + tile processor against Hugging Face's image processors.

Every pipeline starts from the encoded file bytes in memory and ends with float32 tensors, on the
same real images (a tablet screenshot, scanned pages and photographs shipped with PyPI packages):

* decode floor: PIL decode to RGB, nothing else;
* mm15: ``load_image`` + ``ImageProcessor`` (672-pixel tiles, grids of 4..9, overview after), float32
  tiles normalised with CLIP's mean and std;
* mm15 uint8: the same tiles left as 8-bit pixels, as ``mm15 train`` reads them (the encoder normalises
  them with the same arithmetic, ``mm15.image.normalize_pixels``), so the values the encoder sees are
  the float row's; the output holds as many values at a quarter of the bytes;
* mm15 uint8 + normalize_pixels: the uint8 row followed by the encoder's normalisation on this CPU, i.e.
  the total work when the model runs on the same processor (on a GPU that step is on the device);
* LLaVA-NeXT: ``LlavaNextImageProcessor`` with 672-pixel tiles and grid pinpoints for every grid of
  4..9 tiles, i.e. the same encoder inputs as mm15;
* Idefics3: ``Idefics3ImageProcessor`` with its defaults (364-pixel tiles, longest edge 1456).

Threads: the decode floor and the PIL-based references run on one thread; mm15's rows use torch's
intra-op threads where torch does the work (resize, normalisation), by default as many as torch picks for
this machine (printed in the header). ``--threads N`` sets torch's thread count first: ``--threads 1``
compares like for like, and is how ``mm15 train``'s data worker runs (one torch thread).

Usage: ``python benchmarks/preprocess.py [--rounds 5] [--threads N]``. Prints a table of images/s,
output size per image (millions of values) and the ratios; see docs/benchmarks.md.
"""

from __future__ import annotations

import argparse
import io
import os
import platform
import statistics
import time
import warnings
from collections.abc import Callable
from pathlib import Path

import matplotlib
import numpy as np
import torch
from PIL import Image

from mm15.geometry import ImagePlanConfig, candidate_grids
from mm15.image import CLIP_MEAN, CLIP_STD, ImageProcessor, load_image, normalize_pixels

ROOT = Path(__file__).resolve().parent.parent


def real_images() -> dict[str, bytes]:
    """Encoded bytes of real images: our fixture plus images inside installed PyPI packages."""
    import skimage.data

    skimage_dir = Path(skimage.data.__file__).parent
    paths = [
        ROOT / "tests" / "fixtures" / "seeclick_calendar.png",
        skimage_dir / "page.png",
        skimage_dir / "hubble_deep_field.jpg",
        skimage_dir / "retina.jpg",
        skimage_dir / "rocket.jpg",
        skimage_dir / "astronaut.png",
        Path(matplotlib.get_data_path()) / "sample_data" / "grace_hopper.jpg",
    ]
    return {path.name: path.read_bytes() for path in paths}


def decode_floor(data: bytes) -> int:
    with Image.open(io.BytesIO(data)) as image:
        return np.asarray(image.convert("RGB")).size


def make_mm15(dtype: torch.dtype = torch.float32, normalize: bool = False) -> Callable[[bytes], int]:
    processor = ImageProcessor(ImagePlanConfig(), dtype=dtype)

    def run(data: bytes) -> int:
        pixels = processor([load_image(data)]).pixel_values
        if normalize:
            pixels = normalize_pixels(pixels, CLIP_MEAN, CLIP_STD)
        return pixels.numel()

    return run


def make_llava_next() -> Callable[[bytes], int]:
    from transformers.models.llava_next.image_processing_pil_llava_next import LlavaNextImageProcessorPil

    r = 672
    processor = LlavaNextImageProcessorPil(
        size={"shortest_edge": r},
        crop_size={"height": r, "width": r},
        image_grid_pinpoints=[[a * r, b * r] for a, b in candidate_grids(4, 9)],
        image_mean=list(CLIP_MEAN),
        image_std=list(CLIP_STD),
    )

    def run(data: bytes) -> int:
        with Image.open(io.BytesIO(data)) as image:
            out = processor(image.convert("RGB"), return_tensors="pt")
        return out["pixel_values"].numel()

    return run


def make_idefics3() -> Callable[[bytes], int]:
    from transformers.models.idefics3.image_processing_pil_idefics3 import Idefics3ImageProcessorPil

    processor = Idefics3ImageProcessorPil()

    def run(data: bytes) -> int:
        with Image.open(io.BytesIO(data)) as image:
            out = processor(image.convert("RGB"), return_tensors="pt")
        return out["pixel_values"].numel()

    return run


def measure(fn: Callable[[bytes], int], images: dict[str, bytes], rounds: int) -> tuple[float, float]:
    """(images per second over all images, median of rounds; mean output values per image)."""
    sizes = [fn(data) for data in images.values()]  # warm-up, and the output size
    rates = []
    for _ in range(rounds):
        start = time.perf_counter()
        for data in images.values():
            fn(data)
        rates.append(len(images) / (time.perf_counter() - start))
    return statistics.median(rates), sum(sizes) / len(sizes)


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument(
        "--threads",
        type=int,
        help="torch intra-op threads for mm15's rows (default: torch's own choice; 1 = like the PIL rows "
        "and the training data worker)",
    )
    args = parser.parse_args()
    if args.threads is not None:
        if args.threads < 1:
            parser.error("--threads must be at least 1")
        torch.set_num_threads(args.threads)
    warnings.filterwarnings("ignore")
    images = real_images()
    print(
        f"machine: {platform.machine()}, {os.cpu_count()} cores, torch {torch.__version__} "
        f"(torch threads: {torch.get_num_threads()}"
        f"{', set by --threads' if args.threads is not None else ', torch default'}; the PIL rows use 1), "
        f"Python {platform.python_version()}"
    )
    for name, data in images.items():
        with Image.open(io.BytesIO(data)) as image:
            print(f"  {name}: {image.height}x{image.width} {image.format} {len(data) // 1024} KiB")
    pipelines = {
        "decode floor (PIL -> RGB)": decode_floor,
        "mm15": make_mm15(),
        "mm15 uint8 (as training reads it)": make_mm15(torch.uint8),
        "mm15 uint8 + normalize_pixels (CPU total)": make_mm15(torch.uint8, normalize=True),
        "LlavaNextImageProcessor (672, 4..9)": make_llava_next(),
        "Idefics3ImageProcessor (defaults)": make_idefics3(),
    }
    results = {name: measure(fn, images, args.rounds) for name, fn in pipelines.items()}
    mm15_rate = results["mm15"][0]
    print()
    print("| pipeline | images/s | output values per image (M) | mm15 speed-up |")
    print("|---|---|---|---|")
    for name, (rate, size) in results.items():
        print(f"| {name} | {rate:.1f} | {size / 1e6:.2f} | {mm15_rate / rate:.2f}x |")
    floor_rate = results["decode floor (PIL -> RGB)"][0]
    print()
    for name in ("mm15", "mm15 uint8 (as training reads it)", "mm15 uint8 + normalize_pixels (CPU total)"):
        ratio = floor_rate / results[name][0]
        print(f"{name}: time per image / decode-floor time per image: {ratio:.2f} (target <= 2)")


if __name__ == "__main__":
    main()
