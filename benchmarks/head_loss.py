"""The LM head and its cross-entropy: mm15's fused, blocked version against the unfused reference.

Both compute per-token next-token losses for N supervised positions of a (V, D) head, weight them
(as the trainer's per-sample weighting does) and run backward:

* reference: ``F.cross_entropy(F.linear(h, W).float(), targets, reduction="none")``, which is what
  mm15 ran before and what Hugging Face models run (they also do it at every position, not only the
  supervised ones);
* mm15: ``mm15.model.head_loss.head_token_losses``, vocabulary blocks of a few MB, logits recomputed
  in backward, never stored.

Each variant runs in a fresh process, so its peak resident memory is its own: the table gives the
median time of forward + backward over ``--repeats`` runs and the peak growth of resident memory over
the process's size after building the operands. The shapes are the tiny recipe's (SmolLM2's 49,152-word
vocabulary at width 128: an SFT micro-batch, an OCR micro-batch with its long transcriptions) and the
smol preset's (width 576). Compute dtype: ``mm15.hardware.fast_dtype()`` (bf16 autocast where bf16 is
fast), as training uses; ``--dtype float32`` forces float32.

Usage: ``python benchmarks/head_loss.py [--repeats 5] [--dtype float32]``; results in docs/benchmarks.md.
"""

from __future__ import annotations

import argparse
import multiprocessing as mp
import platform
import resource
import statistics
import time

import torch
import torch.nn.functional as F

from mm15.hardware import autocast, fast_dtype
from mm15.model.head_loss import head_token_losses

VOCAB = 49_153  # SmolLM2's 49,152 words plus mm15's image token
SHAPES = (  # (what, supervised positions, width)
    ("tiny SFT micro-batch", 128, 128),
    ("tiny OCR micro-batch", 6000, 128),
    ("smol SFT micro-batch", 512, 576),
)


def reference(hidden: torch.Tensor, weight: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    return F.cross_entropy(F.linear(hidden, weight).float(), targets, reduction="none")


def fused(hidden: torch.Tensor, weight: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    return head_token_losses(hidden, weight, targets)


def _rss_mib() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def measure(variant: str, rows: int, width: int, dtype_name: str, repeats: int, out: mp.Queue) -> None:
    """In a fresh process: median seconds of forward + backward, and peak RSS growth in MiB."""
    torch.manual_seed(0)
    dtype = getattr(torch, dtype_name)
    fn = reference if variant == "reference" else fused
    hidden = torch.randn(rows, width, requires_grad=True)
    weight = (torch.randn(VOCAB, width) * 0.02).requires_grad_()
    targets = torch.randint(0, VOCAB, (rows,))
    scale = torch.rand(rows)
    base = _rss_mib()
    times = []
    for _ in range(repeats + 1):  # the first run is a warm-up
        hidden.grad = weight.grad = None
        start = time.perf_counter()
        with autocast(dtype):
            losses = fn(hidden, weight, targets)
        (losses * scale).sum().backward()
        times.append(time.perf_counter() - start)
    out.put((statistics.median(times[1:]), _rss_mib() - base))


def run(variant: str, rows: int, width: int, dtype: torch.dtype, repeats: int) -> tuple[float, float]:
    context = mp.get_context("spawn")
    queue: mp.Queue = context.Queue()
    name = str(dtype).removeprefix("torch.")
    process = context.Process(target=measure, args=(variant, rows, width, name, repeats, queue))
    process.start()
    result = queue.get()
    process.join()
    return result


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--dtype", choices=("auto", "float32", "bfloat16"), default="auto")
    args = parser.parse_args()
    dtype = fast_dtype() if args.dtype == "auto" else getattr(torch, args.dtype)
    print(
        f"machine: {platform.processor() or platform.machine()}, torch {torch.__version__}, "
        f"{torch.get_num_threads()} threads; compute dtype {dtype}; vocabulary {VOCAB}; "
        f"median of {args.repeats} forward+backward runs, each variant in a fresh process"
    )
    print()
    print(
        "| shape | N x D | reference ms | mm15 ms | speed-up | reference peak MiB | mm15 peak MiB "
        "| memory saved |"
    )
    print("|---|---|---|---|---|---|---|---|")
    for what, rows, width in SHAPES:
        ref_s, ref_mib = run("reference", rows, width, dtype, args.repeats)
        our_s, our_mib = run("fused", rows, width, dtype, args.repeats)
        print(
            f"| {what} | {rows} x {width} | {ref_s * 1e3:.1f} | {our_s * 1e3:.1f} | {ref_s / our_s:.2f}x "
            f"| {ref_mib:.0f} | {our_mib:.0f} | {ref_mib / max(our_mib, 1):.1f}x |"
        )


if __name__ == "__main__":
    main()
