"""Unmasked attention on the CPU: SDPA against ``mm15.model.attention.short_attention``, the numbers behind
the vision encoder's ``SHORT_ATTENTION_MAX_LEN``.

Usage: ``python benchmarks/attention.py [--repeats 20]``. For each (batch, heads, tokens, head dim) shape
it times a forward and backward pass of ``F.scaled_dot_product_attention`` under bf16 autocast and in
float32, and of ``short_attention`` under bf16 autocast (the path ``encoder_attention`` takes), taking
turns so that a drift of the machine's speed moves all three alike, and prints the median milliseconds
and SDPA bf16 / short. Where bf16 is emulated (no bf16 units) the bf16 columns mean nothing: the header
prints ``fast_dtype()``. See docs/benchmarks.md.
"""

from __future__ import annotations

import argparse
import platform
import statistics
import time
from collections.abc import Callable

import torch
import torch.nn.functional as F

from mm15.hardware import fast_dtype
from mm15.model.attention import SHORT_ATTENTION_MAX_LEN, short_attention

# The tiny preset's encoder (64-px tiles of 8-px patches, 4 heads), a ViT-B/16 at 224 px on 5 tiles, lengths
# up to and past the cut-off, and CLIP-L/14 at 336 px.
SHAPES = [
    (40, 4, 65, 16),
    (5, 6, 197, 64),
    (16, 6, 145, 64),
    (8, 6, 325, 64),
    (4, 6, 385, 64),
    (5, 12, 577, 64),
]


def forward_backward(
    attend: Callable[..., torch.Tensor], dtype: torch.dtype | None, shape: tuple
) -> Callable:
    q, k, v = (torch.randn(shape, requires_grad=True) for _ in range(3))

    def run() -> None:
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=dtype is not None):
            out = attend(q, k, v)
        out.float().sum().backward()

    return run


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--repeats", type=int, default=20, help="timed rounds per shape (after 3 warm-ups)")
    args = parser.parse_args()
    torch.manual_seed(0)
    print(
        f"machine: {platform.machine()}, torch {torch.__version__}, {torch.get_num_threads()} threads; "
        f"fast_dtype() = {fast_dtype()}; short path up to {SHORT_ATTENTION_MAX_LEN} keys"
    )
    print(
        "| shape (batch, heads, tokens, head dim) | SDPA bf16 (ms) | SDPA float32 (ms) "
        "| short_attention bf16 (ms) | SDPA bf16 / short |"
    )
    print("|---|---|---|---|---|")
    for shape in SHAPES:
        runs = {
            "sdpa_bf16": forward_backward(F.scaled_dot_product_attention, torch.bfloat16, shape),
            "sdpa_fp32": forward_backward(F.scaled_dot_product_attention, None, shape),
            "short": forward_backward(short_attention, torch.bfloat16, shape),
        }
        times: dict[str, list[float]] = {name: [] for name in runs}
        for round_ in range(3 + args.repeats):
            for name, run in runs.items():
                start = time.perf_counter()
                run()
                if round_ >= 3:
                    times[name].append(time.perf_counter() - start)
        ms = {name: statistics.median(t) * 1e3 for name, t in times.items()}
        print(
            f"| {', '.join(map(str, shape))} | {ms['sdpa_bf16']:.1f} | {ms['sdpa_fp32']:.1f} "
            f"| {ms['short']:.1f} | {ms['sdpa_bf16'] / ms['short']:.2f}x |"
        )


if __name__ == "__main__":
    main()
