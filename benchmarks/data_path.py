"""Where mm15's data path spends its time: ``TrainStream.next_micro`` alone, with a profile.

Two workloads, each in the main thread with nothing else running (torch's operators on its default threads):

* ``shards``: the SFT samples of ``benchmarks/train_step.py`` read from a WebDataset shard (PNG
  decode, MM1.5 splitting, chat template, packing), with that benchmark's equal-token tiny model;
* ``recipe``: the tiny recipe's SFT stage as ``mm15 train`` builds it (synthetic samples rendered on
  the fly from its mixture).

Usage: ``python benchmarks/data_path.py [--micros 20] [--top 10]``. Prints milliseconds per micro-batch
of 4 samples, timed over ``--micros`` micro-batches with no profiler running, then the functions with the
most own time (cProfile) over the next ``--micros``, a breakdown only: cProfile's per-call hooks slow the
Python-heavy parts of the path (by about a quarter in total), so its times are not the path's speed; see
docs/benchmarks.md.
"""

from __future__ import annotations

import argparse
import cProfile
import pstats
import sys
import tempfile
import time
import warnings
from pathlib import Path

import torch

from mm15.chat import ChatEncoder
from mm15.data.mixture import MixtureSampler
from mm15.image import ImageProcessor
from mm15.model.mm15 import MM15Model
from mm15.model.presets import preset
from mm15.train.config import load_recipe
from mm15.train.data import TrainStream

sys.path.insert(0, str(Path(__file__).resolve().parent))
from train_step import equal_token_config, mm15_stream, workload, write_shards

ROOT = Path(__file__).resolve().parent.parent


def recipe_stream() -> TrainStream:
    """The tiny recipe's SFT data, micro-batches of 4, as ``mm15.train.run`` builds them."""
    recipe = load_recipe(ROOT / "recipes" / "tiny.yaml")
    stage = recipe.stage("sft")
    model = MM15Model.build(recipe.model.build())
    plan = recipe.image_plan("sft")
    return TrainStream(
        MixtureSampler(stage.data.mixture_node(), seed=recipe.seed),
        stage.data.resolve_sources(),
        ChatEncoder(model.tokenizer, plan, max_length=stage.data.seq_length),
        ImageProcessor(plan, model.vision.image_mean, model.vision.image_std, dtype=torch.uint8),
        samples_per_micro=stage.micro_batch,
        pad_id=model.tokenizer.pad_token_id,
    )


def profile(name: str, stream: TrainStream, micros: int, top: int) -> None:
    """Milliseconds per micro-batch over ``micros`` unprofiled micro-batches, then a profile of as many."""
    stream.next_micro()  # warm-up: tokenizer, fonts, caches
    start = time.perf_counter()
    for _ in range(micros):
        stream.next_micro()
    per_micro = (time.perf_counter() - start) / micros * 1e3
    profiler = cProfile.Profile()
    start = time.perf_counter()
    profiler.enable()
    for _ in range(micros):
        stream.next_micro()
    profiler.disable()
    profiled = (time.perf_counter() - start) / micros * 1e3
    print(
        f"\n## {name}: {per_micro:.1f} ms per micro-batch of {stream.samples_per_micro} samples "
        f"(no profiler; {profiled:.1f} ms under cProfile, whose breakdown follows)"
    )
    pstats.Stats(profiler, stream=sys.stdout).sort_stats("tottime").print_stats(top)


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--micros", type=int, default=20, help="timed micro-batches per workload")
    parser.add_argument("--top", type=int, default=10, help="functions listed per workload")
    args = parser.parse_args()
    warnings.filterwarnings("ignore")
    torch.manual_seed(0)
    with tempfile.TemporaryDirectory() as tmp:
        # A warm-up micro-batch, then new samples for the timed pass and for the profiled one.
        write_shards(workload(4 * (2 * args.micros + 1)), Path(tmp))
        model = MM15Model.build(equal_token_config(preset("tiny")))
        profile("shards", mm15_stream(model, Path(tmp), 4, 2048), args.micros, args.top)
    profile("recipe", recipe_stream(), args.micros, args.top)


if __name__ == "__main__":
    main()
