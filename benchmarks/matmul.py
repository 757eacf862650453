"""This machine's matmul rates: float32 against bfloat16, the numbers behind ``mm15.hardware.fast_dtype``.

Usage: ``python benchmarks/matmul.py [--sizes 256 512 1024 2048] [--trials 5]``. Prints GFLOP/s per size
and dtype (the best of ``--trials`` timings, as ``matmul_rate`` measures the MFU denominator) and the
bf16 / float32 ratio; ``--trials 1`` run a few times shows how much a single timing varies; see
docs/benchmarks.md. On a CPU without bf16 units, bf16 is emulated
and the large sizes take a while.
"""

from __future__ import annotations

import argparse
import os
import platform

import torch

from mm15.hardware import fast_dtype, matmul_rate


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--sizes", type=int, nargs="+", default=[256, 512, 1024, 2048])
    parser.add_argument("--trials", type=int, default=5, help="timings per rate; the best is printed")
    args = parser.parse_args()
    print(
        f"machine: {platform.machine()}, {os.cpu_count()} cores, torch {torch.__version__} "
        f"({torch.get_num_threads()} threads); fast_dtype() = {fast_dtype()}"
    )
    print("| n | float32 GFLOP/s | bfloat16 GFLOP/s | bf16 / fp32 |")
    print("|---|---|---|---|")
    for n in args.sizes:
        fp32 = matmul_rate(torch.float32, n=n, repeats=5, trials=args.trials)
        bf16 = matmul_rate(torch.bfloat16, n=n, repeats=5, trials=args.trials)
        print(f"| {n} | {fp32 / 1e9:.0f} | {bf16 / 1e9:.0f} | {bf16 / fp32:.2f}x |")


if __name__ == "__main__":
    main()
