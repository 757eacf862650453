"""This machine's matmul rates: float32 against bfloat16, the numbers behind ``mm15.hardware.fast_dtype``.

Usage: ``python benchmarks/matmul.py [--sizes 256 512 1024 2048] [--trials 5]``. Prints GFLOP/s per size
and dtype (the best of ``--trials`` timings, as ``matmul_rate`` measures the MFU denominator) and the
bf16 / float32 ratio; ``--trials 1`` run a few times shows how much a single timing varies; see
docs/benchmarks.md.

On a CPU without bf16 units torch emulates bf16 at about 1 GFLOP/s, so a 2048-cube product takes over a
minute and the default sizes would run for half an hour: there bf16 is timed once per size up to
``EMULATED_MAX_N`` and marked "emulated, not timed" above it.
"""

from __future__ import annotations

import argparse
import os
import platform

import torch

from mm15.hardware import bf16_matmul_is_fast, fast_dtype, matmul_rate

# Largest size at which emulated bf16 is still timed: one 512-cube product takes about a quarter second.
EMULATED_MAX_N = 512


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--sizes", type=int, nargs="+", default=[256, 512, 1024, 2048])
    parser.add_argument("--trials", type=int, default=5, help="timings per rate; the best is printed")
    args = parser.parse_args()
    emulated = not bf16_matmul_is_fast()
    print(
        f"machine: {platform.machine()}, {os.cpu_count()} cores, torch {torch.__version__} "
        f"({torch.get_num_threads()} threads); fast_dtype() = {fast_dtype()}"
        + ("; bf16 is emulated here (slower than float32)" if emulated else "")
    )
    print("| n | float32 GFLOP/s | bfloat16 GFLOP/s | bf16 / fp32 |")
    print("|---|---|---|---|")
    for n in args.sizes:
        fp32 = matmul_rate(torch.float32, n=n, repeats=5, trials=args.trials)
        if not emulated:
            bf16 = matmul_rate(torch.bfloat16, n=n, repeats=5, trials=args.trials)
        elif n <= EMULATED_MAX_N:
            bf16 = matmul_rate(torch.bfloat16, n=n, repeats=1, trials=1)
        else:
            print(f"| {n} | {fp32 / 1e9:.0f} | emulated, not timed | - |")
            continue
        digits = 1 if emulated else 0  # emulated rates are around 1 GFLOP/s
        print(f"| {n} | {fp32 / 1e9:.0f} | {bf16 / 1e9:.{digits}f} | {bf16 / fp32:.2f}x |")


if __name__ == "__main__":
    main()
