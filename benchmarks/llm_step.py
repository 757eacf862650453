"""The decoder's own training-step ceiling: a text-only step of a preset's LLM, eager and compiled, with MFU.

What MFU can a training step of this decoder reach on this machine with nothing multimodal around it?
One row of ``--length`` random tokens, every position supervised (so the LM head's work is all needed),
forward and backward under autocast in the compute dtype, gradient clipping and the fused AdamW mm15
trains with; eager, then ``torch.compile`` of the whole model (warmed up before timing). MFU is model
FLOPs (``mm15.train.flops``: decoder weights x tokens + LM head x supervised positions) over the
median step time (every step does the same work, so this is the median of the per-step rates, the
statistic ``benchmarks/train_step.py`` reports) and the n-cubed matmul rate measured in the same run.
It bounds what the full multimodal step of ``train_step.py`` can reach:
that step adds an encoder and a connector with smaller matrices.

Usage: ``python benchmarks/llm_step.py [--preset smol] [--length 1024] [--steps 4]``; results in
docs/benchmarks.md.
"""

from __future__ import annotations

import argparse
import os
import platform
import statistics
import time
import warnings

import torch

from mm15.hardware import autocast, fast_dtype, matmul_rate
from mm15.model.llm import load_llm
from mm15.model.presets import preset
from mm15.train.flops import FlopWeights, StepWork, causal_lm_weights


def time_steps(
    llm: torch.nn.Module, length: int, steps: int, dtype: torch.dtype, compiled: bool
) -> list[float]:
    """Seconds per training step over ``steps`` timed steps (two untimed warm-up steps first)."""
    llm.train()
    forward = torch.compile(llm) if compiled else llm
    optimizer = torch.optim.AdamW(llm.parameters(), lr=1e-4, fused=True)
    generator = torch.Generator().manual_seed(0)
    ids = torch.randint(0, llm.config.vocab_size, (1, length), generator=generator)

    def step() -> None:
        with autocast(dtype):
            loss = forward(input_ids=ids, labels=ids).loss
        loss.backward()
        torch.nn.utils.clip_grad_norm_(llm.parameters(), 1.0)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)

    for _ in range(2):
        step()
    times = []
    for _ in range(steps):
        start = time.perf_counter()
        step()
        times.append(time.perf_counter() - start)
    return times


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--preset", default="smol", help="the preset whose LLM to time (default smol)")
    parser.add_argument("--length", type=int, default=1024, help="tokens in the one training row")
    parser.add_argument("--steps", type=int, default=4, help="timed steps per mode")
    args = parser.parse_args()
    warnings.filterwarnings("ignore")
    os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
    dtype = fast_dtype()
    peak = matmul_rate(dtype, repeats=5)
    print(
        f"machine: {platform.machine()}, {os.cpu_count()} cores, torch {torch.__version__}, "
        f"{torch.get_num_threads()} threads; compute dtype {dtype}, "
        f"measured matmul {peak / 1e9:.0f} GFLOP/s; preset {args.preset}, "
        f"1 x {args.length} tokens, {args.steps} timed steps"
    )
    print("| mode | step s (median) | step s (range) | tokens/s | model GFLOP/s | MFU |")
    print("|---|---|---|---|---|---|")
    for compiled in (False, True):
        torch.manual_seed(0)
        llm, _ = load_llm(preset(args.preset).llm)
        decoder, head = causal_lm_weights(llm)
        work = StepWork(tokens=args.length, supervised=args.length - 1, patches=0, image_tokens=0)
        step_flops = FlopWeights(decoder=decoder, head=head, encoder=0).step_flops(work)
        times = time_steps(llm, args.length, args.steps, dtype, compiled)
        median = statistics.median(times)
        rate = step_flops / median
        print(
            f"| {'compiled' if compiled else 'eager'} | {median:.2f} | {min(times):.2f}-{max(times):.2f} | "
            f"{args.length / median:.0f} | {rate / 1e9:.0f} | {rate / peak:.1%} |"
        )
        del llm


if __name__ == "__main__":
    main()
