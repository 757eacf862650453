"""Training-step speed: mm15's real step against an equivalent LLaVA-NeXT step, eager and compiled.

Both models are built in the same run from a preset's encoder and LLM sizes (``--preset tiny|smol``) and
train on the *same samples*: SFT samples from the synthetic data engine (general VQA, charts, documents,
tables, grounding; images of different sizes and aspect ratios, answers of different lengths), written
to a WebDataset shard first.

* **mm15**: the whole training path of ``mm15 train`` -- ``TrainStream`` (shard reading, image decoding,
  MM1.5's dynamic splitting, chat template, packing into rows of ``--seq-length`` tokens) through the
  ``Prefetcher`` (inline, a background thread or a worker process: ``--prefetch``, as a recipe's
  ``data.prefetch``),
  then ``train_step`` (forward, the LM head on supervised positions only, cross-entropy, backward,
  gradient clipping, AdamW). The connector keeps one token per patch
  (``num_queries = patches per tile``), and the reference's samples get unsupervised filler tokens up to
  mm15's length (its unpadding leaves it fewer image tokens), so both run the same tokens per sample.
  "mm15 (step only)" replays the same micro-batches prepared before timing, as the reference is timed:
  the step without the data path competing for the cores. "mm15 (preset)" is the preset as shipped (its
  C-Abstractor pools tiles to fewer tokens). ``--recipe RECIPE`` takes the model as a recipe configures
  it instead of a bare preset (``recipes/tiny.yaml`` gives the tiny preset SmolLM2's 49,152-token
  vocabulary in place of its byte tokenizer).
* **LlavaNext**: ``LlavaNextForConditionalGeneration`` with the same vision tower and decoder sizes (its LM
  head tied to its input embeddings, as mm15's is; checked), its any-resolution grids for 4..9 tiles of
  the same size, the same text tokens and labels (image positions and prompts unsupervised), batches
  padded to the longest sample as Hugging Face collators do, ``forward(labels=...)``, backward, clipping
  and AdamW. Its images are preprocessed *before* timing, so its step time holds no data preparation at
  all (in mm15's the data path is included, as ``data wait``).

Figures per model, each the median over the timed steps (as ``benchmarks/llm_step.py`` takes its median
step): the step time, samples/s, real (non-padding) tokens/s and MFU (the step's model FLOPs as
``mm15.train.flops`` counts them for both models -- decoder weights x tokens, LM head x supervised
positions, encoder x patches, connector x its positions -- over its time and this machine's matmul rate
in the compute dtype, measured in the same run); tokens per sample; padding, the share of the batches'
row slots that hold no token (``1 - real tokens / input_ids.numel()``: mm15 packs samples into rows
but pads a micro-batch's shorter rows to its longest; the reference pads every sample to the longest);
and, for mm15, the share of the timed time spent waiting for data. The reference's encoder patches are
those of the tiles it encodes: a batch pads each image's tiles to the most any image has, and
``get_image_features`` drops the padding tiles before the vision tower. ``--compile`` adds the compiled
rows: mm15's per-block ``torch.compile`` (the recipe switch ``compile: true``) and ``torch.compile`` of
the whole reference model; both are warmed up on every timed batch shape first, so compilation is not
timed.

Usage: ``python benchmarks/train_step.py [--preset tiny|smol | --recipe RECIPE] [--samples 4] [--steps 3]
[--compile] [--prefetch auto|inline|thread|process]``
(the compute dtype is ``mm15.hardware.fast_dtype()``: ``MM15_DTYPE=float32`` runs the tiny recipe's)
(``--profile``: only mm15's eager step under ``torch.profiler``, on the whole path and replayed without
the data path, its operators by self time and, by input shape, the costliest calls);
results in docs/benchmarks.md.
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import gc
import os
import platform
import statistics
import tempfile
import time
import warnings
from collections import Counter
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch

from mm15.chat import ChatEncoder
from mm15.data.mixture import MixtureNode, MixtureSampler
from mm15.data.sample import Sample
from mm15.data.sources import write_shards
from mm15.data.synth import generate
from mm15.geometry import candidate_grids
from mm15.hardware import autocast, fast_dtype, matmul_rate
from mm15.image import ImageProcessor, load_image
from mm15.model.mm15 import MM15Config, MM15Model
from mm15.model.presets import preset
from mm15.train.config import load_recipe
from mm15.train.data import MicroBatch, Prefetcher, TrainStream
from mm15.train.flops import StepWork, image_work, llava_next_flop_weights, mm15_flop_weights
from mm15.train.run import prefetch_mode, speed_options
from mm15.train.trainer import build_optimizer, train_step

GENERATORS = ("general-color", "chart-qa", "doc-qa", "refer-ground", "table-qa", "general-count")
LR = 1e-4


def workload(count: int) -> list[Sample]:
    """``count`` single-image SFT samples, cycling through the generators (deterministic)."""
    return [
        generate(GENERATORS[i % len(GENERATORS)], i // len(GENERATORS), split="train") for i in range(count)
    ]


def equal_token_config(cfg: MM15Config) -> MM15Config:
    """The preset with one image token per patch, as LLaVA-NeXT gives the LLM."""
    patches = (cfg.vision.image_size // cfg.vision.patch_size) ** 2
    return dataclasses.replace(
        cfg,
        connector=dataclasses.replace(cfg.connector, num_queries=patches),
        image=dataclasses.replace(cfg.image, tokens_per_tile=patches),
    )


def mm15_stream(model: MM15Model, shard_dir: Path, samples_per_step: int, seq_length: int) -> TrainStream:
    # File order (shuffle_buffer 0, TrainStream's default; recipes default to 256): the reference steps
    # through the same samples in that order, so both models are timed on the same batches.
    return TrainStream(
        MixtureSampler(MixtureNode.from_dict({"sft": 1}), seed=0),
        {"sft": f"shards:{shard_dir}"},
        ChatEncoder(model.tokenizer, model.cfg.image, max_length=seq_length),
        ImageProcessor(model.cfg.image, model.vision.image_mean, model.vision.image_std, dtype=torch.uint8),
        samples_per_micro=samples_per_step,
        pad_id=model.tokenizer.pad_token_id,
    )


def build_reference(model: MM15Model) -> torch.nn.Module:
    """LlavaNext with ``model``'s vision tower and decoder configs (random weights) and 4..9-tile grids.

    Its LM head is tied to its input embeddings, as mm15's (and the decoder config's) is: the top-level
    ``LlavaNextConfig.tie_word_embeddings`` decides, and it defaults to False.
    """
    from transformers import LlavaNextConfig, LlavaNextForConditionalGeneration

    tile = model.cfg.image.tile_size
    grids = [[a * tile, b * tile] for a, b in candidate_grids(model.cfg.image.n_min, model.cfg.image.n_max)]
    vision_config = model.vision.model.config
    config = LlavaNextConfig(
        vision_config=vision_config.to_dict(),
        text_config=model.llm.config.to_dict(),
        image_token_index=model.image_token_id,
        image_grid_pinpoints=grids,
        vision_feature_layer=-1,
        # CLIP has a CLS token to drop ("default"); SigLIP has none ("full").
        vision_feature_select_strategy="default"
        if vision_config.model_type == "clip_vision_model"
        else "full",
        tie_word_embeddings=model.llm.config.tie_word_embeddings,
    )
    torch.manual_seed(0)
    reference = LlavaNextForConditionalGeneration(config)
    ours_tied = model.llm.get_output_embeddings().weight is model.llm.get_input_embeddings().weight
    ref_tied = reference.lm_head.weight is reference.get_input_embeddings().weight
    assert ref_tied == ours_tied, f"LM head tied: mm15 {ours_tied}, LlavaNext {ref_tied}"
    return reference


def reference_batches(
    reference: torch.nn.Module, model: MM15Model, micros: list[MicroBatch]
) -> list[dict[str, Any]]:
    """The reference's padded batches for the samples of mm15's micro-batches (same text, same labels)."""
    from transformers.models.llava_next.image_processing_pil_llava_next import LlavaNextImageProcessorPil
    from transformers.models.llava_next.modeling_llava_next import image_size_to_num_patches

    tile = model.cfg.image.tile_size
    processor = LlavaNextImageProcessorPil(
        size={"shortest_edge": tile},
        crop_size={"height": tile, "width": tile},
        image_grid_pinpoints=reference.config.image_grid_pinpoints,
        image_mean=list(model.vision.image_mean),
        image_std=list(model.vision.image_std),
    )
    image_token = model.image_token_id
    patches_per_tile = (model.cfg.vision.image_size // model.cfg.vision.patch_size) ** 2
    batches = []
    for micro in micros:
        rows, labels, pictures, tiles = [], [], [], 0
        for encoded in micro.samples:
            name, split, seed, index = encoded.sample_id.split("/")
            sample = generate(name, int(index), split=split, seed=int(seed))  # type: ignore[arg-type]
            image = load_image(sample.images[0])
            pixels = processor(image, return_tensors="pt")
            with torch.no_grad():
                features = reference.model.get_image_features(
                    pixels["pixel_values"], pixels["image_sizes"]
                ).pooler_output
            # mm15's text tokens and labels without its image tokens, after the reference's image tokens.
            text = [
                (t, y) for t, y in zip(encoded.input_ids, encoded.labels, strict=True) if t != image_token
            ]
            # LLaVA-NeXT unpads each image's features and adds a newline token per row, so it places
            # fewer image tokens than mm15's one per patch (2,212 against 2,560 on the default four
            # samples). Unsupervised filler tokens bring its sample to mm15's length, so both models
            # run the same number of tokens per sample (issue 5's "same tokens per sample"); a longer
            # reference sample (a square image: only the newlines) is left as it is.
            filler = max(0, len(encoded.input_ids) - features[0].shape[0] - len(text))
            rows.append([image_token] * features[0].shape[0] + [text[0][0]] * filler + [t for t, _ in text])
            labels.append([-100] * (features[0].shape[0] + filler) + [y for _, y in text])
            pictures.append(image)
            tiles += pixels["pixel_values"].shape[1]  # one image alone: no padding tiles
        longest = max(len(r) for r in rows)
        pad = model.tokenizer.pad_token_id
        processed = processor(pictures, return_tensors="pt")
        # The batch pads every image to the most tiles; get_image_features encodes only each image's own
        # (image_size_to_num_patches), so only those count as encoder work.
        encoded_tiles = sum(
            image_size_to_num_patches(
                image_size=size,
                grid_pinpoints=reference.config.image_grid_pinpoints,
                patch_size=reference.config.vision_config.image_size,
            )
            for size in processed["image_sizes"]
        )
        assert encoded_tiles == tiles, (encoded_tiles, tiles)
        batches.append(
            {
                "input_ids": torch.tensor([r + [pad] * (longest - len(r)) for r in rows]),
                "attention_mask": torch.tensor([[1] * len(r) + [0] * (longest - len(r)) for r in rows]),
                "labels": torch.tensor([y + [-100] * (longest - len(y)) for y in labels]),
                "pixel_values": processed["pixel_values"],
                "image_sizes": processed["image_sizes"],
                "real_tokens": sum(len(r) for r in rows),
                "image_tokens": sum(r.count(image_token) for r in rows),
                "patches": int(encoded_tiles) * patches_per_tile,
            }
        )
    return batches


def mm15_work(model: MM15Model, micros: list[MicroBatch]) -> StepWork:
    """The positions mm15's products ran on over ``micros`` (``mm15.train.flops``)."""
    images = [image_work(model, m.pixel_values) for m in micros]
    return StepWork(
        tokens=sum(m.batch.real_tokens for m in micros),
        supervised=sum(int((m.batch.labels[:, 1:] != -100).sum()) for m in micros),
        patches=sum(p for p, _ in images),
        image_tokens=sum(t for _, t in images),
    )


def padding(micros: list[MicroBatch]) -> float:
    """Padding slots over all slots of the micro-batches' rows (packed rows are padded to the longest)."""
    return 1 - sum(m.batch.real_tokens for m in micros) / sum(m.batch.input_ids.numel() for m in micros)


@dataclasses.dataclass(frozen=True)
class Step:
    """One timed step: its seconds and what it processed (samples, real tokens, model FLOPs)."""

    seconds: float
    samples: int
    tokens: int
    flops: float


def speed_row(steps: list[Step], peak: float, wait: float | None, pad: float) -> dict[str, Any]:
    """One table row from the timed steps: the median step time and the median of the per-step rates
    (samples/s, tokens/s, MFU), as ``benchmarks/llm_step.py`` takes its median step, so that one slow
    step (a stray stall on a shared machine) does not move the figures; tokens per sample over all
    steps; the data-wait fraction and the padding fraction as measured by the caller."""
    return {
        "samples_s": statistics.median(s.samples / s.seconds for s in steps),
        "tokens_s": statistics.median(s.tokens / s.seconds for s in steps),
        "tokens_per_sample": sum(s.tokens for s in steps) / sum(s.samples for s in steps),
        "step_s": statistics.median(s.seconds for s in steps),
        "mfu": statistics.median(s.flops / s.seconds for s in steps) / peak,
        "wait": wait,
        "padding": pad,
    }


def run_mm15(
    cfg: MM15Config,
    shard_dir: Path,
    args: argparse.Namespace,
    dtype: torch.dtype,
    peak: float,
    compiled: bool,
) -> tuple[dict[str, Any], MM15Model, list[MicroBatch]]:
    torch.manual_seed(0)
    model = MM15Model.build(cfg).train()
    speed_options(model, compile=compiled)  # the recipe switch `compile: true`
    modules = ("encoder", "connector", "llm")
    optimizer = build_optimizer(model, modules, dict.fromkeys(modules, LR))
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda s: 1.0)
    warm = args.steps if compiled else 1  # a compiled model meets every timed shape once before timing
    mode = prefetch_mode(args.prefetch)
    seen: list[MicroBatch] = []

    def recorded(data: Prefetcher) -> Prefetcher:
        original = data.next_micro

        def recording() -> MicroBatch:
            micro = original()
            seen.append(micro)
            return micro

        data.next_micro = recording  # type: ignore[method-assign]
        return data

    def prefetcher() -> Prefetcher:
        return recorded(Prefetcher(mm15_stream(model, shard_dir, args.samples, args.seq_length), mode=mode))

    data = prefetcher()
    # A compiled model is timed on the batches it compiled for, from a second data path started here,
    # before compiling, as `mm15 train` starts its data path before its first step: a worker process
    # forked after compiling would make the first timed step pay for copying the parent's written
    # pages (copy-on-write), a cost training pays once, at start-up.
    timed_data = prefetcher() if compiled else data
    for step in range(warm):
        train_step(model, data, optimizer, scheduler, 1, step, dtype, 1.0, peak)
    if compiled:
        data.close()
        data = timed_data
        seen.clear()
    weights = mm15_flop_weights(model)
    steps, waits = [], []
    profiler = operator_profiler() if args.profile else contextlib.nullcontext()
    with profiler:
        for step in range(args.steps):
            metrics = train_step(model, data, optimizer, scheduler, 1, warm + step, dtype, 1.0, peak)
            micro = seen[-1]
            seconds = micro.batch.real_tokens / metrics.tokens_per_s
            flops = weights.step_flops(mm15_work(model, [micro]))
            steps.append(Step(seconds, len(micro.samples), micro.batch.real_tokens, flops))
            waits.append(metrics.data_wait)
    data.close()
    if args.profile:
        print_profile(profiler, "mm15's step with its data path")
    timed = seen[-args.steps :]
    # The fraction of all timed time spent waiting for data (each step's fraction weighted by its time).
    wait = sum(w * s.seconds for w, s in zip(waits, steps, strict=True)) / sum(s.seconds for s in steps)
    return speed_row(steps, peak, wait, padding(timed)), model, timed


def operator_profiler() -> torch.profiler.profile:
    return torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU], record_shapes=True)


def print_profile(profiler: torch.profiler.profile, title: str) -> None:
    """Operators by self time, then the costliest (operator, input shapes) pairs with their time per call."""
    print(f"\n{title}: operators by self CPU time")
    print(profiler.key_averages().table(sort_by="self_cpu_time_total", row_limit=12))
    print(f"{title}: by input shape")
    print(
        profiler.key_averages(group_by_input_shape=True).table(
            sort_by="self_cpu_time_total", row_limit=12, max_shapes_column_width=60
        )
    )


class Replay:
    """Recorded micro-batches handed out again with no data work (``train_step``'s stream interface)."""

    def __init__(self, micros: list[MicroBatch], stream: TrainStream) -> None:
        self.micros = iter(micros)
        self.source_names = stream.source_names
        self.sources = list(stream.sampler.probs)  # the keys of TrainStream.realised_mixture
        self.used: Counter[str] = Counter()

    def next_micro(self) -> MicroBatch:
        micro = next(self.micros)
        # Each sample's source, read from the micro-batch's per-token tags (every sample has tokens).
        for i in range(len(micro.samples)):
            (source, *_) = micro.token_source[micro.token_sample == i].tolist()
            self.used[self.source_names[source]] += 1
        return micro

    def mixture_of(self, used: Mapping[str, int]) -> dict[str, float]:
        """``TrainStream.mixture_of`` (``train_step`` passes the samples replayed so far, replays counted
        again)."""
        total = sum(used.values())
        return {name: used.get(name, 0) / total if total else 0.0 for name in self.sources}


def run_mm15_step_only(
    model: MM15Model,
    micros: list[MicroBatch],
    stream: TrainStream,
    dtype: torch.dtype,
    peak: float,
    profile: bool = False,
) -> dict[str, Any]:
    """mm15's ``train_step`` on micro-batches prepared before timing, as the reference is timed: the same
    step without the data path's work on the other core (one warm-up step first)."""
    modules = ("encoder", "connector", "llm")
    optimizer = build_optimizer(model, modules, dict.fromkeys(modules, LR))
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda s: 1.0)
    data = Replay([micros[0], *micros], stream)
    train_step(model, data, optimizer, scheduler, 1, 0, dtype, 1.0, peak)
    weights = mm15_flop_weights(model)
    steps = []
    profiler = operator_profiler() if profile else contextlib.nullcontext()
    with profiler:
        for step, micro in enumerate(micros, start=1):
            start = time.perf_counter()
            train_step(model, data, optimizer, scheduler, 1, step, dtype, 1.0, peak)
            seconds = time.perf_counter() - start
            flops = weights.step_flops(mm15_work(model, [micro]))
            steps.append(Step(seconds, len(micro.samples), micro.batch.real_tokens, flops))
    if profile:
        print_profile(profiler, "mm15's step replayed without the data path")
    return speed_row(steps, peak, None, padding(micros))


def run_reference(
    reference: torch.nn.Module, batches: list[dict[str, Any]], dtype: torch.dtype, peak: float, compiled: bool
) -> dict[str, Any]:
    reference.train()
    step_model = torch.compile(reference) if compiled else reference
    # Fused, as Hugging Face's Trainer defaults to with torch >= 2.8 ("adamw_torch_fused") and as mm15's
    # build_optimizer does.
    trainable = [p for p in reference.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(trainable, lr=LR, fused=True)

    def step(batch: dict[str, Any]) -> None:
        inputs = {k: v for k, v in batch.items() if k not in ("real_tokens", "patches", "image_tokens")}
        with autocast(dtype):
            out = step_model(**inputs)
        out.loss.backward()
        torch.nn.utils.clip_grad_norm_(reference.parameters(), 1.0)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)

    for batch in batches if compiled else batches[:1]:
        step(batch)
    weights = llava_next_flop_weights(reference)
    steps = []
    for batch in batches:
        start = time.perf_counter()
        step(batch)
        seconds = time.perf_counter() - start
        work = StepWork(
            tokens=batch["real_tokens"],
            supervised=int((batch["labels"][:, 1:] != -100).sum()),
            patches=batch["patches"],
            image_tokens=batch["image_tokens"],
        )
        steps.append(Step(seconds, batch["input_ids"].shape[0], work.tokens, weights.step_flops(work)))
    real = sum(b["real_tokens"] for b in batches)
    pad = 1 - real / sum(b["input_ids"].numel() for b in batches)
    return speed_row(steps, peak, None, pad)


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--preset", choices=("tiny", "smol"), default="tiny")
    parser.add_argument(
        "--recipe",
        type=Path,
        help="take the model (preset and overrides) from this recipe instead of --preset",
    )
    parser.add_argument("--samples", type=int, default=4, help="samples per step")
    parser.add_argument("--steps", type=int, default=3, help="timed steps")
    parser.add_argument(
        "--seq-length", type=int, default=2048, help="mm15's packed row length (the tiny SFT stage's)"
    )
    parser.add_argument("--compile", action="store_true", help="also time both models compiled")
    parser.add_argument(
        "--prefetch",
        choices=("auto", "inline", "thread", "process"),
        default="auto",
        help="mm15's data path, as the recipe's data.prefetch: auto (a worker process where processes can "
        "be forked, else inline), inline, thread or process",
    )
    parser.add_argument(
        "--profile",
        action="store_true",
        help="only profile mm15's eager step (equal tokens per sample) and print where its time goes",
    )
    args = parser.parse_args()
    warnings.filterwarnings("ignore")
    os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
    dtype = fast_dtype()
    peak = matmul_rate(dtype, repeats=5)
    cpu = platform.processor() or platform.machine()
    print(
        f"machine: {cpu}, {os.cpu_count()} cores, torch {torch.__version__}, "
        f"{torch.get_num_threads()} threads; "
        f"compute dtype {dtype}, measured matmul {peak / 1e9:.0f} GFLOP/s; "
        f"{f'recipe {args.recipe}' if args.recipe else f'preset {args.preset}'}; "
        f"{args.samples} samples/step, {args.steps} timed steps, prefetch {args.prefetch}"
    )
    shipped = load_recipe(args.recipe).model.build() if args.recipe else preset(args.preset)
    equal = equal_token_config(shipped)
    rows: list[tuple[str, dict[str, Any]]] = []
    with tempfile.TemporaryDirectory() as tmp:
        shard_dir = Path(tmp)
        write_shards(workload(args.samples * args.steps * 3), shard_dir)
        if args.profile:
            _, model, micros = run_mm15(equal, shard_dir, args, dtype, peak, False)
            stream = mm15_stream(model, shard_dir, args.samples, args.seq_length)
            run_mm15_step_only(model, micros, stream, dtype, peak, profile=True)
            return
        for compiled in (False, True) if args.compile else (False,):
            tag = " compiled" if compiled else ""
            ours, model, micros = run_mm15(equal, shard_dir, args, dtype, peak, compiled)
            reference = build_reference(model)
            batches = reference_batches(reference, model, micros)
            ref = run_reference(reference, batches, dtype, peak, compiled)
            rows += [(f"mm15{tag}", ours), (f"LlavaNext{tag}", ref)]
            if not compiled:
                stream = mm15_stream(model, shard_dir, args.samples, args.seq_length)
                step_only = run_mm15_step_only(model, micros, stream, dtype, peak)
                del stream
                rows.append(("mm15 (step only)", step_only))
                rows.append(("mm15 (preset)", run_mm15(shipped, shard_dir, args, dtype, peak, False)[0]))
            # Free this pass's models before the next builds its own: on smol they hold several GB, and a
            # data worker forked next would keep a copy of every page still mapped.
            del model, micros, reference, batches
            gc.collect()
    print(
        "| model | samples/s | tokens/s | tokens/sample | step s | MFU | data wait | padding "
        "| vs LlavaNext, samples/s | vs LlavaNext, tokens/s |"
    )
    print("|---|---|---|---|---|---|---|---|---|---|")
    references = {tag: r for name, r in rows if name.startswith("LlavaNext") for tag in [name[9:]]}
    for name, r in rows:
        reference = references[" compiled" if "compiled" in name else ""]
        wait = "-" if r["wait"] is None else f"{r['wait']:.1%}"
        print(
            f"| {name} | {r['samples_s']:.2f} | {r['tokens_s']:.0f} | {r['tokens_per_sample']:.0f} | "
            f"{r['step_s']:.2f} | {r['mfu']:.1%} | {wait} | {r['padding']:.1%} | "
            f"{r['samples_s'] / reference['samples_s']:.2f}x | {r['tokens_s'] / reference['tokens_s']:.2f}x |"
        )


if __name__ == "__main__":
    main()
