"""Model speed: mm15's training step and generation against an equivalent LLaVA-NeXT from transformers.

Both models are built in the same run, randomly initialised, with the same vision encoder (CLIP ViT,
224-pixel tiles, patch 16, last layer, CLS dropped) and the same decoder (SmolLM2-135M's shape, or the
tiny preset's), on the same 448 x 448 image plus the same text:

* mm15: dynamic splitting with 224-pixel tiles (2x2 + overview = 5 tiles), the C-Abstractor with 196
  queries per tile, so the LLM sees about as many image tokens as LLaVA-NeXT's (``--connector mlp``:
  mm15's MLP baseline instead, the same connector type as the reference's projector);
* reference: ``LlavaNextForConditionalGeneration`` with grid pinpoints for 4..9 tiles of 224 pixels
  (the same 2x2 + base image = 5 tiles), its MLP projector, unpadding and row-newline tokens, and its
  LM head tied to its input embeddings as mm15's is (checked).

Figures, in the compute dtype ``mm15.hardware.fast_dtype()`` picks for this machine (bf16 autocast
where bf16 matmuls are fast, else float32) for both models, with 2 threads: a forward+backward step
(tokens/s over each model's whole sequence, and MFU: model FLOPs as ``mm15.train.flops`` counts them
for both, over this machine's matmul rate in that dtype, measured in the same run), time to first
token of greedy generation, and decode tokens/s with the KV cache.
The two models take turns (a step of mm15, one of the reference, and so on; the same for whole
generations) and each figure is a median, so a machine whose speed drifts during the run moves both alike.

Usage: ``python benchmarks/model.py [--llm smol|tiny] [--steps 5] [--new-tokens 32]``; see
docs/benchmarks.md.
"""

from __future__ import annotations

import argparse
import itertools
import platform
import statistics
import time
import warnings
from collections.abc import Callable, Sequence
from dataclasses import replace
from typing import TypeVar

import torch
from PIL import Image

from mm15.geometry import ImagePlanConfig, candidate_grids
from mm15.hardware import autocast, bf16_matmul_is_fast, fast_dtype, matmul_rate
from mm15.model.connector import ConnectorConfig
from mm15.model.generate import GenerationConfig, stream
from mm15.model.llm import LLMConfig
from mm15.model.mm15 import MM15Config, MM15Model, MM15Processor
from mm15.model.presets import preset
from mm15.model.vision import VisionConfig
from mm15.train.flops import StepWork, llava_next_flop_weights, mm15_flop_weights

T = TypeVar("T")
TILE = 224
TEXT = "Describe the picture in detail, please, and name every object you can see in it."

LLM_SHAPES = {
    # SmolLM2-135M-Instruct's decoder (random weights; the speed does not depend on them).
    "smol": LLMConfig(
        source="tiny",
        vocab_size=49_152,
        hidden_size=576,
        intermediate_size=1536,
        num_layers=30,
        num_heads=9,
        num_kv_heads=3,
        max_position_embeddings=8192,
    ),
    "tiny": preset("tiny").llm,  # the tiny preset's decoder
}
VISION = VisionConfig(
    kind="clip",
    image_size=TILE,
    patch_size=16,
    hidden_size=384,
    intermediate_size=1536,
    num_layers=6,
    num_heads=6,
)


def alternate(fns: Sequence[Callable[[], T]], repeats: int) -> list[list[T]]:
    """Each function's results over ``repeats`` rounds, after one warm-up call each.

    The functions take turns within each round (mm15, reference, mm15, ...), so a machine that speeds up
    or slows down during the run (a shared 2-core VM does, by 10-30% within a minute) moves both
    models' figures alike instead of whichever ran in that stretch.
    """
    for fn in fns:
        fn()
    results: list[list[T]] = [[] for _ in fns]
    for _ in range(repeats):
        for fn, out in zip(fns, results, strict=True):
            out.append(fn())
    return results


def seconds_of(fn: Callable[[], object]) -> Callable[[], float]:
    def run() -> float:
        start = time.perf_counter()
        fn()
        return time.perf_counter() - start

    return run


def labels_for(input_ids: torch.Tensor, image_token: int) -> torch.Tensor:
    """Next-token labels as in SFT: every text token supervised, no loss on image tokens."""
    return input_ids.masked_fill(input_ids == image_token, -100)


def build_mm15(llm: LLMConfig, connector: str) -> tuple[MM15Model, dict]:
    cfg = MM15Config(
        name="bench",
        vision=VISION,
        connector=ConnectorConfig(
            kind=connector,  # type: ignore[arg-type]
            vision_dim=384,
            llm_dim=llm.hidden_size,
            hidden_dim=384,
            num_queries=196,
            depth=2,
            num_patches=196,
        ),
        llm=llm,
        image=ImagePlanConfig(tile_size=TILE, tokens_per_tile=196),
    )
    model = MM15Model.build(cfg)
    image = Image.new("RGB", (448, 448), (120, 80, 200))
    batch = MM15Processor.for_model(model)([f"<image>\n{TEXT}"], [[image]])
    return model, batch


def build_llava_next(llm: LLMConfig, image_token: int) -> tuple[torch.nn.Module, dict]:
    from transformers import CLIPVisionConfig, LlamaConfig, LlavaNextConfig, LlavaNextForConditionalGeneration
    from transformers.models.llava_next.image_processing_pil_llava_next import LlavaNextImageProcessorPil

    grids = [[a * TILE, b * TILE] for a, b in candidate_grids(4, 9)]
    config = LlavaNextConfig(
        vision_config=CLIPVisionConfig(
            image_size=TILE,
            patch_size=16,
            hidden_size=384,
            intermediate_size=1536,
            num_hidden_layers=6,
            num_attention_heads=6,
            hidden_act="quick_gelu",
        ),
        text_config=LlamaConfig(
            vocab_size=llm.vocab_size,
            hidden_size=llm.hidden_size,
            intermediate_size=llm.intermediate_size,
            num_hidden_layers=llm.num_layers,
            num_attention_heads=llm.num_heads,
            num_key_value_heads=llm.num_kv_heads,
            max_position_embeddings=llm.max_position_embeddings,
            tie_word_embeddings=llm.tie_word_embeddings,
            eos_token_id=2,
            pad_token_id=2,
            bos_token_id=1,
        ),
        image_token_index=image_token,
        image_grid_pinpoints=grids,
        vision_feature_layer=-1,
        vision_feature_select_strategy="default",
        # The top-level flag decides whether the LM head is tied (it defaults to False whatever the text
        # config says): tied as mm15's is (both LLM shapes here tie theirs).
        tie_word_embeddings=llm.tie_word_embeddings,
    )
    model = LlavaNextForConditionalGeneration(config)
    tied = model.lm_head.weight is model.get_input_embeddings().weight
    assert tied == llm.tie_word_embeddings, f"LM head tied: LlavaNext {tied}, mm15 {llm.tie_word_embeddings}"
    processor = LlavaNextImageProcessorPil(
        size={"shortest_edge": TILE}, crop_size={"height": TILE, "width": TILE}, image_grid_pinpoints=grids
    )
    pixels = processor(Image.new("RGB", (448, 448), (120, 80, 200)), return_tensors="pt")
    with torch.no_grad():
        features = model.model.get_image_features(pixels["pixel_values"], pixels["image_sizes"]).pooler_output
    n_image = features[0].shape[0]
    text_ids = torch.randint(3, min(llm.vocab_size, 250), (len(TEXT.encode()) + 1,))
    input_ids = torch.cat([torch.full((n_image,), image_token), text_ids]).unsqueeze(0)
    batch = {
        "input_ids": input_ids,
        "attention_mask": torch.ones_like(input_ids),
        "pixel_values": pixels["pixel_values"],
        "image_sizes": pixels["image_sizes"],
    }
    return model, batch


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--llm", choices=sorted(LLM_SHAPES), default="smol")
    parser.add_argument("--steps", type=int, default=5)
    parser.add_argument("--new-tokens", type=int, default=32)
    parser.add_argument(
        "--connector",
        choices=("c-abstractor", "mlp"),
        default="c-abstractor",
        help="mm15's connector: MM1.5's C-Abstractor, or the MLP baseline (LLaVA-NeXT's projector type)",
    )
    args = parser.parse_args()
    warnings.filterwarnings("ignore")
    torch.manual_seed(0)
    llm = LLM_SHAPES[args.llm]
    dtype = fast_dtype()
    peak = matmul_rate(dtype, repeats=5)  # the 1024-cube rate, as the training-step benchmarks
    print(
        f"machine: {platform.machine()}, torch {torch.__version__}, {torch.get_num_threads()} threads; "
        f"compute dtype {dtype} (bf16 matmuls fast here: {bf16_matmul_is_fast()}), measured {dtype} "
        f"matmul {peak / 1e9:.0f} GFLOP/s; LLM shape: {args.llm}; mm15 connector: {args.connector}"
    )
    # Both rates side by side, small enough to finish where bf16 is emulated (about 1 GFLOP/s).
    print(
        f"matmul 512^3: float32 {matmul_rate(torch.float32, n=512, trials=1) / 1e9:.0f} GFLOP/s, "
        f"bfloat16 {matmul_rate(torch.bfloat16, n=512, repeats=2, trials=1) / 1e9:.1f} GFLOP/s"
    )

    ours, our_batch = build_mm15(llm, args.connector)
    ref, ref_batch = build_llava_next(replace(llm), image_token=ours.image_token_id)
    ours.train()
    ref.train()

    def our_step() -> None:
        with autocast(dtype):
            out = ours(
                our_batch["input_ids"],
                our_batch["attention_mask"],
                our_batch["pixel_values"],
                labels=labels_for(our_batch["input_ids"], ours.image_token_id),
            )
        out.loss.backward()
        ours.zero_grad(set_to_none=True)

    def ref_step() -> None:
        with autocast(dtype):
            out = ref(**ref_batch, labels=labels_for(ref_batch["input_ids"], ours.image_token_id))
        out.loss.backward()
        ref.zero_grad(set_to_none=True)

    rows = []
    tiles = our_batch["pixel_values"].shape[0]
    step_times = alternate([seconds_of(our_step), seconds_of(ref_step)], args.steps)
    for name, times, batch, weights in (
        ("mm15", step_times[0], our_batch, mm15_flop_weights(ours)),
        ("LlavaNext", step_times[1], ref_batch, llava_next_flop_weights(ref)),
    ):
        seconds = statistics.median(times)
        tokens = batch["input_ids"].shape[1]
        is_image = batch["input_ids"] == ours.image_token_id
        work = StepWork(
            tokens=tokens,
            supervised=int((~is_image[:, 1:]).sum()),  # labels_for: every text token after the first
            patches=tiles * 196,
            image_tokens=int(is_image.sum()),
        )
        flops = weights.step_flops(work)
        rows.append(
            {
                "name": name,
                "tokens": tokens,
                "step": seconds,
                "tok_s": tokens / seconds,
                "mfu": flops / seconds / peak,
            }
        )

    ours.eval()
    ref.eval()
    gen = GenerationConfig(max_new_tokens=args.new_tokens)

    def our_generate() -> list[float]:
        """Seconds from the call to each new token (the stream yields once per decoding step)."""
        start, stamps = time.perf_counter(), []
        with autocast(dtype):
            for _ in stream(ours, our_batch, gen):
                stamps.append(time.perf_counter() - start)
        return stamps

    def ref_generate() -> list[float]:
        """The same for transformers' generate, through its streamer hook (called once per token)."""
        stamps: list[float] = []

        class Clock:
            def put(self, value: torch.Tensor) -> None:
                stamps.append(time.perf_counter() - start)

            def end(self) -> None:
                pass

        with autocast(dtype), torch.no_grad():
            start = time.perf_counter()
            ref.generate(
                **ref_batch,
                max_new_tokens=args.new_tokens,
                min_new_tokens=args.new_tokens,
                do_sample=False,
                streamer=Clock(),
            )
        return stamps[1:]  # the first put is the prompt

    for row, runs in zip(rows, alternate([our_generate, ref_generate], max(2, args.steps)), strict=True):
        row["ttft"] = statistics.median(run[0] for run in runs)
        # Median time between consecutive tokens over every run: robust to a stray slow step.
        steps = [later - earlier for run in runs for earlier, later in itertools.pairwise(run)]
        row["decode"] = 1.0 / statistics.median(steps)
        row["made"] = len(runs[0])

    print()
    print(
        "| model | sequence tokens | train step (s) | train tokens/s | MFU | time to first token (s) "
        "| decode tokens/s |"
    )
    print("|---|---|---|---|---|---|---|")
    for row in rows:
        print(
            f"| {row['name']} | {row['tokens']} | {row['step']:.3f} | {row['tok_s']:.0f} | {row['mfu']:.1%} "
            f"| {row['ttft']:.3f} | {row['decode']:.1f} |"
        )
    ours_row, ref_row = rows
    print()
    print(
        f"mm15 / LlavaNext: train tokens/s {ours_row['tok_s'] / ref_row['tok_s']:.2f}x, "
        # Inverted so that, like the other two, above 1 means mm15 is faster.
        f"time to first token (speed) {ref_row['ttft'] / ours_row['ttft']:.2f}x, "
        f"decode {ours_row['decode'] / ref_row['decode']:.2f}x "
        f"(decoded {ours_row['made']} and {ref_row['made']} tokens)"
    )


if __name__ == "__main__":
    main()
