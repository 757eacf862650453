"""Synthetic data engine speed: samples per second per generator on one core, at default sizes.

Each generator makes ``--n`` training samples (rendering the images and the ground truth, nothing
cached between samples) in this single process; torch is not involved, so this is one core's rate.
Usage: ``python benchmarks/synth.py [--n 100]``; see docs/benchmarks.md.
"""

from __future__ import annotations

import argparse
import os
import platform
import time

from mm15.data.synth import generate, generators

TARGET = 50.0  # samples/s per core for single-image categories (the data issue's target)


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--n", type=int, default=100)
    args = parser.parse_args()
    os.environ.setdefault("OMP_NUM_THREADS", "1")
    cores = os.cpu_count()
    print(f"machine: {platform.machine()}, {cores} cores (one used), Python {platform.python_version()}")
    print()
    print("| generator | category | images per sample | samples/s | target |")
    print("|---|---|---|---|---|")
    for name, gen in sorted(generators().items(), key=lambda kv: (kv[1].category, kv[0])):
        generate(name, 0)  # warm-up: fonts and caches
        start = time.perf_counter()
        images = sum(len(generate(name, i).images) for i in range(1, args.n + 1))
        rate = args.n / (time.perf_counter() - start)
        single = images == args.n and gen.category not in ("ocr",)
        verdict = ("met" if rate >= TARGET else "MISSED") if single else "n/a"
        print(f"| {name} | {gen.category} | {images / args.n:.1f} | {rate:.0f} | {verdict} |")


if __name__ == "__main__":
    main()
